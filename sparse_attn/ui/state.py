"""Settings: defaults, bounds, and the round trip through the URL query string.

Each setting lives in ``st.session_state`` under its own name (which is also
its widget key), so widgets keep their values when the language changes. The
method settings are named as ``sparse_attn.methods.Config``'s fields, so the
settings dict builds a ``Config`` without renaming; the others (source, L, H,
D, device, ...) belong to the app.

The URL keeps its short keys (``k``, ``chunk``, ...): links people shared
still open their view. ``URL_KEYS`` maps setting names to them, here and
nowhere else. On a session's first run the query string seeds the settings;
values from the URL are checked against the same bounds as the widgets, and a
bad value falls back to the default and is listed in a notice
(``show_url_notices``), as are keys the app does not know. The page writes
the URL back with each key once. Free text travels in the URL up to
``URL_TEXT_CHARS`` characters both ways: longer text is neither written nor
read, and ``text_link_note`` says so.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Callable, Mapping

import streamlit as st

from sparse_attn.i18n import LANGS, normalize_lang, t
from sparse_attn.methods import choices
from sparse_attn.ops.sampling import PROPOSALS
from sparse_attn.sources import KINDS, PATTERNS

from .markup import code_span, join_list
from .inputs import DEFAULT_TEXT

SEQ_LENS = (16, 32, 64, 128, 256, 512, 1024, 2048, 4096, 8192)
HEAD_DIMS = (16, 32, 64, 128)
CHUNKS = (8, 16, 32, 64, 128, 256, 512, 1024, 2048)
BLOCKS = (4, 8, 16, 32, 64, 128)
PAGES = (1, 2, 4, 8, 16, 32, 64)  # 1: Quest's bound is each key's own score
K_MAX, SAMPLES_MAX, SEED_MAX, HEADS_MAX = 512, 1024, 2**31 - 1, 16
NUM_BLOCKS_MAX, WINDOW_MAX = 64, 1024
SINKS_MAX, FORCED_MAX = 64, 8  # FORCED_MAX twice stays below NUM_BLOCKS_MAX: the forced blocks always fit


@dataclass(frozen=True)
class Spec:
    default: Any
    parse: Callable[[str], Any]  # URL text -> value; raises ValueError when not allowed


def _int_in(lo: int, hi: int) -> Callable[[str], int]:
    def parse(text: str) -> int:
        value = int(text)
        if not lo <= value <= hi:
            raise ValueError(value)
        return value

    return parse


def _one_of(options, cast=str) -> Callable[[str], Any]:
    def parse(text: str):
        value = cast(text)
        if value not in options:
            raise ValueError(value)
        return value

    return parse


def _bool(text: str) -> bool:
    if text.lower() in ("1", "true", "yes"):
        return True
    if text.lower() in ("0", "false", "no"):
        return False
    raise ValueError(text)


# Free text goes into the URL only up to this many characters, and a longer one in a URL is not read:
# a link then opens what the page wrote. 500 CJK characters percent-encode to about 4.5 kB, well inside
# the 8 kB request line a proxy such as nginx accepts by default.
URL_TEXT_CHARS = 500


def _lang(text: str) -> str:
    return normalize_lang(text, strict=True)  # "zh-CN", "zh_TW", "ZH" -> "zh"


def _text(text: str) -> str:
    if len(text) > URL_TEXT_CHARS:
        raise ValueError("too long for a link")
    return text


# The lessons of lessons.py by id, in its order. Named here because the URL checks them and lessons.py
# reads this module's settings (importing it back would be a cycle); tests/test_lessons.py checks the two agree.
LESSON_IDS = ("band", "sinks", "flat", "proposal", "nsa", "chunked", "model_heads")


def _lesson(text: str) -> str:
    if text not in LESSON_IDS:
        raise ValueError(text)
    return text


def devices() -> list[str]:
    import torch

    found = ["cpu"]
    if torch.cuda.is_available():
        found.append("cuda")
    if getattr(torch.backends, "mps", None) is not None and torch.backends.mps.is_available():
        found.append("mps")
    return found


DTYPES = ("float32", "float64", "bfloat16", "float16")


def specs() -> dict[str, Spec]:
    """Every setting the URL carries, by setting name (in the order the URL lists them)."""
    return {
        "lang": Spec("en", _lang),
        "source": Spec("synthetic", _one_of(KINDS)),
        "pattern": Spec("local", _one_of(PATTERNS)),
        "text": Spec(DEFAULT_TEXT, _text),
        "layer": Spec(0, _int_in(0, 23)),
        "L": Spec(256, _one_of(SEQ_LENS, int)),
        "H": Spec(4, _int_in(1, HEADS_MAX)),
        "D": Spec(64, _one_of(HEAD_DIMS, int)),
        "method": Spec("topk", _one_of(choices("method"))),  # registry keys only
        "top_k": Spec(32, _int_in(0, K_MAX)),
        "num_samples": Spec(64, _int_in(1, SAMPLES_MAX)),
        "proposal": Spec("lsh", _one_of(PROPOSALS)),
        "selection_block_size": Spec(16, _one_of(BLOCKS, int)),
        "num_selected_blocks": Spec(4, _int_in(1, NUM_BLOCKS_MAX)),
        "sliding_window_size": Spec(32, _int_in(1, WINDOW_MAX)),
        "num_initial_blocks": Spec(1, _int_in(0, FORCED_MAX)),
        "num_local_blocks": Spec(2, _int_in(0, FORCED_MAX)),
        "num_sink_tokens": Spec(4, _int_in(0, SINKS_MAX)),
        "token_budget": Spec(32, _int_in(1, K_MAX)),
        "page_size": Spec(16, _one_of(PAGES, int)),
        "chunk_size": Spec(64, _one_of(CHUNKS, int)),
        "causal": Spec(False, _bool),
        "device": Spec("cpu", _one_of(devices())),
        "dtype": Spec("float32", _one_of(DTYPES)),
        "seed": Spec(0, _int_in(0, SEED_MAX)),
        "head": Spec(0, _int_in(0, HEADS_MAX - 1)),
        "log": Spec(False, _bool),
        "pool": Spec("max", _one_of(("max", "mean"))),
        "view": Spec("maps", _one_of(TABS)),
        "lesson": Spec("", _lesson),  # the open lesson's id ("" when none)
    }


# Setting name -> its key in the URL, where the two differ (every other setting is its own URL key).
# Shared links use these keys: change them and old links lose their settings.
URL_KEYS = {
    "top_k": "k",
    "num_samples": "samples",
    "selection_block_size": "block",
    "num_selected_blocks": "nblocks",
    "sliding_window_size": "window",
    "num_initial_blocks": "initial",
    "num_local_blocks": "local",
    "num_sink_tokens": "sinks",
    "token_budget": "tokens",
    "page_size": "page",
    "chunk_size": "chunk",
}

# Settings with no widget of their own, set from another: the one block slider sets both NSA block sizes.
TIED = {"compress_block_size": "selection_block_size"}


def url_key(name: str) -> str:
    """The query-string key of setting ``name``."""
    return URL_KEYS.get(name, name)


def widget_of(name: str) -> str:
    """The setting whose widget sets ``name`` (itself, unless it is tied to another)."""
    return TIED.get(name, name)


def settings(values: Mapping[str, Any]) -> dict[str, Any]:
    """The settings dict: every setting of ``specs()`` from ``values``, plus the tied ones."""
    s = {name: values[name] for name in specs()}
    s.update({name: s[source] for name, source in TIED.items()})
    return s


def defaults() -> dict[str, Any]:
    """The settings dict of a fresh session with no query string."""
    return settings({name: spec.default for name, spec in specs().items()})


def read_query(query: Mapping[str, object]) -> tuple[dict[str, Any], list[tuple[str, str]]]:
    """The settings dict a URL's query gives, and the (key, value) pairs it ignored.

    A value outside its bounds keeps the default; a key that names no setting
    is ignored. Both are listed, in the URL's order, so the page can say so.
    """
    values, ignored = {}, []
    by_key = {url_key(name): name for name in specs()}
    for key, raw in query.items():
        if key not in by_key:
            ignored.append((key, str(raw)))
    for name, spec in specs().items():
        value = spec.default
        key = url_key(name)
        if key in query:
            raw = query[key]
            text = str(raw).lower() if isinstance(raw, bool) else str(raw)
            try:
                value = spec.parse(text)
            except (ValueError, TypeError):
                ignored.append((key, text))  # a hand-edited or stale URL: keep the default, and say so
        values[name] = value
    order = list(query)
    ignored.sort(key=lambda pair: order.index(pair[0]) if pair[0] in order else len(order))
    return settings(values), ignored


def from_query(query: Mapping[str, object]) -> dict[str, Any]:
    """The settings dict a URL's query (short keys, as text or plain values) gives, as a first run reads it.

    A value outside its bounds keeps the default, as in the app.
    """
    return read_query(query)[0]


NOTICES_KEY, BASELINE_KEY = "_url_ignored", "_url_baseline"


def init_state() -> None:
    """Seed session_state from the query string once per session, then from defaults."""
    ss = st.session_state
    if ss.get("_seeded"):
        # Re-assigning keeps the values of widgets hidden on this run (Streamlit drops those otherwise).
        for name, spec in specs().items():
            ss[name] = ss[name] if name in ss else spec.default
        return
    # With a key given twice (?lang=en&lang=zh) the last one counts, as in st.query_params.
    seeded, ignored = read_query(st.query_params.to_dict())
    for name in specs():
        ss[name] = seeded[name]
    ss[NOTICES_KEY] = ignored
    ss["_seeded"] = True


def url_notices() -> list[tuple[str, str]]:
    """The (key, value) pairs of this session's URL that were ignored (empty once the notice is done)."""
    return list(st.session_state.get(NOTICES_KEY, []))


