"""Eight students at the websocket (no browser): no errors, no cross-talk, every picture its own, sane numbers.

The run is small enough for CI (about half a minute on a shared 2-core
machine); ``python -m benchmarks.ws_load`` runs the classroom sizes. No speed
target is asserted here: the benchmark records those.
"""
import dataclasses
import math

import pytest
from streamlit.proto.Element_pb2 import Element
from streamlit.proto.ForwardMsg_pb2 import ForwardMsg

from benchmarks import ws_load
from benchmarks.ws_load import MessageCache, Page, Student

SESSIONS, SECONDS, PERIOD = 8, 10, 2.0


@pytest.fixture(scope="module")
def report():
    r = ws_load.run(sessions=SESSIONS, seconds=SECONDS, period=PERIOD, settle_s=3)
    print("\n".join(ws_load.lines(r)))
    return r


def test_eight_students_at_the_websocket(report):
    r = report
    assert r["failures"] == [] and r["errors"] == [], "\n".join(ws_load.lines(r)) + r["log_tail"]
    assert r["tracebacks"] == 0, r["log_tail"]
    assert r["students_without_picture"] == []
    assert r["checked"] == SESSIONS and r["cross_talk"] == {}, r["cross_talk"]
    assert all(s.latencies for s in r["students"])  # every student changed k at least once and got its picture
    assert r["deflate"] in (True, False)
    for name in ("p50", "p95", "max"):
        assert 0 < r["latency_s"][name] < math.inf
        assert 0 < r["first_page_s"][name] < math.inf
    for name in ("payload_bytes", "wire_bytes"):
        assert all(0 < r[name][q] < math.inf for q in ("median", "p95"))
    # A frame carries its payload plus a header, so the socket gives at least the payload (unless compressed).
    assert r["deflate"] or r["wire_bytes"]["median"] >= r["payload_bytes"]["median"]
    assert 0 < r["interactions_per_s"] < math.inf and r["interactions"] == sum(len(s.latencies) for s in r["students"])
    assert r["server_cpu_s"] > 0 and r["server_cpu_s_per_interaction"] > 0
    rss = r["rss_mib"]
    assert 0 < rss["baseline"] <= rss["peak"] and rss["after"] > 0


def test_the_cross_talk_check_tells_students_apart(report):
    # Without this, an empty cross-talk list would prove nothing: give students each other's last pages.
    a, b = report["students"][:2]
    swapped = [dataclasses.replace(a, last_page=b.last_page), dataclasses.replace(b, last_page=a.last_page)]
    found = ws_load.cross_talk_of(swapped)
    assert set(found) == {a.index, b.index}, found
    # One k step apart, same everything else: both the slider and the sparse map give it away.
    off_by_one = dataclasses.replace(a, query={**a.query, "k": str(int(a.query["k"]) + 1)})
    problems = ws_load.cross_talk_of([off_by_one])[a.index]
    assert any(p.startswith("top_k") for p in problems) and any("sparse map" in p for p in problems), problems
    assert ws_load.cross_talk_of([a, b]) == {}


def test_a_broken_panel_is_seen_in_the_deltas(faulty_app):
    url, log = faulty_app
    st = Student(0, ws_load.student_query(0, "classroom", {}, None))
    ws_load.drive(url, [st], seconds=0, period=1)
    assert st.failure is None and st.errors, st  # the maps panel's error box arrives as a delta
    assert all(e.startswith(("error box", "exception")) for e in st.errors)


def _element(kind: str, **fields) -> Element:
    e = Element()
    getattr(e, kind).SetInParent()
    for name, value in fields.items():
        setattr(getattr(e, kind), name, value)
    return e


def test_a_page_counts_exceptions_and_error_boxes_only():
    page = Page()
    page.add(_element("exception", type="RuntimeError", message="boom"))
    page.add(_element("alert", body="bad file", format=1))  # Alert.ERROR
    page.add(_element("alert", body="just so you know", format=3))  # Alert.INFO is no error
    page.add(_element("slider", id="$$ID-0123abcd-top_k"), fragment_id="f1")
    assert page.errors == ["exception RuntimeError: boom", "error box: bad file"]
    assert list(page.elements) == ["top_k"]  # widgets are found by the key the app gave them
    # A fragment's run redraws its part only: the rest stays, and the errors are that run's own.
    after = page.after_fragment()
    assert list(after.elements) == ["top_k"] and after.fragments == {"top_k": "f1"} and after.errors == []


def test_the_message_cache_answers_references_as_a_browser_does():
    cache = MessageCache(max_age=2)
    big = ForwardMsg(hash="h1")
    big.metadata.cacheable = True
    big.delta.new_element.markdown.body = "a large element"
    cache.keep(big)
    cache.keep(ForwardMsg(hash="h2"))  # not cacheable: not kept
    assert cache.hashes() == ["h1"]
    ref = ForwardMsg(ref_hash="h1")
    ref.metadata.delta_path[:] = [0, 3]
    got = cache.resolve(ref)
    assert got.delta.new_element.markdown.body == "a large element" and list(got.metadata.delta_path) == [0, 3]
    for _ in range(3):
        cache.end_run()  # three runs without a reference: the entry ages out
    assert cache.hashes() == []
    with pytest.raises(LookupError):
        cache.resolve(ref)


def test_bad_arguments_are_refused_with_what_is_allowed():
    with pytest.raises(ValueError, match="loopback"):
        ws_load.check_url("http://example.com:8501")
    with pytest.raises(ValueError, match="unknown setting"):
        ws_load.parse_sets(["nope=1"])
    with pytest.raises(ValueError, match="not an allowed value"):
        ws_load.parse_sets(["L=1000"])
    assert ws_load.parse_sets(["L=4096", "top_k=8"]) == {"L": "4096", "k": "8"}
