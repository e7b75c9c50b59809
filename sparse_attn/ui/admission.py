"""One memory budget for the whole server process: heavy computations queue for their estimated bytes.

Each view is checked against the memory budget on its own (``memory.check_budget``),
but fifty students share one process: twenty views near the limit at once would
exhaust the machine. So the maps view, the accuracy-vs-budget sweep and the
timing sweep each hold their estimated bytes (``check_budget``'s estimate) of
one server-wide budget while they allocate, and give them back when they end,
exceptions included. The sum of what is held never exceeds the budget.

The server budget is ``SPARSE_ATTN_SERVER_BUDGET_MB`` (MiB) when set, else the
per-view budget (``memory.default_budget_bytes``: 2 GiB or
``SPARSE_ATTN_MEMORY_BUDGET_MB``), so one view near its limit runs alone and
small ones run side by side. A request larger than the whole budget is refused
at once (``BudgetError``); one that fits waits in arrival order (a large request
is not overtaken forever by small ones), the student sees how many computations
run ahead of theirs, and after ``WAIT_S`` (90 s) they are told the server is busy.

A cached computation (``st.cache_resource``) takes its bytes inside the cache, so a
cache hit costs nothing: the body calls ``admit``, which never blocks; when it
would have to wait it raises ``Busy``, the caller (``call``) waits outside the
cache, where the message can be drawn, and runs the body again holding the bytes.
"""
from __future__ import annotations

import contextlib
import itertools
import threading
import time
from collections import deque
from typing import Callable, NamedTuple

import streamlit as st

from sparse_attn.i18n import t

from .memory import BudgetError, default_budget_bytes, mib_from_env

__all__ = ["SERVER_BUDGET_ENV", "WAIT_S", "Busy", "ServerBusy", "Gate", "Ticket", "gate", "server_budget_bytes",
           "admit", "hold", "call"]

SERVER_BUDGET_ENV = "SPARSE_ATTN_SERVER_BUDGET_MB"
# Longest a student waits in line before being told to try again: longer than one accuracy-vs-budget sweep
# holds its bytes (its 60 s limit, the run it finishes and its dense reference), so a view queued behind
# one sweep gets its turn.
WAIT_S = 90.0
POLL_S = 0.5  # how often a waiting student's message is redrawn (and a student who left is noticed)
ICON_WAIT = ":material/hourglass_top:"  # Streamlit's icon font: an emoji needs a font the server may lack


class Busy(Exception):
    """Raised by ``admit`` inside a cached body when its bytes are not free now: the caller waits and retries."""

    def __init__(self, need: float):
        super().__init__(f"{need:.0f} bytes are not free in the server budget now")
        self.need = need


class ServerBusy(Exception):
    """The bytes did not free up within the wait: tell the student to try again (a warning, not an error)."""


class Ticket:
    """Bytes admitted to one computation; released once, by ``Gate.release``."""

    __slots__ = ("need", "number", "released", "handed")

    def __init__(self, need: int, number: int):
        self.need, self.number, self.released, self.handed = need, number, False, False


class Queue(NamedTuple):
    """What a waiting student is told: computations running now, and requests queued ahead of theirs."""

    running: int
    ahead: int
    waited_s: float


def server_budget_bytes() -> int:
    """``SPARSE_ATTN_SERVER_BUDGET_MB`` in bytes when set (a positive number of MiB), else the per-view budget."""
    found = mib_from_env(SERVER_BUDGET_ENV)
    return default_budget_bytes() if found is None else found


