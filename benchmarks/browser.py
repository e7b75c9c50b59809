"""What the browser drivers (the latency benchmark, the classroom load test, the browser tests) read from the page.

Charts are found by their Streamlit key (the ``st-key-<key>`` class of their
container), never by position: charts can mount in any order.
"""
from __future__ import annotations

__all__ = ["IDLE", "MAPS", "TRACE_SIGNATURE", "wait_idle", "signature", "wait_for_new_signature", "wait_for_plot"]

IDLE = "[data-testid='stApp'][data-test-script-state='notRunning']"
MAPS = "maps_chart"

# A fingerprint of one heatmap trace: (rows, cols, non-zero cells, sum), read from plotly's own data.
TRACE_SIGNATURE = """([key, trace]) => {
  const el = document.querySelector('.st-key-' + key + ' .js-plotly-plot');
  if (!el || !el._fullData || !el._fullData[trace]) return null;
  const z = el._fullData[trace].z;
  if (!z || !z.length) return null;
  let nz = 0, sum = 0;
  for (const row of z) for (const v of row) { if (v > 0) nz += 1; sum += v; }
  return [z.length, z[0].length, nz, Math.round(sum * 1e6) / 1e6];
}"""


def wait_idle(page, timeout: float = 60_000) -> None:
    page.wait_for_selector(IDLE, timeout=timeout)


def signature(page, key: str = MAPS, trace: int = 1):
    return page.evaluate(TRACE_SIGNATURE, [key, trace])


def wait_for_new_signature(page, old, key: str = MAPS, trace: int = 1, timeout: float = 60_000):
    """Wait until the trace's data on screen differs from ``old``; return the new signature."""
    page.wait_for_function(
        f"([old, key, trace]) => {{ const s = ({TRACE_SIGNATURE})([key, trace]); "
        "return s !== null && JSON.stringify(s) !== JSON.stringify(old); }",
        arg=[old, key, trace], timeout=timeout, polling="raf",
    )
    return signature(page, key, trace)


def wait_for_plot(page, key: str = MAPS, trace: int = 1, timeout: float = 60_000):
    page.wait_for_function(f"() => ({TRACE_SIGNATURE})(['{key}', {trace}]) !== null", timeout=timeout)
    return signature(page, key, trace)
