"""Two app processes behind nginx on loopback: the websocket driver through it, affinity, a worker that dies.

Students connect from distinct loopback addresses (127.0.0.x), which is how
students on different machines look to nginx. About a minute on a shared
2-core machine. Without nginx this fails under CI=true (tools/test.sh installs
it) and skips elsewhere.
"""
import os
import re
import subprocess
import time
import urllib.parse
from pathlib import Path

import pytest

from benchmarks import cluster as cl
from benchmarks import ws_load
from benchmarks.ws_load import Student
from tests.conftest import IN_CI

SESSIONS, SECONDS, PERIOD = 8, 10, 2.0
CANDIDATES = [f"127.0.0.{i}" for i in range(1, 41)]
SHOTS = os.environ.get("SPARSE_ATTN_SCREENSHOTS")  # a folder: save the browser's pages there


@pytest.fixture(scope="module")
def nginx_bin():
    try:
        return cl.find_nginx()
    except FileNotFoundError as exc:
        if IN_CI:
            pytest.fail(f"CI runs the cluster tests through nginx: {exc}")
        pytest.skip(str(exc))


@pytest.fixture(scope="module")
def nginx_cluster(nginx_bin):
    with cl.cluster(2) as c:
        yield c


@pytest.fixture(scope="module")
def routes(nginx_cluster):
    """Source address -> the worker nginx sends it to, asked three times in a row: the answer must not change.

    (In a row, not in rounds: round robin over an even number of addresses gives each the same worker every round.)
    """
    asked = {a: {cl.upstream_for(nginx_cluster.url, a) for _ in range(3)} for a in CANDIDATES}
    moved = {a: ups for a, ups in asked.items() if len(ups) > 1}
    assert not moved, f"{len(moved)} client addresses went to more than one worker, e.g. {list(moved.items())[:2]}"
    return {a: ups.pop() for a, ups in asked.items()}


def _on(routes: dict, worker: cl.Worker) -> list[str]:
    return [a for a, up in routes.items() if up == worker.upstream]


@pytest.fixture(scope="module")
def report(nginx_cluster, routes):
    c = nginx_cluster
    # Forty addresses hashed onto two workers all land on one only by a 2**-39 chance; if they did, the config
    # would be wrong (ip_hash, for one, sends all of 127.0.0.x to one worker), and this says so.
    split = [_on(routes, w) for w in c.workers]
    assert all(split), f"every candidate address went to one worker: {routes}"
    half = SESSIONS // 2
    sources = [a for pair in zip(split[0][:half], split[1][:half]) for a in pair]
    r = ws_load.measure(c.url, sessions=SESSIONS, seconds=SECONDS, period=PERIOD, pid=[w.pid for w in c.workers],
                        log_path=[w.log for w in c.workers], proxy_pid=c.nginx_pid, sources=sources, settle_s=3)
    print("\n".join(ws_load.lines(r)))
    return r


def test_eight_students_through_nginx_on_two_workers(report, routes, nginx_cluster):
    r = report
    assert r["failures"] == [] and r["errors"] == [], "\n".join(ws_load.lines(r))
    assert r["tracebacks"] == 0
    assert r["students_without_picture"] == []
    assert r["checked"] == SESSIONS and r["cross_talk"] == {}, r["cross_talk"]
    assert all(s.latencies for s in r["students"])
    assert r["source_addresses"] == SESSIONS
    # Each websocket went where that address's plain requests go: the media files and uploads of a session are
    # in the process that holds its websocket.
    for s in r["students"]:
        assert s.upstream == routes[s.source], (s.index, s.source, s.upstream)
    workers = r["workers"]
    assert [w["pid"] for w in workers] == [w.pid for w in nginx_cluster.workers]  # every student on a measured one
    for w in workers:
        assert w["students"] == SESSIONS // 2, workers
        assert w["interactions"] > 0 and w["interactions_per_s"] > 0 and w["cpu_s"] > 0, workers
        assert 0 < w["rss_mib"]["baseline"] <= w["rss_mib"]["peak"]
    assert sum(w["interactions"] for w in workers) == r["interactions"]
    assert r["server_cpu_s"] == pytest.approx(sum(w["cpu_s"] for w in workers))
    assert r["proxy_cpu_s"] >= 0


def test_each_worker_answers_its_own_health_address(nginx_cluster):
    for w in nginx_cluster.workers:
        status, headers, body = cl.get(f"{nginx_cluster.url}/_worker/{w.index}/health")
        assert (status, body.strip(), headers["x-upstream"]) == (200, b"ok", w.upstream)


def test_the_rendered_config_is_valid_nginx_and_refuses_bad_ports(nginx_bin, tmp_path):
    (tmp_path / "tmp").mkdir()
    conf = tmp_path / "nginx.conf"
    conf.write_text(cl.render(listen="127.0.0.1:8500", worker_ports=[8601, 8602], prefix=tmp_path))
    directives = [line.split("#", 1)[0].strip() for line in conf.read_text().splitlines()]
    assert "hash $remote_addr consistent;" in directives and not any(d.startswith("ip_hash") for d in directives)
    assert [d for d in directives if d.startswith("server 127.0.0.1:")] == [
        f"server 127.0.0.1:{p} max_fails=1 fail_timeout=10s;" for p in (8601, 8602)]
    assert not any("@" in d for d in directives)  # every placeholder filled
    checked = subprocess.run([nginx_bin, "-t", "-p", str(tmp_path), "-c", str(conf), "-e",
                              str(tmp_path / "error.log")], capture_output=True, text=True)
    assert checked.returncode == 0, checked.stderr
    for bad in ([], [0], [8601, 8601], ["8601"]):
        with pytest.raises(ValueError, match="worker_ports"):
            cl.render(listen="127.0.0.1:8500", worker_ports=bad, prefix=tmp_path)


