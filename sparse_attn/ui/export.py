"""Figures as PNG (kaleido through the system Chromium), made only when the user asks.

One Chromium serves every export of the server process: started on the first
export and kept (``kaleido.start_sync_server``), it brings an export from about
2 s (a browser started per image) to a fraction of a second. It is started
with plotly.js from the installed plotly package and without MathJax, so
rendering fetches nothing, and with its proxy pointed at a closed loopback
port, so nothing it might request leaves the machine.
"""
from __future__ import annotations

import threading
import warnings
from pathlib import Path

_lock = threading.Lock()  # one Chromium for exports: kaleido's server is not re-entrant
_started = False
NO_PROXY = "127.0.0.1:9"  # the discard port: closed, so any request the browser makes fails at once


def _plotly_js() -> str:
    import plotly

    return str(Path(plotly.__file__).parent / "package_data" / "plotly.min.js")


def _start() -> None:
    global _started
    import kaleido  # imported here so a missing one fails on click, not at start

    kaleido.start_sync_server(plotlyjs=_plotly_js(), mathjax=False, proxy_server=NO_PROXY, silence_warnings=True)
    _started = True


def png(fig, *, scale: float = 2.0) -> bytes:
    with _lock:
        if not _started:
            _start()
        with warnings.catch_warnings():
            # plotly passes its per-call browser options, which a running server rightly ignores
            warnings.filterwarnings("ignore", message="The kopts argument is ignored")
            return fig.to_image(format="png", scale=scale)
