"""Tab 3: time each method on the chosen device, over sequence lengths, on log-log axes.

Timing runs from all sessions share one lock per device, so one student's
benchmark never runs beside another's and distorts it. Each point is timed
until its spread is small (``sparse_attn.timing.time_until_stable``) or its
share of the time budget is spent; a run stops before a point that would not
fit in what is left, and says which points it did not measure. Each point
also holds its memory estimate of the server-wide budget while it runs
(``admission``), queueing with a message when the maps or a sweep hold it.
"""
from __future__ import annotations

import math
import threading
import time
from typing import NamedTuple

import pandas as pd
import streamlit as st
import torch

from sparse_attn import viz
from sparse_attn.i18n import t
from sparse_attn.methods import METHODS, shape_of
from sparse_attn.timing import NOISY_IQR, cuda_peak_bytes, time_until_stable

from . import admission, charts, compute, errors, guide, state, threads
from .memory import BudgetError, check_budget

LENGTHS = tuple(L for L in state.SEQ_LENS if L >= 64)
DEFAULT_LENGTHS = (128, 256, 512)
WAIT_S = 120  # how long a run waits for another session's run on the same device
MIN_RUNS = 5
# Each point measures for its share of the budget left, within these bounds: a fast point still gets enough
# runs for a median, and one slow point cannot take the time the others need.
POINT_S = (0.2, 5.0)
_LIST_SEP = {"en": "; ", "zh": "；"}  # between the noisy points named in one sentence


class Stopped(NamedTuple):
    """Where a run stopped: the first point not measured, how many were left out, and why."""

    method: str
    seq_len: int
    missing: int
    total: int
    need_s: float | None  # the predicted time of that point; None when the budget was already spent
    left_s: float


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


def _row(key: str, L: int, **values) -> dict:
    nan = float("nan")
    return dict(method=key, seq_len=L, median_ms=nan, q1_ms=nan, q3_ms=nan, iqr_ms=nan, runs=0, noisy=False,
                memory_est=nan, memory_peak=nan) | values


def run_sweep(s: dict, lengths, budget_s: float, lang: str, progress=None, min_run_time: float = 0.05):
    """(rows, stopped): one row per (method, seq_len) measured; ``stopped`` a ``Stopped``, or None when complete.

    Rows: method, seq_len, median_ms, q1_ms, q3_ms, iqr_ms, runs, noisy (IQR
    above ``NOISY_IQR`` x the median, or fewer than 3 runs), memory_est
    (bytes, the cost model's), memory_peak (bytes, measured on CUDA only).
    A point the memory guard refuses gets a row with runs 0.
    """
    rows: list[dict] = []
    stopped = None
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
        shape = shape_of(q, k, v)
        for key in methods:
            left = budget_s - (time.perf_counter() - start)
            if left <= 0:
                stopped = Stopped(key, L, steps - done, steps, None, 0.0)
                break
            m = METHODS[key]
            try:
                need_bytes = check_budget(key, shape, cfg, q.element_size(), with_view=False)
            except BudgetError:
                rows.append(_row(key, L))
                done += 1
                continue
            cost = m.cost(shape, cfg, q.element_size())
            # Lengths run shortest first, so a long point's cost is predicted from a short one: warm-up,
            # block-size estimate and the runs. A run stops before a point that cannot fit, not minutes after.
            need = (MIN_RUNS + 2) * cost.flops * rate.get(key, 0.0)
            if need > left:
                stopped = Stopped(key, L, steps - done, steps, need, left)
                break
            share = min(max(left / (steps - done), POINT_S[0]), POINT_S[1], left)
            with admission.hold(need_bytes, lang), torch.no_grad():
                call = m.timed(q, k, v, cfg)
                timing = time_until_stable(call, max_time=share, min_runs=MIN_RUNS, min_run_time=min_run_time,
                                           num_threads=threads.timing_threads())
                peak = _peak_bytes(call, s["device"])
                del call  # its tensors go before the bytes are given back
            rate[key] = max(rate.get(key, 0.0), timing.median / max(cost.flops, 1.0))
            rows.append(_row(key, L, median_ms=timing.median * 1e3, q1_ms=timing.q1 * 1e3, q3_ms=timing.q3 * 1e3,
                             iqr_ms=timing.iqr * 1e3, runs=timing.runs, noisy=timing.noisy(NOISY_IQR),
                             memory_est=float(cost.memory_bytes), memory_peak=peak))
            done += 1
            if progress is not None:
                progress.progress(done / steps, text=t("speed.progress", lang, method=t(f"method.{key}", lang), L=L))
        if stopped:
            break
    return pd.DataFrame(rows, columns=list(_row("", 0))), stopped


