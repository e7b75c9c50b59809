"""Start the app with ``streamlit run`` on a free loopback port, for browser tests and benchmarks.

    with serve() as url:
        ...  # drive http://127.0.0.1:<port> with a browser

The server's output goes to ``log_path`` (or a temporary file) so a caller
can check it for tracebacks afterwards.
"""
from __future__ import annotations

import contextlib
import os
import socket
import subprocess
import sys
import tempfile
import time
import urllib.request
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
CHROMIUM = os.environ.get("CHROMIUM", "/usr/bin/chromium")
CHROMIUM_ARGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
                 "--disable-background-networking", "--disable-component-update", "--disable-sync"]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@contextlib.contextmanager
def serve(*, port: int | None = None, log_path: str | os.PathLike | None = None, timeout: float = 60.0,
          env: dict[str, str] | None = None):
    """Run the app until the block exits; yields its base URL."""
    port = port or free_port()
    log = open(log_path, "w+") if log_path else tempfile.TemporaryFile("w+")
    cmd = [sys.executable, "-m", "streamlit", "run", str(ROOT / "app.py"), "--server.headless", "true",
           "--server.port", str(port), "--server.address", "127.0.0.1", "--browser.gatherUsageStats", "false"]
    proc = subprocess.Popen(cmd, cwd=ROOT, stdout=log, stderr=subprocess.STDOUT,
                            env={**os.environ, "HF_HUB_OFFLINE": "1", **(env or {})})
    url = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + timeout
        while True:
            if proc.poll() is not None:
                log.seek(0)
                raise RuntimeError(f"the app exited with code {proc.returncode}:\n{log.read()[-4000:]}")
            try:
                with urllib.request.urlopen(url + "/_stcore/health", timeout=2) as r:
                    if r.read().strip() == b"ok":
                        break
            except OSError:
                pass
            if time.monotonic() > deadline:
                raise TimeoutError(f"the app did not answer on {url} within {timeout} s")
            time.sleep(0.2)
        yield url
    finally:
        stop(proc)
        log.close()


def stop(proc: subprocess.Popen, grace_s: float = 10) -> None:
    """Ask a process to end, and end it if it has not within ``grace_s``."""
    proc.terminate()
    try:
        proc.wait(grace_s)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait()
