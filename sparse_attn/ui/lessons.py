"""Lessons a teacher can open in class: each sets a view through the URL and says what to look at.

A lesson is a URL query (the short keys of ``state.URL_KEYS``) plus its text in
the catalogs (``lessons.<id>.title``, ``.look1``.., ``.question``). Opening one
from the picker sets every setting from ``state.from_query(query)``, so the
view is the one the text describes whatever the reader had moved before;
``?lesson=<id>&<query>`` in a shared link opens the same view and banner.

The text states numbers: they are ``Lesson.numbers``, measured on that view
(float32, CPU) and filled into the templates, and tests/test_lessons.py
measures them again.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from urllib.parse import parse_qsl, quote

import streamlit as st

from sparse_attn.i18n import LANGS, t

from . import guide, state

# The model lesson's sentence, in its URL: its numbers were measured on this text, whatever the default becomes.
MODEL_TEXT = "The cat sat on the mat because it was warm, and the dog watched the cat from the door."


@dataclass(frozen=True)
class Lesson:
    query: str  # URL query with short keys, without "lesson" and "lang"
    chapter: str  # the notebook chapter that explains it (guide.CHAPTERS)
    looks: int  # how many "what to look at" bullets its text has (lessons.<id>.look1 ..)
    numbers: dict = field(default_factory=dict)  # measured values its text states, by template name
    labels: dict = field(default_factory=dict)  # template name -> catalog key: widget labels in the reader's language
    resets: tuple[str, ...] = ()  # widget keys outside the URL that the text assumes at their defaults


# Settings a lesson never changes: they are the reader's, not the view's.
KEEP = ("lang", "device", "lesson")

LESSONS: dict[str, Lesson] = {
    "band": Lesson(
        "pattern=local&method=topk&k=8&view=maps", "ch3_topk", 3,
        {"mass8": 0.6815, "err8": 0.5839, "mass16": 0.9435, "err16": 0.09673, "mass32": 0.9985, "err32": 0.002152},
        {"k": "setting.top_k"},
    ),
    "sinks": Lesson(
        "pattern=sink_local&method=topk&k=16&log=true&view=maps", "ch3_topk", 4,
        {"sink_mass": 0.7442, "mass16": 0.9576, "err16": 0.05599, "mass4": 0.7442, "err4": 0.3804,
         "sllm_mass": 0.9999, "sllm_keys": 62.6, "sllm0_mass": 0.3577, "sllm0_err": 0.9555},
        {"k": "setting.top_k", "log": "setting.log", "sllm": "method.streaming_llm", "sinks": "setting.num_sink_tokens"},
    ),
    "flat": Lesson(
        "pattern=flat&method=sampling&proposal=uniform&samples=32&view=budget", "ch4_sampling", 4,
        {"topk32": 9.944, "sampling32": 11.63, "hybrid32": 14.71, "lsh32": 24.45},
        {"metric": "viz.error_vs_uniform_axis", "picker": "budget.metric", "proposal": "setting.proposal",
         "lsh": "proposal.lsh"},
    ),
    "proposal": Lesson(
        "pattern=peaked&method=sampling&samples=32&proposal=uniform&view=maps", "ch4_sampling", 3,
        {"uni_mass": 0.1250, "uni_err": 0.9726, "lsh_mass": 0.8075, "lsh_err": 0.2171,
         "oracle_err": 0.000699, "top1_err": 0.000267},
        {"proposal": "setting.proposal", "lsh": "proposal.lsh", "oracle": "proposal.oracle", "topk": "method.topk",
         "k": "setting.top_k", "scored": "metric.keys_scored"},
    ),
    "nsa": Lesson(
        "pattern=sink_local&method=nsa&block=16&nblocks=4&window=32&initial=1&local=2&log=true&view=maps", "ch5_blocks", 4,
        {"sel_mass": 0.9998, "sel_err": 0.000217, "slide_mass": 0.3577, "slide_err": 0.9555,
         "cmp_sink": 0.0714, "dense_sink": 0.7551, "cmp_err": 1.055, "mix_err": 0.6595, "mix0_err": 0.7379,
         "head3_pick": 0.3984},
        {"initial": "setting.num_initial_blocks"},
    ),
    "chunked": Lesson(
        "view=explain", "ch3_topk", 4,
        # The explainer's defaults (24 values from seed 0, chunks of 8, k = 4) and what they give.
        {"n": 24, "chunk": 8, "k": 4, "candidates": 12, "top1": 99, "top2": 97, "top3": 94, "top4": 91,
         "k2": 8, "held": 5, "keep": 3, "lost1": 78, "lost2": 76, "got1": 68, "got2": 63, "chunks": 3},
        {"k_label": "explain.k"},
        resets=("ex_n", "ex_chunk", "ex_k", "ex_seed"),  # the explainer's own controls: the text reads their defaults
    ),
    "model_heads": Lesson(
        f"source=model&text={quote(MODEL_TEXT)}&layer=1&method=topk&k=4&head=11&view=maps", "ch6_real_model", 4,
        {"cls_lo": 0.28, "cls_hi": 0.81, "sep_hi": 0.04, "next8": 0.63, "mass_lo": 0.619, "mass_hi": 0.98,
         "prev2": 1.0},
        {"head": "setting.head", "layer": "setting.layer"},
    ),
}


def ids() -> tuple[str, ...]:
    return tuple(LESSONS)


def query_of(lesson_id: str) -> dict[str, str]:
    """The lesson's URL query as a dict (short keys, text values), as ``st.query_params`` holds it."""
    return dict(parse_qsl(LESSONS[lesson_id].query, keep_blank_values=True))


