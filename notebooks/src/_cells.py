"""The building blocks of a chapter source: prose in two languages, shared code, checked claims.

A chapter is a Python module with ``NUMBER``, ``SLUG``, ``TITLE`` (en/zh),
``TERMS`` (glossary keys the chapter teaches) and ``CELLS``, a list of the
objects below. ``notebooks/build.py`` turns it into one notebook per language.

Cells, in the order a chapter usually lists them::

    Objectives(en=("...", ...), zh=("...", ...))   # "## Learning objectives", right after the header
    Md(en=..., zh=...)                             # prose
    Code("...")                                    # shared by both notebooks
    Claim(en=..., zh=..., check="assert ...")      # a sentence and the asserts that prove it
    Summary(en=..., zh=...)                        # "## Summary"
    References(items=(("text", "url"), ...))       # "## References", the same entries in both languages
    Exercises(items=(Exercise(...), ...))          # "## Exercises", 2 or 3 of them

An ``Exercise`` has its task, a hint and a worked solution in both languages,
a ``self_check`` cell defining ``check_exN(answer)`` (N its number), the
``solution_code`` that computes the answer and calls the check, and a
``wrong_answer`` the tests hand to the check, which must reject it.
"""
from __future__ import annotations

import re
import textwrap
from dataclasses import dataclass

__all__ = ["Claim", "Code", "Exercise", "Exercises", "Md", "Objectives", "References", "Summary"]


def _clean(text: str) -> str:
    return textwrap.dedent(text).strip("\n")


_BLOCK = re.compile(r"^\s*(#|\||[-*>]\s|\d+\.\s|```|\$\$|<)")
# Characters that sit against their neighbours without a space: CJK ideographs and
# full-width punctuation (，。：；、（）“”《》 and the like).
_WIDE = re.compile(r"[\u2e80-\u9fff\uf900-\ufaff\u3000-\u303f\uff00-\uffef\u201c\u201d\u2018\u2019\u2014\u2026]")
_WIDE_PUNCT = re.compile(r"[\u3000-\u303f\uff00-\uffef\u201c\u201d\u2018\u2019\u2014\u2026]")


def _joiner(left: str, right: str) -> str:
    """What goes between two wrapped lines of Chinese prose: nothing between two CJK
    characters or next to full-width punctuation, a space between CJK and Latin text or code."""
    a, b = left[-1], right[0]
    if _WIDE_PUNCT.match(a) or _WIDE_PUNCT.match(b) or (_WIDE.match(a) and _WIDE.match(b)):
        return ""
    return " "


_ITEM = re.compile(r"^\s*([-*]|\d+\.)\s")


def _join_lines(lines: list[str]) -> str:
    out = ""
    for line in lines:
        out += _joiner(out, line) + line if out else line
    return out


def _join_paragraph(paragraph: str) -> str:
    raw = [line for line in paragraph.splitlines() if line.strip()]
    lines = [line.strip() for line in raw]
    if raw and _ITEM.match(raw[0]) and not any(_BLOCK.match(x) and not _ITEM.match(x) for x in lines):
        # A list: each item's wrapped lines join like a paragraph's; the items keep their own lines.
        items: list[list[str]] = []
        for original, line in zip(raw, lines):
            if _ITEM.match(original):
                items.append([original.rstrip()])
            else:
                items[-1].append(line)
        return "\n".join(_join_lines(item) for item in items)
    if any(_BLOCK.match(line) for line in lines):
        return paragraph  # a table, heading, formula or code block keeps its lines
    return _join_lines(lines)


def _clean_zh(text: str) -> str:
    """Dedent, and join the wrapped lines of plain paragraphs: a line break between
    Chinese characters renders as a stray space, while Latin text and code keep theirs."""
    return "\n\n".join(_join_paragraph(p) for p in _clean(text).split("\n\n"))


def _items(name: str, items, clean) -> tuple[str, ...]:
    if isinstance(items, str) or not items:
        raise ValueError(f"{name} must be a non-empty tuple of strings")
    return tuple(clean(s) for s in items)


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
class Objectives:
    """What a student can do after the chapter, one item each; rendered right after the header."""

    en: tuple[str, ...]
    zh: tuple[str, ...]

    def __post_init__(self):
        object.__setattr__(self, "en", _items("Objectives.en", self.en, _clean))
        object.__setattr__(self, "zh", _items("Objectives.zh", self.zh, _clean_zh))
        if len(self.en) != len(self.zh):
            raise ValueError("Objectives need the same number of items in en and zh")


@dataclass(frozen=True)
class Summary(Md):
    """The chapter's closing summary (prose or a list), under "## Summary"."""


@dataclass(frozen=True)
class References:
    """Works the chapter builds on: (citation, url) pairs, url may be "" when there is none."""

    items: tuple[tuple[str, str], ...]

    def __post_init__(self):
        if not self.items or any(len(item) != 2 for item in self.items):
            raise ValueError("References need (citation, url) pairs")
        object.__setattr__(self, "items", tuple((" ".join(c.split()), u.strip()) for c, u in self.items))


@dataclass(frozen=True)
class Exercise:
    """One exercise: task, hint and worked solution in both languages, and the code that checks answers.

    ``self_check`` defines ``check_exN(answer)`` (N the exercise's number): it
    prints a confirmation through ``tr`` or raises ``AssertionError`` with a
    helpful message. ``solution_code`` computes the answer and calls the check;
    it runs in the tests, hidden from students until they open it.
    ``wrong_answer`` is an expression (a plausible mistake) the tests hand to
    ``check_exN``, which must reject it.
    """

    en: str
    zh: str
    hint_en: str
    hint_zh: str
    solution_en: str
    solution_zh: str
    self_check: str
    solution_code: str
    wrong_answer: str

    def __post_init__(self):
        for name in ("en", "hint_en", "solution_en", "self_check", "solution_code", "wrong_answer"):
            object.__setattr__(self, name, _clean(getattr(self, name)))
        for name in ("zh", "hint_zh", "solution_zh"):
            object.__setattr__(self, name, _clean_zh(getattr(self, name)))
        empty = [name for name in self.__dataclass_fields__ if not getattr(self, name).strip()]
        if empty:
            raise ValueError(f"an Exercise needs every field, these are empty: {empty}")

    def check_name(self, number: int) -> str:
        return f"check_ex{number}"

    def validate(self, number: int) -> None:
        name = self.check_name(number)
        if not re.search(rf"^def {name}\(", self.self_check, flags=re.MULTILINE):
            raise ValueError(f"exercise {number}: self_check must define {name}(answer)")
        if "assert" not in self.self_check and "AssertionError" not in self.self_check:
            raise ValueError(f"exercise {number}: {name} must be able to reject an answer (assert or AssertionError)")
        if f"{name}(" not in self.solution_code:
            raise ValueError(f"exercise {number}: solution_code must call {name}(...)")


@dataclass(frozen=True)
class Exercises:
    """The closing exercises: ``items``, 2 or 3 of them."""

    items: tuple[Exercise, ...]

    def __post_init__(self):
        if not 2 <= len(self.items) <= 3 or not all(isinstance(e, Exercise) for e in self.items):
            raise ValueError("Exercises need 2 or 3 Exercise items")
        object.__setattr__(self, "items", tuple(self.items))
        for n, exercise in enumerate(self.items, 1):
            exercise.validate(n)
