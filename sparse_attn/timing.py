"""How long a call takes and how much memory it allocates: the one timer the app, the sweep and the benchmarks share.

Timing goes through ``torch.utils.benchmark`` (it warms up, synchronises
CUDA and picks how many calls to group); we report the median and the
interquartile range of at least ``min_runs`` measurements.
"""
from __future__ import annotations

import statistics
import weakref
from dataclasses import dataclass, field
from typing import Callable

import torch
from torch.utils import benchmark
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_leaves

__all__ = ["Timing", "time_fn", "cuda_peak_bytes", "TensorMemory", "peak_tensor_bytes"]


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
