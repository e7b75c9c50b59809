"""How long a call takes and how much memory it allocates: the one timer the app, the sweep and the benchmarks share.

Timing goes through ``torch.utils.benchmark`` (it warms up, synchronises
CUDA and picks how many calls to group); we report the median and the
interquartile range of at least ``min_runs`` measurements. ``time_fn`` runs
for a fixed time; ``time_until_stable`` keeps measuring until the spread is
small or its time is spent, which is what a reader of one chart needs.
"""
from __future__ import annotations

import math
import statistics
import time
import weakref
from dataclasses import dataclass, field
from typing import Callable

import torch
from torch.utils import benchmark
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_leaves

from ._checks import check_int, check_number

__all__ = ["Timing", "time_fn", "time_until_stable", "NOISY_IQR", "cuda_peak_bytes", "TensorMemory",
           "peak_tensor_bytes"]

# torch.utils.benchmark's own warning level: an IQR above 10% of the median "could indicate system fluctuation".
NOISY_IQR = 0.1


@dataclass
class Timing:
    """Seconds per call: median and interquartile range over ``times``, and the quartiles themselves."""

    median: float
    iqr: float
    times: list[float] = field(default_factory=list)
    q1: float = math.nan
    q3: float = math.nan

    @property
    def runs(self) -> int:
        return len(self.times)

    @property
    def relative_iqr(self) -> float:
        """IQR / median: the spread as a share of the number reported (inf for a zero median)."""
        return self.iqr / self.median if self.median > 0 else math.inf

    def noisy(self, threshold: float = NOISY_IQR) -> bool:
        """True when the spread is above ``threshold`` x the median, or too few runs (< 3) to tell."""
        return self.runs < 3 or self.relative_iqr > threshold


def time_fn(fn: Callable[[], object], *, min_run_time: float = 0.5, min_runs: int = 5,
            num_threads: int | None = None) -> Timing:
    """Time ``fn()`` with ``torch.utils.benchmark``; at least ``min_runs`` measurements.

    ``blocked_autorange`` warms up and synchronises CUDA itself; a call slower
    than ``min_run_time`` would get a single measurement, so we top it up with
    single-call measurements until there are ``min_runs``.
    """
    timer = benchmark.Timer(stmt="fn()", globals={"fn": fn}, num_threads=num_threads or torch.get_num_threads())
    m = timer.blocked_autorange(min_run_time=min_run_time)
    times = list(m.times)
    while len(times) < min_runs:
        times.extend(timer.timeit(1).times)
    q1, _, q3 = statistics.quantiles(times, n=4) if len(times) > 1 else (times[0],) * 3
    return Timing(statistics.median(times), q3 - q1, times, q1, q3)


def time_until_stable(fn: Callable[[], object], *, max_time: float = 2.0, threshold: float = NOISY_IQR,
                      min_runs: int = 5, min_run_time: float = 0.05, num_threads: int | None = None) -> Timing:
    """Time ``fn()`` until its IQR is below ``threshold`` x the median, or about ``max_time`` seconds are spent.

    ``torch.utils.benchmark``'s ``adaptive_autorange`` does the measuring
    (warm-up, CUDA synchronisation, calls grouped so the timer's own cost
    vanishes); single calls top it up to ``min_runs`` while time is left, so
    a call slower than ``max_time`` / ``min_runs`` gets fewer runs and
    ``Timing.noisy`` says so. Quartiles interpolate linearly, as torch's
    ``Measurement`` does, so they stay inside the measured range.
    """
    check_number(max_time, "max_time", positive=True)
    check_number(threshold, "threshold", positive=True)
    check_int(min_runs, "min_runs", minimum=1)
    check_number(min_run_time, "min_run_time", positive=True)
    start = time.perf_counter()
    timer = benchmark.Timer(stmt="fn()", globals={"fn": fn}, num_threads=num_threads or torch.get_num_threads())
    m = timer.adaptive_autorange(threshold=threshold, min_run_time=min(min_run_time, max_time),
                                 max_run_time=max_time)
    times = list(m.times)
    while len(times) < min_runs:
        spent = time.perf_counter() - start
        if spent + statistics.median(times) > max_time:
            break
        times.extend(timer.timeit(1).times)
    q1, _, q3 = statistics.quantiles(times, n=4, method="inclusive") if len(times) > 1 else (times[0],) * 3
    median = statistics.median(times)
    q1, q3 = min(q1, median), max(q3, median)  # interpolation can round one ulp past the median
    return Timing(median, q3 - q1, times, q1, q3)


def cuda_peak_bytes(fn: Callable[[], object]) -> int:
    """Bytes one call of ``fn`` allocates on the current CUDA device beyond what was already held."""
    torch.cuda.synchronize()
    base = torch.cuda.memory_allocated()
    torch.cuda.reset_peak_memory_stats()
    fn()
    torch.cuda.synchronize()
    return torch.cuda.max_memory_allocated() - base


class TensorMemory(TorchDispatchMode):
    """Peak bytes of the tensors that operations create inside the ``with`` block, on any device.

    PyTorch calls the mode for every operation; each new storage an operation
    returns is added, and subtracted when it is freed (a view adds nothing).
    It sees every tensor PyTorch hands back, not the scratch inside one fused
    kernel, and not the inputs, which exist before the block. Chapter 2 of the
    notebooks builds it from scratch; the CPU has no allocator counter like
    ``cuda_peak_bytes``'s, which is why this exists.
    """

    def __init__(self):
        super().__init__()
        self.now = self.peak = 0
        self.alive: set[int] = set()

    def _freed(self, key: int, nbytes: int) -> None:
        self.alive.discard(key)
        self.now -= nbytes

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        for t in tree_leaves(out):
            if isinstance(t, torch.Tensor) and id(t.untyped_storage()) not in self.alive:
                storage = t.untyped_storage()
                self.alive.add(id(storage))
                self.now += storage.nbytes()
                weakref.finalize(storage, self._freed, id(storage), storage.nbytes())
        self.peak = max(self.peak, self.now)
        return out


def peak_tensor_bytes(fn: Callable[[], object]) -> int:
    """Peak bytes of the tensors ``fn()`` creates while it runs (``TensorMemory``); its result is dropped."""
    with TensorMemory() as counter:
        fn()
    return counter.peak
