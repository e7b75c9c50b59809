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

After a server restart an open page reconnects with no session on the server,
and its next change starts one. That first run brings the page's widget values
(the changed one included) and its URL, which still says what the page showed
before the change: a value a widget sent wins over the URL (``sent_settings``).
So long text survives a restart in its own text box; ``text_restart_note``
says when it would not.
"""
from __future__ import annotations

import functools
import math
import re
from collections.abc import Sequence
from dataclasses import dataclass
from types import MappingProxyType
from typing import Any, Callable, Mapping

import streamlit as st

from sparse_attn.i18n import LANG_NAMES, LANGS, catalog, normalize_lang, t
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
    options: tuple = ()  # a choice's allowed values (empty for numbers and free text)


def _choice(default, options, cast=str) -> Spec:
    return Spec(default, _one_of(options, cast), tuple(options))


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


def specs() -> Mapping[str, Spec]:
    """Every setting the URL carries, by setting name (in the order the URL lists them); read-only."""
    return _specs()


# Built once per process (the devices found do not change while it runs): every rerun asks for them
# several times per setting, and building them each time was a few milliseconds of every rerun.
@functools.cache
def _specs() -> Mapping[str, Spec]:
    return MappingProxyType({
        "lang": Spec("en", _lang, LANGS),
        "source": _choice("synthetic", KINDS),
        "pattern": _choice("local", PATTERNS),
        "text": Spec(DEFAULT_TEXT, _text),
        "layer": Spec(0, _int_in(0, 23)),
        "L": _choice(256, SEQ_LENS, int),
        "H": Spec(4, _int_in(1, HEADS_MAX)),
        "D": _choice(64, HEAD_DIMS, int),
        "method": _choice("topk", choices("method")),  # registry keys only
        "top_k": Spec(32, _int_in(0, K_MAX)),
        "num_samples": Spec(64, _int_in(1, SAMPLES_MAX)),
        "proposal": _choice("lsh", PROPOSALS),
        "selection_block_size": _choice(16, BLOCKS, int),
        "num_selected_blocks": Spec(4, _int_in(1, NUM_BLOCKS_MAX)),
        "sliding_window_size": Spec(32, _int_in(1, WINDOW_MAX)),
        "num_initial_blocks": Spec(1, _int_in(0, FORCED_MAX)),
        "num_local_blocks": Spec(2, _int_in(0, FORCED_MAX)),
        "num_sink_tokens": Spec(4, _int_in(0, SINKS_MAX)),
        "token_budget": Spec(32, _int_in(1, K_MAX)),
        "page_size": _choice(16, PAGES, int),
        "chunk_size": _choice(64, CHUNKS, int),
        "causal": Spec(False, _bool),
        "device": _choice("cpu", devices()),
        "dtype": _choice("float32", DTYPES),
        "seed": Spec(0, _int_in(0, SEED_MAX)),
        "head": Spec(0, _int_in(0, HEADS_MAX - 1)),
        "log": Spec(False, _bool),
        "pool": _choice("max", ("max", "mean")),
        "view": _choice("maps", TABS),
        "lesson": Spec("", _lesson, ("", *LESSON_IDS)),  # the open lesson's id ("" when none)
    })


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


# How a choice's widget shows each option (the widgets' format_func), as the catalog key of its label: the
# browser names a picked option by its label, and a new session must read it back before the widget is drawn.
# A label's placeholders (a lesson title's numbers) match anything. tests/test_url.py checks these against the
# app's own widgets in both languages.
CHOICE_LABELS = {"source": "source.{}", "pattern": "pattern.{}", "method": "method.{}", "proposal": "proposal.{}",
                 "pool": "viz.pool_{}", "view": "tab.{}", "lesson": "lessons.{}.title"}
NO_CHOICE_LABELS = {"lesson": "lessons.none"}  # the label of a choice's empty option ("" : no lesson)
WIDGET_OF_SETTING = {"view": "tab"}  # settings whose widget has another key (the tabs store the open tab's label)


def _shows(label: str, name: str, option) -> bool:
    """Whether a widget of setting ``name`` shows ``option`` as ``label`` (in any language)."""
    if name == "lang":
        return label == LANG_NAMES.get(option)
    if name not in CHOICE_LABELS:
        return label == str(option)
    key = CHOICE_LABELS[name].format(option) if option != "" else NO_CHOICE_LABELS.get(name)
    for code in LANGS:
        template = catalog(code).get(key)
        if template is not None:
            pattern = ".+?".join(map(re.escape, re.split(r"\{[^{}]*\}", template)))
            if re.fullmatch(pattern, label, re.S):
                return True
    return False


def decode_widget(name: str, raw) -> Any:
    """The value of setting ``name`` that its widget's state ``raw`` holds, checked as the URL's are; None if none.

    ``raw`` is what the widget sent: a slider's numbers, a select slider's or a choice's labels, a toggle's
    bool, a number, the text. Free text is taken whole: the link's limit is no limit of the text box.
    """
    spec = specs()[name]
    if isinstance(raw, Sequence) and not isinstance(raw, str):  # a slider's or select slider's one value
        items = list(raw)
        if len(items) != 1:
            return None
        raw = items[0]
    if name == "text":
        return raw if isinstance(raw, str) else None
    if isinstance(raw, bool):
        text = str(raw).lower()
    elif isinstance(raw, (int, float)):
        if not math.isfinite(raw) or raw != int(raw):  # NaN, infinity or a fraction: no setting of ours holds one
            return None
        text = str(int(raw))
    elif isinstance(raw, str):
        text = raw
        if spec.options and text not in map(str, spec.options):
            text = next((str(o) for o in spec.options if _shows(raw, name, o)), raw)
    else:
        return None
    if text == str(spec.default):  # always allowed, even where the URL names it by leaving the key out ("" lesson)
        return spec.default
    try:
        return spec.parse(text)
    except (ValueError, TypeError):
        return None


def _widget_states() -> dict[str, Any]:
    """The widget states that came with this run from the browser, by widget key (decoded as Streamlit reads them).

    Streamlit reads a widget's state only once the widget is drawn. On the first run of a new session (after a
    server restart the page reconnects, and its next change starts one) nothing is drawn yet, so the states are
    read here through Streamlit's session internals. Should those change, this finds none and the URL seeds the
    session as on a fresh page: the student's change is lost, nothing breaks, and tests/test_url.py fails.
    """
    try:
        from streamlit.runtime.state.common import unpack_widget_state_value, user_key_from_element_id
        from streamlit.runtime.state.session_state_proxy import get_session_state

        protos = get_session_state().get_widget_states()
    except (ImportError, AttributeError, TypeError):
        return {}
    found = {}
    for proto in protos:
        try:
            key = user_key_from_element_id(proto.id)
            if key is not None:
                found[key] = unpack_widget_state_value(proto)
        except (AttributeError, TypeError, ValueError):  # one odd state (a component's bad JSON) spoils no other
            continue
    return found


def sent_settings() -> dict[str, Any]:
    """The settings whose widgets' values came with this run, by setting name (only those that decode)."""
    states = _widget_states()
    sent = {}
    for name in specs():
        key = WIDGET_OF_SETTING.get(name, name)
        if key in states and (value := decode_widget(name, states[key])) is not None:
            sent[name] = value
    return sent