def settings_of(lesson_id: str) -> dict:
    """Every setting the lesson's view has, as a first run of its URL reads them (``state.from_query``)."""
    return state.from_query(query_of(lesson_id))


def link(lesson_id: str, lang: str) -> str:
    """A relative link that opens the lesson in ``lang`` (the query string only, for any host)."""
    lang_part = "" if lang == "en" else f"&lang={lang}"
    return f"?lesson={lesson_id}&{LESSONS[lesson_id].query}{lang_part}"


def text(key: str, lesson_id: str, lang: str) -> str:
    """``lessons.<id>.<key>`` in ``lang``, its numbers filled in."""
    lesson = LESSONS[lesson_id]
    labels = {name: t(key, lang) for name, key in lesson.labels.items()}
    return t(f"lessons.{lesson_id}.{key}", lang, **lesson.numbers, **labels)


def open_lesson(lesson_id: str) -> None:
    """Apply a lesson's settings and open its tab (a widget callback: it runs before the widgets are drawn)."""
    ss = st.session_state
    if lesson_id not in LESSONS:
        ss["lesson"] = ""
        return
    values = settings_of(lesson_id)
    for name in state.specs():
        if name not in KEEP:
            ss[name] = values[name]
    ss["lesson"] = lesson_id
    # The tab widget stores its label, and state.open_tab_label reads "view" back from it: set both.
    ss["tab"] = state.tab_labels(ss.get("lang", "en"))[state.TABS.index(values["view"])]
    for key in LESSONS[lesson_id].resets:
        ss.pop(key, None)


def close_lesson() -> None:
    st.session_state["lesson"] = ""


def _picked() -> None:
    lesson_id = st.session_state.get("lesson", "")
    if lesson_id:
        open_lesson(lesson_id)


def drifted(lesson_id: str, current) -> list[str]:
    """The settings (names) where ``current`` (session state) differs from the lesson's view."""
    want = settings_of(lesson_id)
    current = dict(current)
    # The banner runs before the tabs record a click as "view": read the open tab from the tab widget itself.
    for code in LANGS:
        labels = state.tab_labels(code)
        if current.get("tab") in labels:
            current["view"] = state.TABS[labels.index(current["tab"])]
    return [name for name in state.specs() if name not in KEEP and current.get(name) != want[name]]


MOVED_KEY = "_lesson_moved"  # whether the banner last drawn said "you have left the lesson's settings"


def drift_changed() -> bool:
    """Whether the banner drawn last no longer tells the truth (a panel rerun alone moved a setting)."""
    ss = st.session_state
    lesson_id = ss.get("lesson", "")
    if lesson_id not in LESSONS:
        return False
    return bool(drifted(lesson_id, ss.to_dict())) != ss.get(MOVED_KEY, False)


def sidebar(sb, lang: str) -> None:
    """The lesson picker at the top of the sidebar, and the lessons' links for a teacher."""
    ss = st.session_state
    if ss.get("lesson", "") not in ("", *LESSONS):
        ss["lesson"] = ""
    sb.selectbox(t("lessons.picker", lang), ("", *LESSONS), key="lesson", on_change=_picked,
                 format_func=lambda i: text("title", i, lang) if i else t("lessons.none", lang),
                 help=t("lessons.picker_help", lang))
    with sb.expander(t("lessons.links", lang)):
        st.caption(t("lessons.links_note", lang))
        st.markdown("\n".join(f"- [{text('title', i, lang)}]({link(i, lang)})" for i in LESSONS))


def banner(lang: str) -> None:
    """The open lesson's explanation, above the pictures: what to look at, a question, the chapter, a close button."""
    ss = st.session_state
    lesson_id = ss.get("lesson", "")
    if lesson_id not in LESSONS:
        return
    lesson = LESSONS[lesson_id]
    title = t("lessons.banner_title", lang, title=text("title", lesson_id, lang))
    # An expander, open at first: a student who has read it folds it away and keeps the pictures near the top.
    with st.container(key="lesson_banner"), st.expander(title, expanded=True, icon=":material/school:"):
        looks = "\n".join(f"- {text(f'look{i}', lesson_id, lang)}" for i in range(1, lesson.looks + 1))
        st.markdown(f"**{t('lessons.look', lang)}**\n\n{looks}")
        st.markdown(f"**{t('lessons.question', lang)}** {text('question', lesson_id, lang)}")
        st.caption(":material/menu_book: " + guide.chapter_ref(lesson.chapter, lang))
        moved = drifted(lesson_id, ss.to_dict())
        ss[MOVED_KEY] = bool(moved)
        if moved:
            st.caption(t("lessons.drifted", lang))
        with st.container(horizontal=True):
            if moved:
                st.button(t("lessons.reopen", lang), key="lesson_reopen", on_click=open_lesson, args=(lesson_id,),
                          icon=":material/restart_alt:")
            st.button(t("lessons.close", lang), key="lesson_close", on_click=close_lesson, icon=":material/close:")
