"""A classroom at the websocket: N simulated students speak Streamlit's own protocol to one served app (no browser).

    python -m benchmarks.ws_load --sessions 50 --seconds 60 --period 5
    python -m benchmarks.ws_load --sessions 1 --seconds 30 --period 0 --settings defaults   # one student, flat out
    python -m benchmarks.ws_load --sessions 20 --set L=4096 --url http://127.0.0.1:8501
    python -m benchmarks.ws_load --sessions 5 --view budget
    python -m benchmarks.ws_load --sessions 50 --workers 2 --source-addresses 50   # two processes behind nginx

Each student opens ``/_stcore/stream`` (subprotocol ``streamlit``, as the
browser does) and asks for its first run with its own query string (length,
pattern, seed, k: ``benchmarks.classroom_load.student_settings``). Then, at
jittered times (Poisson arrivals by default, so students are not in
lockstep), it moves the k slider one step the way the browser does: a
``rerun_script`` BackMsg whose widget state carries the slider's new value
under the widget id the server sent with the slider, the page's current
query string, and the hashes of the large messages it already holds (the
browser's message cache; the server then sends a reference instead). An
interaction ends when that run's ``script_finished`` arrives.

Reported (``run`` returns it as a dict): interactions and interactions per
second, latency from the change to the run's end (p50 / p95 / max), bytes per
interaction (websocket message payloads, and the bytes that came off the
socket), exception elements and error boxes in the deltas, tracebacks in the
server log, cross-talk (each student's last picture and widgets against its
own settings, recomputed in this process), and the server's CPU seconds and
RSS at baseline, at its peak (sampled every 0.2 s) and after every session
closed. The load average is recorded beside the numbers: the machine may be
shared.

Behind a load balancer (``--workers N`` starts N app processes behind nginx,
``benchmarks.cluster``; or ``--url`` of one with a ``--pid`` for each worker),
students connect from distinct loopback addresses (``--source-addresses``:
127.0.0.1 to 127.0.0.N, round robin), since nginx keeps a student on one
worker by its address, and each reads the worker that took its websocket from
the ``X-Upstream`` header of the handshake. The report then adds, per worker:
its students, interactions and rate, CPU seconds and RSS.

Simplifications, against a browser: a rerun carries only the k slider's
widget state (the server keeps every other widget's last value, so the
result is the same; the cross-talk check would notice otherwise), no
heartbeats, no Origin header and hence no XSRF token (the app has no login:
the token only guards the auth cookie), and nothing is rendered.
"""
from __future__ import annotations

import argparse
import asyncio
import collections
import json
import math
import os
import platform
import random
import resource
import statistics
import sys
import tempfile
import threading
import time
import urllib.parse
import zlib
from dataclasses import dataclass, field
from pathlib import Path

from streamlit.proto.BackMsg_pb2 import BackMsg
from streamlit.proto.ForwardMsg_pb2 import ForwardMsg

LOOPBACK = ("127.0.0.1", "localhost", "::1")
K_SETTING = "top_k"
MAPS_CHART, BUDGET_CHART = "maps_chart", "budget_chart"
PICTURES = {"maps": MAPS_CHART, "budget": BUDGET_CHART}  # the chart a student waits for, by open tab
K_RANGE = (4, 48)  # as the browser driver: k stays below every classroom length, so each step changes the selection
# Widgets whose value in the last run must be the student's own (they are set only by that student's URL and k).
OWN_WIDGETS = ("L", "H", "seed", K_SETTING)


def p95(xs) -> float:
    xs = sorted(xs)
    return xs[min(len(xs) - 1, round(0.95 * (len(xs) - 1)))] if xs else math.nan


# --- what a browser holds: the message cache and the page of the current run ---------------------------------

class MessageCache:
    """The browser's cache of large messages: the server sends a ``ref_hash`` for any hash the rerun lists.

    An entry not seen for ``max_age`` runs is dropped, as the browser does
    (``global.maxCachedMessageAge``, sent in ``new_session``).
    """

    def __init__(self, max_age: int = 2):
        self.max_age, self.run, self._entries = max_age, 0, {}

    def keep(self, msg) -> None:
        if msg.metadata.cacheable and msg.hash:
            self._entries[msg.hash] = [msg, self.run]

    def resolve(self, ref):
        """The cached message a ``ref_hash`` message stands for, with the ref's own place on the page."""
        entry = self._entries.get(ref.ref_hash)
        if entry is None:
            raise LookupError(f"the server referred to message {ref.ref_hash}, which this client never held")
        entry[1] = self.run
        msg = ForwardMsg()
        msg.CopyFrom(entry[0])
        msg.metadata.CopyFrom(ref.metadata)
        return msg

    def end_run(self) -> None:
        self.run += 1
        self._entries = {h: e for h, e in self._entries.items() if self.run - e[1] <= self.max_age}

    def hashes(self) -> list[str]:
        return list(self._entries)


def _element_id(element) -> str:
    kind = element.WhichOneof("type")
    return getattr(getattr(element, kind), "id", "") if kind else ""


def user_key(element_id: str) -> str | None:
    """The ``key=`` a widget was given, from its element id (``$$ID-<hash>-<key>``); None for an unkeyed one."""
    parts = element_id.split("-", 2)
    return parts[2] if len(parts) == 3 and parts[0] == "$$ID" else None