def init_state() -> None:
    """Seed session_state once per session: from the widgets' values the browser sent, else the URL, else defaults.

    A fresh page load sends no widget values, and the URL seeds everything. A page that reconnects after a server
    restart shows widgets that already hold the student's settings, and its first run is the student's next change:
    the URL still says what the page showed before it, so a widget's own value wins.
    """
    ss = st.session_state
    if ss.get("_seeded"):
        # Re-assigning keeps the values of widgets hidden on this run (Streamlit drops those otherwise).
        for name, spec in specs().items():
            ss[name] = ss[name] if name in ss else spec.default
        return
    # With a key given twice (?lang=en&lang=zh) the last one counts, as in st.query_params.
    seeded, ignored = read_query(st.query_params.to_dict())
    sent = sent_settings()
    for name in specs():
        ss[name] = sent.get(name, seeded[name])
    sent_keys = {url_key(name) for name in sent}
    ss[NOTICES_KEY] = [(key, value) for key, value in ignored if key not in sent_keys]
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


def text_restart_note(lang: str) -> str | None:
    """A caption for the text box when the text is too long for the link: what keeps it, and what does not.

    The open page keeps it: after a server restart the text box sends it back (``init_state``). A reload
    or the link opens the default sentence, and so does a restart while the text box is not shown.
    """
    ss = st.session_state
    if ss.get("source") != "model" or len(ss.get("text", "")) <= URL_TEXT_CHARS:
        return None
    return t("restart.text_kept", lang, limit=URL_TEXT_CHARS)


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


TABS = ("maps", "budget", "speed", "generate", "explain")


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
