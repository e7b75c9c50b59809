"""Tab 2: accuracy against budget, the error-vs-keys curve of every method a budget drives, on the current input.

The methods come from the registry (``sparse_attn.sweep.default_methods``:
each role-"method" entry with an ``at_budget``), so a newly registered method
is swept here without a change to this file. Each runs with the sidebar's
other settings (proposal, sinks, page and block sizes); the budget sets the
rest (``Method.at_budget``).
"""
from __future__ import annotations

import hashlib
import os
import threading
import time
from collections import OrderedDict
from typing import Callable, NamedTuple

import pandas as pd
import streamlit as st
import torch
from streamlit.runtime import Runtime
from streamlit.runtime.scriptrunner_utils.script_requests import ScriptRequestType
from streamlit.runtime.scriptrunner_utils.script_run_context import get_script_run_ctx

from sparse_attn import viz
from sparse_attn.i18n import t
from sparse_attn.methods import METHODS, SettingError, Shape, shape_of
from sparse_attn.ops.dense import dense_attention
from sparse_attn.sweep import budget_sweep

from . import admission, charts, compute, errors, guide, state
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


# A sweep runs at most this long (``SPARSE_ATTN_SWEEP_LIMIT_S`` when set); then it shows what finished.
LIMIT_ENV = "SPARSE_ATTN_SWEEP_LIMIT_S"
LIMIT_S = 60.0
# CPU seconds of one run of one seed: a fixed part plus a part per million (query, key) pairs over all heads
# (B * H * Lq * Lk), fitted to the whole default sweep at L = 256 and 512 on a 2-core CPU (0.40 and 0.97 s per
# run; docs/benchmarks.md). Only the pre-start estimate uses it, to decide whether to run one seed instead of
# three; the deadline is what bounds a run, on any machine.
RUN_S = (0.2, 0.75)
KEEP = 8  # finished sweeps kept per server (each a table of at most a few hundred rows)
KEEP_S = 1800.0


def limit_s() -> float:
    raw = os.environ.get(LIMIT_ENV)
    try:
        value = float(raw) if raw else LIMIT_S
    except ValueError:
        raise ValueError(f"{LIMIT_ENV} must be a number of seconds, got {raw!r}") from None
    return value if value > 0 else LIMIT_S


class Plan(NamedTuple):
    """What a sweep will run, decided before anything large is allocated."""

    q: torch.Tensor
    k: torch.Tensor
    v: torch.Tensor
    shape: Shape
    steps: list  # (method, budget) in budget-major order: a sweep cut short still shows every method's left end
    runs: dict  # method -> runs of one seed per step
    seeds: tuple
    skipped: list
    need_bytes: float
    estimate_s: float  # of the full plan, with ``SEEDS``
    shrunk: bool  # sampled methods run one seed because three would not fit in the time limit


def plan(s: dict, upload=None) -> Plan:
    """The steps of the sweep, the memory they need and the time they would take; ``SettingError`` for bad input.

    ``skipped`` holds (method, last, code, params, message): for a method
    whose settings this input cannot take; for the first budget whose memory
    estimate the memory guard refuses (``memory.check_budget``, as for the
    maps; larger budgets are left out too), ``last`` the largest budget that
    fits, or None; and with code "no_point" for a method that no budget here
    can drive (``at_budget`` returns None).
    """
    q, k, v, _, _ = compute.qkv(s, upload)
    shape = shape_of(q, k, v)
    errors.inject_fault("budget")
    base = compute.config(s)  # the sidebar's settings, causal included; each budget sets the rest
    budgets = [b for b in BUDGETS if b <= shape.Lk]
    fits, skipped, need = {}, [], 0.0
    for key in swept():
        method = METHODS[key]
        fits[key] = []
        try:
            for b in budgets:
                cfg = method.at_budget(base, b, num_keys=shape.Lk)
                if cfg is not None:
                    need = max(need, check_budget(key, shape, cfg, q.element_size(), with_view=True))
                    fits[key].append(b)
        except BudgetError as exc:  # costs grow with the budget: the larger ones would be refused too
            skipped.append((key, fits[key][-1] if fits[key] else None, exc.code, dict(exc.params), str(exc)))
        except SettingError as exc:  # e.g. a page larger than this input: the other methods still show
            skipped.append((key, None, exc.code, dict(exc.params), str(exc)))
            fits[key] = []
        else:
            if not fits[key] and budgets:
                skipped.append((key, None, "no_point", {"max": budgets[-1]}, "no budget here can drive it"))
    steps = [(key, b) for b in budgets for key in fits if b in fits[key]]
    random = {key: "proposal" in METHODS[key].params for key in fits}
    per_run = RUN_S[0] + RUN_S[1] * shape.B * shape.H * shape.Lq * shape.Lk / 1e6
    estimate = sum(len(SEEDS) if random[key] else 1 for key, _ in steps) * per_run
    # Fewer seeds only help where a method draws them: otherwise the deadline alone bounds the run.
    seeds = SEEDS if estimate <= limit_s() or not any(random[key] for key, _ in steps) else SEEDS[:1]
    runs = {key: len(seeds) if random[key] else 1 for key in fits}
    return Plan(q, k, v, shape, steps, runs, seeds, skipped, need, estimate, seeds != SEEDS)


