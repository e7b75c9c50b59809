"""Measure cases: one call's peak memory, then timing; in this process, in a fresh one, or a sweep of them.

Every method is built through the registry (``METHODS[name].timed``, which
validates the settings and prepares inputs such as the selected branch's
block indices), so a benchmark times exactly what the library, the app and
the sweep run under that name.
"""
from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path
from typing import Callable

import torch

from sparse_attn.methods import METHODS
from sparse_attn.timing import cuda_peak_bytes, time_fn

from .cases import CUDA_ONLY_BACKENDS, DTYPES, SDPA_BACKENDS, SDPA_METHODS, Case
from .memory import available_bytes, estimate_bytes, peak_rss_bytes, reset_peak_rss, rss_bytes

__all__ = ["timed_call", "measure_case", "run_case_subprocess", "skip_reason", "run_sweep", "add_speedup",
           "SHAPE_KEYS"]

# The fresh process imports ``benchmarks`` from the checkout this module lives in, wherever it is started.
_ROOT = str(Path(__file__).resolve().parents[1])


def timed_call(case: Case, q, k, v) -> Callable[[], torch.Tensor]:
    """The zero-argument call to measure: the registry's ``timed`` call, under the case's SDPA backend if pinned."""
    fn = METHODS[case.method].timed(q, k, v, case.config)
    backend = SDPA_BACKENDS[case.sdpa_backend]
    if backend is None:
        return fn
    from torch.nn.attention import SDPBackend, sdpa_kernel

    pinned = [getattr(SDPBackend, backend)]

    def run():
        with sdpa_kernel(pinned):
            return fn()

    return run


def _refusal(case: Case) -> str | None:
    """Why a case makes no sense anywhere (an unknown name, a backend for the wrong method), or None."""
    if case.method not in METHODS:
        return f"unknown method {case.method!r}: method must be one of {list(METHODS)}"
    if case.dtype not in DTYPES:
        return f"unknown dtype {case.dtype!r}; choose from {sorted(DTYPES)}"
    if case.device.startswith("cuda") and not torch.cuda.is_available():
        return f"device {case.device!r} asked for, but CUDA is not available here"
    if case.sdpa_backend not in SDPA_BACKENDS:
        return f"unknown SDPA backend {case.sdpa_backend!r}; choose from {list(SDPA_BACKENDS)}"
    if case.sdpa_backend != "default" and case.method not in SDPA_METHODS:
        return f"an SDPA backend applies to {list(SDPA_METHODS)} only, not {case.method!r}"
    return None


def _check_case(case: Case) -> None:
    reason = _refusal(case)
    if reason:
        raise ValueError(reason)


def measure_case(case: Case, *, timing: bool = True) -> dict:
    """Run one case in this process: peak memory of a single call, then timing.

    Returns the case's row plus results. On the CPU the peak is the resident
    set's high-water mark during the call (reset just before it), and
    ``peak_extra_bytes`` is that minus the resident set just before the call
    (inputs already allocated); a fresh process (``run_case_subprocess``)
    keeps other cases' freed-but-cached memory out of it. On CUDA it is the
    allocator's peak above what was held before the call.
    """
    _check_case(case)
    tiny = case.tiny()
    timed_call(tiny, *tiny.inputs())()
    q, k, v = case.inputs()
    fn = timed_call(case, q, k, v)
    row = case.to_row()
    if case.device.startswith("cuda"):
        row["peak_extra_bytes"] = cuda_peak_bytes(fn)
    else:
        reset_peak_rss()
        base = rss_bytes()
        fn()
        peak = peak_rss_bytes()
        row["peak_rss_bytes"] = peak
        row["peak_extra_bytes"] = max(peak - base, 0)
    if timing:
        t = time_fn(fn, min_run_time=case.min_run_time, min_runs=case.min_runs)
        row.update(median_s=t.median, iqr_s=t.iqr, runs=t.runs)
    return row


