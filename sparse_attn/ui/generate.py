"""The generating tab: why sparse attention speeds up decoding, one new token at a time.

Two pictures. Bytes of K and V each new token reads against context length,
counted from the sizes alone (``bytes_per_step``: nothing runs), for a large
model's shape or the sidebar's. Then the real decoders on the sidebar's
synthetic pattern, over a cache that grows token by token: which keys each
new token read, and the bytes it read beside dense attention's. Both are
cached per settings (bounded), and neither depends on the head picked or the
language, so those redraw without recomputing.
"""
from __future__ import annotations

import pandas as pd
import streamlit as st

from sparse_attn import viz_decode
from sparse_attn.decode import DECODERS
from sparse_attn.i18n import t
from sparse_attn.methods import METHODS, Config
from sparse_attn.sources import pattern_params, synthetic_qkv

from . import charts, compute, errors, guide
from .threads import one_thread

# A long-context model's attention: 64 query heads over 4 KV heads of 128 dimensions, in bfloat16
# (the shape the decode benchmark measures on the GPU).
MODEL_SHAPE = {"num_heads": 64, "num_kv_heads": 4, "head_dim": 128, "itemsize": 2}
SHAPES = ("model", "sidebar")
GEN_MAX_LEN = 256  # the step-by-step view's cache: enough tokens for a pattern, few enough to see each key
_ITEMSIZE = {"float64": 8, "float32": 4, "bfloat16": 2, "float16": 2}
_MIB = 2**20


def sidebar_shape(s: dict) -> dict:
    """The sidebar's synthetic shape: H query heads, as many KV heads (the patterns have no grouping), its D and dtype."""
    return {"num_heads": s["H"], "num_kv_heads": s["H"], "head_dim": s["D"], "itemsize": _ITEMSIZE[s["dtype"]]}


def valid_methods(cfg: Config) -> tuple[list[str], list[tuple[str, Exception]]]:
    """The decoders whose settings ``cfg`` allows, and (method, error) for those it does not (e.g. k = 0)."""
    ok, bad = [], []
    for m in DECODERS:
        check = METHODS[m].validate
        try:
            if check is not None:
                check(cfg)
            ok.append(m)
        except (ValueError, TypeError) as e:
            bad.append((m, e))
    return ok, bad


@st.cache_data(max_entries=32, show_spinner=False)
def bytes_data(cfg: Config, shape: dict, methods: tuple[str, ...]) -> list[dict]:
    """``viz_decode.bytes_rows`` for these settings (sizes only: microseconds, cached so a rerun is free)."""
    return viz_decode.bytes_rows(cfg, methods=methods, **shape)


def ratio_table(rows: list[dict], lang: str) -> pd.DataFrame:
    """At the longest length: each method's MiB per token and how many times fewer bytes than dense it reads."""
    longest = max(r["length"] for r in rows)
    at = {r["method"]: r["bytes_per_token"] for r in rows if r["length"] == longest}
    dense = at["dense"]
    return pd.DataFrame([{
        t("gen.col.method", lang): viz_decode.gen_method_label(m, lang),
        t("gen.col.mib", lang, n=viz_decode._tokens(longest)): f"{b / _MIB:,.2f}",
        t("gen.col.ratio", lang): f"{dense / b:.1f}×",
    } for m, b in at.items()])


def gen_input(s: dict):
    """q, k, v of the sidebar's pattern for the step-by-step view: at most GEN_MAX_LEN tokens, CPU float32.

    Patterns that place matches (retrieval, peaked) take them from earlier keys, so
    a causal decoder can find them.
    """
    params = {"causal": True} if "causal" in pattern_params(s["pattern"]) else {}
    L = min(s["L"], GEN_MAX_LEN)
    return synthetic_qkv(s["pattern"], heads=s["H"], length=L, head_dim=s["D"], seed=s["seed"], **params)


@st.cache_data(max_entries=32, show_spinner=False)
def steps_data(pattern: str, L: int, H: int, D: int, seed: int, method: str, cfg: Config) -> viz_decode.StepGrid:
    """``viz_decode.decode_steps`` on the sidebar's pattern (about 0.05 s at the defaults; cached per settings)."""
    compute._log_call("generate_steps")
    q, k, v = gen_input({"pattern": pattern, "L": L, "H": H, "D": D, "seed": seed})
    with one_thread():
        return viz_decode.decode_steps(method, q, k, v, cfg)