class Gate:
    """A counting semaphore by bytes, first come first served (``threading.Condition``)."""

    def __init__(self, capacity: int):
        if not isinstance(capacity, int) or capacity <= 0:
            raise ValueError(f"capacity must be a positive number of bytes, got {capacity!r}")
        self.capacity = capacity
        self.used = 0
        self.running = 0
        self._queue: deque[Ticket] = deque()
        self._cond = threading.Condition()
        self._numbers = itertools.count()

    def _ticket(self, need: float) -> Ticket:
        need = int(need)
        if need > self.capacity:
            mb, cap = round(need / 2**20), round(self.capacity / 2**20)
            raise BudgetError("budget", f"these settings need about {mb} MiB, more than the {cap} MiB budget; "
                              "lower seq_len", need_mb=mb, budget_mb=cap, setting="seq_len")
        return Ticket(max(need, 0), next(self._numbers))

    def _grant(self, ticket: Ticket) -> Ticket:
        self.used += ticket.need
        self.running += 1
        return ticket

    def try_acquire(self, need: float) -> Ticket | None:
        """The bytes now if nobody is queued and they fit, else None; ``BudgetError`` if they never can."""
        ticket = self._ticket(need)
        with self._cond:
            if not self._queue and self.used + ticket.need <= self.capacity:
                return self._grant(ticket)
        return None

    def acquire(self, need: float, *, timeout: float | None = None, on_wait: Callable[[Queue], None] | None = None,
                poll: float | None = None) -> Ticket:
        """Wait in line for the bytes; ``ServerBusy`` after ``timeout`` s, ``BudgetError`` if they never fit.

        ``timeout`` and ``poll`` default to ``WAIT_S`` and ``POLL_S``. ``on_wait`` is
        called every ``poll`` s while waiting (outside the lock);
        whatever it raises (a student who left) takes the request out of the line.
        """
        ticket = self._ticket(need)
        timeout = WAIT_S if timeout is None else timeout
        poll = POLL_S if poll is None else poll
        start = time.monotonic()
        with self._cond:
            self._queue.append(ticket)
        try:
            while True:
                with self._cond:
                    if self._queue[0] is ticket and self.used + ticket.need <= self.capacity:
                        self._queue.popleft()
                        self._cond.notify_all()  # the next in line may fit beside this one
                        return self._grant(ticket)
                    waited = time.monotonic() - start
                    if waited >= timeout:
                        raise ServerBusy(f"waited {waited:.0f} s for {ticket.need} bytes")
                    state = Queue(self.running, list(self._queue).index(ticket), waited)
                    self._cond.wait(min(poll, timeout - waited))
                if on_wait is not None:
                    on_wait(state)
        except BaseException:
            with self._cond:
                if ticket in self._queue:
                    self._queue.remove(ticket)
                    self._cond.notify_all()  # the one behind may be at the head now
            raise

    def release(self, ticket: Ticket) -> None:
        """Give the bytes back (a second release of the same ticket does nothing)."""
        with self._cond:
            if ticket.released:
                return
            ticket.released = True
            self.used -= ticket.need
            self.running -= 1
            self._cond.notify_all()

    def waiting(self) -> int:
        with self._cond:
            return len(self._queue)


@st.cache_resource
def gate() -> Gate:
    """The gate every session of this server process shares."""
    return Gate(server_budget_bytes())


_handed = threading.local()  # the ticket ``call`` waited for, taken by the cached body it runs next


@contextlib.contextmanager
def admit(need: float, g: Gate | None = None):
    """Hold ``need`` bytes while the block runs; never waits (``Busy`` when it would have to)."""
    g = g or gate()
    held = getattr(_handed, "ticket", None)
    if held is not None and not held.handed and not held.released and held.need >= int(need):
        held.handed = True  # ``call`` waited for these bytes and releases them
        yield held
        return
    ticket = g.try_acquire(need)
    if ticket is None:
        raise Busy(need)
    try:
        yield ticket
    finally:
        g.release(ticket)


def _show_queue(placeholder, lang: str) -> Callable[[Queue], None]:
    def show(q: Queue) -> None:
        # Redrawing is also the point where Streamlit stops a run whose student left or reran.
        key = "guard.queued" if q.ahead else "guard.queued_next"
        placeholder.info(t(key, lang, running=q.running, ahead=q.ahead, waited=f"{q.waited_s:.0f}"), icon=ICON_WAIT)
    return show


@contextlib.contextmanager
def hold(need: float, lang: str, placeholder=None, *, timeout: float | None = None, g: Gate | None = None):
    """Hold ``need`` bytes while the block runs, waiting in line with a message in ``placeholder`` (an st.empty).

    Raises ``ServerBusy`` after ``timeout`` s and ``BudgetError`` for more than the whole budget.
    """
    g = g or gate()
    ticket = g.try_acquire(need)
    if ticket is None:
        placeholder = placeholder if placeholder is not None else st.empty()
        try:
            ticket = g.acquire(need, timeout=timeout, on_wait=_show_queue(placeholder, lang))
        finally:
            placeholder.empty()
    try:
        yield ticket
    finally:
        g.release(ticket)


def call(fn, *args, lang: str, timeout: float | None = None, g: Gate | None = None, **kwargs):
    """``fn(*args, **kwargs)`` where ``fn`` (cached or not) admits its body with ``admit``.

    A cache hit or free bytes: one call, no wait. Otherwise wait in line with a
    message, then run ``fn`` again holding the bytes it asked for.
    """
    try:
        return fn(*args, **kwargs)
    except Busy as busy:
        need = busy.need
    with hold(need, lang, timeout=timeout, g=g) as ticket:
        _handed.ticket = ticket
        try:
            return fn(*args, **kwargs)
        finally:
            _handed.ticket = None