def run_case_subprocess(case: Case, *, timing: bool = True, timeout: float | None = None) -> dict:
    """``measure_case`` in a fresh Python process, so the CPU memory high-water mark is this case's alone.

    A case the process could not run comes back as its row with an ``error`` (the last line it printed).
    """
    cmd = [sys.executable, "-m", "benchmarks", "_case", json.dumps(case.to_row())]
    if not timing:
        cmd.append("--no-timing")
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(p for p in (_ROOT, os.environ.get("PYTHONPATH")) if p)}
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, env=env)
    if proc.returncode != 0:
        tail = proc.stderr.strip().splitlines()[-1:] or [f"exit code {proc.returncode}"]
        return {**case.to_row(), "error": tail[0]}
    return json.loads(proc.stdout.strip().splitlines()[-1])


def skip_reason(case: Case) -> str | None:
    """Why a case cannot run here (a note for the table), or None."""
    reason = _refusal(case)
    if reason:
        return reason
    if case.sdpa_backend in CUDA_ONLY_BACKENDS and not case.device.startswith("cuda"):
        return f"{case.label} runs on CUDA only"
    if case.kv_heads and case.heads % case.kv_heads:
        return f"heads ({case.heads}) must be a multiple of kv_heads ({case.kv_heads})"
    validate = METHODS[case.method].validate
    if validate is not None:
        try:
            validate(case.config)
        except ValueError as e:
            return f"{type(e).__name__}: {e}"
    need, free = estimate_bytes(case), available_bytes(case.device)
    if need > 0.8 * free:
        return f"skipped: needs about {need / 2**30:.1f} GiB, {free / 2**30:.1f} GiB free on {case.device}"
    return None


def _measure_in_process(case: Case) -> dict:
    try:
        return measure_case(case)
    except torch.cuda.OutOfMemoryError:
        torch.cuda.empty_cache()
        return {**case.to_row(), "note": "skipped: out of memory on the device"}
    except (ValueError, TypeError, RuntimeError) as e:
        if torch.cuda.is_available():
            torch.cuda.empty_cache()
        return {**case.to_row(), "note": f"{type(e).__name__}: {str(e).splitlines()[0][:200]}"}


def run_sweep(cases: list[Case], *, progress: bool = True, on_row: Callable[[dict], None] | None = None,
              timeout: float | None = None) -> list[dict]:
    """Measure every case; a case that cannot run becomes a row with a ``note`` and the sweep goes on.

    CPU cases run in a fresh subprocess each (their memory high-water mark is
    theirs alone); CUDA cases run in this process, with the allocator's peak
    counter reset per case. ``on_row`` sees each row as it is made.
    """
    bar = None
    if progress:
        try:
            from tqdm.auto import tqdm

            bar = tqdm(total=len(cases), unit="case", file=sys.stderr)
        except ImportError:
            bar = None
    rows = []
    for i, case in enumerate(cases, 1):
        label = f"{case.label} L={case.length} {case.dtype} {case.device}"
        if bar is not None:
            bar.set_description(label)
        elif progress:
            print(f"[{i}/{len(cases)}] {label}", file=sys.stderr, flush=True)
        reason = skip_reason(case)
        if reason:
            row = {**case.to_row(), "note": reason}
        elif case.device.startswith("cuda"):
            row = _measure_in_process(case)
        else:
            row = run_case_subprocess(case, timeout=timeout)
            if "error" in row:
                row["note"] = row.pop("error")
        rows.append(row)
        if on_row is not None:
            on_row(row)
        if bar is not None:
            bar.update(1)
    if bar is not None:
        bar.close()
    add_speedup(rows)
    return rows


SHAPE_KEYS = ("length", "batch", "heads", "kv_heads", "head_dim", "causal", "dtype", "device")


def add_speedup(rows: list[dict]) -> None:
    """speedup_vs_dense = dense's median (SDPA, default backend) / this row's median, on the same shapes and device."""
    base = {tuple(r.get(k) for k in SHAPE_KEYS): r["median_s"] for r in rows
            if r["method"] == "dense" and r.get("sdpa_backend", "default") == "default" and "median_s" in r}
    for r in rows:
        ref = base.get(tuple(r.get(k) for k in SHAPE_KEYS))
        if ref and "median_s" in r:
            r["speedup_vs_dense"] = ref / r["median_s"]
