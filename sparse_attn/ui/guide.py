"""How to read each picture: one or two sentences beside it, and the notebook chapter that explains it."""
from __future__ import annotations

from pathlib import Path

import streamlit as st

from sparse_attn.i18n import t

# The notebook chapters, in course order; each has a built notebook per language (notebooks/<lang>/<slug>.ipynb).
CHAPTERS = ("ch1_why", "ch2_dense", "ch3_topk", "ch4_sampling", "ch5_blocks", "ch6_real_model", "ch7_tuning",
            "ch8_decode")

# Picture id -> the chapter that explains it. The reading note is the catalog string ``guide.<picture>``.
PICTURES = {
    "maps": "ch3_topk",
    "heads": "ch6_real_model",
    "budget": "ch4_sampling",
    "speed": "ch7_tuning",
    "explain": "ch3_topk",
    "nsa_branches": "ch5_blocks",
    "nsa_blocks": "ch5_blocks",
    "nsa_gates": "ch5_blocks",
    "model_lines": "ch6_real_model",
    "model_overview": "ch6_real_model",
    "generate_bytes": "ch8_decode",
    "generate_steps": "ch8_decode",
}


def notebook_path(chapter: str, lang: str) -> str:
    """The chapter's notebook, relative to the repository root (where the app is started)."""
    if chapter not in CHAPTERS:
        raise ValueError(f"chapter must be one of {CHAPTERS}, got {chapter!r}")
    return f"notebooks/{lang}/{chapter}.ipynb"


def notebook_file(chapter: str, lang: str) -> Path:
    """The notebook as a file beside the package (for checks: the app only names the path)."""
    return Path(__file__).resolve().parents[2] / notebook_path(chapter, lang)


def chapter_ref(chapter: str, lang: str) -> str:
    """'Notebook: chapter 3, ... (notebooks/en/ch3_topk.ipynb)' as markdown, the path in code style."""
    return t("guide.notebook", lang, chapter=t(f"chapter.{chapter}", lang)) + f" `{notebook_path(chapter, lang)}`"


def text(picture: str, lang: str) -> str:
    """The reading note of ``picture`` and, on its own line, the chapter reference (markdown)."""
    if picture not in PICTURES:
        raise ValueError(f"picture must be one of {tuple(PICTURES)}, got {picture!r}")
    # The book icon and its own line set the chapter apart from the sentences about the picture.
    return t(f"guide.{picture}", lang) + "  \n:material/menu_book: " + chapter_ref(PICTURES[picture], lang)


def note(picture: str, lang: str, container=None) -> None:
    """The reading note of ``picture`` (catalog key ``guide.<picture>``) under the picture it explains."""
    (container or st).caption(text(picture, lang))
