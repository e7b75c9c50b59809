"""What the browser tests read from the page: the drivers' helpers (``benchmarks.browser``) and two of their own."""
from __future__ import annotations

from benchmarks.browser import IDLE, MAPS, TRACE_SIGNATURE, signature, wait_for_new_signature, wait_for_plot, wait_idle

__all__ = ["IDLE", "MAPS", "TRACE_SIGNATURE", "wait_idle", "signature", "wait_for_new_signature", "wait_for_plot",
           "trace_count", "set_slider"]


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