@dataclass
class Page:
    """The elements the last run drew, by their user key, and what went wrong in that run."""
    elements: dict = field(default_factory=dict)  # user key -> Element proto
    fragments: dict = field(default_factory=dict)  # user key -> id of the fragment that drew it ("" for none)
    errors: list[str] = field(default_factory=list)

    def after_fragment(self) -> Page:
        """The page a fragment's run starts from: everything else stays on screen."""
        return Page(dict(self.elements), dict(self.fragments))

    def add(self, element, fragment_id: str = "") -> None:
        kind = element.WhichOneof("type")
        if kind == "exception":
            e = element.exception
            self.errors.append(f"exception {e.type}: {e.message[:200]}")
        elif kind == "alert" and element.alert.format == element.alert.ERROR:
            self.errors.append(f"error box: {element.alert.body[:200]}")
        key = user_key(_element_id(element))
        if key:
            self.elements[key] = element
            self.fragments[key] = fragment_id


def widget_value(element):
    """What a slider, select slider or number input shows, as the student sees it (select sliders: the option)."""
    kind = element.WhichOneof("type")
    w = getattr(element, kind)
    if kind == "slider":
        if w.options:  # a select slider: the option's text when set, else the index of its default
            return w.raw_value[0] if w.set_value and w.raw_value else w.options[int(w.default[0])]
        value = (w.value if w.set_value else w.default)[0]
        return int(value) if w.data_type == w.INT else value
    if kind == "number_input":
        value = w.value if w.set_value else w.default
        return int(value) if w.data_type == w.INT else value
    raise TypeError(f"no reader for a {kind} widget")


def plot_trace_z(element, trace: int):
    """Trace ``trace``'s z of a chart element as a float64 array (plotly 6 sends arrays base64-encoded)."""
    import base64

    import numpy as np

    from sparse_attn.ui.charts import spec

    z = spec(element.bidi_component)["data"][trace]["z"]
    if isinstance(z, dict):
        shape = [int(n) for n in str(z["shape"]).split(",")]
        z = np.frombuffer(base64.b64decode(z["bdata"]), dtype=np.dtype(z["dtype"])).reshape(shape)
    return np.asarray(z, dtype=np.float64)


def map_signature(element, trace: int = 1) -> tuple:
    """``classroom_load.RESULT_SIGNATURE`` of a heatmap trace, read from the chart the server sent."""
    import numpy as np

    z = plot_trace_z(element, trace)
    return (z.shape[0], z.shape[1], int((z > 0).sum()), float(np.nansum(z * z)),
            float(np.nansum(z * np.arange(1, z.shape[1] + 1))))


# --- one student -----------------------------------------------------------------------------------------

@dataclass
class Student:
    index: int
    query: dict  # its URL query (short keys); k follows what it last sent
    first_page_s: float = math.nan
    latencies: list[float] = field(default_factory=list)
    window: tuple[float, float] | None = None  # when it started and stopped changing k (monotonic clock)
    payload_bytes: list[int] = field(default_factory=list)  # per interaction
    wire_bytes: list[int] = field(default_factory=list)
    deflated_bytes: list[int] = field(default_factory=list)  # an estimate, with --estimate-deflate
    late: int = 0  # changes sent after their scheduled time (the previous one was still running)
    errors: list[str] = field(default_factory=list)
    last_page: Page | None = None
    deflate: bool = False
    failure: str | None = None
    source: str | None = None  # the loopback address it connects from (None: the system's choice)
    upstream: str | None = None  # the worker behind a proxy that took its websocket (its X-Upstream header)


def _counting_connection():
    from websockets.asyncio.client import ClientConnection

    class Counting(ClientConnection):
        """Counts the bytes that come off the socket (frames, headers, compression as sent), beside the payloads."""
        wire = 0

        def data_received(self, data: bytes) -> None:
            self.wire += len(data)
            super().data_received(data)

    return Counting


def _rerun(query_string: str, page_script_hash: str, cache: MessageCache, url: str, widgets=(),
           fragment_id: str = "") -> bytes:
    msg = BackMsg()
    cs = msg.rerun_script
    cs.query_string = query_string
    cs.page_script_hash = page_script_hash
    cs.fragment_id = fragment_id  # a widget inside a fragment reruns only that fragment, as in the browser
    cs.cached_message_hashes.extend(cache.hashes())
    cs.context_info.url = url
    cs.context_info.locale = "en-US"
    cs.context_info.timezone = "UTC"
    for widget_id, value in widgets:
        w = cs.widget_states.widgets.add()
        w.id = widget_id
        w.double_array_value.data.append(float(value))  # what a slider sends, an int slider too
    return msg.SerializeToString()


