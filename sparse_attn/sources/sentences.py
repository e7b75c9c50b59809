"""Example sentences, in English and Chinese, that the default model (all-MiniLM-L6-v2) can read.

The model's vocabulary holds only 244 single Chinese characters, so most
Chinese text becomes ``[UNK]``. The Chinese sentences here use only those
characters (the tests check every one gives no ``[UNK]``) and still read as a
native speaker writes.

Each sentence may name one link worth looking at (``Look``): a layer, a head
and a query token whose strongest key is the named one. The English ones show
a head that links a pronoun or a verb back to its subject ("it" -> "cat"); the
Chinese ones a head that links a repeated character to its first occurrence.
The tests check each link on the model itself (the key is the query's
strongest, with at least 0.4 of its weight).
"""
from __future__ import annotations

from dataclasses import dataclass

__all__ = ["Look", "Sentence", "SENTENCES", "sentences", "sentence"]


@dataclass(frozen=True)
class Look:
    """Query token ``query`` attends most to key token ``key`` in (``layer``, ``head``); positions count [CLS] as 0."""

    layer: int
    head: int
    query: int
    key: int
    query_token: str   # the token strings at those positions, for a reader (and a check that positions still fit)
    key_token: str


@dataclass(frozen=True)
class Sentence:
    id: str
    lang: str
    text: str
    look: Look | None = None


SENTENCES: tuple[Sentence, ...] = (
    Sentence("en_cat", "en", "The cat did not eat the fish because it was not hungry.",
             Look(3, 1, 9, 2, "it", "cat")),
    Sentence("en_animal", "en", "The animal did not cross the street because it was too tired.",
             Look(3, 1, 9, 2, "it", "animal")),
    Sentence("en_trophy", "en", "The trophy did not fit in the suitcase because it was too big.",
             Look(3, 1, 10, 2, "it", "trophy")),
    Sentence("en_keys", "en", "The keys to the old cabinet are on the kitchen table.",
             Look(3, 1, 7, 2, "are", "keys")),
    # Chinese: only characters in the model's vocabulary (no 在, 是, 很, 了 ...).
    Sentence("zh_moon", "zh", "天上有月，水中也有月。", Look(2, 9, 10, 4, "月", "月")),
    Sentence("zh_village", "zh", "山下有一小村，村里有一口古井。", Look(2, 9, 8, 6, "村", "村")),
    Sentence("zh_birthday", "zh", "我和小王同年同月同日生。", Look(2, 9, 9, 5, "同", "同")),
    Sentence("zh_seasons", "zh", "北京的秋天真美，南京的春天也真美。", Look(2, 9, 16, 7, "美", "美")),
    Sentence("zh_history", "zh", "中国有五千年的文明史。"),
)


def sentences(lang: str | None = None) -> tuple[Sentence, ...]:
    """The sentences in ``lang`` ("en" / "zh"), or all of them (None)."""
    if lang is not None and lang not in ("en", "zh"):
        raise ValueError(f"lang must be 'en', 'zh' or None, got {lang!r}")
    return tuple(s for s in SENTENCES if lang is None or s.lang == lang)


def sentence(id: str) -> Sentence:
    """The sentence with this id."""
    for s in SENTENCES:
        if s.id == id:
            return s
    raise ValueError(f"id must be one of {', '.join(s.id for s in SENTENCES)}, got {id!r}")
