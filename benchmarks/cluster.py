"""Several processes of the app behind one nginx: a class larger than one process serves.

    python -m benchmarks.cluster --workers 2 --port 8500                 # loopback; prints the URL, Ctrl-C stops it
    python -m benchmarks.cluster --workers 2 --port 8500 --host 0.0.0.0  # for students on the local network
    python -m benchmarks.cluster --workers 2 --print-config --prefix /srv/sparse-attn/nginx --worker-ports 8601 8602

Each worker is ``streamlit run app.py`` on its own loopback port (``serve()``,
so with the project's ``.streamlit/config.toml``); nginx listens on
``--host``:``--port`` and hashes each client address to one worker
(``deploy/nginx.conf.template`` says why). nginx runs from a prefix directory of
its own (config, pid, logs and temp files inside it), so no root is needed and
a system nginx is not touched. From Python:

    with cluster(workers=2) as c:
        c.url, [w.pid for w in c.workers], c.nginx_pid
"""
from __future__ import annotations

import argparse
import concurrent.futures
import contextlib
import http.client
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
import urllib.parse
from dataclasses import dataclass, field
from pathlib import Path

from benchmarks.classroom_load import server_pid
from sparse_attn.ui.server import free_port, serve, stop as stop_process

ROOT = Path(__file__).resolve().parents[1]
TEMPLATE = ROOT / "deploy" / "nginx.conf.template"
NGINX_HINT = "install it with `apt-get install nginx` (Debian, Ubuntu) or set NGINX to its path"


@dataclass
class Worker:
    index: int
    url: str
    pid: int
    log: Path

    @property
    def port(self) -> int:
        return urllib.parse.urlsplit(self.url).port

    @property
    def upstream(self) -> str:
        """How nginx names this worker in ``$upstream_addr`` (and the ``X-Upstream`` header)."""
        return f"127.0.0.1:{self.port}"


@dataclass
class Cluster:
    url: str
    prefix: Path
    nginx_pid: int
    workers: list[Worker] = field(default_factory=list)

    def worker_of(self, upstream: str) -> Worker | None:
        """The worker an ``X-Upstream`` value names (nginx lists every worker it tried, the last one answered)."""
        last = upstream.rsplit(",", 1)[-1].strip()
        return next((w for w in self.workers if w.upstream == last), None)

    def kill(self, index: int, timeout: float = 10.0) -> None:
        """Stop worker ``index`` at once (SIGKILL), as a crash would, and wait until its port is closed."""
        w = self.workers[index]
        os.kill(w.pid, signal.SIGKILL)
        deadline = time.monotonic() + timeout
        while _answers(w.url + "/_stcore/health"):
            if time.monotonic() > deadline:
                raise TimeoutError(f"worker {index} (pid {w.pid}) still answers {timeout} s after SIGKILL")
            time.sleep(0.1)


def find_nginx() -> str:
    """The nginx binary: $NGINX when set, else on PATH, else Debian's /usr/sbin/nginx (not on a plain user's PATH)."""
    if os.environ.get("NGINX"):
        if os.access(os.environ["NGINX"], os.X_OK):
            return os.environ["NGINX"]
        raise FileNotFoundError(f"NGINX={os.environ['NGINX']!r} is not an executable file")
    for candidate in (shutil.which("nginx"), "/usr/sbin/nginx"):
        if candidate and os.access(candidate, os.X_OK):
            return candidate
    raise FileNotFoundError(f"nginx was not found: {NGINX_HINT}")


def render(*, listen: str, worker_ports: list[int], prefix: str | os.PathLike) -> str:
    """``deploy/nginx.conf.template`` with its @NAMES@ filled in."""
    if not worker_ports:
        raise ValueError("worker_ports must name at least one port, got none")
    for port in worker_ports:
        if not isinstance(port, int) or not 0 < port < 65536:
            raise ValueError(f"worker_ports must be ports in 1..65535, got {port!r}")
    if len(set(worker_ports)) != len(worker_ports):
        raise ValueError(f"worker_ports must differ from each other, got {worker_ports}")
    prefix = str(Path(prefix).resolve())
    # A worker that refuses a connection is left alone for 10 s, so the students it had reconnect elsewhere.
    servers = "\n".join(f"        server 127.0.0.1:{p} max_fails=1 fail_timeout=10s;" for p in worker_ports)
    health = "\n".join(f"        location = /_worker/{i}/health {{ proxy_pass http://127.0.0.1:{p}/_stcore/health; }}"
                       for i, p in enumerate(worker_ports))
    text = TEMPLATE.read_text()
    for name, value in (("@SERVERS@", servers), ("@HEALTH@", health), ("@LISTEN@", listen), ("@PREFIX@", prefix)):
        text = text.replace(name, value)
    if "@" in "".join(line.split("#", 1)[0] for line in text.splitlines()):
        raise RuntimeError(f"{TEMPLATE.name} has a placeholder this code does not fill")
    return text


def _answers(url: str, source: str | None = None, timeout: float = 2.0) -> bool:
    try:
        return get(url, source=source, timeout=timeout)[0] == 200
    except OSError:
        return False


def get(url: str, *, source: str | None = None, timeout: float = 5.0) -> tuple[int, dict[str, str], bytes]:
    """GET ``url`` from loopback address ``source`` (127.0.0.x: how a student on another machine looks to nginx)."""
    parts = urllib.parse.urlsplit(url)
    conn = http.client.HTTPConnection(parts.hostname, parts.port or 80, timeout=timeout,
                                      source_address=(source, 0) if source else None)
    try:
        conn.request("GET", parts.path or "/")
        r = conn.getresponse()
        return r.status, {k.lower(): v for k, v in r.getheaders()}, r.read()
    finally:
        conn.close()


