"""Three students at once against one served app: no exceptions, no error boxes, no cross-talk, memory returns."""
from benchmarks.classroom_load import expected_signature, run_classroom, same_signature, student_settings

SESSIONS, SECONDS = 3, 8  # about 30 s on a shared 2-core machine; the benchmark script runs 20


def test_the_result_check_tells_neighbouring_settings_apart():
    # Without this, a matching last heatmap would prove nothing about cross-talk.
    a = student_settings(0)
    sig = expected_signature(a)
    assert same_signature(sig, expected_signature(dict(a)))
    assert not same_signature(sig, expected_signature(a | {"k": a["k"] + 1}))
    assert not same_signature(sig, expected_signature(a | {"seed": a["seed"] + 1}))
    assert len({tuple(sorted(student_settings(i).items())) for i in range(SESSIONS)}) == SESSIONS


def test_three_students_at_once(app_url, server_log):
    r = run_classroom(app_url, server_log, SESSIONS, SECONDS, settle_s=5)
    print("\n".join(r.lines()))
    assert r.failures == []
    assert r.tracebacks == 0, server_log.read_text()[-4000:]
    assert r.error_boxes == 0 and r.mismatched == []
    assert all(len(s.latencies) >= 2 for s in r.students)  # every student got several updated heatmaps
    # Sessions hold no tensors and the caches are bounded: closing everyone gives the memory back (or most of it).
    assert r.rss_after - r.rss_baseline < 200 * 2**20, r.lines()