class _Session:
    """A student's websocket: send a rerun, read until the run's end, keep the page it drew."""

    def __init__(self, ws, page_url: str, estimate_deflate: bool = False):
        self.ws, self.page_url = ws, page_url
        self.cache, self.page = MessageCache(), Page()
        self.query_string, self.page_script_hash = "", ""
        # What permessage-deflate would put on the wire (one raw deflate stream per connection, context kept,
        # each message flushed and its 4-byte tail dropped, as RFC 7692 says), with the settings the server's
        # websockets library negotiates (a 4 KiB window, memLevel 5, level 6): against a server with
        # compression on, this came within 0.1 % of the bytes measured on the socket. Only when not negotiated.
        self._deflate = zlib.compressobj(6, zlib.DEFLATED, -12, 5) if estimate_deflate else None

    def _deflated(self, raw: bytes) -> int:
        return len(self._deflate.compress(raw) + self._deflate.flush(zlib.Z_SYNC_FLUSH)) - 4

    async def run(self, query_string: str, widgets=(), fragment_id: str = "",
                  timeout_s: float = 300.0) -> tuple[Page, int, int, int]:
        """One rerun from send to ``script_finished``: (its page, payload bytes, socket bytes, deflated bytes)."""
        wire0, deflated = self.ws.wire, 0
        self.query_string = query_string  # the address bar, until the app rewrites it
        await self.ws.send(_rerun(query_string, self.page_script_hash, self.cache, self.page_url, widgets,
                                  fragment_id))
        fresh = (lambda: self.page.after_fragment()) if fragment_id else Page
        page, payload = fresh(), 0
        deadline = time.monotonic() + timeout_s
        while True:
            raw = await asyncio.wait_for(self.ws.recv(), max(0.1, deadline - time.monotonic()))
            payload += len(raw)
            if self._deflate is not None:
                deflated += self._deflated(raw)
            msg = ForwardMsg()
            msg.ParseFromString(raw)
            kind = msg.WhichOneof("type")
            if kind == "ref_hash":
                msg = self.cache.resolve(msg)
                kind = msg.WhichOneof("type")
            else:
                self.cache.keep(msg)
            if kind == "new_session":
                self.page_script_hash = msg.new_session.page_script_hash
                if msg.new_session.config.max_cached_message_age:
                    self.cache.max_age = msg.new_session.config.max_cached_message_age
                page = fresh()  # a run starts: the page is rebuilt (all of it, or the fragment's part)
            elif kind == "page_info_changed":
                self.query_string = msg.page_info_changed.query_string  # the app rewrote the address bar
            elif kind == "delta" and msg.delta.WhichOneof("type") == "new_element":
                page.add(msg.delta.new_element, msg.delta.fragment_id)
            elif kind == "script_finished":
                status = msg.script_finished
                if status == ForwardMsg.FINISHED_EARLY_FOR_RERUN:
                    continue  # the app asked for another run itself; this interaction ends with that one
                self.cache.end_run()
                if status == ForwardMsg.FINISHED_WITH_COMPILE_ERROR:
                    page.errors.append("the script did not compile")
                self.page = page
                return page, payload, self.ws.wire - wire0, deflated


def _gaps(rng: random.Random, period: float, arrivals: str):
    """Seconds between a student's changes: Poisson arrivals, or a fixed period from a random phase."""
    if period <= 0:
        while True:
            yield 0.0
    if arrivals == "poisson":
        while True:
            yield rng.expovariate(1.0 / period)
    yield rng.uniform(0, period)
    while True:
        yield period


async def _student(url: str, st: Student, *, seconds: float, period: float, arrivals: str, seed: int,
                   timeout_s: float, estimate_deflate: bool = False) -> Student:
    from websockets.asyncio.client import connect

    parts = urllib.parse.urlsplit(url)
    ws_url = urllib.parse.urlunsplit(("ws" if parts.scheme == "http" else "wss", parts.netloc,
                                      parts.path.rstrip("/") + "/_stcore/stream", "", ""))
    page_url = urllib.parse.urlunsplit((parts.scheme, parts.netloc, parts.path or "/", "", ""))
    rng = random.Random(seed * 100_003 + st.index)
    try:
        # No client pings (a browser sends none; a busy server answers late) and no proxy: loopback only.
        async with connect(ws_url, subprotocols=["streamlit"], max_size=None, proxy=None, ping_interval=None,
                           open_timeout=timeout_s, create_connection=_counting_connection(),
                           local_addr=(st.source, 0) if st.source else None) as ws:
            st.upstream = ws.response.headers.get("X-Upstream")
            st.deflate = any(ext.name == "permessage-deflate" for ext in ws.protocol.extensions)
            session = _Session(ws, page_url, estimate_deflate and not st.deflate)
            start = time.perf_counter()
            page, *_ = await session.run(urllib.parse.urlencode(st.query), timeout_s=timeout_s)
            st.first_page_s = time.perf_counter() - start
            st.errors += page.errors
            st.last_page = page
            # Every step is a new k until the top, then back to the bottom (the Home key): in a one-student run
            # no value comes round again before the view cache (16 entries) has dropped it, so none is a cache hit.
            gaps = _gaps(rng, period, arrivals)
            due = time.monotonic() + next(gaps)
            began = time.monotonic()
            end = began + seconds  # the bounded time starts once this student sees its page
            while True:
                now = time.monotonic()
                if due > now:
                    if due >= end:
                        break
                    await asyncio.sleep(due - now)
                elif now >= end:
                    break
                elif period > 0:
                    st.late += 1
                # The slider as the last run drew it: its id and bounds are the server's, not guessed here.
                slider = page.elements.get(K_SETTING)
                if slider is None or slider.WhichOneof("type") != "slider":
                    raise LookupError("the page has no k slider")
                lo, hi = max(K_RANGE[0], int(slider.slider.min)), min(K_RANGE[1], int(slider.slider.max))
                k = int(st.query["k"]) + 1
                k = lo if k > hi else k
                st.query["k"] = str(k)
                start = time.perf_counter()
                page, payload, wire, deflated = await session.run(
                    session.query_string, [(slider.slider.id, k)], page.fragments.get(K_SETTING, ""),
                    timeout_s=timeout_s)
                st.latencies.append(time.perf_counter() - start)
                st.payload_bytes.append(payload)
                st.wire_bytes.append(wire)
                st.deflated_bytes.append(deflated)
                st.errors += page.errors
                st.last_page = page
                due = max(due + next(gaps), time.monotonic())
            st.window = (began, time.monotonic())
    except Exception as exc:  # one student's failure is a finding, not the end of the run
        st.failure = f"{type(exc).__name__}: {str(exc).splitlines()[0] if str(exc) else ''}"
    return st


