"""Text for Markdown-rendering elements (``st.error``, ``st.warning``, ``st.caption``) that is safe and readable.

Values a user controls (a file's name, a URL's value) go in as inline code,
where Markdown draws no image, link, emoji or formula; free text is escaped.
Byte counts are written in binary units, the units the limits are set in.
No Streamlit here: the strings are tested without a page.
"""
from __future__ import annotations

import re

# Between the items of a list: Chinese uses the enumeration comma.
LIST_SEPARATORS = {"en": ", ", "zh": "、"}


def code_span(text: object) -> str:
    """``text`` as one Markdown inline code span, whatever backticks or brackets it holds."""
    s = " ".join(str(text).split("\n"))
    if not s.strip():
        return "“" + s + "”"
    # A span is fenced by a backtick run longer than any inside it; a space pads a backtick at either end.
    fence = "`" * (max((len(run) for run in re.findall(r"`+", s)), default=0) + 1)
    pad = " " if s[0] == "`" or s[-1] == "`" else ""
    return f"{fence}{pad}{s}{pad}{fence}"


_MARKDOWN_SPECIAL = re.compile(r"([\\`*_{}\[\]()<>#+\-.!|~$:=])")


def escape_markdown(text: object) -> str:
    """Plain text that Markdown shows as it is: every punctuation mark it could read as syntax is escaped."""
    return _MARKDOWN_SPECIAL.sub(r"\\\1", " ".join(str(text).split("\n")))


def join_list(items, lang: str) -> str:
    return LIST_SEPARATORS.get(lang, ", ").join(items)


def size_text(n: int) -> str:
    """A byte count in binary units: ``64 MiB``, ``66.8 MiB``, ``122 GiB``, ``900 B``."""
    for unit, factor in (("GiB", 2**30), ("MiB", 2**20), ("KiB", 2**10)):
        if n >= factor:
            v = n / factor
            if v == int(v):
                return f"{int(v)} {unit}"
            return f"{v:.3g} {unit}" if v < 100 else f"{v:.0f} {unit}"
    return f"{n} B"


def size_texts(*sizes: int) -> list[str]:
    """Byte counts in binary units, told apart: 64 MiB + 1 B must not read "64 MiB, over the 64 MiB limit"."""
    texts = [size_text(n) for n in sizes]
    if len(set(texts)) < len(set(sizes)):
        texts = [text if text.endswith(" B") else f"{text} ({n:,} B)" for text, n in zip(texts, sizes)]
    return texts
