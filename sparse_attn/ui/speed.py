"""Tab 3: time each method on the chosen device, over sequence lengths, on log-log axes.

Timing runs from all sessions share one lock per device, so one student's
benchmark never runs beside another's and distorts it. A run stops when its
time budget is spent and shows what it measured so far.
"""
from __future__ import annotations

import threading
import time

import pandas as pd
import streamlit as st
import torch

from sparse_attn import viz
from sparse_attn.i18n import t
from sparse_attn.methods import METHODS, shape_of
from sparse_attn.timing import cuda_peak_bytes, time_fn

from . import compute, errors, export, state
from .memory import BudgetError, check_budget

LENGTHS = tuple(L for L in state.SEQ_LENS if L >= 64)
DEFAULT_LENGTHS = (128, 256, 512)
WAIT_S = 120  # how long a run waits for another session's run on the same device


@st.cache_resource
def device_locks() -> dict[str, threading.Lock]:
    """One lock per device, shared by every session of this server process."""
    return {d: threading.Lock() for d in state.devices()}


def timed_methods(s: dict) -> list[str]:
    """Dense SDPA, the full-score top-k, streaming top-k at the chosen chunk, and the chosen method."""
    keys = ["dense", "topk_full", "topk"]
    if s["method"] not in keys:
        keys.append(s["method"])
    return keys


def _peak_bytes(fn, device: str) -> float:
    """Peak memory one call allocates beyond what was already held; measured on CUDA only (NaN elsewhere)."""
    if not device.startswith("cuda"):
        return float("nan")
    return float(cuda_peak_bytes(fn))


def run_sweep(s: dict, lengths, budget_s: float, lang: str, progress=None, min_run_time: float = 0.1):
    """Rows (method, seq_len, median_ms, iqr_ms, runs, memory_est) and whether the time budget stopped it."""
    rows, cancelled = [], False
    methods = timed_methods(s)
    cfg = compute.config(s)
    steps = len(lengths) * len(methods)
    start = time.perf_counter()
    done = 0
    rate: dict[str, float] = {}  # seconds per estimated FLOP, per method, from the points measured so far
    for L in sorted(lengths):
        # Timings depend on shapes, not values: every source is timed on random q, k, v of its head count.
        q, k, v, _, _ = compute.qkv({**s, "source": "synthetic", "pattern": "random", "L": L, "method": "dense"},
                                    with_view=False)
        for key in methods:
            done += 1
            if time.perf_counter() - start > budget_s:
                cancelled = True
                break
            m = METHODS[key]
            try:
                check_budget(key, shape_of(q, k, v), cfg, q.element_size(), with_view=False)
            except BudgetError:
                rows.append(dict(method=key, seq_len=L, median_ms=float("nan"), iqr_ms=float("nan"), runs=0,
                                 memory_est=float("nan"), memory_peak=float("nan")))
                continue
            flops = m.cost(shape_of(q, k, v), cfg, q.element_size()).flops
            # Lengths run shortest first, so a long point's cost is predicted from a short one:
            # a run stops before a point that would overrun its budget, not minutes after.
            predicted = 4 * flops * rate.get(key, 0.0)
            if time.perf_counter() - start + predicted > budget_s:
                cancelled = True
                break
            with torch.no_grad():
                call = m.timed(q, k, v, cfg)
                timing = time_fn(call, min_run_time=min_run_time, min_runs=3)
                peak = _peak_bytes(call, s["device"])
            rate[key] = max(rate.get(key, 0.0), timing.median / max(flops, 1.0))
            rows.append(dict(method=key, seq_len=L, median_ms=timing.median * 1e3, iqr_ms=timing.iqr * 1e3,
                             runs=timing.runs, memory_est=m.cost(shape_of(q, k, v), cfg, q.element_size()).memory_bytes,
                             memory_peak=peak))
            if progress is not None:
                progress.progress(done / steps, text=t("speed.progress", lang, method=t(f"method.{key}", lang), L=L))
        if cancelled:
            break
    return pd.DataFrame(rows), cancelled


def render(s: dict, lang: str) -> None:
    ss = st.session_state
    st.caption(t("speed.intro", lang, device=s["device"], dtype=s["dtype"], H=s["H"], D=s["D"]))
    c1, c2 = st.columns([3, 1])
    lengths = c1.multiselect(t("speed.lengths", lang), LENGTHS, default=list(DEFAULT_LENGTHS), key="sp_lengths")
    budget_s = c2.number_input(t("speed.time_budget", lang), 1, 300, 30, key="sp_budget")
    if st.button(t("speed.run", lang), key="sp_run", type="primary", disabled=not lengths):
        lock = device_locks()[s["device"]]
        waiting = st.empty()
        if not lock.acquire(blocking=False):
            waiting.info(t("speed.waiting", lang))
            if not lock.acquire(timeout=WAIT_S):
                waiting.warning(t("speed.busy", lang))
                return
        try:
            waiting.empty()
            bar = st.progress(0.0, text=t("speed.starting", lang))
            df, cancelled = run_sweep(s, lengths, float(budget_s), lang, bar)
            bar.empty()
            ss["sp_result"] = dict(df=df, cancelled=cancelled, settings=(s["device"], s["dtype"], s["H"], s["D"], s["chunk_size"]))
        except Exception as exc:
            errors.show(exc, lang)
            return
        finally:
            lock.release()
    result = ss.get("sp_result")
    if result is None:
        st.info(t("speed.hint", lang))
        return
    df = result["df"]
    if result["cancelled"]:
        st.warning(t("speed.cancelled", lang, budget=budget_s))
    if df["median_ms"].isna().any():
        st.info(t("speed.skipped", lang))
    names = {key: t(f"method.{key}", lang) for key in df["method"].unique()}
    names["topk"] = t("speed.topk_streaming", lang, chunk=result["settings"][4])
    fig = viz.scaling_plot(df.dropna(subset=["median_ms"]), names=names, lang=lang)
    st.plotly_chart(fig, key="speed_chart", config={"displaylogo": False})
    st.success(t("speed.done", lang, n=int(df["runs"].gt(0).sum())))
    table = df.assign(method=df["method"].map(names)).rename(columns={
        "method": t("budget.col_method", lang), "seq_len": t("setting.seq_len", lang),
        "median_ms": t("speed.col_median", lang), "iqr_ms": t("speed.col_iqr", lang),
        "runs": t("speed.col_runs", lang), "memory_est": t("speed.col_memory", lang),
        "memory_peak": t("speed.col_peak", lang),
    })
    st.dataframe(table, hide_index=True)
    c1, c2 = st.columns(2)
    c1.download_button(t("export.png", lang), lambda: export.png(fig), file_name="timings.png", mime="image/png",
                       key="png_speed", on_click="ignore")
    c2.download_button(t("export.csv_timings", lang), df.to_csv(index=False).encode(), file_name="timings.csv",
                       mime="text/csv", key="csv_speed", on_click="ignore")