def test_source_addresses_are_loopback_only():
    assert ws_load.source_addresses(3) == ["127.0.0.1", "127.0.0.2", "127.0.0.3"]
    assert ws_load.source_addresses(None) == [None]
    assert ws_load.source_addresses(["127.0.0.9"]) == ["127.0.0.9"]
    for bad in (0, 255, ["10.0.0.1"], ["127.0.0"], []):
        with pytest.raises(ValueError, match="sources"):
            ws_load.source_addresses(bad)


def test_a_browser_through_nginx_gets_its_maps_its_changes_and_its_download(page, nginx_cluster, routes, report):
    from playwright.sync_api import expect

    from sparse_attn.i18n import t
    from tests.browser.helpers import set_slider, wait_for_new_signature, wait_for_plot, wait_idle

    c, lang = nginx_cluster, "en"
    page.goto(f"{c.url}/?lang={lang}&L=128&k=16")
    wait_idle(page)
    before = wait_for_plot(page)
    slider = page.get_by_role("slider", name=t("setting.top_k", lang))
    set_slider(page, slider, 12)  # the websocket's messages, both ways, go through the proxy
    page.wait_for_url(re.compile(r"[?&]k=12\b"), timeout=60_000)
    wait_for_new_signature(page, before)
    wait_idle(page)
    assert page.locator("[data-testid='stException']").count() == 0
    if SHOTS:
        Path(SHOTS).mkdir(parents=True, exist_ok=True)
        page.screenshot(path=f"{SHOTS}/through_nginx_{lang}.png", full_page=True)
    # The CSV behind the download button lives in the worker that holds this page's session.
    with page.expect_download(timeout=30_000) as download:
        page.get_by_role("button", name=t("export.csv_metrics", lang)).click()
    assert Path(download.value.path()).read_text().count("\n") >= 2
    expect(page.get_by_role("slider", name=t("setting.top_k", lang))).to_have_value("12")
    page.goto("about:blank")  # nginx logs a websocket when it closes
    deadline, ws = time.monotonic() + 10, []
    while not ws and time.monotonic() < deadline:
        time.sleep(0.2)
        log = (c.prefix / "access.log").read_text().splitlines()
        ws = [line for line in log if line.startswith("127.0.0.1 ") and "/_stcore/stream" in line]
    assert ws and all('" 101 ' in line and routes["127.0.0.1"] in line for line in ws), ws


async def _first_page(url: str, st: Student, then=None):
    """One connection from ``st.source``: its first page, and ``then(page)`` while the session is still open."""
    from websockets.asyncio.client import connect

    parts = urllib.parse.urlsplit(url)
    async with connect(f"ws://{parts.netloc}/_stcore/stream", subprotocols=["streamlit"], max_size=None, proxy=None,
                       ping_interval=None, local_addr=(st.source, 0),
                       create_connection=ws_load._counting_connection()) as ws:
        st.upstream = ws.response.headers.get("X-Upstream")
        session = ws_load._Session(ws, url + "/")
        page, *_ = await session.run(urllib.parse.urlencode(st.query), timeout_s=120)
        st.last_page, st.errors = page, page.errors
        return then(page) if then else None


def test_a_download_lives_in_its_own_worker_and_affinity_finds_it(nginx_cluster, routes, report):
    c = nginx_cluster
    source = _on(routes, c.workers[0])[0]
    other = c.workers[1]
    st = Student(0, ws_load.student_query(3, "classroom", {}, None), source=source)

    def fetch(page):
        path = page.elements["csv_metrics"].download_button.url
        assert path.startswith("/media/"), path
        through = cl.get(c.url + path, source=source)
        elsewhere = cl.get(other.url + path)
        return through, elsewhere

    (status, headers, body), (status_elsewhere, *_) = ws_load.run_async(_first_page(c.url, st, fetch))
    assert st.errors == [] and c.worker_of(st.upstream) is c.workers[0]
    assert status == 200 and headers["x-upstream"] == c.workers[0].upstream and body.count(b"\n") >= 2, body[:200]
    # The same file asked of the other worker does not exist there: without affinity the download would fail.
    assert status_elsewhere == 404


def test_when_a_worker_dies_its_students_reconnect_elsewhere_and_the_url_restores_their_view(nginx_cluster, routes,
                                                                                          report):
    c = nginx_cluster  # this test stops worker 1: it runs last in this module
    source = _on(routes, c.workers[1])[0]
    before = Student(0, ws_load.student_query(5, "classroom", {}, None), source=source)
    ws_load.drive(c.url, [before], seconds=4, period=1)
    assert before.failure is None and before.latencies and c.worker_of(before.upstream) is c.workers[1], before
    assert ws_load.cross_talk_of([before]) == {}
    c.kill(1)
    # The page's address bar holds its settings (k as last changed): a new session anywhere starts from it.
    after = Student(0, dict(before.query), source=source)
    ws_load.run_async(_first_page(c.url, after))
    assert after.errors == [] and c.worker_of(after.upstream) is c.workers[0], after.upstream
    assert ws_load.cross_talk_of([after]) == {}, "the surviving worker did not restore the student's view"
    # And the student carries on there: its next changes stick.
    later = Student(0, dict(before.query), source=source)
    ws_load.drive(c.url, [later], seconds=3, period=1)
    assert later.failure is None and later.latencies and later.query["k"] != before.query["k"]
    assert c.worker_of(later.upstream) is c.workers[0] and ws_load.cross_talk_of([later]) == {}
    assert c.workers[0].log.read_text().count("Traceback") == 0
