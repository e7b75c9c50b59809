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
bad value falls back to the default.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Callable, Mapping

import streamlit as st

from sparse_attn.i18n import LANGS, t
from sparse_attn.methods import choices
from sparse_attn.ops.sampling import PROPOSALS

from .inputs import DEFAULT_TEXT, MAX_TEXT_CHARS

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


def _text(text: str) -> str:
    if len(text) > MAX_TEXT_CHARS:
        raise ValueError("too long")
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
        "lang": Spec("en", _one_of(LANGS)),
        "source": Spec("synthetic", str),  # checked against the registered sources in the sidebar
        "pattern": Spec("local", str),
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


def from_query(query: Mapping[str, object]) -> dict[str, Any]:
    """The settings dict a URL's query (short keys, as text or plain values) gives, as a first run reads it.

    A value outside its bounds keeps the default, as in the app.
    """
    values = {}
    for name, spec in specs().items():
        value = spec.default
        key = url_key(name)
        if key in query:
            raw = query[key]
            try:
                value = spec.parse(str(raw).lower() if isinstance(raw, bool) else str(raw))
            except (ValueError, TypeError):
                pass  # a hand-edited or stale URL: keep the default
        values[name] = value
    return settings(values)


# Free text goes into the URL only while it is short enough to share.
URL_TEXT_CHARS = 200


def init_state() -> None:
    """Seed session_state from the query string once per session, then from defaults."""
    ss = st.session_state
    if ss.get("_seeded"):
        # Re-assigning keeps the values of widgets hidden on this run (Streamlit drops those otherwise).
        for name, spec in specs().items():
            ss[name] = ss[name] if name in ss else spec.default
        return
    seeded = from_query(st.query_params.to_dict())
    for name in specs():
        ss[name] = seeded[name]
    ss["_seeded"] = True


def write_query_params(names) -> None:
    """Mirror the current settings into the URL under their short keys (only those that differ, to keep it short)."""
    want = {}
    for name in names:
        spec = specs().get(name)
        value = st.session_state.get(name)
        if name == "text" and len(str(value)) > URL_TEXT_CHARS:
            continue
        if spec is not None and value is not None and (value != spec.default or name == "lang"):
            want[url_key(name)] = str(value).lower() if isinstance(value, bool) else str(value)
    if dict(st.query_params) != want:
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
