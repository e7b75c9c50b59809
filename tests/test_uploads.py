"""Uploads as a student meets them: every refusal names what is wrong, in the reader's language, in place of the picture.

The reader's checks are in test_sources.py; here are the words (both languages, no English left in the
Chinese, no advice to unpickle, names as plain text, sizes in MiB), the browser's refusals standing in for the
upload, and the app's maps panel through AppTest. The browser itself is in tests/browser/test_upload_browser.py.
"""
from __future__ import annotations

import io
import json
import pickle
import re
import struct
import tomllib
import zipfile
from pathlib import Path

import numpy as np
import pytest
from streamlit.testing.v1 import AppTest

from sparse_attn.i18n import LANGS, catalog, t
from sparse_attn.sources import ERROR_CODES, FILE_SUFFIXES, Source, SourceError, load
from sparse_attn.ui import errors, inputs, markup
from sparse_attn.ui.charts import elements as chart_elements

ROOT = Path(__file__).resolve().parent.parent
APP = str(ROOT / "app.py")
MIB = 2**20
rng = np.random.default_rng(0)
GOOD = rng.standard_normal((1, 2, 20, 8)).astype(np.float32)


def npy(arr, **kw) -> bytes:
    buf = io.BytesIO()
    np.save(buf, arr, **kw)
    return buf.getvalue()


def npz(**arrays) -> bytes:
    buf = io.BytesIO()
    np.savez(buf, **arrays)
    return buf.getvalue()


def huge_header() -> bytes:
    """A .npy of a hundred bytes whose header claims (1, 61, 16384, 32768) float32: 122 GiB."""
    header = repr({"descr": "<f4", "fortran_order": False, "shape": (1, 61, 2**14, 2**15)}).encode()
    header += b" " * (-(10 + len(header) + 1) % 64) + b"\n"
    return b"\x93NUMPY\x01\x00" + struct.pack("<H", len(header)) + header + b"\0" * 64


def forged_npz() -> bytes:
    """A .npz whose zip directory says entry k.npy is 100 bytes longer than its data."""
    data = bytearray(npz(q=GOOD, k=GOOD))
    at = data.index(b"PK\x01\x02", data.index(b"PK\x01\x02") + 4)  # the second directory entry: k.npy
    assert data[at + 46 : at + 51] == b"k.npy"
    size = struct.unpack("<I", data[at + 24 : at + 28])[0]
    data[at + 24 : at + 28] = struct.pack("<I", size + 100)
    return bytes(data)


def refusal(name: str, data: bytes, max_bytes: int = inputs.MAX_UPLOAD_BYTES) -> SourceError:
    with pytest.raises(SourceError) as info:
        load(Source.file(data=data, name=name, max_bytes=max_bytes))
    return info.value


# name, bytes, the code, and words each language's message must hold (what a student needs to read).
CASES = {
    "text": ("notes.npy", b"q, k, v\n0.1, 0.2, 0.3\n" * 20, "not_npy", {"en": "not in .npy format", "zh": "不是 .npy 格式"}),
    "raw_pickle": ("evil.npy", pickle.dumps({"q": 1}), "raw_pickle", {"en": "Python pickle", "zh": "Python pickle"}),
    "object": ("obj.npy", npy(np.array([{"a": 1}], dtype=object), allow_pickle=True), "pickle",
               {"en": "object array", "zh": "对象数组"}),
    "huge_header": ("huge.npy", huge_header(), "header_too_large", {"en": "122 GiB", "zh": "122 GiB"}),
    "cut": ("cut.npy", npy(GOOD)[:-7], "truncated", {"en": "incomplete", "zh": "不完整"}),
    "forged": ("forged.npz", forged_npz(), "archive_mismatch", {"en": "zip directory", "zh": "zip 目录"}),
    "suffix": ("weights.pt", b"\0" * 10, "bad_suffix", {"en": "not supported", "zh": "不支持"}),
    "not_zip": ("broken.npz", b"PK but not a zip", "bad_format", {"en": "not a valid .npz", "zh": "不是有效的 .npz"}),
    "bomb": ("bomb.npz", None, "unpacks_too_large", {"en": "unpack", "zh": "解压"}),
    "missing": ("kv.npz", npz(k=GOOD, v=GOOD), "missing_array", {"en": "no array named", "zh": "没有名为"}),
    "shape": ("flat.npy", npy(GOOD[0, 0]), "bad_shape", {"en": "x[None, None]", "zh": "x[None, None]"}),
    "dtype": ("ints.npz", npz(q=GOOD.astype(np.int32), k=GOOD), "bad_dtype", {"en": "int32", "zh": "int32"}),
    "nan": ("nan.npz", npz(q=np.where(GOOD > 1, np.nan, GOOD), k=GOOD), "non_finite", {"en": "NaN", "zh": "NaN"}),
    "fit": ("fit.npz", npz(q=GOOD, k=GOOD[..., :4]), "qkv_mismatch", {"en": "do not fit", "zh": "无法配合"}),
}