async def _classroom(url: str, students: list[Student], **kw) -> list[Student]:
    return list(await asyncio.gather(*(_student(url, s, **kw) for s in students)))


def drive(url: str, students: list[Student], *, seconds: float, period: float, arrivals: str = "poisson",
          seed: int = 0, timeout_s: float = 300.0, estimate_deflate: bool = False) -> list[Student]:
    """Run these students against ``url`` at once (everyone arrives together, as a class does)."""
    check_url(url)
    return run_async(_classroom(url, students, seconds=seconds, period=period, arrivals=arrivals, seed=seed,
                                timeout_s=timeout_s, estimate_deflate=estimate_deflate))


def run_async(coro):
    """``asyncio.run(coro)``, in a thread of its own when this thread already runs a loop.

    Playwright's sync API keeps a loop running in the main thread for the whole test session, so after the first
    browser test a plain ``asyncio.run`` here would refuse to start.
    """
    try:
        asyncio.get_running_loop()
    except RuntimeError:
        return asyncio.run(coro)
    import concurrent.futures

    with concurrent.futures.ThreadPoolExecutor(1) as pool:
        return pool.submit(asyncio.run, coro).result()


def check_url(url: str) -> str:
    parts = urllib.parse.urlsplit(url)
    if parts.scheme not in ("http", "https") or parts.hostname not in LOOPBACK:
        raise ValueError(f"url must be http(s) on the loopback interface (127.0.0.1, localhost, ::1), got {url!r}")
    return url


# --- the students' settings and what their pages must show ------------------------------------------------

def parse_sets(pairs) -> dict[str, str]:
    """``--set name=value`` pairs as URL query entries; a name is a setting's name or its URL key."""
    from sparse_attn.ui import state

    by_key = {state.url_key(name): name for name in state.specs()}
    out = {}
    for pair in pairs or ():
        name, sep, value = pair.partition("=")
        name = name.strip()
        if not sep or not name:
            raise ValueError(f"--set takes name=value, got {pair!r}")
        setting = name if name in state.specs() else by_key.get(name)
        if setting is None:
            raise ValueError(f"--set: unknown setting {name!r}; allowed: {', '.join(sorted(by_key))}")
        try:
            state.specs()[setting].parse(value)
        except (ValueError, TypeError):
            raise ValueError(f"--set: {name}={value!r} is not an allowed value of {name}") from None
        out[state.url_key(setting)] = value
    return out


def student_query(i: int, mode: str, overrides: dict[str, str], view: str | None) -> dict:
    """Student i's URL query: the browser driver's classroom mix, or the app's defaults with its own seed and k."""
    from benchmarks.classroom_load import student_settings

    if mode == "classroom":
        q = dict(student_settings(i))
    elif mode == "defaults":
        q = {"seed": 1000 + i, "k": 8 + (7 * i) % 32}
    else:
        raise ValueError(f"settings must be 'classroom' or 'defaults', got {mode!r}")
    q.update(overrides)
    if view:
        q["view"] = view
    return {key: str(value) for key, value in q.items()}


def own_state_mismatches(st: Student) -> list[str]:
    """Widgets in the student's last page that show someone else's settings (or that are missing)."""
    from sparse_attn.ui import state

    want = state.from_query(st.query)
    out = []
    for name in OWN_WIDGETS:
        element = st.last_page.elements.get(state.widget_of(name))
        if element is None:
            out.append(f"{name}: no widget")
            continue
        seen = widget_value(element)
        if str(seen) != str(want[name]):
            out.append(f"{name}: shows {seen}, its own is {want[name]}")
    return out


def picture_mismatch(st: Student, view: str) -> str | None:
    """None when the student's last page holds its picture and (maps) it is the one its settings give."""
    from benchmarks.classroom_load import expected_signature, same_signature

    chart = st.last_page.elements.get(PICTURES[view])
    if chart is None or chart.WhichOneof("type") != "bidi_component":
        return f"no {PICTURES[view]} in the last page"
    if view != "maps":
        return None  # the budget sweep is too costly to redo per student here; its widgets are still checked
    seen, want = map_signature(chart), expected_signature(st.query)
    return None if same_signature(seen, want) else f"sparse map {seen} is not its own {want}"


def cross_talk_of(students: list[Student], view: str = "maps") -> dict[int, list[str]]:
    """Student index -> what its last page shows that is not its own (only students with a problem)."""
    from streamlit.logger import set_log_level

    set_log_level("error")  # the app's cache used outside a server warns on every call; the warnings say nothing here
    out = {}
    for s in students:
        problems = own_state_mismatches(s)
        if (p := picture_mismatch(s, view)) is not None:
            problems.append(p)
        if problems:
            out[s.index] = problems
    return out


# --- the server: CPU and memory from /proc ---------------------------------------------------------------

class ServerProbe:
    """Samples one process's RSS and CPU time every ``every`` seconds in a thread; keeps the peak RSS."""

    def __init__(self, pid: int, every: float = 0.2):
        self.pid, self.every, self.peak = pid, every, 0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def rss(self) -> int:
        with open(f"/proc/{self.pid}/status") as f:
            for line in f:
                if line.startswith("VmRSS:"):
                    return int(line.split()[1]) * 1024
        raise RuntimeError(f"no VmRSS for process {self.pid}")

    def cpu_s(self) -> float:
        fields = Path(f"/proc/{self.pid}/stat").read_text().rsplit(")", 1)[1].split()
        return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")  # utime + stime

    def _run(self):
        while not self._stop.is_set():
            try:
                self.peak = max(self.peak, self.rss())
            except (OSError, RuntimeError):
                return  # the server has gone; the students' failures will say so
            self._stop.wait(self.every)

    def __enter__(self):
        self.peak = self.rss()
        self._thread.start()
        return self

    def __exit__(self, *exc):
        self._stop.set()
        self._thread.join()


