"""The server-wide memory guard: a byte semaphore that never over-admits, serves in order, refuses and times out;
the maps view queues inside its cache only on a miss; the budget tab is bounded in time and shows progress."""
import random
import threading
import time
from pathlib import Path

import pytest
import streamlit as st
from streamlit.delta_generator import DeltaGenerator
from streamlit.testing.v1 import AppTest

from sparse_attn.i18n import LANGS, t
from sparse_attn.ui import admission
from sparse_attn.ui.admission import Busy, Gate, ServerBusy
from sparse_attn.ui.charts import elements as chart_elements
from sparse_attn.ui.memory import BudgetError

APP = str(Path(__file__).resolve().parent.parent / "app.py")
MiB = 2**20


def _wait_until(cond, timeout=10.0):
    deadline = time.monotonic() + timeout
    while not cond():
        assert time.monotonic() < deadline, "condition not reached"
        time.sleep(0.005)


def test_concurrent_requests_never_exceed_the_budget():
    g = Gate(100 * MiB)
    held = peak = 0
    lock = threading.Lock()
    errors = []

    def worker(seed):
        rng = random.Random(seed)
        nonlocal held, peak
        try:
            for _ in range(20):
                need = rng.randint(1, 60) * MiB
                ticket = g.acquire(need, timeout=30, poll=0.01)
                with lock:
                    held += need
                    peak = max(peak, held)
                    assert held <= g.capacity and g.used <= g.capacity
                time.sleep(rng.random() * 0.003)
                with lock:
                    held -= need
                g.release(ticket)
        except BaseException as exc:  # surfaced below: an assertion in a thread does not fail the test by itself
            errors.append(exc)

    threads = [threading.Thread(target=worker, args=(i,)) for i in range(16)]
    for th in threads:
        th.start()
    for th in threads:
        th.join(60)
    assert not errors, errors
    assert g.used == 0 and g.running == 0 and g.waiting() == 0
    assert 60 * MiB < peak <= 100 * MiB  # it did run several at once, and never beyond the budget


def test_requests_are_served_in_arrival_order_and_small_ones_do_not_overtake():
    g = Gate(100)
    first = g.acquire(100)
    order = []

    def waiter(name, need):
        ticket = g.acquire(need, timeout=10, poll=0.01)
        order.append(name)
        time.sleep(0.02)
        g.release(ticket)

    threads = []
    for i, (name, need) in enumerate([("big", 90), ("small1", 10), ("small2", 5)]):
        th = threading.Thread(target=waiter, args=(name, need))
        th.start()
        threads.append(th)
        _wait_until(lambda: g.waiting() == i + 1)  # each is in line before the next arrives
    # Room for a small request, but others are in line: it must queue too, not jump ahead.
    assert g.try_acquire(1) is None
    g.release(first)
    for th in threads:
        th.join(10)
    assert order == ["big", "small1", "small2"]
    assert g.used == 0


def test_a_request_larger_than_the_whole_budget_is_refused_at_once():
    g = Gate(64 * MiB)
    started = time.monotonic()
    with pytest.raises(BudgetError) as info:
        g.acquire(65 * MiB, timeout=30)
    assert time.monotonic() - started < 1.0
    assert info.value.code == "budget" and info.value.params["budget_mb"] == 64
    assert g.waiting() == 0
    for lang in LANGS:  # the memory guard's own message, in the student's language
        from sparse_attn.ui import errors

        assert errors.message(info.value, lang) == t("err.budget", lang, need_mb=65, budget_mb=64,
                                                     setting=t("setting.seq_len", lang))


def test_a_wait_is_bounded_and_leaves_the_line():
    g = Gate(10)
    blocker = g.acquire(10)
    started = time.monotonic()
    with pytest.raises(ServerBusy):
        g.acquire(5, timeout=0.3, poll=0.05)
    assert 0.25 < time.monotonic() - started < 2.0
    assert g.waiting() == 0  # gone from the line: it holds up nobody
    g.release(blocker)
    assert g.try_acquire(10) is not None


def test_a_waiter_whose_callback_raises_leaves_the_line_and_the_next_goes_ahead():
    g = Gate(10)
    blocker = g.acquire(10)
    seen = []

    class Left(BaseException):  # like Streamlit's StopException when the student closed the page
        pass

    def on_wait(q):
        seen.append(q)
        raise Left()

    with pytest.raises(Left):
        g.acquire(10, timeout=10, poll=0.01, on_wait=on_wait)
    assert seen and seen[0].running == 1 and seen[0].ahead == 0
    got = []
    th = threading.Thread(target=lambda: got.append(g.acquire(10, timeout=10, poll=0.01)))
    th.start()
    _wait_until(lambda: g.waiting() == 1)
    g.release(blocker)
    th.join(10)
    assert got and g.used == 10