def case_error(case: str) -> SourceError:
    name, data, _, _ = CASES[case]
    if case == "bomb":
        buf = io.BytesIO()
        np.savez_compressed(buf, q=np.zeros((1, 1, 4096, 1024)), k=np.zeros((1, 1, 4096, 1024)))  # 64 MiB unpacked
        data = buf.getvalue()
        assert len(data) < MIB
    return refusal(name, data)


# What may stay Latin in a Chinese message: code, names of formats, functions and dtypes.
TECHNICAL = re.compile(r"`[^`]*`|\b(?:safetensors|Python|pickle|unpickle|NaN|"
                       r"zip|npy|npz|float\d+|bfloat16|int\d+|[KMG]iB|B|q|k|v|x|H|L|D|Dv|Hkv|None)\b")


def latin_words(text: str) -> list[str]:
    return re.findall(r"[A-Za-z]{2,}", TECHNICAL.sub(" ", text))


@pytest.mark.parametrize("case", sorted(CASES))
def test_each_refusal_says_what_is_wrong_in_each_language(case):
    err = case_error(case)
    assert err.code == CASES[case][2], (err.code, str(err))
    name = CASES[case][0]
    seen = {}
    for lang in LANGS:
        msg = errors.message(err, lang)
        seen[lang] = msg
        assert CASES[case][3][lang] in msg, msg
        assert markup.code_span(name) in msg  # the file, named as inline code
        assert "allow_pickle" not in msg
        # Not one of the generic fallbacks that wrap an exception's English text.
        for generic in ("err.invalid", "err.unexpected"):
            assert not msg.startswith(catalog(lang)[generic].split("{")[0]), msg
    assert not latin_words(seen["zh"]), (seen["zh"], latin_words(seen["zh"]))
    assert seen["en"] != seen["zh"]


def test_a_text_file_is_not_called_a_pickle_and_nothing_advises_unpickling():
    msg = {lang: errors.message(case_error("text"), lang) for lang in LANGS}
    assert "pickle" not in msg["en"].lower() and "pickle" not in msg["zh"].lower()
    for lang in LANGS:
        assert not [k for k, v in catalog(lang).items() if "allow_pickle" in v]


def test_every_file_error_code_has_a_message_in_both_languages():
    file_codes = {"missing_file", "bad_suffix", "bad_format", "not_npy", "raw_pickle", "pickle", "bad_header",
                  "header_too_large", "truncated", "archive_mismatch", "too_large", "unpacks_too_large",
                  "missing_array", "bad_shape", "qkv_mismatch", "bad_dtype", "non_finite"}
    assert file_codes <= set(ERROR_CODES)
    for lang in LANGS:
        for code in file_codes:
            template = catalog(lang)[f"err.source.{code}"]
            assert "{reason}" not in template, (lang, code)  # reason is English, for logs only