NOTICE_VALUE_CHARS = 40  # a pasted essay in ?text= is named, not repeated


def url_notice_text(ignored, lang: str) -> str:
    """The notice for these ignored (key, value) pairs, in ``lang``; keys and values as inline code."""
    def shown(value: str) -> str:
        return value if len(value) <= NOTICE_VALUE_CHARS else value[:NOTICE_VALUE_CHARS] + "…"

    items = join_list((code_span(f"{key}={shown(value)}") for key, value in ignored), lang)
    return t("io.url_ignored", lang, items=items)


def show_url_notices(lang: str) -> None:
    """Say which parts of the link were ignored: from the first run until the student changes a setting.

    Call it after the sidebar (which may adjust settings to each other) on every run.
    """
    ss = st.session_state
    ignored = ss.get(NOTICES_KEY)
    if not ignored:
        return
    now = settings(ss)
    baseline = ss.setdefault(BASELINE_KEY, now)
    if now != baseline:  # the student has moved on: the link's settings are history
        ss[NOTICES_KEY] = []
        return
    st.warning(url_notice_text(ignored, lang), icon=":material/link:")


def text_link_note(lang: str) -> str | None:
    """A caption for the model's text when the page's link cannot carry it (too long), else None."""
    ss = st.session_state
    text = ss.get("text", "")
    if ss.get("source") != "model" or len(text) <= URL_TEXT_CHARS:
        return None
    return t("io.text_not_in_link", lang, count=len(text), limit=URL_TEXT_CHARS)