def steps_caption(grid: viz_decode.StepGrid, head: int, lang: str) -> str:
    """The numbers of the last drawn step, read off the grid the picture shows."""
    read, dense = int(grid.bytes_read[-1]), int(grid.dense_bytes[-1])
    return t("gen.steps_numbers", lang, method=viz_decode.gen_method_label(grid.method, lang), pos=int(grid.steps[-1]),
             n=int(grid.steps[-1]) + 1, keys=grid.keys_read(head), h=head, kib=read / 1024,
             dense_kib=dense / 1024, share=read / dense)


def _follow_sidebar_method(s: dict) -> None:
    """The picker starts at the sidebar's method, and follows it when the sidebar changes to one with a decoder."""
    ss = st.session_state
    if ss.get("_gen_sidebar_method") != s["method"]:
        ss["_gen_sidebar_method"] = s["method"]
        if s["method"] in DECODERS:
            ss["gen_method"] = s["method"]
    if ss.get("gen_method") not in DECODERS:
        ss["gen_method"] = "nsa"


def render(settings: dict, lang: str) -> None:
    """The generating tab for the sidebar's settings dict (``state.settings``: Config fields, pattern, L, H, D, ...)."""
    st.subheader(t("gen.title", lang))
    st.markdown(t("gen.intro", lang))
    try:
        cfg = compute.config(settings)
        _bytes_part(settings, cfg, lang)
    except Exception as exc:  # a bad setting breaks this picture only
        errors.show(exc, lang)
    try:
        cfg = compute.config(settings)
        _steps_part(settings, cfg, lang)
    except Exception as exc:
        errors.show(exc, lang)


def _bytes_part(s: dict, cfg: Config, lang: str) -> None:
    st.markdown("#### " + t("gen.bytes_heading", lang))
    shape_name = st.radio(t("gen.shape", lang), SHAPES, key="gen_shape", horizontal=True,
                          format_func=lambda x: t(f"gen.shape.{x}", lang, H=s["H"], D=s["D"], dtype=s["dtype"]))
    shape = MODEL_SHAPE if shape_name == "model" else sidebar_shape(s)
    methods, refused = valid_methods(cfg)
    rows = bytes_data(cfg, shape, tuple(methods))
    charts.show(viz_decode.bytes_figure(rows, lang, title=t("gen.bytes_title", lang, **_shape_words(shape, lang))),
                "gen_bytes")
    st.dataframe(ratio_table(rows, lang), hide_index=True, key="gen_ratio")
    st.caption(t("gen.settings_used", lang, k=cfg.top_k, budget=cfg.token_budget, page=cfg.page_size,
                 block=cfg.selection_block_size, n=cfg.num_selected_blocks, window=cfg.sliding_window_size,
                 sinks=cfg.num_sink_tokens))
    for m, exc in refused:
        st.caption(t("gen.left_out", lang, method=viz_decode.gen_method_label(m, lang),
                     why=errors.message(exc, lang)))
    guide.note("generate_bytes", lang)


def _shape_words(shape: dict, lang: str) -> dict:
    return {"H": shape["num_heads"], "Hkv": shape["num_kv_heads"], "D": shape["head_dim"],
            "bytes": shape["itemsize"]}


def _steps_part(s: dict, cfg: Config, lang: str) -> None:
    st.markdown("#### " + t("gen.steps_heading", lang))
    _follow_sidebar_method(s)
    methods, refused = valid_methods(cfg)
    why = dict(refused)
    cols = st.columns([2, 1])
    method = cols[0].selectbox(t("gen.method", lang), list(DECODERS), key="gen_method",
                               format_func=lambda m: viz_decode.gen_method_label(m, lang))
    H = s["H"]
    head = 0
    if H > 1:
        st.session_state["gen_head"] = min(st.session_state.get("gen_head", 0), H - 1)
        head = cols[1].slider(t("gen.head", lang), 0, H - 1, key="gen_head")
    if method in why:
        st.warning(t("gen.method_refused", lang, method=viz_decode.gen_method_label(method, lang),
                     why=errors.message(why[method], lang)))
        return
    L = min(s["L"], GEN_MAX_LEN)
    grid = steps_data(s["pattern"], L, H, s["D"], s["seed"], method, cfg)
    stride = int(grid.steps[1] - grid.steps[0]) if len(grid.steps) > 1 else 1
    charts.show(viz_decode.steps_figure(grid, head, lang), "gen_steps")
    st.caption(steps_caption(grid, head, lang))
    st.caption(t("gen.steps_input", lang, pattern=t(f"pattern.{s['pattern']}", lang), L=L, steps=len(grid.steps),
                 every=stride))
    if s["source"] != "synthetic":
        st.caption(t("gen.synthetic_only", lang, pattern=t(f"pattern.{s['pattern']}", lang)))
    guide.note("generate_steps", lang)