class Probes:
    """Several processes at once (the workers behind a proxy): per-process CPU and RSS, and the peak of their sum."""

    def __init__(self, pids, every: float = 0.2):
        self.probes = [ServerProbe(p, every) for p in pids]
        self.every, self.peak, self.peaks = every, 0, [0] * len(self.probes)
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def rss(self) -> list[int]:
        return [p.rss() for p in self.probes]

    def cpu_s(self) -> list[float]:
        return [p.cpu_s() for p in self.probes]

    def _sample(self) -> None:
        each = self.rss()
        self.peaks = [max(a, b) for a, b in zip(self.peaks, each)]
        self.peak = max(self.peak, sum(each))

    def _run(self):
        while not self._stop.is_set():
            try:
                self._sample()
            except (OSError, RuntimeError):
                return  # a worker has gone; the students' failures will say so
            self._stop.wait(self.every)

    def __enter__(self):
        self._sample()
        self._thread.start()
        return self

    def __exit__(self, *exc):
        self._stop.set()
        self._thread.join()


def listening_ports(pid: int) -> list[int]:
    """The TCP ports process ``pid`` listens on (through /proc; empty when it is not visible)."""
    try:
        mine = {os.readlink(fd).removeprefix("socket:[").removesuffix("]") for fd in Path(f"/proc/{pid}/fd").iterdir()}
    except OSError:
        return []
    return sorted({port for port, inode in _listening() if inode in mine})


def _listening():
    """(port, socket inode) of every TCP socket in the LISTEN state (0A) that /proc shows, IPv4 and IPv6."""
    for table in ("/proc/net/tcp", "/proc/net/tcp6"):
        try:
            lines = Path(table).read_text().splitlines()[1:]
        except OSError:
            continue
        for line in lines:
            cols = line.split()
            if cols[3] == "0A":
                yield int(cols[1].rsplit(":", 1)[1], 16), cols[9]


def source_addresses(spec) -> list[str | None]:
    """Client addresses on loopback (Linux routes all of 127/8 to lo): a count n gives 127.0.0.1 .. 127.0.0.n.

    A list of 127.x.y.z addresses is taken as it is; None gives the system's choice.
    """
    if spec is None:
        return [None]
    if isinstance(spec, int) and not isinstance(spec, bool):
        if not 1 <= spec <= 254:
            raise ValueError(f"sources must be a count in 1..254, got {spec}")
        return [f"127.0.0.{i}" for i in range(1, spec + 1)]
    addresses = [str(a) for a in spec]
    bad = [a for a in addresses if a.split(".")[0] != "127" or len(a.split(".")) != 4
           or not all(x.isdigit() and int(x) < 256 for x in a.split("."))]
    if not addresses or bad:
        raise ValueError(f"sources must be a count or loopback IPv4 addresses (127.x.y.z), got {spec!r}")
    return addresses


def listener_pid(port: int) -> int | None:
    """The process that listens on loopback ``port`` (found through /proc), or None when it is not visible."""
    inodes = {inode for listening, inode in _listening() if listening == port}
    for proc in Path("/proc").iterdir():
        if not proc.name.isdigit():
            continue
        try:
            for fd in (proc / "fd").iterdir():
                if os.readlink(fd).removeprefix("socket:[").removesuffix("]") in inodes:
                    return int(proc.name)
        except OSError:
            continue
    return None


def loadavg() -> str:
    return " ".join(Path("/proc/loadavg").read_text().split()[:3])


# --- the run ----------------------------------------------------------------------------------------------

def _as_list(x) -> list:
    return [] if x is None else [x] if isinstance(x, (int, str, os.PathLike)) else list(x)


def _children(pid: int) -> list[int]:
    out = []
    for proc in Path("/proc").iterdir():
        try:
            if proc.name.isdigit() and (proc / "stat").read_text().rsplit(")", 1)[1].split()[1] == str(pid):
                out.append(int(proc.name))
        except OSError:
            continue
    return out


def _tree_cpu_s(pid: int) -> float:
    """CPU seconds of a process and its children (nginx: the master and its worker processes)."""
    total = 0.0
    for p in [pid, *_children(pid)]:
        try:
            total += ServerProbe(p).cpu_s()
        except OSError:
            continue
    return total


def per_worker(students: list[Student], pids: list[int], ports: dict[int, int], span: float, cpu_s: list[float],
               rss: dict[str, list[int]]) -> list[dict]:
    """Each measured process's share of the run: the students whose websocket it took (by X-Upstream) and its cost.

    ``ports`` maps a listening port to its pid; ``rss`` holds per-process baseline, peak and after lists.
    """
    by_pid = {pid: [] for pid in pids}
    for s in students:
        port = int(s.upstream.rsplit(",", 1)[-1].rsplit(":", 1)[1]) if s.upstream else None
        by_pid.setdefault(ports.get(port), []).append(s)  # None: a student no measured process took
    mib, out = 2**20, []
    for i, pid in enumerate(pids):
        mine = by_pid[pid]
        n = sum(len(s.latencies) for s in mine)
        out.append({"pid": pid, "ports": sorted(p for p, q in ports.items() if q == pid), "students": len(mine),
                    "interactions": n, "interactions_per_s": n / span if span and span > 0 else 0.0,
                    "cpu_s": cpu_s[i], "cpu_s_per_interaction": cpu_s[i] / n if n else math.nan,
                    "rss_mib": {k: v[i] / mib for k, v in rss.items()}})
    if by_pid.get(None):
        out.append({"pid": None, "ports": [], "students": len(by_pid[None]),
                    "upstreams": sorted({str(s.upstream) for s in by_pid[None]})})
    return out


