"""The app's strings in English and Chinese, and the glossary both follow.

Catalogs are flat JSON objects with identical keys in both languages; values
are ``str.format`` templates. A language's catalog is ``<lang>.json`` (the
shared labels) merged with one file per part of the app, ``<part>.<lang>.json``
(``lessons.en.json``, ``nsa.zh.json``, ...): a key may live in one file only. ``t("metric.mass_kept", "zh")`` returns
the Chinese label; ``t("err.k_zero", "en", k=0)`` fills ``{k}``. The glossary
(``glossary.json``: English term -> 中文 term) is the vocabulary the catalogs
and the notebooks share. No Streamlit here: notebooks use the same strings.
"""
from __future__ import annotations

import json
from functools import lru_cache
from pathlib import Path

__all__ = ["LANGS", "LANG_NAMES", "t", "catalog", "glossary", "normalize_lang"]

LANGS = ("en", "zh")
# Each language names itself, so a reader can find their own in either UI.
LANG_NAMES = {"en": "English", "zh": "中文"}
_DIR = Path(__file__).parent


@lru_cache(maxsize=None)
def catalog(lang: str) -> dict[str, str]:
    """The full key -> template mapping for ``lang`` ("en" or "zh"); read once per process."""
    lang = normalize_lang(lang, strict=True)
    merged: dict[str, str] = {}
    for path in [_DIR / f"{lang}.json", *sorted(_DIR.glob(f"*.{lang}.json"))]:
        with open(path, encoding="utf-8") as f:
            part = json.load(f)
        twice = sorted(set(part) & set(merged))
        if twice:  # two files defining one key: which one wins would depend on file order
            raise ValueError(f"{path.name} repeats keys defined in another {lang} catalog file: {twice[:5]}")
        merged.update(part)
    return merged


@lru_cache(maxsize=None)
def glossary() -> dict[str, str]:
    """English term -> 中文 term, e.g. "sparse attention" -> "稀疏注意力"."""
    with open(_DIR / "glossary.json", encoding="utf-8") as f:
        return json.load(f)


def normalize_lang(lang: object, *, strict: bool = False) -> str:
    """"en" or "zh" from a setting or URL value ("zh-CN" -> "zh"); unknown -> "en" unless ``strict``."""
    if isinstance(lang, str):
        code = lang.strip().lower().split("-")[0].split("_")[0]
        if code in LANGS:
            return code
    if strict:
        raise ValueError(f"lang must be one of {LANGS}, got {lang!r}")
    return "en"


def t(key: str, lang: str = "en", /, **params: object) -> str:
    """The string ``key`` in ``lang``, with ``{name}`` placeholders filled from ``params``.

    Raises KeyError naming the key when it is missing, and ValueError for an
    unknown language, so a typo fails in tests instead of showing a raw key.
    """
    table = catalog(normalize_lang(lang, strict=True))
    try:
        template = table[key]
    except KeyError:
        raise KeyError(f"no string {key!r} in the {lang!r} catalog") from None
    return template.format(**params) if params else template
