"""Tab 4: how chunked top-k works, on a small example the reader controls."""
from __future__ import annotations

import streamlit as st
import torch

from sparse_attn import viz
from sparse_attn.i18n import t
from sparse_attn.topk import chunked_topk


def render(lang: str) -> None:
    st.markdown(t("explain.intro", lang))
    c1, c2, c3, c4 = st.columns(4)
    n = c1.slider(t("explain.length", lang), 4, 64, 24, key="ex_n")
    chunk = c2.slider(t("explain.chunk", lang), 1, 64, 8, key="ex_chunk")
    k = c3.slider(t("explain.k", lang), 1, 64, 4, key="ex_k")
    seed = c4.number_input(t("setting.seed", lang), 0, 2**31 - 1, 0, key="ex_seed")
    if k > n:
        st.warning(t("explain.k_clipped", lang, k=k, n=n))
        k = n
    g = torch.Generator().manual_seed(int(seed))
    x = torch.randint(0, 100, (n,), generator=g).float()
    st.plotly_chart(viz.chunked_topk_figure(x, k, chunk, lang=lang), key="explain_chart", config={"displaylogo": False})
    ours = chunked_topk(x, k, chunk_size=chunk)
    ref = torch.topk(x, k)
    same = torch.equal(ours.values, ref.values)
    st.markdown(t("explain.result", lang, values=", ".join(f"{v:g}" for v in ours.values.tolist()),
                  indices=", ".join(map(str, ours.indices.tolist()))))
    (st.success if same else st.error)(t("explain.match" if same else "explain.mismatch", lang))
    chunks = -(-n // chunk)
    st.caption(t("explain.cost", lang, chunks=chunks, candidates=sum(min(k, chunk, n - i) for i in range(0, n, chunk)), k=k))