def measure(url: str, *, sessions: int, seconds: float, period: float, pid, log_path, mode: str = "classroom",
            overrides: dict[str, str] | None = None, view: str | None = None, arrivals: str = "poisson",
            seed: int = 0, settle_s: float = 5.0, timeout_s: float = 300.0, check: int | None = None,
            estimate_deflate: bool = False, sources: int | None = None, proxy_pid: int | None = None) -> dict:
    """Warm the server with one student, run ``sessions`` at once, and report (see the module's docstring).

    ``pid`` and ``log_path`` may each be several (the workers behind a proxy at ``url``); ``sources``
    students' source addresses (``source_addresses``); ``proxy_pid`` the proxy, whose CPU is reported.
    """
    view = view or "maps"
    if view not in PICTURES:
        raise ValueError(f"view must be one of {', '.join(PICTURES)}, got {view!r}")
    if sessions < 1 or seconds < 0 or period < 0:
        raise ValueError("sessions must be >= 1, seconds and period >= 0")
    overrides = overrides or {}
    open_view = None if view == "maps" else view
    pids, logs = _as_list(pid), [Path(p) for p in _as_list(log_path)]
    ports = {port: p for p in pids for port in listening_ports(p)}
    # One student first, on settings no one else uses: imports, caches and the first page build are not load.
    # Behind a proxy each worker is warmed on its own port: the proxy would send one warm-up to one worker.
    warm_urls = [f"http://127.0.0.1:{port}" for port in ports] if len(pids) > 1 else [url]
    for j, warm_url in enumerate(warm_urls):
        warm = Student(-1 - j, student_query(10_000, mode, overrides, open_view))
        drive(warm_url, [warm], seconds=0, period=period, timeout_s=timeout_s)
        if warm.failure:
            raise RuntimeError(f"the warm-up student at {warm_url} failed: {warm.failure}")
    time.sleep(2)
    probe = Probes(pids) if pids else None
    load_before = loadavg()
    addresses = source_addresses(sources)
    students = [Student(i, student_query(i, mode, overrides, open_view), source=addresses[i % len(addresses)])
                for i in range(sessions)]
    cpu0, mine0 = (probe.cpu_s() if probe else []), resource.getrusage(resource.RUSAGE_SELF)
    proxy0 = _tree_cpu_s(proxy_pid) if proxy_pid else math.nan
    rss_base = probe.rss() if probe else None
    t0 = time.perf_counter()
    if probe:
        probe.__enter__()
    try:
        drive(url, students, seconds=seconds, period=period, arrivals=arrivals, seed=seed, timeout_s=timeout_s,
              estimate_deflate=estimate_deflate)
        wall = time.perf_counter() - t0
        cpu_each = [b - a for a, b in zip(cpu0, probe.cpu_s())] if probe else []
        cpu_run = sum(cpu_each) if probe else math.nan
        proxy_cpu = _tree_cpu_s(proxy_pid) - proxy0 if proxy_pid else math.nan
        load_end = loadavg()
        time.sleep(settle_s)  # closed websockets end their sessions; give the server a moment to drop them
        rss_after = probe.rss() if probe else None
    finally:
        if probe:
            probe.__exit__()
    mine1 = resource.getrusage(resource.RUSAGE_SELF)
    # The checks come after the measurement: recomputing each student's picture here costs CPU the server shares.
    lat = [x for s in students for x in s.latencies]
    payload = [x for s in students for x in s.payload_bytes]
    wire = [x for s in students for x in s.wire_bytes]
    deflated = [x for s in students for x in s.deflated_bytes if x]
    checked = [s for s in students if s.failure is None and s.last_page is not None][:check]
    cross_talk = cross_talk_of(checked, view)
    first = [s.first_page_s for s in students if not math.isnan(s.first_page_s)]
    # Each student's clock starts at its own first page: the rate is over the time any student was changing k.
    windows = [s.window for s in students if s.window]
    span = (max(e for _, e in windows) - min(b for b, _ in windows)) if windows else math.nan
    mib = 2**20
    return {
        "sessions": sessions, "seconds": seconds, "period": period, "arrivals": arrivals, "view": view,
        "settings": mode, "overrides": overrides, "wall_s": wall,
        "interactions": len(lat),
        "interactions_per_s": len(lat) / span if windows and span > 0 else 0.0, "changes_span_s": span,
        "offered_per_s": sessions / period if period > 0 else math.inf,
        "late_changes": sum(s.late for s in students),
        "latency_s": {"p50": statistics.median(lat) if lat else math.nan, "p95": p95(lat),
                      "max": max(lat) if lat else math.nan},
        "first_page_s": {"p50": statistics.median(first) if first else math.nan, "p95": p95(first),
                         "max": max(first) if first else math.nan},
        "payload_bytes": {"median": statistics.median(payload) if payload else math.nan, "p95": p95(payload)},
        "wire_bytes": {"median": statistics.median(wire) if wire else math.nan, "p95": p95(wire)},
        "deflate": any(s.deflate for s in students),
        "deflated_bytes_estimate": {"median": statistics.median(deflated), "p95": p95(deflated)} if deflated else None,
        "errors": [f"student {s.index}: {e}" for s in students for e in s.errors],
        "failures": [f"student {s.index}: {s.failure}" for s in students if s.failure],
        "tracebacks": sum(log.read_text().count("Traceback") for log in logs) if logs else None,
        "students_without_picture": [s.index for s in students
                                     if s.last_page is None or PICTURES[view] not in s.last_page.elements],
        "cross_talk": cross_talk, "checked": len(checked),
        "server_cpu_s": cpu_run, "server_cpu_s_per_interaction": cpu_run / len(lat) if lat else math.nan,
        "driver_cpu_s": (mine1.ru_utime + mine1.ru_stime) - (mine0.ru_utime + mine0.ru_stime),
        # Several processes: their sum (and the peak of the sum); "workers" has each one.
        "rss_mib": {"baseline": sum(rss_base) / mib if probe else None, "peak": probe.peak / mib if probe else None,
                    "after": sum(rss_after) / mib if probe else None},
        "workers": per_worker(students, pids, ports, span, cpu_each,
                              {"baseline": rss_base, "peak": probe.peaks if probe else [], "after": rss_after})
        if len(pids) > 1 or any(s.upstream for s in students) else [],
        "upstreams": dict(collections.Counter(s.upstream for s in students if s.upstream)),
        "source_addresses": len({s.source for s in students if s.source}),
        "proxy_cpu_s": proxy_cpu,
        "loadavg": {"before": load_before, "end": load_end},
        "machine": f"{platform.machine()}, {os.cpu_count()} CPUs, Python {platform.python_version()}",
        "students": students,  # the raw results, for callers that look closer (not written to --json)
    }