def test_sizes_are_in_binary_units_and_told_apart_at_the_limit():
    assert [markup.size_text(n) for n in (900, 1536, 64 * MIB, 70_000_000, 122 * 2**30)] == \
        ["900 B", "1.5 KiB", "64 MiB", "66.8 MiB", "122 GiB"]
    # 64 MiB and one byte is not "64 MiB over a 64 MiB limit".
    assert markup.size_texts(64 * MIB + 1, 64 * MIB) == ["64 MiB (67,108,865 B)", "64 MiB (67,108,864 B)"]
    err = inputs.Refused("big.npy", 70_000_000, "size").error()
    for lang in LANGS:
        msg = errors.message(err, lang)
        assert "66.8 MiB" in msg and "64 MiB" in msg
    # No decimal "MB" anywhere the app writes, and the limit is the one the server is configured with.
    for lang in LANGS:
        assert not [k for k, v in catalog(lang).items() if re.search(r"\d\s?[KMG]B\b", v)]
    with open(ROOT / ".streamlit" / "config.toml", "rb") as f:
        assert tomllib.load(f)["server"]["maxUploadSize"] * MIB == inputs.MAX_UPLOAD_BYTES  # Streamlit: MiB


def test_the_upload_hint_names_the_limit_and_every_format():
    for lang in LANGS:
        hint = t("io.upload_hint", lang, limit=markup.size_text(inputs.MAX_UPLOAD_BYTES))
        assert "64 MiB" in hint and all(s in hint for s in FILE_SUFFIXES)
        assert all(s in catalog(lang)["err.source.bad_suffix"] for s in FILE_SUFFIXES)


NASTY_NAMES = [
    "![x](http://a/b.png)[link](http://c).npy",
    "`tick`s``.npy",
    "$x^2$ :red[alert] <b>bold</b> **b** _i_.npz",
    "`",
    " ",
]


def unspan(span: str) -> str:
    """The text CommonMark reads from one code span: fence stripped, and one padding space either side."""
    fence = re.match(r"`+", span).group(0)
    assert span.endswith(fence)
    inner = span[len(fence):-len(fence)]
    return inner[1:-1] if inner.startswith(" ") and inner.endswith(" ") and inner.strip() else inner


@pytest.mark.parametrize("name", NASTY_NAMES)
def test_file_names_are_inline_code_whatever_they_hold(name):
    span = markup.code_span(name)
    if name.strip():
        assert unspan(span) == name
        fence = len(re.match(r"`+", span).group(0))
        assert fence not in {len(r) for r in re.findall(r"`+", name)}  # no run inside can close the span early
    err = inputs.Refused(name, 10, "suffix").error()
    for lang in LANGS:
        msg = errors.message(err, lang)
        assert span in msg
        if len(name.strip()) > 1:  # nothing of the name is left outside its span for Markdown to read
            assert name not in msg.replace(span, "")


def test_exception_text_is_escaped_not_rendered():
    msg = errors.message(ValueError("see ![x](http://a/b.png) and [y](http://c)"), "en")
    assert "![x](" not in msg and "[y](" not in msg and "\\[y\\]\\(http\\:" in msg


def test_a_refusal_lasts_until_the_uploader_holds_another_file():
    store = {}
    report = {"name": "big.npy", "size": 70_000_000, "reason": "size"}
    assert inputs.track_refusal(store, None, "old") is None
    assert inputs.track_refusal(store, report, "old") == inputs.Refused("big.npy", 70_000_000, "size")
    # Later runs (a slider moved) still see it while the uploader holds the old file ...
    assert inputs.track_refusal(store, None, "old") == inputs.Refused("big.npy", 70_000_000, "size")
    # ... and a newly accepted file, or removing the old one, ends it.
    assert inputs.track_refusal(store, None, "new") is None and inputs.track_refusal(store, None, "new") is None
    inputs.track_refusal(store, report, None)
    assert inputs.track_refusal(store, None, "first") is None
    # The report comes from the page: anything malformed is ignored.
    for bad in ({"name": 3, "size": 1, "reason": "size"}, {"name": "a", "size": -1, "reason": "size"},
                {"name": "a", "size": True, "reason": "size"}, {"name": "a", "size": 1, "reason": "other"}, "x", []):
        assert inputs.track_refusal({}, bad, None) is None


