"""How long a call takes and how much memory it allocates: the one timer the app, the sweep and the benchmarks share.

Timing goes through ``torch.utils.benchmark`` (it warms up, synchronises
CUDA and picks how many calls to group); we report the median and the
interquartile range of at least ``min_runs`` measurements.
"""
from __future__ import annotations

import statistics
from dataclasses import dataclass, field
from typing import Callable

import torch
from torch.utils import benchmark

__all__ = ["Timing", "time_fn", "cuda_peak_bytes"]


@dataclass
class Timing:
    """Seconds per call: median and interquartile range over ``times``."""

    median: float
    iqr: float
    times: list[float] = field(default_factory=list)

    @property
    def runs(self) -> int:
        return len(self.times)


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
    return Timing(statistics.median(times), q3 - q1, times)


def cuda_peak_bytes(fn: Callable[[], object]) -> int:
    """Bytes one call of ``fn`` allocates on the current CUDA device beyond what was already held."""
    torch.cuda.synchronize()
    base = torch.cuda.memory_allocated()
    torch.cuda.reset_peak_memory_stats()
    fn()
    torch.cuda.synchronize()
    return torch.cuda.max_memory_allocated() - base
