"""The sidebar: language, input, method and where to run. Returns the settings as a dict."""
from __future__ import annotations

import streamlit as st

from sparse_attn.i18n import LANG_NAMES, LANGS, t
from sparse_attn.methods import METHODS, choices
from sparse_attn.ops.sampling import PROPOSALS
from sparse_attn.sources import KINDS

from . import inputs, lessons, model_panel, state


def _up_to_L(name: str, most: int, known_L: int | None) -> int:
    """A count slider's upper bound: its own limit, or L where L is known (more keys than there are change nothing).

    Clamps the setting first, so a value from a longer sequence (or the URL) fits.
    """
    if known_L:
        most = max(2, min(most, known_L))  # (a slider needs two values)
    st.session_state[name] = min(st.session_state[name], most)
    return most


def _open_view() -> str:
    """The open tab's id; the tab widget holds a label in either language (this run's value, set before the run)."""
    label = st.session_state.get("tab")
    for code in LANGS:
        labels = state.tab_labels(code)
        if label in labels:
            return state.TABS[labels.index(label)]
    return st.session_state.get("view", "maps")


def render() -> dict:
    ss = st.session_state
    sb = st.sidebar
    sb.radio(t("sidebar.language", state.lang()), LANGS, key="lang", format_func=LANG_NAMES.get, horizontal=True)
    lang = state.lang()  # the radio above may have just changed it
    lessons.sidebar(sb, lang)

    sb.header(t("sidebar.input", lang))
    sources = list(KINDS)
    if ss["source"] not in sources:
        ss["source"] = sources[0]
    sb.radio(t("setting.source", lang), sources, key="source", format_func=lambda s: t(f"source.{s}", lang))
    upload = None
    if ss["source"] == "synthetic":
        pats = inputs.patterns()
        if ss["pattern"] not in pats:
            ss["pattern"] = "local" if "local" in pats else pats[0]
        sb.selectbox(t("setting.pattern", lang), pats, key="pattern", format_func=lambda p: t(f"pattern.{p}", lang))
        sb.select_slider(t("setting.seq_len", lang), state.SEQ_LENS, key="L")
        sb.slider(t("setting.heads", lang), 1, state.HEADS_MAX, key="H")
        sb.select_slider(t("setting.head_dim", lang), state.HEAD_DIMS, key="D")
    elif ss["source"] == "model":
        model_panel.text_input(sb, lang)
        layers = inputs.model().num_layers
        ss["layer"] = min(ss["layer"], layers - 1)
        sb.slider(t("setting.layer", lang), 0, layers - 1, key="layer")
    else:
        upload = inputs.uploader(sb, lang)

    sb.header(t("sidebar.method", lang))
    sb.selectbox(t("setting.method", lang), choices("method"), key="method", format_func=lambda m: t(f"method.{m}", lang))
    # A widget for each Config field the method reads (Method.params); each widget's key is that field.
    params = {state.widget_of(p) for p in METHODS[ss["method"]].params}
    known_L = ss["L"] if ss["source"] == "synthetic" else None  # model and file inputs set L when loaded
    if "top_k" in params:  # k = L is worth reaching (nothing dropped, and the app says so); beyond, nothing changes
        sb.slider(t("setting.top_k", lang), 0, _up_to_L("top_k", state.K_MAX, known_L), key="top_k",
                  help=t("help.top_k", lang))
    if "num_samples" in params:
        sb.slider(t("setting.num_samples", lang), 1, _up_to_L("num_samples", state.SAMPLES_MAX, known_L),
                  key="num_samples")
    if "proposal" in params:
        sb.selectbox(t("setting.proposal", lang), PROPOSALS, key="proposal",
                     format_func=lambda p: t(f"proposal.{p}", lang))
    if "selection_block_size" in params:  # also sets compress_block_size (state.TIED)
        sb.select_slider(t("setting.selection_block_size", lang), state.BLOCKS, key="selection_block_size")
    forced = 0
    for name in ("num_initial_blocks", "num_local_blocks"):
        if name in params:
            sb.slider(t(f"setting.{name}", lang), 0, state.FORCED_MAX, key=name, help=t(f"help.{name}", lang))
            forced += ss[name]
    if "num_selected_blocks" in params:
        # NSA counts its forced blocks among the selected ones: the slider starts at them (and at 1).
        least = max(1, forced)
        # More blocks than the input holds change nothing: the bound follows L where L is known (synthetic).
        # (A slider needs two values: one above ``least`` at least.)
        most = max(least + 1, min(state.NUM_BLOCKS_MAX, -(-known_L // ss["selection_block_size"]))) if known_L \
            else state.NUM_BLOCKS_MAX
        ss["num_selected_blocks"] = min(max(ss["num_selected_blocks"], least), most)
        sb.slider(t("setting.num_selected_blocks", lang), least, most, key="num_selected_blocks")
    if "num_sink_tokens" in params:
        sb.slider(t("setting.num_sink_tokens", lang), 0, _up_to_L("num_sink_tokens", state.SINKS_MAX, known_L),
                  key="num_sink_tokens", help=t("help.num_sink_tokens", lang))
    if "sliding_window_size" in params:
        most = max(2, min(state.WINDOW_MAX, known_L)) if known_L else state.WINDOW_MAX
        ss["sliding_window_size"] = min(ss["sliding_window_size"], most)
        sb.slider(t("setting.sliding_window_size", lang), 1, most, key="sliding_window_size")
    if "token_budget" in params:
        sb.slider(t("setting.token_budget", lang), 1, _up_to_L("token_budget", state.K_MAX, known_L),
                  key="token_budget", help=t("help.token_budget", lang))
    if "page_size" in params:
        sb.select_slider(t("setting.page_size", lang), state.PAGES, key="page_size", help=t("help.page_size", lang))
    # Only where it changes something: the chosen method reads it, or the speed tab times streaming top-k with it.
    if "chunk_size" in params or _open_view() == "speed":
        sb.select_slider(t("setting.chunk_size", lang), state.CHUNKS, key="chunk_size", help=t("help.chunk_size", lang))
    sb.toggle(t("setting.causal", lang), key="causal")

    sb.header(t("sidebar.run", lang))
    sb.selectbox(t("setting.device", lang), state.devices(), key="device")
    dtypes = [d for d in state.DTYPES if d != "float16" or ss["device"] != "cpu"]
    if ss["dtype"] not in dtypes:
        ss["dtype"] = "float32"
    sb.selectbox(t("setting.dtype", lang), dtypes, key="dtype")
    sb.number_input(t("setting.seed", lang), 0, state.SEED_MAX, step=1, key="seed")

    s = state.settings(ss)
    s["text"] = ss.get("text", "")
    s["upload"] = upload
    return s