class Sweep:
    """One sweep's rows so far; ``final`` once complete or cut at the time limit (a student who left resumes it)."""

    def __init__(self, p: Plan):
        self.lock = threading.Lock()  # one session computes a sweep; another with the same settings waits for it
        self.parts: list[pd.DataFrame] = []
        self.done: set = set()
        self.failed: set = set()
        self.skipped = list(p.skipped)
        self.shape = tuple(p.shape)
        self.runs_total = sum(p.runs[key] for key, _ in p.steps)
        self.runs_done = 0
        self.final = False
        self.cut = None  # (limit_s, last budget every method reached) when the time limit stopped it
        self.shrunk = (p.estimate_s, len(p.seeds)) if p.shrunk else None
        self.born = time.monotonic()

    def table(self) -> pd.DataFrame | None:
        if not self.parts:
            return None
        df = pd.concat(self.parts, ignore_index=True)
        order = {key: i for i, key in enumerate(swept())}  # registration order, then budget: as the chart reads
        return df.sort_values(["method", "budget"], key=lambda c: c.map(order) if c.name == "method" else c,
                              kind="stable", ignore_index=True)


class Sweeps:
    """The finished (and resumable) sweeps of this server, at most ``KEEP``, each for ``KEEP_S`` s."""

    def __init__(self):
        self._lock = threading.Lock()
        self._items: OrderedDict = OrderedDict()

    def get(self, key) -> Sweep | None:
        with self._lock:
            now = time.monotonic()
            for old in [k for k, sw in self._items.items() if now - sw.born > KEEP_S]:
                del self._items[old]
            if key in self._items:
                self._items.move_to_end(key)
            return self._items.get(key)

    def add(self, key, sw: Sweep) -> Sweep:
        """Keep ``sw`` under ``key``, unless another session just did: then the one kept."""
        with self._lock:
            kept = self._items.setdefault(key, sw)
            self._items.move_to_end(key)
            while len(self._items) > KEEP:
                self._items.popitem(last=False)
            return kept


@st.cache_resource
def sweeps() -> Sweeps:
    return Sweeps()


def cache_key(s: dict, upload) -> tuple:
    digest = None if upload is None else (upload[0], hashlib.sha256(upload[1]).hexdigest())
    return tuple(sorted(s.items())), digest


def still_here() -> Callable[[], bool]:
    """False once this run's student closed the page (websocket gone) or asked for a rerun."""
    ctx = get_script_run_ctx(suppress_warning=True)
    if ctx is None:
        return lambda: True
    runtime = Runtime.instance() if Runtime.exists() else None
    requests = ctx.script_requests

    def alive() -> bool:
        if runtime is not None and not runtime.is_active_session(ctx.session_id):
            return False
        # A pending rerun or stop (fastReruns): Streamlit would raise it at the next st call; notice it between runs.
        state = getattr(requests, "_state", None)
        return state is None or state == ScriptRequestType.CONTINUE
    return alive


def _progress(bar, sw: Sweep, key: str, budget: int, started: float, runs_at_start: int, lang: str) -> None:
    done = sw.runs_done - runs_at_start
    rate = (time.monotonic() - started) / done if done else None
    left = "…" if rate is None else f"{rate * (sw.runs_total - sw.runs_done):.0f}"
    bar.progress(min(sw.runs_done / max(sw.runs_total, 1), 1.0),
                 text=t("guard.sweep_progress", lang, method=t(f"method.{key}", lang), budget=budget,
                        done=sw.runs_done, total=sw.runs_total, left=left))


