"""The building blocks of a chapter source: prose in two languages, shared code, checked claims.

A chapter is a Python module with ``NUMBER``, ``SLUG``, ``TITLE`` (en/zh),
``TERMS`` (glossary keys the chapter teaches) and ``CELLS``, a list of the
objects below. ``notebooks/build.py`` turns it into one notebook per language.
"""
from __future__ import annotations

import re
import textwrap
from dataclasses import dataclass


def _clean(text: str) -> str:
    return textwrap.dedent(text).strip("\n")


_BLOCK = re.compile(r"^\s*(#|\||[-*>]\s|\d+\.\s|```)")


def _join_paragraph(paragraph: str) -> str:
    lines = paragraph.splitlines()
    if any(_BLOCK.match(line) for line in lines):
        return paragraph  # a list, table, heading or code block keeps its lines
    return "".join(line.strip() for line in lines)


def _clean_zh(text: str) -> str:
    """Dedent, and join the wrapped lines of plain paragraphs: a line break between
    Chinese characters renders as a stray space."""
    return "\n\n".join(_join_paragraph(p) for p in _clean(text).split("\n\n"))


@dataclass(frozen=True)
class Md:
    """A prose cell, written once in English and once in Chinese."""

    en: str
    zh: str

    def __post_init__(self):
        object.__setattr__(self, "en", _clean(self.en))
        object.__setattr__(self, "zh", _clean_zh(self.zh))


@dataclass(frozen=True)
class Code:
    """A code cell, identical in both notebooks (language-dependent text goes through ``tr`` or ``lang=LANG``)."""

    source: str

    def __post_init__(self):
        object.__setattr__(self, "source", _clean(self.source))


@dataclass(frozen=True)
class Claim:
    """A sentence that states a number or a comparison, and the asserts that prove it.

    Built into a prose cell followed by a code cell holding ``check``, so a
    notebook cannot say something its own numbers contradict.
    """

    en: str
    zh: str
    check: str

    def __post_init__(self):
        for name in ("en", "check"):
            object.__setattr__(self, name, _clean(getattr(self, name)))
        object.__setattr__(self, "zh", _clean_zh(self.zh))
        if "assert " not in self.check:
            raise ValueError(f"a Claim's check must contain an assert, got {self.check!r}")


@dataclass(frozen=True)
class Exercises:
    """The closing exercises: one item per exercise, in both languages."""

    en: tuple[str, ...]
    zh: tuple[str, ...]

    def __post_init__(self):
        if len(self.en) != len(self.zh) or not 2 <= len(self.en) <= 3:
            raise ValueError("Exercises need 2 or 3 items, the same number in en and zh")
        object.__setattr__(self, "en", tuple(_clean(s) for s in self.en))
        object.__setattr__(self, "zh", tuple(_clean(s) for s in self.zh))