def _log_tails(logs, result: dict) -> str:
    if not result["tracebacks"]:
        return ""
    return "\n".join(f"--- {log}:\n{Path(log).read_text()[-4000:]}" for log in logs
                     if "Traceback" in Path(log).read_text())


def run(*, sessions: int, seconds: float, period: float, url: str | None = None, pid=None, log_path=None,
        workers: int | None = None, **kw) -> dict:
    """``measure`` against ``url`` (loopback), or against a server of its own started with ``serve()``.

    ``workers``: instead, ``workers`` processes of its own behind nginx (``benchmarks.cluster``), each measured.
    With ``url``, ``pid`` and ``log_path`` may name several processes and logs (the workers behind a proxy).
    """
    from benchmarks.classroom_load import server_pid
    from sparse_attn.ui.server import serve

    if url is not None:
        check_url(url)
        pid = pid or listener_pid(urllib.parse.urlsplit(url).port or 80)
        logs = _as_list(log_path)
        result = measure(url, sessions=sessions, seconds=seconds, period=period, pid=pid, log_path=logs, **kw)
        result["log_tail"] = _log_tails(logs, result)
        return result
    if workers is not None:
        from benchmarks.cluster import cluster

        with cluster(workers) as c:
            logs = [w.log for w in c.workers]
            result = measure(c.url, sessions=sessions, seconds=seconds, period=period,
                             pid=[w.pid for w in c.workers], log_path=logs, proxy_pid=c.nginx_pid, **kw)
            result["log_tail"] = _log_tails(logs, result)  # the logs go with the cluster's directory
        return result
    with tempfile.TemporaryDirectory() as tmp:
        log = Path(log_path) if log_path else Path(tmp) / "streamlit.log"
        with serve(log_path=log) as own:
            result = measure(own, sessions=sessions, seconds=seconds, period=period, pid=server_pid(own),
                             log_path=log, **kw)
        result["log_tail"] = log.read_text()[-4000:] if result["tracebacks"] else ""
        return result


def lines(r: dict) -> list[str]:
    lat, first = r["latency_s"], r["first_page_s"]
    rss = r["rss_mib"]
    fmt = (lambda x: "n/a" if x is None else f"{x:.0f}")
    out = [
        f"{r['sessions']} students, {r['seconds']:g} s each, "
        + (f"period {r['period']:g} s ({r['arrivals']}), " if r["period"] > 0 else "flat out, ")
        + f"view {r['view']}, settings {r['settings']} {r['overrides'] or ''}".rstrip(),
        f"interactions {r['interactions']}, {r['interactions_per_s']:.2f}/s "
        f"(offered {r['offered_per_s']:.2f}/s; {r['late_changes']} sent late, the previous still running)",
        f"change -> script finished: p50 {lat['p50']:.2f} s, p95 {lat['p95']:.2f} s, max {lat['max']:.2f} s; "
        f"first page p50 {first['p50']:.2f} s, p95 {first['p95']:.2f} s, max {first['max']:.2f} s",
        f"bytes per interaction: payload median {r['payload_bytes']['median'] / 1e3:.0f} kB, "
        f"p95 {r['payload_bytes']['p95'] / 1e3:.0f} kB; off the socket median {r['wire_bytes']['median'] / 1e3:.0f} kB, "
        f"p95 {r['wire_bytes']['p95'] / 1e3:.0f} kB "
        f"(per-message deflate {'negotiated' if r['deflate'] else 'not negotiated'})"
        + (f"; deflated, estimated: median {r['deflated_bytes_estimate']['median'] / 1e3:.0f} kB, "
           f"p95 {r['deflated_bytes_estimate']['p95'] / 1e3:.0f} kB" if r["deflated_bytes_estimate"] else ""),
        f"server CPU {r['server_cpu_s']:.1f} s ({r['server_cpu_s_per_interaction']:.2f} s per interaction); "
        f"driver CPU {r['driver_cpu_s']:.1f} s",
        f"server RSS: baseline {fmt(rss['baseline'])} MiB, peak {fmt(rss['peak'])} MiB, "
        f"after the sessions closed {fmt(rss['after'])} MiB",
        f"errors {len(r['errors'])}, failures {len(r['failures'])}, tracebacks in the server log "
        f"{'not read' if r['tracebacks'] is None else r['tracebacks']}, students without their picture "
        f"{len(r['students_without_picture'])}, cross-talk {len(r['cross_talk'])} of {r['checked']} checked",
        *[f"  {x}" for x in (r["errors"] + r["failures"])[:10]],
        *[f"  cross-talk, student {i}: {'; '.join(p)}" for i, p in list(r["cross_talk"].items())[:10]],
        *worker_lines(r),
        f"load average before {r['loadavg']['before']}, at the end {r['loadavg']['end']}; {r['machine']}",
    ]
    return out