def _run(sw: Sweep, p: Plan, s: dict, bar, lang: str) -> None:
    """Run the steps ``sw`` has not done, until done, the time limit, or the student leaves or reruns."""
    limit = limit_s()
    started = time.monotonic()
    deadline = started + limit
    alive, at_start = still_here(), sw.runs_done
    base = compute.config(s)
    with torch.no_grad():
        ref = dense_attention(p.q, p.k, p.v, causal=s["causal"], return_weights=True)
    stopped = None
    for key, b in p.steps:
        if (key, b) in sw.done or key in sw.failed:
            continue
        _progress(bar, sw, key, b, started, at_start, lang)  # an st call: where Streamlit stops a run it was asked to
        runs_before = sw.runs_done

        def step(done, total, method, budget, runs_before=runs_before):
            sw.runs_done = runs_before + done
        try:
            df = budget_sweep(p.q, p.k, p.v, [key], [b], proposals=[s["proposal"]], seeds=p.seeds,
                              causal=s["causal"], config=base, reference=ref, should_stop=lambda: not alive(),
                              deadline=deadline, on_step=step)
        except SettingError as exc:  # e.g. a page larger than this input: the other methods still show
            sw.skipped.append((key, None, exc.code, dict(exc.params), str(exc)))
            sw.failed.add(key)
            continue
        stopped = df.attrs["stopped"]
        if stopped:
            sw.runs_done = runs_before  # the unfinished row is left out, and so are its runs
            break
        sw.parts.append(df)
        sw.done.add((key, b))
    if stopped == "should_stop":
        return  # not final: the same settings resume from here
    if stopped == "deadline":
        reached = [b for b in sorted({b for _, b in p.steps}) if all((k2, b) in sw.done or k2 in sw.failed
                                                                      for k2, b2 in p.steps if b2 == b)]
        sw.cut = (limit, reached[-1] if reached else None)
    sw.final = True


def curve(s: dict, upload, lang: str, announce: Callable[[Sweep], None] | None = None) -> Sweep | None:
    """The sweep for these settings: from this server's memory, or run now with progress; None when the server is busy.

    A run is admitted against the server's memory budget (``admission``), shows
    a progress bar, stops at ``limit_s()`` (keeping what finished) and stops
    between runs when its student leaves or reruns (kept, to resume).
    ``announce(sweep)`` is called before a run starts, to say what was decided.
    """
    key = cache_key(s, upload)
    sw = sweeps().get(key)
    if sw is not None and sw.final:
        return sw
    p = plan(s, upload)
    sw = sw or sweeps().add(key, Sweep(p))
    box = st.empty()
    waited = time.monotonic()
    while not sw.lock.acquire(timeout=admission.POLL_S):  # another student is computing these very settings
        if time.monotonic() - waited > admission.WAIT_S:
            box.empty()
            st.warning(t("guard.busy", lang), icon=admission.ICON_WAIT)
            return None
        box.info(t("guard.same_sweep", lang), icon=admission.ICON_WAIT)
    try:
        if sw.final:
            box.empty()
            return sw
        if announce is not None:
            announce(sw)
        try:
            with admission.hold(p.need_bytes, lang, box):
                bar = box.progress(0.0, text=t("guard.sweep_start", lang))
                _run(sw, p, s, bar, lang)
        except admission.ServerBusy:
            st.warning(t("guard.busy", lang), icon=admission.ICON_WAIT)
            return None
        box.empty()
    finally:
        sw.lock.release()
    return sw


def _lower(sw: Sweep, lang: str) -> str:
    """The setting to lower for a faster sweep: time grows with heads x length^2, so the length, unless shortest."""
    return errors.setting_label("seq_len" if Shape(*sw.shape).Lq > min(state.SEQ_LENS) else "heads", lang)


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
    notes, said = st.container(), []

    def announce(sw: Sweep) -> None:  # before the run starts, and again on every rerun that shows its result
        if sw.shrunk and not said:
            notes.info(t("guard.shrunk", lang, limit=f"{limit_s():.0f}", seeds=len(SEEDS), setting=_lower(sw, lang)))
            said.append(True)

    try:
        # The curve does not depend on the chosen method or on the settings a budget sets: pin them.
        sw = curve({**{k: s[k] for k in compute.COMPUTE_KEYS}, **PINNED}, s["upload"], lang, announce)
    except Exception as exc:
        errors.show(exc, lang)
        return
    if sw is None:  # the server stayed busy: told so
        return
    announce(sw)
    df, skipped, shape = sw.table(), sw.skipped, sw.shape
    setting = _lower(sw, lang)
    if sw.cut:
        limit, last = sw.cut
        where = (t("guard.cut_reached", lang, last=last) if last is not None else t("guard.cut_none", lang))
        st.warning(t("guard.cut", lang, limit=f"{limit:.0f}", done=sw.runs_done, total=sw.runs_total, where=where,
                     setting=setting), icon=":material/timer:")
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
    charts.show(fig, "budget_chart", filename="accuracy_vs_budget")
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
    charts.save_hint(lang)
    st.download_button(t("export.csv_budget", lang), df.to_csv(index=False).encode(), file_name="accuracy_vs_budget.csv",
                       mime="text/csv", key="csv_budget", on_click="ignore")