def test_release_happens_on_exceptions_and_twice_is_harmless():
    g = Gate(10)
    with pytest.raises(RuntimeError):
        with admission.admit(8, g):
            assert g.used == 8
            raise RuntimeError("boom")
    assert g.used == 0 and g.running == 0
    ticket = g.acquire(4)
    g.release(ticket)
    g.release(ticket)
    assert g.used == 0 and g.running == 0


def test_admit_never_blocks_and_call_waits_outside_then_hands_the_bytes_over():
    g = Gate(10)
    blocker = g.acquire(8)
    with pytest.raises(Busy) as info:
        with admission.admit(5, g):
            pass
    assert info.value.need == 5
    runs = []

    def body():
        with admission.admit(5, g) as ticket:
            runs.append(g.used)
            return ticket

    threading.Timer(0.2, g.release, args=(blocker,)).start()
    ticket = admission.call(body, lang="en", g=g, timeout=10)
    # The first try raised Busy; the second ran with the bytes ``call`` waited for (not 5 more on top).
    assert runs == [5] and ticket.handed and g.used == 0


def test_a_cache_hit_costs_nothing_and_does_not_queue():
    g = Gate(10)
    calls = []

    @st.cache_data(show_spinner=False)
    def heavy(x):
        calls.append(x)
        with admission.admit(6, g):
            return x * 2

    heavy.clear()
    assert admission.call(heavy, 21, lang="en", g=g) == 42
    blocker = g.acquire(10)  # the whole budget taken
    started = time.monotonic()
    assert admission.call(heavy, 21, lang="en", g=g, timeout=5) == 42  # cached: no wait
    assert time.monotonic() - started < 0.5 and calls == [21]
    with pytest.raises(ServerBusy):  # a miss does wait, and is told after the timeout
        admission.call(heavy, 22, lang="en", g=g, timeout=0.3)
    g.release(blocker)
    assert admission.call(heavy, 22, lang="en", g=g) == 44 and g.used == 0


def test_the_server_budget_comes_from_its_variable_or_the_view_budget(monkeypatch):
    from sparse_attn.ui.memory import default_budget_bytes

    monkeypatch.delenv(admission.SERVER_BUDGET_ENV, raising=False)
    assert admission.server_budget_bytes() == default_budget_bytes()
    monkeypatch.setenv(admission.SERVER_BUDGET_ENV, "3072")
    assert admission.server_budget_bytes() == 3 * 2**30
    monkeypatch.setenv(admission.SERVER_BUDGET_ENV, "lots")
    with pytest.raises(ValueError, match=admission.SERVER_BUDGET_ENV):
        admission.server_budget_bytes()
    with pytest.raises(ValueError, match="capacity"):
        Gate(0)


# --- through the app ------------------------------------------------------------------------------------------------

def _record(monkeypatch, method: str) -> list:
    """Every call of ``DeltaGenerator.<method>`` the app makes (what a browser would see appear, then go)."""
    seen = []
    original = getattr(DeltaGenerator, method)

    def spy(self, *args, **kwargs):
        seen.append((args, kwargs))
        return original(self, *args, **kwargs)

    monkeypatch.setattr(DeltaGenerator, method, spy)
    return seen


@pytest.mark.parametrize("lang", LANGS)
def test_maps_wait_in_line_with_a_message_then_draw(monkeypatch, lang):
    from sparse_attn.ui import compute

    compute.view.clear()
    infos = _record(monkeypatch, "info")
    g = admission.gate()
    blocker = g.acquire(g.capacity)  # another student's computation holds the whole budget

    def finish_once_queued():  # the other computation ends a while after this student joined the line
        _wait_until(lambda: g.waiting() == 1, timeout=60)
        time.sleep(1.2)
        g.release(blocker)

    threading.Thread(target=finish_once_queued).start()
    at = AppTest.from_file(APP, default_timeout=120)
    at.query_params["lang"] = lang
    at.query_params["L"] = "64"
    at.run()
    assert not at.exception, [e.message for e in at.exception]
    waiting = [t(key, lang, running=1, ahead=0, waited=0) for key in ("guard.queued", "guard.queued_next")]
    queued = [a[0] for a, _ in infos if a and a[0].split("（")[0].split("(")[0] in
              {w.split("（")[0].split("(")[0] for w in waiting}]
    assert queued, "no queue message while waiting"
    assert not any(i.value in queued for i in at.info)  # cleared once it started
    assert chart_elements(at) and not at.error and g.used == 0


