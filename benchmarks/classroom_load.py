"""A classroom at once: N students in real browser sessions against one served app.

    python -m benchmarks.classroom_load --sessions 20 --seconds 60
    python -m benchmarks.classroom_load --sessions 6 --seconds 20 --url http://127.0.0.1:8501

Starts the app on a free loopback port (or uses ``--url``, loopback only),
opens N Playwright contexts in one system Chromium, each on its own settings
(sequence length, pattern, seed, k), and for a bounded time moves its k slider
by one step and waits until its sparse heatmap on screen changes. Reports the
p50 / p95 time from a change to the updated heatmap, the server's peak RSS and
its RSS after every session closed, Python tracebacks in the server log, error
boxes seen on any page, and whether each session's last heatmap is the one its
own settings give (computed again here, outside the server: no cross-talk).

``tests/load/`` runs the same driver at a size CI can take.
"""
from __future__ import annotations

import argparse
import asyncio
import os
import platform
import statistics
import sys
import tempfile
import threading
import time
import urllib.parse
from dataclasses import dataclass, field
from pathlib import Path

from benchmarks.browser import IDLE, MAPS, TRACE_SIGNATURE
from sparse_attn.i18n import t
from sparse_attn.ui.server import CHROMIUM, CHROMIUM_ARGS, serve
from sparse_attn.ui.state import url_key

# What a panel shows when something broke: Streamlit's exception box and the app's own error box.
ERROR_BOXES = "[data-testid='stException'], [data-testid='stAlertContentError']"
LENGTHS = (64, 128, 256)
PATTERNS = ("random", "local", "sink_local", "retrieval", "periodic")
K_RANGE = (4, 48)  # k stays below every length, so each step changes the selection
K_KEY = url_key("top_k")  # sessions start from URLs, as a shared link would

# A finer fingerprint than the helpers' one for the final check: each row of a sparse map sums to 1 whatever the
# seed, so add the sum of squares and a key-position-weighted sum, which tell different weights and keys apart.
RESULT_SIGNATURE = """([key, trace]) => {
  const el = document.querySelector('.st-key-' + key + ' .js-plotly-plot');
  if (!el || !el._fullData || !el._fullData[trace] || !el._fullData[trace].z) return null;
  const z = el._fullData[trace].z;
  let nz = 0, sq = 0, pos = 0;
  for (const row of z) row.forEach((v, j) => { if (v > 0) nz += 1; sq += v * v; pos += v * (j + 1); });
  return [z.length, z[0].length, nz, sq, pos];
}"""


def p95(xs: list[float]) -> float:
    xs = sorted(xs)
    return xs[min(len(xs) - 1, round(0.95 * (len(xs) - 1)))]


