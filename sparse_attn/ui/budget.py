"""Tab 2: accuracy against budget, the error-vs-keys curve of every method a budget drives, on the current input.

The methods come from the registry (``sparse_attn.sweep.default_methods``:
each role-"method" entry with an ``at_budget``), so a newly registered method
is swept here without a change to this file. Each runs with the sidebar's
other settings (proposal, sinks, page and block sizes); the budget sets the
rest (``Method.at_budget``).
"""
from __future__ import annotations

import pandas as pd
import streamlit as st

from sparse_attn import viz
from sparse_attn.i18n import t
from sparse_attn.methods import METHODS, SettingError, Shape, shape_of

from . import compute, errors, export, guide
from .memory import BudgetError, check_budget

BUDGETS = (1, 2, 4, 8, 16, 32, 64, 128, 256, 512)  # keys per query; those beyond the key length are left out
SEEDS = (0, 1, 2)
# Settings every at_budget overwrites (or the seeds replace): pinned in the cache key, so moving them reuses the curve.
PINNED = {"method": "topk", "top_k": 1, "num_samples": 1, "token_budget": 1, "seed": 0}
# Below these the error is rounding: an exact method measured at most 1.9e-6 in float32 and 2.5e-15 in
# float64 on the default input (docs/app.md); half precision rounds by more, so it shows what it measures.
EXACT_BELOW = {"float64": 1e-12}
EXACT_BELOW_DEFAULT = 1e-5


def swept() -> list[str]:
    """The registry keys this tab sweeps, in registration order."""
    from sparse_attn.sweep import default_methods

    return default_methods()


@st.cache_data(max_entries=8, ttl=1800, show_spinner=False)
def curve(s: dict, upload=None):
    """(table, skipped, shape): the sweep of every ``swept()`` method, what was left out and why, q/k/v's sizes.

    ``skipped`` holds (method, last, code, params, message): for a method
    whose settings this input cannot take; for the first budget whose memory
    estimate the memory guard refuses (``memory.check_budget``, as for the
    maps; larger budgets are left out too), ``last`` the largest budget that
    fits, or None; and with code "no_point" for a method that no budget here
    can drive (``at_budget`` returns None).
    """
    from sparse_attn.sweep import budget_sweep

    q, k, v, _, _ = compute.qkv(s, upload)
    shape = shape_of(q, k, v)
    errors.inject_fault("budget")
    base = compute.config(s)  # the sidebar's settings, causal included; each budget sets the rest
    budgets = [b for b in BUDGETS if b <= shape.Lk]
    tables, skipped = [], []
    for key in swept():
        method = METHODS[key]
        fits = []
        try:
            for b in budgets:
                cfg = method.at_budget(base, b, num_keys=shape.Lk)
                if cfg is not None:
                    check_budget(key, shape, cfg, q.element_size(), with_view=True)
                    fits.append(b)
        except BudgetError as exc:  # costs grow with the budget: the larger ones would be refused too
            skipped.append((key, fits[-1] if fits else None, exc.code, dict(exc.params), str(exc)))
        else:
            if not fits and budgets:
                skipped.append((key, None, "no_point", {"max": budgets[-1]}, "no budget here can drive it"))
        if not fits:
            continue
        try:
            tables.append(budget_sweep(q, k, v, [key], fits, proposals=[s["proposal"]], seeds=SEEDS,
                                       causal=s["causal"], config=base))
        except SettingError as exc:  # e.g. a page larger than this input: the other methods still show
            skipped.append((key, None, exc.code, dict(exc.params), str(exc)))
    df = pd.concat(tables, ignore_index=True) if tables else None
    return df, skipped, tuple(shape)


def method_name(method: str, proposal: str, lang: str) -> str:
    """A row's label: the method's catalog name, and its proposal when it has one."""
    name = t(f"method.{method}", lang)
    return f"{name} ({t(f'proposal.{proposal}', lang)})" if proposal else name


def current_keys(s: dict, shape: Shape) -> float | None:
    """Keys per query of the sidebar's method and settings (its cost model), or None when it has no estimate."""
    method = METHODS[s["method"]]
    try:
        return float(method.cost(shape, compute.config(s), 4).keys_attended)
    except (TypeError, ValueError, ZeroDivisionError):
        return None


def render(s: dict, lang: str) -> None:
    st.caption(t("budget.intro", lang))
    try:
        # The curve does not depend on the chosen method or on the settings a budget sets: pin them.
        df, skipped, shape = curve({**{k: s[k] for k in compute.COMPUTE_KEYS}, **PINNED}, s["upload"])
    except Exception as exc:
        errors.show(exc, lang)
        return
    for key, last, code, params, message in skipped:
        reason = (t("budget.no_point", lang, **params) if code == "no_point"
                  else errors.message(SettingError(code, message, **params), lang))
        name = t(f"method.{key}", lang)
        st.info(t("budget.stops_at", lang, method=name, last=last, reason=reason) if last is not None
                else t("budget.skipped_method", lang, method=name, reason=reason))
    if df is None:
        return
    metric = st.radio(t("budget.metric", lang), tuple(viz.CURVE_METRICS), key="bd_metric", horizontal=True,
                      format_func=lambda m: t(viz.CURVE_METRICS[m], lang))
    names = {m: method_name(m, p, lang) for m, p in zip(df["method"], df["proposal"])}  # one proposal per method
    here = current_keys(s, Shape(*shape))  # drawn outside the cache: moving k moves only the line
    here = here if here and here > 0 else None
    label = None if here is None else t("budget.current", lang, method=t(f"method.{s['method']}", lang),
                                        value=f"{here:.3g}")
    fig = viz.budget_curve(df, x="budget", y=metric, names=names, current=here, current_label=label,
                           exact_below=EXACT_BELOW.get(s["dtype"], EXACT_BELOW_DEFAULT), lang=lang)
    st.plotly_chart(fig, key="budget_chart", config={"displaylogo": False})
    guide.note("budget", lang)
    st.caption(t("budget.note", lang))
    cols = {
        "method": t("budget.col_method", lang), "budget": t("budget.col_budget", lang),
        "error_mean": t("metric.relative_error", lang), "error_std": t("budget.col_error_std", lang),
        "error_vs_uniform_mean": t("metric.error_vs_uniform", lang), "mass_kept_mean": t("metric.mass_kept", lang),
        "tv_mean": t("metric.total_variation", lang), "kl_finite": t("budget.col_kl_finite", lang),
        "kl_mean": t("budget.col_kl_mean", lang), "keys_attended": t("metric.keys_attended", lang),
    }
    table = df[list(cols)].assign(method=df["method"].map(names)).rename(columns=cols)
    st.dataframe(table, hide_index=True)
    c1, c2 = st.columns(2)
    c1.download_button(t("export.png", lang), lambda: export.png(fig), file_name="accuracy_vs_budget.png",
                       mime="image/png", key="png_budget", on_click="ignore")
    c2.download_button(t("export.csv_budget", lang), df.to_csv(index=False).encode(), file_name="accuracy_vs_budget.csv",
                       mime="text/csv", key="csv_budget", on_click="ignore")
