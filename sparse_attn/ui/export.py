"""Figures as PNG (kaleido through the system Chromium), made only when the user asks."""
from __future__ import annotations

import threading

_lock = threading.Lock()  # one Chromium for exports: kaleido's server is not re-entrant


def png(fig, *, scale: float = 2.0) -> bytes:
    import kaleido  # noqa: F401  (plotly finds it; imported here so a missing one fails on click, not at start)

    with _lock:
        return fig.to_image(format="png", scale=scale)
