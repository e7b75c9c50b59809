"""Tab 4: how chunked top-k works, on a small example the reader controls.

The example has its own controls, labelled as its own ("k in this example"):
they are not the sidebar's k and chunk size, and neither changes the other.
"""
from __future__ import annotations

import streamlit as st
import torch

from sparse_attn import viz
from sparse_attn.i18n import t
from sparse_attn.topk import chunked_topk

from . import charts, guide

MAX_ROWS = 12  # chunks drawn at most: the smallest chunk size follows the row length


def _clamp(key: str, lo: int, hi: int, default: int) -> None:
    """Keep a slider's remembered value inside bounds that moved (a shorter row), before the slider is drawn."""
    ss = st.session_state
    ss[key] = min(max(int(ss.get(key, default)), lo), hi)


def render(lang: str) -> None:
    st.markdown(t("explain.intro", lang))
    box = st.container(border=True)
    box.caption(t("charts.explain_own", lang))
    c1, c2, c3, c4 = box.columns(4)
    n = c1.slider(t("explain.length", lang), 4, 64, 24, key="ex_n")
    # Bounds follow the row: at most MAX_ROWS chunks, k at most the row's length.
    lo = -(-n // MAX_ROWS)
    _clamp("ex_chunk", lo, n, 8)
    chunk = c2.slider(t("explain.chunk", lang), lo, n, key="ex_chunk")
    asked = int(st.session_state.get("ex_k", 4))
    _clamp("ex_k", 1, n, 4)
    k = c3.slider(t("explain.k", lang), 1, n, key="ex_k")
    seed = c4.number_input(t("charts.explain_seed", lang), 0, 2**31 - 1, 0, key="ex_seed")
    if asked > n:  # the row got shorter than the k the reader had chosen
        st.info(t("explain.k_clipped", lang, k=asked, n=n))
    g = torch.Generator().manual_seed(int(seed))
    x = torch.randint(0, 100, (n,), generator=g).float()
    charts.show(viz.chunked_topk_figure(x, k, chunk, lang=lang), "explain_chart", filename="chunked_topk")
    guide.note("explain", lang)
    ours = chunked_topk(x, k, chunk_size=chunk)
    ref = torch.topk(x, k)
    same = torch.equal(ours.values, ref.values)
    st.markdown(t("explain.result", lang, values=", ".join(f"{v:g}" for v in ours.values.tolist()),
                  indices=", ".join(map(str, ours.indices.tolist()))))
    (st.success if same else st.error)(t("explain.match" if same else "explain.mismatch", lang))
    chunks = -(-n // chunk)
    st.caption(t("explain.cost", lang, chunks=chunks, candidates=sum(min(k, chunk, n - i) for i in range(0, n, chunk)), k=k))
