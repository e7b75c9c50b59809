"""The model source on Chinese text: the [UNK] share is said, the notice exists, and the examples are readable."""
import re

import pytest
import torch

from sparse_attn.i18n import LANGS, catalog, t
from sparse_attn.ops import dense_attention
from sparse_attn.sources import Source, load, load_model
from sparse_attn.sources.model import unknown_tokens, vocab_counts
from sparse_attn.sources.sentences import SENTENCES, sentence, sentences

# The sentence: "The kitten sat on the mat, because it was warm there."
ZH_UNREADABLE = "小猫坐在垫子上，因为那里很暖和。"


@pytest.fixture(scope="module")
def minilm():
    return load_model()


def test_vocabulary_counts(minilm):
    # The numbers the sidebar notice states, read from the tokenizer itself.
    assert vocab_counts() == {"vocab": 30522, "han": 244}


def test_unreadable_chinese_gets_the_unknown_tokens_note(minilm):
    qkv = load(Source.model(ZH_UNREADABLE, layer=2))
    (note,) = [n for n in qkv.notes if n.code == "unknown_tokens"]
    # 16 tokens of text ([CLS] and [SEP] not counted), 9 of them [UNK]: 猫 坐 在 垫 因 为 那 很 暖.
    assert note.params == {"share": 9 / 16, "count": 9, "total": 16}
    assert qkv.tokens.count("[UNK]") == 9 and len(qkv.tokens) == 16 + 2
    assert unknown_tokens(ZH_UNREADABLE) == (9, 16)
    for lang in LANGS:
        shown = t("note.unknown_tokens", lang, **note.params)
        assert "9" in shown and "16" in shown and "56%" in shown, shown


def test_readable_text_gets_no_note_and_truncation_counts_kept_tokens(minilm):
    assert [n.code for n in load(Source.model("The cat sat on the mat.")).notes] == []
    # Unknown tokens are counted over what the model reads: cut to 5 tokens, [CLS] 小 [UNK] [UNK] [SEP].
    qkv = load(Source.model(ZH_UNREADABLE, max_tokens=5))
    assert [n.code for n in qkv.notes] == ["truncated", "unknown_tokens"]
    assert qkv.notes[1].params == {"share": 2 / 3, "count": 2, "total": 3}


@pytest.mark.parametrize("example", sentences("zh"), ids=lambda s: s.id)
def test_every_chinese_example_is_read_without_unknown_tokens(minilm, example):
    unknown, total = unknown_tokens(example.text)
    assert unknown / total <= 0.10 and unknown == 0, (example.text, unknown, total)
    assert total == len(re.sub(r"\s", "", example.text))  # one token per character: nothing merged or dropped
    assert not [n for n in load(Source.model(example.text)).notes if n.code == "unknown_tokens"]


def test_examples_cover_both_languages_and_english_reads_cleanly(minilm):
    assert len(sentences("en")) >= 4 and len(sentences("zh")) >= 4
    assert {s.lang for s in SENTENCES} == {"en", "zh"} and len({s.id for s in SENTENCES}) == len(SENTENCES)
    for s in sentences("en"):
        assert unknown_tokens(s.text)[0] == 0, s.text
    assert sentence("en_cat").text.startswith("The cat")
    with pytest.raises(ValueError, match="id must be one of"):
        sentence("nope")
    with pytest.raises(ValueError, match="lang"):
        sentences("fr")


@pytest.mark.parametrize("example", [s for s in SENTENCES if s.look is not None], ids=lambda s: s.id)
def test_each_named_link_is_the_querys_strongest(minilm, example):
    lk = example.look
    qkv = load(Source.model(example.text, layer=lk.layer))
    assert (qkv.tokens[lk.query], qkv.tokens[lk.key]) == (lk.query_token, lk.key_token)
    _, w = dense_attention(qkv.q.double(), qkv.k.double(), qkv.v.double(), scale=qkv.scale, return_weights=True)
    row = w[0, lk.head, lk.query]
    assert int(row.argmax()) == lk.key and row[lk.key] >= 0.4, (example.id, row[lk.key].item(), int(row.argmax()))
    # A Chinese example's link is a repeated character looking back at its first occurrence, not at itself.
    if example.lang == "zh":
        assert lk.key < lk.query and torch.isclose(row.sum(), torch.tensor(1.0, dtype=row.dtype))


def test_notice_strings_exist_in_both_languages():
    en, zh = catalog("en"), catalog("zh")
    for key in ("model.notice", "note.unknown_tokens", "model.example", "model.example_placeholder", "model.look"):
        assert key in en and key in zh, key
    notice = {lang: t("model.notice", lang, vocab="30,522", han=244) for lang in LANGS}
    assert "English" in notice["en"] and "[UNK]" in notice["en"] and "244" in notice["en"]
    assert "英文" in notice["zh"] and "[UNK]" in notice["zh"] and "244" in notice["zh"] and "汉字" in notice["zh"]
