"""Tab 2: accuracy against budget, the error-vs-keys curve of each method on the current input."""
from __future__ import annotations

import streamlit as st

from sparse_attn import viz
from sparse_attn.i18n import t

from . import compute, errors, export

BUDGET_MAX = 512
SEEDS = (0, 1, 2)
SWEPT = ("topk", "sampling", "hybrid")  # registry keys; the sampling methods use the sidebar's proposal


@st.cache_data(max_entries=8, ttl=1800, show_spinner=False)
def curve(s: dict, upload=None):
    from sparse_attn.sweep import budget_sweep

    q, k, v, _, _ = compute.qkv(s, upload)
    L = k.shape[2]
    errors.inject_fault("budget")
    budgets = [b for b in (1, 2, 4, 8, 16, 32, 64, 128, 256, 512) if b <= min(L, BUDGET_MAX)]
    return budget_sweep(q, k, v, list(SWEPT), budgets, proposals=[s["proposal"]], seeds=SEEDS, causal=s["causal"])


def method_name(method: str, proposal: str, lang: str) -> str:
    """A row's label: the method's catalog name, and its proposal when it has one."""
    name = t(f"method.{method}", lang)
    return f"{name} ({t(f'proposal.{proposal}', lang)})" if proposal else name


def render(s: dict, lang: str) -> None:
    st.caption(t("budget.intro", lang))
    try:
        # The curve does not depend on the chosen method or k: fix them, so moving k reuses the cached curve.
        df = curve({**{k: s[k] for k in compute.COMPUTE_KEYS}, "method": "topk", "top_k": 1}, s["upload"])
    except Exception as exc:
        errors.show(exc, lang)
        return
    names = {m: method_name(m, p, lang) for m, p in zip(df["method"], df["proposal"])}  # one proposal per method
    fig = viz.budget_curve(df, x="budget", y="error_mean", names=names, lang=lang)
    st.plotly_chart(fig, key="budget_chart", config={"displaylogo": False})
    table = df[["method", "budget", "error_mean", "error_std", "mass_kept_mean", "keys_attended"]].rename(columns={
        "method": t("budget.col_method", lang), "budget": t("budget.col_budget", lang),
        "error_mean": t("metric.relative_error", lang), "error_std": t("budget.col_error_std", lang),
        "mass_kept_mean": t("metric.mass_kept", lang), "keys_attended": t("metric.keys_attended", lang),
    })
    table[t("budget.col_method", lang)] = table[t("budget.col_method", lang)].map(names)
    st.dataframe(table, hide_index=True)
    c1, c2 = st.columns(2)
    c1.download_button(t("export.png", lang), lambda: export.png(fig), file_name="accuracy_vs_budget.png",
                       mime="image/png", key="png_budget", on_click="ignore")
    c2.download_button(t("export.csv_budget", lang), df.to_csv(index=False).encode(), file_name="accuracy_vs_budget.csv",
                       mime="text/csv", key="csv_budget", on_click="ignore")
