"""What the browser tests and the latency benchmark read from the page."""
from __future__ import annotations

IDLE = "[data-testid='stApp'][data-test-script-state='notRunning']"

# A fingerprint of one heatmap trace: (rows, cols, non-zero cells, sum), read from plotly's own data.
TRACE_SIGNATURE = """([plot, trace]) => {
  const el = document.querySelectorAll('.js-plotly-plot')[plot];
  if (!el || !el._fullData || !el._fullData[trace]) return null;
  const z = el._fullData[trace].z;
  if (!z || !z.length) return null;
  let nz = 0, sum = 0;
  for (const row of z) for (const v of row) { if (v > 0) nz += 1; sum += v; }
  return [z.length, z[0].length, nz, Math.round(sum * 1e6) / 1e6];
}"""


def wait_idle(page, timeout: float = 60_000) -> None:
    page.wait_for_selector(IDLE, timeout=timeout)


def signature(page, plot: int = 0, trace: int = 1):
    return page.evaluate(TRACE_SIGNATURE, [plot, trace])


def wait_for_new_signature(page, old, plot: int = 0, trace: int = 1, timeout: float = 60_000):
    """Wait until the trace's data on screen differs from ``old``; return the new signature."""
    page.wait_for_function(
        f"([old, plot, trace]) => {{ const s = ({TRACE_SIGNATURE})([plot, trace]); "
        "return s !== null && JSON.stringify(s) !== JSON.stringify(old); }",
        arg=[old, plot, trace], timeout=timeout, polling="raf",
    )
    return signature(page, plot, trace)


def wait_for_plot(page, timeout: float = 60_000):
    page.wait_for_function(f"() => ({TRACE_SIGNATURE})([0, 1]) !== null", timeout=timeout)
    return signature(page)