def format_bytes(x: float) -> str:
    """12.3 MiB, 512 KiB, 80 B; a dash for a value not measured."""
    if not math.isfinite(x):
        return "—"
    for factor, name in ((2**30, "GiB"), (2**20, "MiB"), (2**10, "KiB")):
        if x >= factor:
            return f"{x / factor:.3g} {name}"
    return f"{x:.0f} B"


def _ms(x: float) -> str:
    return f"{x:.3g}" if math.isfinite(x) else "—"


def table(df: pd.DataFrame, names: dict[str, str], device: str, lang: str) -> pd.DataFrame:
    """The results as the reader sees them: names, times to 3 digits, memory in KiB / MiB / GiB."""
    cols = {
        t("budget.col_method", lang): df["method"].map(names),
        t("setting.seq_len", lang): df["seq_len"],
        t("speed.col_median", lang): df["median_ms"].map(_ms),
        t("speed.col_iqr", lang): df["iqr_ms"].map(_ms),
        t("charts.col_spread", lang): [f"{i / m:.0%}" if m > 0 else "—" for i, m in zip(df["iqr_ms"], df["median_ms"])],
        t("speed.col_runs", lang): df["runs"],
        t("speed.col_memory", lang): df["memory_est"].map(format_bytes),
    }
    if device.startswith("cuda"):  # the allocator's peak exists only there; no column of dashes on a CPU
        cols[t("speed.col_peak", lang)] = df["memory_peak"].map(format_bytes)
    return pd.DataFrame(cols)


def _status(result: dict, names: dict[str, str], lang: str) -> None:
    """Finished or stopped (never both), then the noisy points and the skipped ones."""
    df, stopped = result["df"], result["stopped"]
    measured = int(df["runs"].gt(0).sum())
    if stopped:
        st.warning(t("speed.cancelled", lang, budget=result["budget"]))
        params = dict(missing=stopped.missing, total=stopped.total, method=names.get(stopped.method, stopped.method),
                      L=stopped.seq_len)
        if stopped.need_s is None:
            st.caption(t("charts.stopped_spent", lang, **params))
        else:
            st.caption(t("charts.stopped_at", lang, need=f"{stopped.need_s:.2g}", left=f"{stopped.left_s:.2g}",
                         **params))
    else:
        st.success(t("speed.done", lang, n=measured))
    noisy = df[df["noisy"] & df["runs"].gt(0)]
    if len(noisy):
        points = _LIST_SEP[lang].join(t("charts.noisy_point", lang, method=names.get(m, m), L=L)
                                      for m, L in zip(noisy["method"], noisy["seq_len"]))
        st.warning(t("charts.noisy", lang, points=points, threshold=f"{NOISY_IQR:.0%}"))
    if df["runs"].eq(0).any():
        st.info(t("speed.skipped", lang))


def render(s: dict, lang: str) -> None:
    ss = st.session_state
    cpu_threads = t("speed.threads", lang, n=threads.timing_threads()) if s["device"] == "cpu" else ""
    st.caption(t("speed.intro", lang, device=s["device"], dtype=s["dtype"], H=s["H"], D=s["D"], threads=cpu_threads,
                 threshold=f"{NOISY_IQR:.0%}"))
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
            df, stopped = run_sweep(s, lengths, float(budget_s), lang, bar)
            bar.empty()
            ss["sp_result"] = dict(df=df, stopped=stopped, budget=budget_s, device=s["device"],
                                   chunk=s["chunk_size"])
        except admission.ServerBusy:  # memory stayed taken by other students' maps or sweeps: not an error
            st.warning(t("guard.busy", lang), icon=admission.ICON_WAIT)
            return
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
    names = {key: t(f"method.{key}", lang) for key in df["method"].unique()}
    names["topk"] = t("speed.topk_streaming", lang, chunk=result["chunk"])
    _status(result, names, lang)
    shown = df[df["runs"].gt(0)]
    fig = viz.scaling_plot(shown, spread=("q1_ms", "q3_ms"), noisy="noisy", names=names, lang=lang)
    charts.show(fig, "speed_chart", filename="timings")
    guide.note("speed", lang)
    st.caption(t("charts.speed_why", lang))
    st.dataframe(table(df, names, result["device"], lang), hide_index=True)
    csv = df if result["device"].startswith("cuda") else df.drop(columns="memory_peak")
    charts.save_hint(lang)
    st.download_button(t("export.csv_timings", lang), csv.to_csv(index=False).encode(), file_name="timings.csv",
                       mime="text/csv", key="csv_speed", on_click="ignore")