def student_settings(i: int) -> dict:
    """Session i's own starting settings, as its URL's query: no two sessions of a run share (L, pattern, seed)."""
    return {"L": LENGTHS[i % len(LENGTHS)], "pattern": PATTERNS[(i // len(LENGTHS)) % len(PATTERNS)],
            "seed": 1000 + i, K_KEY: 8 + (7 * i) % 32, "H": 2}


def expected_signature(settings: dict) -> tuple:
    """RESULT_SIGNATURE of the sparse heatmap a URL query (``student_settings``) gives, computed in this process."""
    import numpy as np

    from sparse_attn.ui import compute, state

    s = state.from_query(settings)  # the app reads a first visit's settings the same way
    data = compute.view({key: s[key] for key in compute.COMPUTE_KEYS})
    z = np.asarray(compute.pick(data, s["head"], s["pool"])["maps"]["sparse"].values, dtype=np.float32)
    z = z.astype(np.float64)
    return z.shape[0], z.shape[1], int((z > 0).sum()), float((z * z).sum()), float((z * np.arange(1, z.shape[1] + 1)).sum())


def same_signature(seen, want, rel: float = 1e-5) -> bool:
    return (seen is not None and tuple(seen[:3]) == tuple(want[:3])
            and all(abs(a - b) <= rel * max(1.0, abs(b)) for a, b in zip(seen[3:], want[3:])))


class RssSampler:
    """Samples one process's resident memory (from /proc) in a thread; keeps the peak."""

    def __init__(self, pid: int, every: float = 0.2):
        self.pid, self.every, self.peak = pid, every, 0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def now(self) -> int:
        with open(f"/proc/{self.pid}/status") as f:
            for line in f:
                if line.startswith("VmRSS:"):
                    return int(line.split()[1]) * 1024
        raise RuntimeError(f"no VmRSS for process {self.pid}")

    def _run(self):
        while not self._stop.is_set():
            try:
                self.peak = max(self.peak, self.now())
            except (OSError, RuntimeError):
                return  # the server has gone; the caller's checks will say so
            self._stop.wait(self.every)

    def __enter__(self):
        self.peak = self.now()
        self._thread.start()
        return self

    def __exit__(self, *exc):
        self._stop.set()
        self._thread.join()


def server_pid(url: str) -> int:
    """The pid of the ``streamlit run`` child of this process that serves ``url``."""
    port = str(urllib.parse.urlsplit(url).port)
    me = str(os.getpid())
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            args = (entry / "cmdline").read_bytes().split(b"\0")
            ppid = (entry / "stat").read_text().rsplit(")", 1)[1].split()[1]
        except OSError:
            continue
        if ppid == me and b"streamlit" in b" ".join(args) and port.encode() in args:
            return int(entry.name)
    raise RuntimeError(f"no streamlit server child of this process on port {port}")


@dataclass
class Student:
    index: int
    settings: dict
    latencies: list[float] = field(default_factory=list)
    error_boxes: int = 0
    last_signature: list | None = None
    slider_value: str | None = None
    failure: str | None = None


async def _signature(page):
    return await page.evaluate(TRACE_SIGNATURE, [MAPS, 1])


async def _wait_changed(page, old, timeout_ms: float):
    await page.wait_for_function(
        f"([old, key, trace]) => {{ const s = ({TRACE_SIGNATURE})([key, trace]); "
        "return s !== null && JSON.stringify(s) !== JSON.stringify(old); }",
        arg=[old, MAPS, 1], timeout=timeout_ms, polling="raf")


async def _student(browser, url: str, st: Student, seconds: float, timeout_ms: float) -> Student:
    ctx = await browser.new_context(viewport={"width": 1400, "height": 1000})
    try:
        page = await ctx.new_page()
        await page.goto(url + "/?" + urllib.parse.urlencode(st.settings), timeout=timeout_ms)
        await page.wait_for_selector(IDLE, timeout=timeout_ms)
        await page.wait_for_function(f"() => ({TRACE_SIGNATURE})(['{MAPS}', 1]) !== null", timeout=timeout_ms)
        sig = await _signature(page)
        deadline = time.monotonic() + seconds  # the bounded time starts once this student sees a heatmap
        slider = page.get_by_role("slider", name=t("setting.top_k", "en"))
        step = 1 if st.index % 2 == 0 else -1
        while time.monotonic() < deadline:
            k = st.settings[K_KEY]
            if not K_RANGE[0] <= k + step <= K_RANGE[1]:
                step = -step
            await slider.focus()
            start = time.perf_counter()
            await page.keyboard.press("ArrowRight" if step > 0 else "ArrowLeft")
            st.settings[K_KEY] = k + step
            await _wait_changed(page, sig, timeout_ms)
            st.latencies.append(time.perf_counter() - start)
            await page.wait_for_selector(IDLE, timeout=timeout_ms)
            sig = await _signature(page)
            st.error_boxes = max(st.error_boxes, await page.locator(ERROR_BOXES).count())
        await page.wait_for_selector(IDLE, timeout=timeout_ms)
        # A key pressed while the app reruns can be lost or land on the redrawn
        # widget, so the k this session really asked for is what its slider
        # shows; its L, pattern and seed are its own, and a picture from any
        # other session would not match them.
        st.slider_value = await slider.input_value()
        st.settings[K_KEY] = int(st.slider_value)
        st.last_signature = await page.evaluate(RESULT_SIGNATURE, [MAPS, 1])
        st.error_boxes = max(st.error_boxes, await page.locator(ERROR_BOXES).count())
    except Exception as exc:  # one student's failure is a finding, not the end of the run
        st.failure = f"{type(exc).__name__}: {str(exc).splitlines()[0] if str(exc) else ''}"
    finally:
        await ctx.close()
    return st


async def _classroom(url: str, sessions: int, seconds: float, timeout_ms: float) -> list[Student]:
    from playwright.async_api import async_playwright

    async with async_playwright() as pw:
        browser = await pw.chromium.launch(executable_path=CHROMIUM, args=CHROMIUM_ARGS)
        try:
            # Everyone arrives at once, as a class does.
            students = [Student(i, student_settings(i)) for i in range(sessions)]
            return list(await asyncio.gather(*(_student(browser, url, s, seconds, timeout_ms) for s in students)))
        finally:
            await browser.close()


def drive(url: str, sessions: int, seconds: float, timeout_ms: float = 120_000) -> list[Student]:
    """Run the classroom against ``url``; in a thread of its own, so it never meets another event loop."""
    if urllib.parse.urlsplit(url).hostname not in ("127.0.0.1", "localhost", "::1"):
        raise ValueError(f"url must be on the loopback interface, got {url!r}")
    out: list = []
    worker = threading.Thread(target=lambda: out.append(asyncio.run(_classroom(url, sessions, seconds, timeout_ms))))
    worker.start()
    worker.join()
    if not out:
        raise RuntimeError("the load driver stopped without results (see the thread's traceback above)")
    return out[0]


@dataclass
class Report:
    sessions: int
    seconds: float
    students: list[Student]
    changes: int
    p50: float
    p95: float
    rss_baseline: int
    rss_peak: int
    rss_after: int
    tracebacks: int
    error_boxes: int
    mismatched: list[int]
    failures: list[str]

    def lines(self) -> list[str]:
        mib = 2**20
        return [
            f"sessions {self.sessions}, {self.seconds:g} s each, {self.changes} changes",
            f"change -> updated heatmap: p50 {self.p50:.2f} s, p95 {self.p95:.2f} s",
            f"server RSS: baseline {self.rss_baseline / mib:.0f} MiB, peak {self.rss_peak / mib:.0f} MiB, "
            f"after the sessions closed {self.rss_after / mib:.0f} MiB",
            f"tracebacks in the server log: {self.tracebacks}; error boxes seen: {self.error_boxes}; "
            f"sessions whose last heatmap did not match their settings: {len(self.mismatched)}; "
            f"sessions that failed: {len(self.failures)}",
            *[f"  failure: {f}" for f in self.failures],
        ]


def run_classroom(url: str, log_path: Path, sessions: int, seconds: float, *, settle_s: float = 10.0) -> Report:
    """Warm the server with one session, then run ``sessions`` at once and measure; ``log_path`` is the server log."""
    sampler_pid = server_pid(url)
    drive(url, 1, 0.0)  # one student first: imports, caches and the first page build are not load
    time.sleep(2)
    with RssSampler(sampler_pid) as rss:
        baseline = rss.now()
        students = drive(url, sessions, seconds)
        time.sleep(settle_s)  # closed websockets end their sessions; give the server a moment to drop them
        after = rss.now()
    lat = [x for s in students for x in s.latencies]
    mismatched = [s.index for s in students if s.failure is None
                  and not same_signature(s.last_signature, expected_signature(s.settings))]
    return Report(sessions=sessions, seconds=seconds, students=students, changes=len(lat),
                  p50=statistics.median(lat) if lat else float("nan"), p95=p95(lat) if lat else float("nan"),
                  rss_baseline=baseline, rss_peak=rss.peak, rss_after=after,
                  tracebacks=Path(log_path).read_text().count("Traceback"),
                  error_boxes=sum(s.error_boxes for s in students), mismatched=mismatched,
                  failures=[f"session {s.index}: {s.failure}" for s in students if s.failure])


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--sessions", type=int, default=20)
    ap.add_argument("--seconds", type=float, default=60.0, help="how long each session keeps changing k")
    args = ap.parse_args(argv)
    if args.sessions < 1 or args.seconds <= 0:
        ap.error("--sessions must be >= 1 and --seconds > 0")
    with tempfile.TemporaryDirectory() as tmp:
        log = Path(tmp) / "streamlit.log"
        with serve(log_path=log) as url:
            report = run_classroom(url, log, args.sessions, args.seconds)
        print("\n".join(report.lines()))
    print(f"\nmachine: {platform.processor() or platform.machine()}, {os.cpu_count()} CPUs, "
          f"load average before the run's end {os.getloadavg()[0]:.1f}; top-k, H=2, D=64, float32, "
          f"L in {LENGTHS}, k in {K_RANGE}, one Chromium with {args.sessions} contexts")
    ok = not (report.tracebacks or report.error_boxes or report.mismatched or report.failures)
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
