"""Torch's intra-op threads in a served app: one per student's computation, since the students are the parallelism.

Streamlit runs each session's script in a thread of its own, so two students already keep both
cores of a small server busy; torch's intra-op threads on top of that only spin waiting for each
other (OpenMP keeps a finished parallel region's threads busy-waiting for the next one). Measured on
this project's 2-core machine, one student flat out at the defaults (``python -m benchmarks.ws_load
--sessions 1 --period 0 --settings defaults``): 0.11-0.12 server CPU-s per interaction with torch's
two threads (11.2-11.7/s), 0.08-0.09 with one (11.7-13.0/s); 50 students (``--sessions 50 --period 5``)
p95 3.35-3.90 s against 0.51-1.31 s, with the caching changes made beside it (docs/benchmarks.md).

``limit`` sets the count once per process: ``SPARSE_ATTN_TORCH_THREADS`` (default 1; 0 leaves torch's
own count, as the tests do). torch applies it to every thread that starts after, and each script run
is a new thread. Two kinds of work get every thread the process started with instead: a computation
that needs over half the server's memory budget (``wide``: no other of its size can run beside it, so
a second core would idle; with one thread, 20 students opening L = 4096 at once waited up to 94 s for
their first picture and one was told the server was busy, with every thread for those views up to 70 s
and every student got it), and the timing tab (``timing_threads``: its runs take turns per device, as
the benchmarks in docs/ measure).
"""
from __future__ import annotations

import os
import threading
from contextlib import contextmanager

import torch

__all__ = ["ENV", "limit", "one_thread", "timing_threads", "wide"]

ENV = "SPARSE_ATTN_TORCH_THREADS"
_START_THREADS = torch.get_num_threads()  # before any limit: the count the timing tab measures with
_limited = threading.Lock()
_done = False
_base: int | None = None  # the count ``limit`` set; what ``wide`` and ``one_thread`` return to


def limit() -> int:
    """Set torch's thread count for this process from ``SPARSE_ATTN_TORCH_THREADS`` (once); return the count."""
    global _done, _base
    with _limited:
        if not _done:
            raw = os.environ.get(ENV, "1").strip()
            try:
                n = int(raw)
            except ValueError:
                raise ValueError(f"{ENV} must be a whole number of threads (0: leave torch's own), got {raw!r}") from None
            if n < 0:
                raise ValueError(f"{ENV} must be >= 0 (0: leave torch's own count), got {n}")
            if n > 0:
                torch.set_num_threads(n)
                _base = n
            _done = True
    return torch.get_num_threads()


def timing_threads() -> int:
    """The thread count the timing tab measures with: the process's own before ``limit``."""
    return _START_THREADS


def _back(saved: int) -> int:
    return saved if _base is None else _base


@contextmanager
def wide(on: bool = True):
    """Every thread the process started with, in this thread, while the block runs (when ``on``).

    torch's count is set per thread (and read by threads that start meanwhile): this one goes back to
    ``limit``'s count after, whatever another session set in the meantime.
    """
    if not on or _START_THREADS <= torch.get_num_threads():
        yield
        return
    saved = torch.get_num_threads()
    torch.set_num_threads(_START_THREADS)
    try:
        yield
    finally:
        torch.set_num_threads(_back(saved))


_lock = threading.Lock()
_users = 0
_saved = 1


@contextmanager
def one_thread():
    """Torch on one intra-op thread while any session is inside this block, whatever ``limit`` set.

    For the generating tab's decode steps (a few dozen ops on tensors of a few KiB): 1.3 s with 2
    threads, 0.05 s with one. The setting is process-wide, so sessions count themselves in and out:
    the count the process had comes back only when the last one leaves, and two overlapping
    sessions cannot leave it on one thread.
    """
    global _users, _saved
    with _lock:
        if _users == 0:
            _saved = torch.get_num_threads()
            torch.set_num_threads(1)
        _users += 1
    try:
        yield
    finally:
        with _lock:
            _users -= 1
            if _users == 0:
                torch.set_num_threads(_back(_saved))