@pytest.mark.parametrize("lang", LANGS)
def test_maps_that_wait_too_long_get_a_busy_warning_not_an_error(monkeypatch, lang):
    from sparse_attn.ui import compute

    compute.view.clear()
    monkeypatch.setattr(admission, "WAIT_S", 0.5)
    g = admission.gate()
    blocker = g.acquire(g.capacity)
    try:
        at = AppTest.from_file(APP, default_timeout=120)
        at.query_params["lang"] = lang
        at.query_params["L"] = "32"
        at.run()
    finally:
        g.release(blocker)
    assert not at.exception, [e.message for e in at.exception]
    assert [w.value for w in at.warning] == [t("guard.busy", lang)]
    assert not at.error and not chart_elements(at) and g.waiting() == 0


def test_the_budget_tab_at_4096_is_bounded_in_time_and_shows_progress(monkeypatch):
    from sparse_attn.ui import budget

    monkeypatch.setenv(budget.LIMIT_ENV, "8")
    bars = _record(monkeypatch, "progress")
    started = time.monotonic()
    at = AppTest.from_file(APP, default_timeout=170)
    at.query_params["view"] = "budget"
    at.query_params["L"] = "4096"
    at.run()
    took = time.monotonic() - started
    assert not at.exception, [e.message for e in at.exception]
    assert not at.error
    # Before: about ten minutes on both cores. Now: the limit, plus loading and one run that started before it.
    assert took < 90, took
    texts = [kw.get("text") or "" for _, kw in bars]
    assert any(t("guard.sweep_start", "en") == s for s in texts)
    runs = [s for s in texts if "keys per query" in s and "runs" in s]
    assert runs, texts  # one bar per method and budget, naming both
    # The full curve would not fit: where it stopped is said, with the setting to lower.
    [cut] = [w.value for w in at.warning if w.value.startswith("Stopped at the 8 s limit")]
    assert t("setting.seq_len", "en") in cut
    # A rerun (the metric radio, say) reuses what finished: no second sweep of the same settings.
    n = len(bars)
    at.run()
    assert len(bars) == n and not at.exception


def test_the_sweep_is_planned_before_it_starts_and_shrunk_only_where_seeds_help(monkeypatch):
    from sparse_attn.ui import budget, compute, state

    def plan(**over):
        return budget.plan({**{k: state.defaults()[k] for k in compute.COMPUTE_KEYS}, **budget.PINNED, **over})

    small = plan(L=64)
    assert not small.shrunk and small.seeds == budget.SEEDS
    assert [b for _, b in small.steps] == sorted(b for _, b in small.steps)  # budget-major: a cut keeps every method
    monkeypatch.setenv(budget.LIMIT_ENV, "8")
    mid = plan(L=1024)
    assert mid.shrunk and mid.seeds == budget.SEEDS[:1] and mid.estimate_s > 8
    assert {"sampling", "hybrid"} <= {key for key, _ in mid.steps}
    # At 4096 the memory guard leaves out every sampled method: one seed would save nothing, so nothing is shrunk
    # (the deadline bounds the run) and the admitted bytes are the largest step's estimate, within the budget.
    big = plan(L=4096)
    assert not big.shrunk and not {"sampling", "hybrid"} & {key for key, _ in big.steps}
    assert {key for key, *_ in big.skipped} >= {"sampling", "hybrid"}
    assert 0 < big.need_bytes <= admission.server_budget_bytes()


def test_a_sweep_notices_its_student_left_or_reran(monkeypatch):
    """``still_here`` reads what the installed Streamlit sets when a websocket closes or a rerun is asked for."""
    from types import SimpleNamespace

    from streamlit.runtime.scriptrunner_utils.script_requests import RerunData, ScriptRequests

    from sparse_attn.ui import budget

    requests = ScriptRequests()
    monkeypatch.setattr(budget, "get_script_run_ctx",
                        lambda **_: SimpleNamespace(session_id="s1", script_requests=requests))
    active = {"s1"}
    runtime = SimpleNamespace(is_active_session=lambda sid: sid in active)
    monkeypatch.setattr(budget.Runtime, "exists", classmethod(lambda cls: True))
    monkeypatch.setattr(budget.Runtime, "instance", classmethod(lambda cls: runtime))
    alive = budget.still_here()
    assert alive()
    active.clear()  # the websocket closed: the session manager no longer lists the session
    assert not alive()
    active.add("s1")
    assert requests.request_rerun(RerunData())  # the same student moved a slider (fastReruns)
    assert not alive()
    requests2 = ScriptRequests()
    monkeypatch.setattr(budget, "get_script_run_ctx",
                        lambda **_: SimpleNamespace(session_id="s1", script_requests=requests2))
    alive = budget.still_here()
    requests2.request_stop()  # what disconnect_session asks of a running script
    assert not alive()