def upstream_for(url: str, source: str) -> str:
    """The worker nginx sends client address ``source`` to (its ``X-Upstream``), asked with a health check."""
    status, headers, _ = get(url.rstrip("/") + "/_stcore/health", source=source)
    if status != 200 or "x-upstream" not in headers:
        raise RuntimeError(f"{url} answered {status} without an X-Upstream header: is it the cluster's nginx?")
    return headers["x-upstream"]


def _wait_ready(nginx: subprocess.Popen, url: str, paths: list[str], prefix: Path, timeout: float) -> None:
    deadline = time.monotonic() + timeout
    while not all(_answers(url + p) for p in paths):
        if nginx.poll() is not None:
            errors = (prefix / "error.log").read_text()[-4000:] if (prefix / "error.log").exists() else ""
            raise RuntimeError(f"nginx exited with code {nginx.returncode}:\n{errors}")
        if time.monotonic() > deadline:
            raise TimeoutError(f"nginx did not answer on {url} within {timeout} s")
        time.sleep(0.1)


@contextlib.contextmanager
def cluster(workers: int = 2, *, port: int | None = None, host: str = "127.0.0.1",
            prefix: str | os.PathLike | None = None, env: dict[str, str] | None = None, timeout: float = 90.0):
    """Run ``workers`` app processes and one nginx in front of them until the block exits; yields a ``Cluster``."""
    if not isinstance(workers, int) or workers < 1:
        raise ValueError(f"workers must be an integer >= 1, got {workers!r}")
    nginx_bin = find_nginx()
    own_prefix = prefix is None
    prefix = Path(tempfile.mkdtemp(prefix="sparse-attn-nginx-") if own_prefix else prefix).resolve()
    # nginx started as root runs its workers as an unprivileged user, who must reach the temp directories.
    prefix.mkdir(parents=True, exist_ok=True)
    prefix.chmod(0o755)
    (prefix / "tmp").mkdir(exist_ok=True)
    port = port or free_port()
    url = f"http://{'127.0.0.1' if host in ('0.0.0.0', '::', '[::]') else host}:{port}"
    try:
        with contextlib.ExitStack() as stack:
            logs = [prefix / f"worker-{i}.log" for i in range(workers)]
            # Started side by side: each takes a few seconds to import torch and answer its health check.
            with concurrent.futures.ThreadPoolExecutor(workers) as pool:
                urls = list(pool.map(lambda log: stack.enter_context(serve(log_path=log, env=env, timeout=timeout)),
                                     logs))
            members = [Worker(i, u, server_pid(u), log) for i, (u, log) in enumerate(zip(urls, logs))]
            conf = prefix / "nginx.conf"
            conf.write_text(render(listen=f"{host}:{port}", worker_ports=[w.port for w in members], prefix=prefix))
            out = stack.enter_context(open(prefix / "nginx.out", "w"))
            nginx = subprocess.Popen([nginx_bin, "-p", str(prefix), "-c", str(conf), "-e", str(prefix / "error.log"),
                                      "-g", "daemon off;"], stdout=out, stderr=subprocess.STDOUT)
            stack.callback(stop_process, nginx)
            _wait_ready(nginx, url, ["/_stcore/health", *(f"/_worker/{i}/health" for i in range(workers))],
                        prefix, timeout)
            yield Cluster(url, prefix, nginx.pid, members)
    finally:
        if own_prefix:
            shutil.rmtree(prefix, ignore_errors=True)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--workers", type=int, default=2, help="app processes (about one core each when busy)")
    ap.add_argument("--port", type=int, default=8500, help="the port nginx listens on")
    ap.add_argument("--host", default="127.0.0.1", help="the address nginx listens on (0.0.0.0: every interface)")
    ap.add_argument("--prefix", help="nginx's directory (config, pid, logs, temp); default: a new temporary one")
    ap.add_argument("--print-config", action="store_true", help="print the nginx config and start nothing")
    ap.add_argument("--worker-ports", type=int, nargs="+", help="with --print-config: the workers' loopback ports "
                    "(default: 8601, 8602, ...)")
    args = ap.parse_args(argv)
    if args.workers < 1 or not 0 < args.port < 65536:
        ap.error("--workers must be >= 1 and --port in 1..65535")
    if args.print_config:
        ports = args.worker_ports or [8601 + i for i in range(args.workers)]
        try:
            print(render(listen=f"{args.host}:{args.port}", worker_ports=ports, prefix=args.prefix or "."))
        except ValueError as exc:
            ap.error(str(exc))
        return 0
    if args.worker_ports:
        ap.error("--worker-ports goes with --print-config; a running cluster picks free ports itself")
    try:
        find_nginx()
    except FileNotFoundError as exc:
        print(exc, file=sys.stderr)
        return 2
    stop = {"now": False}
    for sig in (signal.SIGINT, signal.SIGTERM):  # SIGINT too: a shell's background job starts with it ignored
        signal.signal(sig, lambda *_: stop.update(now=True))
    with cluster(args.workers, port=args.port, host=args.host, prefix=args.prefix) as c:
        print(f"{c.url}  (nginx pid {c.nginx_pid}, prefix {c.prefix})")
        for w in c.workers:
            print(f"  worker {w.index}: {w.url}, pid {w.pid}, log {w.log}")
        sys.stdout.flush()
        while not stop["now"]:
            time.sleep(0.5)
    return 0


if __name__ == "__main__":
    sys.exit(main())
