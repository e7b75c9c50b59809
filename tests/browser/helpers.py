"""What the browser tests and the latency benchmark read from the page.

Charts are found by their Streamlit key (the ``st-key-<key>`` class of their
container), never by position: charts can mount in any order.
"""
from __future__ import annotations

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


def trace_count(page, key: str, timeout: float = 60_000) -> int:
    """Number of traces in the chart with this key, once it is on screen."""
    js = f"() => {{ const el = document.querySelector('.st-key-{key} .js-plotly-plot'); return el && el._fullData ? el._fullData.length : 0; }}"
    page.wait_for_function(f"() => ({js})() > 0", timeout=timeout)
    return page.evaluate(js)


def set_slider(page, slider, target: int, attempts: int = 60) -> None:
    """Step a slider with the arrow keys until it shows ``target``.

    A key pressed while the app reruns can be lost when Streamlit redraws the
    widget, so each press is checked and the loop corrects itself.
    """
    for _ in range(attempts):
        wait_idle(page)
        value = int(slider.input_value())
        if value == target:
            return
        slider.press("ArrowLeft" if value > target else "ArrowRight")
        page.wait_for_function(
            "([el, v]) => el.getAttribute('aria-valuenow') !== String(v)",
            arg=[slider.element_handle(), value], timeout=10_000,
        )
    raise AssertionError(f"the slider did not reach {target}; it shows {slider.input_value()}")