def test_a_refusal_stands_in_for_the_upload_with_its_own_code():
    s = {"source": "file"}
    with pytest.raises(SourceError) as info:
        inputs.source(s, inputs.Refused("big.npy", 70 * MIB, "size"))
    assert info.value.code == "too_large" and info.value.params["limit"] == 64 * MIB
    with pytest.raises(SourceError) as info:
        inputs.source(s, inputs.Refused("model.pt", 10, "suffix"))
    assert info.value.code == "bad_suffix" and info.value.params["suffix"] == ".pt"
    for lang in LANGS:
        caption = inputs.refusal_caption(inputs.Refused("big.npy", 70 * MIB, "size"), lang)
        assert "70 MiB" in caption and "64 MiB" in caption and "`big.npy`" in caption


def test_the_uploader_css_puts_each_languages_words_in():
    for lang in LANGS:
        css = inputs.uploader_css(lang)
        for key in ("io.upload_button", "io.drop_here"):
            assert f"content: {inputs._css_string(t(key, lang))}" in css
        assert "stFileUploaderDropzoneInstructions" in css  # Streamlit's "64MB per file" line is hidden
    assert 'content: "上传"' in inputs.uploader_css("zh")
    assert inputs._css_string('a"b\\c') == '"a\\22 b\\5c c"'


# ---------------------------------------------------------------- through the app (AppTest)


def run_app(**query) -> AppTest:
    at = AppTest.from_file(APP, default_timeout=120)
    for key, value in query.items():
        at.query_params[key] = str(value)
    return at.run()


def upload(at: AppTest, name: str, data: bytes) -> AppTest:
    return at.file_uploader(key=inputs.UPLOAD_KEY).set_value((name, data, "application/octet-stream")).run()


@pytest.mark.parametrize("lang", LANGS)
def test_a_bad_file_replaces_the_picture_and_a_good_one_brings_it_back(lang):
    at = run_app(source="file", lang=lang)
    assert not at.exception and [e.value for e in at.error] == [t("err.no_upload", lang)]
    upload(at, "good.npz", npz(q=GOOD, k=GOOD))
    assert not at.exception and not at.error and chart_elements(at)
    # A bad file after the good one: its message, in place of the earlier file's picture.
    for case in ("text", "forged", "huge_header"):
        name, data, _, words = CASES[case]
        upload(at, name, data)
        assert not at.exception
        assert [e.value for e in at.error] == [errors.message(case_error(case), lang)]
        assert words[lang] in at.error[0].value and not chart_elements(at)


def test_a_file_the_browser_refused_replaces_the_picture():
    # What the page reports when Streamlit's uploader refuses a file in the browser (it never reaches the server).
    at = AppTest.from_file(APP, default_timeout=120)
    at.query_params["source"] = "file"
    at.query_params["lang"] = "zh"
    at.session_state[inputs.REFUSED_KEY] = (inputs.Refused("big.npy", 70 * MIB, "size"), None)
    at.run()
    assert not at.exception
    want = errors.message(inputs.Refused("big.npy", 70 * MIB, "size").error(), "zh")
    assert [e.value for e in at.error] == [want] and "64 MiB" in want and not chart_elements(at)
    assert inputs.refusal_caption(inputs.Refused("big.npy", 70 * MIB, "size"), "zh") in [c.value for c in at.caption]


def test_the_catalog_files_of_this_part_hold_the_same_keys():
    files = {lang: json.loads((ROOT / "sparse_attn" / "i18n" / f"io.{lang}.json").read_text(encoding="utf-8"))
             for lang in LANGS}
    assert set(files["en"]) == set(files["zh"]) and files["en"]


def _zip_names(data: bytes) -> list[str]:
    return zipfile.ZipFile(io.BytesIO(data)).namelist()


def test_the_forged_archive_is_what_it_claims_to_be():
    # The fixture itself: a real .npz whose only change is the directory's size for k.npy.
    data = forged_npz()
    assert _zip_names(data) == ["q.npy", "k.npy"]
    assert zipfile.ZipFile(io.BytesIO(data)).getinfo("k.npy").file_size == len(npy(GOOD)) + 100