def query_for(names, values: Mapping[str, Any]) -> dict[str, str]:
    """The query (short keys, text values) that opens these settings: only those off their defaults, lang always."""
    want = {}
    for name in names:
        spec = specs().get(name)
        value = values.get(name)
        if spec is None or value is None:
            continue
        if name == "text" and len(str(value)) > URL_TEXT_CHARS:
            continue  # the link does not carry it (text_link_note says so); it reads no longer text either
        if value != spec.default or name == "lang":
            want[url_key(name)] = str(value).lower() if isinstance(value, bool) else str(value)
    return want


def write_query_params(names) -> None:
    """Mirror the current settings into the URL under their short keys (only those that differ, to keep it short)."""
    want = query_for(names, st.session_state)
    # Compare every value of every key: a dict of the query keeps one value per key and would
    # call ?lang=en&lang=zh equal to ?lang=zh, leaving the duplicate in the address bar.
    have = {key: list(st.query_params.get_all(key)) for key in st.query_params}
    if have != {key: [value] for key, value in want.items()}:
        st.query_params.from_dict(want)


TABS = ("maps", "budget", "speed", "explain")


def tab_labels(lang: str) -> list[str]:
    return [t(f"tab.{tab}", lang) for tab in TABS]


def open_tab_label(lang: str) -> str:
    """The label of the open tab in ``lang``: the tab widget stores a label, so map it across languages.

    Also records the open tab as ``view`` (a language-free id) for the URL.
    """
    ss = st.session_state
    current = ss.get("tab")
    for code in LANGS:
        labels = tab_labels(code)
        if current in labels:
            ss["view"] = TABS[labels.index(current)]
            break
    label = tab_labels(lang)[TABS.index(ss["view"])]
    if current is not None and current != label:
        ss["tab"] = label
    return label


def lang() -> str:
    return st.session_state.get("lang", "en")
