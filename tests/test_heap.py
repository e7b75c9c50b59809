"""The server's heap trimming: a real call where glibc has it, and one thread per process however often asked."""
import threading

from sparse_attn.ui import heap


def test_trim_calls_the_c_library_where_it_has_malloc_trim():
    assert heap.trim() is (heap._TRIM is not None)


def test_trimming_starts_one_thread_per_process(monkeypatch):
    monkeypatch.setattr(heap, "_thread", None)
    monkeypatch.setattr(heap, "_stop", threading.Event())
    calls = []
    done = threading.Event()

    def fake_trim(pad):
        calls.append(pad)
        done.set()

    monkeypatch.setattr(heap, "_TRIM", fake_trim)
    before = threading.active_count()
    assert heap.start_trimming(period_s=0.01) and heap.start_trimming(period_s=0.01)
    assert threading.active_count() == before + 1  # the second call started nothing
    assert done.wait(5) and calls[0] == 0  # malloc_trim(0): keep no padding at the top of the heap
    n = len(calls)
    threading.Event().wait(0.1)
    assert len(calls) == n  # idle since that trim: no second one until another run
    assert heap._thread.daemon and heap._thread.name == "sparse-attn-heap-trim"
    heap._stop.set()
    heap._thread.join(5)
    assert not heap._thread.is_alive()


def test_without_malloc_trim_nothing_runs(monkeypatch):
    monkeypatch.setattr(heap, "_thread", None)
    monkeypatch.setattr(heap, "_TRIM", None)
    assert heap.start_trimming() is False and heap.trim() is False and heap._thread is None
