"""Torch's thread count in a served app: set once from SPARSE_ATTN_TORCH_THREADS, and the guard for decode steps."""
from pathlib import Path

import pytest
import torch
from streamlit.testing.v1 import AppTest

from sparse_attn.i18n import t
from sparse_attn.ui import threads

APP = str(Path(__file__).resolve().parent.parent / "app.py")


@pytest.fixture
def fresh(monkeypatch):
    """``limit`` as in a new process, and torch's count put back after."""
    before = torch.get_num_threads()
    monkeypatch.setattr(threads, "_done", False)
    monkeypatch.setattr(threads, "_base", None)
    torch.set_num_threads(2)
    yield monkeypatch
    torch.set_num_threads(before)


def test_limit_sets_the_count_once_per_process(fresh):
    fresh.delenv(threads.ENV, raising=False)
    assert threads.limit() == 1 and torch.get_num_threads() == 1  # the default: one thread
    fresh.setenv(threads.ENV, "2")
    assert threads.limit() == 1  # once: a later run does not undo what the first one set


@pytest.mark.parametrize(("raw", "want"), [("2", 2), (" 1 ", 1), ("0", 2)])
def test_limit_reads_the_variable_and_zero_leaves_torchs_own(fresh, raw, want):
    fresh.setenv(threads.ENV, raw)
    assert threads.limit() == want == torch.get_num_threads()


@pytest.mark.parametrize(("raw", "says"), [("two", "whole number"), ("-1", ">= 0"), ("1.5", "whole number")])
def test_a_bad_value_is_refused_by_name(fresh, raw, says):
    fresh.setenv(threads.ENV, raw)
    with pytest.raises(ValueError, match=f"{threads.ENV}.*{says}"):
        threads.limit()
    assert torch.get_num_threads() == 2


def test_the_app_limits_its_process_and_the_timing_tab_names_its_threads(monkeypatch):
    calls = []
    monkeypatch.setattr(threads, "limit", lambda: calls.append(1) or 1)  # the process itself keeps its count
    at = AppTest.from_file(APP, default_timeout=120)
    at.query_params["view"] = "speed"
    at.query_params["L"] = "64"
    at.run()
    assert not at.exception and calls == [1]
    wanted = t("speed.threads", "en", n=threads.timing_threads())
    assert any(wanted in c.value for c in at.caption)


def test_overlapping_sessions_restore_the_thread_count_once_the_last_leaves():
    before = torch.get_num_threads()
    torch.set_num_threads(2)  # a count the bug would lose
    try:
        outer = threads.one_thread()
        outer.__enter__()
        with threads.one_thread():
            assert torch.get_num_threads() == 1
        assert torch.get_num_threads() == 1  # the first session is still inside
        outer.__exit__(None, None, None)
        assert torch.get_num_threads() == 2
    finally:
        torch.set_num_threads(before)


@pytest.fixture
def limited(monkeypatch):
    """A served process as ``limit`` leaves it: started on 3 threads, limited to 1."""
    before = torch.get_num_threads()
    monkeypatch.setattr(threads, "_START_THREADS", 3)
    monkeypatch.setattr(threads, "_base", 1)
    torch.set_num_threads(1)
    yield monkeypatch
    torch.set_num_threads(before)


def test_wide_gives_every_thread_then_the_limit_back(limited):
    with threads.wide():
        assert torch.get_num_threads() == 3
        torch.set_num_threads(2)  # another session's change in the meantime
    assert torch.get_num_threads() == 1
    with threads.wide(False):
        assert torch.get_num_threads() == 1


@pytest.mark.parametrize("over_half", [True, False])
def test_a_view_over_half_the_server_budget_gets_every_thread(limited, over_half):
    from sparse_attn.methods import shape_of
    from sparse_attn.ui import admission, compute, memory, state

    s = state.defaults()
    s["L"], s["seed"] = 64, 9174 + over_half  # seeds no other test uses: not cache hits
    s = {k: s[k] for k in compute.COMPUTE_KEYS}
    q, k, v, *_ = compute.qkv(s, None)
    need = memory.check_budget(s["method"], shape_of(q, k, v), compute.config(s), q.element_size())
    limited.setattr(admission, "gate", lambda: admission.Gate(int(2 * need - 1 if over_half else 2 * need + 1)))
    seen, real = [], compute._maps
    limited.setattr(compute, "_maps", lambda *a, **kw: seen.append(torch.get_num_threads()) or real(*a, **kw))
    compute.view.clear()
    compute.view(s)
    assert seen == [3 if over_half else 1]
    assert torch.get_num_threads() == 1
