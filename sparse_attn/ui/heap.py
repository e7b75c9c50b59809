"""Give freed memory back to the system, so a server's RSS falls after a classroom leaves.

Each rerun allocates and frees megabytes (maps, figures, websocket messages) from many threads.
glibc keeps what was freed in its heaps for reuse, so after 50 students left, a server measured
628 MiB of RSS against 386 at its start although Python held little of it; one ``malloc_trim(0)``
brought it to 466 MiB. A daemon thread per process trims every ``PERIOD_S`` seconds (a walk of the
free lists: milliseconds). Where the C library is not glibc there is nothing to call, and nothing runs.
"""
from __future__ import annotations

import ctypes
import ctypes.util
import threading

__all__ = ["PERIOD_S", "trim", "start_trimming"]

PERIOD_S = 10.0


def _malloc_trim():
    try:
        return ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6").malloc_trim
    except (OSError, AttributeError):  # not glibc (macOS, musl): no such call
        return None


_TRIM = _malloc_trim()
_started = threading.Lock()
_thread: threading.Thread | None = None
_stop = threading.Event()  # set only by the tests, to end a thread they started


def trim() -> bool:
    """Return the heaps' free memory to the system now; False where the C library has no ``malloc_trim``."""
    if _TRIM is None:
        return False
    _TRIM(0)
    return True


def start_trimming(period_s: float = PERIOD_S) -> bool:
    """Trim every ``period_s`` seconds for the life of the process (once per process; later calls do nothing)."""
    global _thread
    if _TRIM is None:
        return False
    with _started:
        if _thread is None:
            def loop():
                while not _stop.wait(period_s):
                    trim()

            _thread = threading.Thread(target=loop, name="sparse-attn-heap-trim", daemon=True)
            _thread.start()
    return True