def worker_lines(r: dict) -> list[str]:
    """Per-worker lines of a run behind a proxy (none for one process on its own)."""
    if not r.get("workers"):
        return []
    took = sum(1 for w in r["workers"] if w["pid"] is not None and w["students"])
    out = [f"behind a proxy: {took} of {sum(1 for w in r['workers'] if w['pid'] is not None)} measured workers "
           f"took websockets, students from "
           f"{r['source_addresses'] or 1} source address(es)"
           + ("" if math.isnan(r.get("proxy_cpu_s", math.nan)) else f"; proxy CPU {r['proxy_cpu_s']:.1f} s")]
    for w in r["workers"]:
        if w["pid"] is None:
            out.append(f"  students on workers not measured: {w['students']} ({', '.join(w['upstreams'])})")
            continue
        rss = w["rss_mib"]
        out.append(f"  worker pid {w['pid']} (port {', '.join(map(str, w['ports'])) or '?'}): students "
                   f"{w['students']}, {w['interactions']} interactions, {w['interactions_per_s']:.2f}/s, CPU "
                   f"{w['cpu_s']:.1f} s ({w['cpu_s_per_interaction']:.2f} s per interaction), RSS "
                   f"{rss['baseline']:.0f} / {rss['peak']:.0f} / {rss['after']:.0f} MiB")
    return out


def ok(r: dict) -> bool:
    return not (r["errors"] or r["failures"] or r["tracebacks"] or r["cross_talk"] or r["students_without_picture"])


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--sessions", type=int, default=20)
    ap.add_argument("--seconds", type=float, default=60.0, help="how long each student keeps changing k")
    ap.add_argument("--period", type=float, default=5.0, help="mean seconds between a student's changes (0: flat out)")
    ap.add_argument("--arrivals", choices=("poisson", "uniform"), default="poisson",
                    help="poisson: exponential gaps; uniform: a fixed period from a random phase")
    ap.add_argument("--url", help="a served app on loopback (default: start one)")
    ap.add_argument("--pid", type=int, action="append",
                    help="with --url: the server process to measure (default: the listener); repeat it for each "
                    "worker behind a proxy")
    ap.add_argument("--log", action="append", help="with --url: the server's log, to count tracebacks (repeatable)")
    ap.add_argument("--workers", type=int, help="start this many app processes behind nginx (benchmarks.cluster) "
                    "and measure each")
    ap.add_argument("--source-addresses", type=int, metavar="N",
                    help="students connect from 127.0.0.1 .. 127.0.0.N in turn (as from N machines: nginx keeps "
                    "a client address on one worker)")
    ap.add_argument("--set", action="append", metavar="NAME=VALUE", help="put every student on this setting")
    ap.add_argument("--settings", choices=("classroom", "defaults"), default="classroom",
                    help="classroom: mixed lengths and patterns, H=2; defaults: the app's defaults, own seed and k")
    ap.add_argument("--view", choices=tuple(PICTURES), default="maps", help="the tab every student opens")
    ap.add_argument("--seed", type=int, default=0, help="seeds the students' timing")
    ap.add_argument("--settle", type=float, default=5.0, help="seconds to wait after closing before measuring RSS")
    ap.add_argument("--check", type=int, help="check only the first N students for cross-talk (default: all)")
    ap.add_argument("--estimate-deflate", action="store_true",
                    help="also estimate the bytes per-message deflate would send (costs the driver CPU)")
    ap.add_argument("--json", help="also write the report here")
    args = ap.parse_args(argv)
    if args.sessions < 1 or args.seconds < 0 or args.period < 0:
        ap.error("--sessions must be >= 1, --seconds and --period >= 0")
    if args.workers is not None and (args.workers < 1 or args.url):
        ap.error("--workers must be >= 1, and goes without --url (it starts its own servers)")
    if args.source_addresses is not None and not 1 <= args.source_addresses <= 254:
        ap.error("--source-addresses must be in 1..254")
    try:
        overrides = parse_sets(args.set)
        if args.url:
            check_url(args.url)
    except ValueError as exc:
        ap.error(str(exc))
    r = run(sessions=args.sessions, seconds=args.seconds, period=args.period, url=args.url, pid=args.pid,
            log_path=args.log, workers=args.workers, sources=args.source_addresses, mode=args.settings,
            overrides=overrides, view=args.view, arrivals=args.arrivals, seed=args.seed, settle_s=args.settle,
            check=args.check, estimate_deflate=args.estimate_deflate)
    print("\n".join(lines(r)))
    if r["log_tail"]:
        print("\nthe server log's end:\n" + r["log_tail"])
    if args.json:
        Path(args.json).write_text(json.dumps({k: v for k, v in r.items() if k != "students"}, indent=1, default=str))
    return 0 if ok(r) else 1


if __name__ == "__main__":
    sys.exit(main())
