"""The catalogs: same keys, no empty strings, same placeholders, and the glossary followed."""
import re
import string

import pytest

from sparse_attn.i18n import LANGS, catalog, glossary, normalize_lang, t


def _fields(template: str) -> set[str]:
    return {name for _, name, _, _ in string.Formatter().parse(template) if name}


def test_same_keys_and_no_empty_strings():
    en, zh = catalog("en"), catalog("zh")
    assert set(en) == set(zh), set(en) ^ set(zh)
    for lang in LANGS:
        empty = [k for k, v in catalog(lang).items() if not isinstance(v, str) or not v.strip()]
        assert not empty, (lang, empty)


def test_same_placeholders_in_both_languages():
    en, zh = catalog("en"), catalog("zh")
    diff = {k: (_fields(en[k]), _fields(zh[k])) for k in en if _fields(en[k]) != _fields(zh[k])}
    assert not diff


def test_chinese_strings_are_chinese():
    # A copied English string in the zh catalog would pass the key check; most labels must differ.
    en, zh = catalog("en"), catalog("zh")
    same = [k for k in en if en[k] == zh[k]]
    assert set(same) <= {"explain.k"}, same
    cjk = re.compile(r"[\u4e00-\u9fff]")
    no_cjk = [k for k, v in zh.items() if not cjk.search(v) and k not in same]
    assert not no_cjk, no_cjk


# Core glossary terms (English pattern -> required Chinese term) checked across the catalogs.
CORE = {
    r"\bsparse attention\b": "稀疏注意力",
    r"\bimportance sampling\b": "重要性采样",
    r"\bqueries\b|\bquery\b": "查询",
    r"\bchunks?\b": "分块",
    r"\battention\b": "注意力",
}


@pytest.mark.parametrize("pattern", sorted(CORE))
def test_glossary_terms_are_used(pattern):
    en, zh = catalog("en"), catalog("zh")
    term = CORE[pattern]
    assert glossary()  # the glossary file itself loads
    missing = []
    for key, text in en.items():
        plain = re.sub(r"\{[^}]*\}", "", text)  # placeholders are not words
        if re.search(pattern, plain, flags=re.IGNORECASE) and term not in zh[key]:
            missing.append((key, zh[key]))
    assert not missing


def test_glossary_has_the_project_terms():
    g = glossary()
    for en_term, zh_term in {"attention": "注意力", "sparse attention": "稀疏注意力", "top-k selection": "Top-k 选择",
                             "importance sampling": "重要性采样", "query": "查询", "key": "键", "value": "值",
                             "head": "注意力头", "chunk": "分块"}.items():
        assert g[en_term] == zh_term


def test_every_registry_entry_has_a_name_in_both_catalogs():
    from sparse_attn.methods import METHODS, ROLES

    assert {m.role for m in METHODS.values()} <= set(ROLES)
    for lang in LANGS:
        missing = [key for key in METHODS if f"method.{key}" not in catalog(lang)]
        assert not missing, (lang, missing)


def test_t_fills_params_and_fails_loudly():
    assert t("err.k_too_small", "en", value=0).startswith("k must be at least 1 (got 0)")
    assert "0" in t("err.k_too_small", "zh", value=0)
    with pytest.raises(KeyError, match="no.such.key"):
        t("no.such.key", "en")
    with pytest.raises(ValueError, match="lang"):
        t("app.title", "fr")


@pytest.mark.parametrize("raw, want", [("zh", "zh"), ("zh-CN", "zh"), ("EN", "en"), ("fr", "en"), (None, "en")])
def test_normalize_lang(raw, want):
    assert normalize_lang(raw) == want
