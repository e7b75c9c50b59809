"""The charts in a real Chromium: positive log axes, timing that says finished or stopped, hovers with names."""
import os
import re
from pathlib import Path

import pytest
from playwright.sync_api import expect

from sparse_attn.i18n import LANGS, t

from .helpers import trace_count, wait_for_plot, wait_idle

SHOTS = Path(os.environ.get("SPARSE_ATTN_CHART_SHOTS", "/tmp/shots/h3"))
EXCEPTIONS = "[data-testid='stException']"

# Every y a chart's traces hold (error bar ends included), read from plotly's own data on screen.
Y_VALUES = """(key) => {
  const el = document.querySelector('.st-key-' + key + ' .js-plotly-plot');
  if (!el || !el._fullData) return null;
  const out = [];
  for (const tr of el._fullData) {
    const ys = Array.from(tr.y || []);
    const e = tr.error_y || {};
    ys.forEach((y, i) => {
      if (y === null || y === undefined || Number.isNaN(y)) return;
      out.push(y);
      if (e.visible && e.array) {
        const minus = (e.symmetric === false && e.arrayminus) ? e.arrayminus[i] : e.array[i];
        out.push(y - (minus || 0), y + (e.array[i] || 0));
      }
    });
  }
  return {ys: out, type: el._fullLayout.yaxis.type, range: el._fullLayout.yaxis.range};
}"""


def shot(page, name: str) -> None:
    """The whole main column: Streamlit scrolls inside it, so the window grows to its height for the picture."""
    SHOTS.mkdir(parents=True, exist_ok=True)
    size = page.viewport_size
    height = page.evaluate("() => document.querySelector('[data-testid=stMain]').scrollHeight")
    page.set_viewport_size({"width": size["width"], "height": min(max(height + 40, size["height"]), 8000)})
    page.wait_for_timeout(500)  # plotly redraws at the new size
    page.screenshot(path=str(SHOTS / f"{name}.png"), full_page=True)
    page.set_viewport_size(size)


def assert_positive_log_axis(page, key: str) -> None:
    data = page.evaluate(Y_VALUES, key)
    assert data and data["type"] == "log" and data["ys"], data
    low, high = 10 ** data["range"][0], 10 ** data["range"][1]
    assert min(data["ys"]) > 0, min(data["ys"])  # no zero or negative value on the log axis
    assert low * 0.999 <= min(data["ys"]) and max(data["ys"]) <= high * 1.001, (min(data["ys"]), max(data["ys"]), low, high)


@pytest.mark.parametrize("lang", LANGS)
def test_the_budget_chart_has_no_zero_on_its_log_axis(page, app_url, lang):
    page.goto(app_url + f"/?view=budget&L=128&method=hybrid&lang={lang}")
    wait_idle(page, 120_000)
    assert trace_count(page, "budget_chart", timeout=120_000) >= 2
    assert_positive_log_axis(page, "budget_chart")
    title = page.evaluate("() => document.querySelector('.st-key-budget_chart .js-plotly-plot')._fullLayout.title.text")
    assert re.sub(r"<[^>]+>", "", title).startswith(t("tab.budget", lang))  # Streamlit wraps titles in <b>
    assert page.locator(EXCEPTIONS).count() == 0
    shot(page, f"budget_{lang}")


@pytest.mark.parametrize("lang", LANGS)
def test_a_short_timing_run_finishes_with_its_spread_on_the_chart(page, app_url, lang):
    page.goto(app_url + f"/?view=speed&L=64&H=2&D=16&lang={lang}")
    wait_idle(page)
    budget = page.get_by_role("spinbutton", name=t("speed.time_budget", lang))
    budget.fill("6")  # short: finished or stopped, the page must say which (and the suite stays quick)
    budget.press("Enter")
    wait_idle(page)
    page.get_by_role("button", name=t("speed.run", lang)).click()
    done, stopped = t("speed.done", lang, n=9), t("speed.cancelled", lang, budget=6)  # 3 lengths x 3 methods
    expect(page.get_by_text(re.compile(f"{re.escape(done)}|{re.escape(stopped)}")).first).to_be_visible(timeout=150_000)
    wait_idle(page, 150_000)
    # Finished or stopped, never both.
    assert (page.get_by_text(done, exact=True).count() > 0) != (page.get_by_text(stopped, exact=True).count() > 0)
    assert trace_count(page, "speed_chart") == 3
    assert_positive_log_axis(page, "speed_chart")
    expect(page.get_by_text(t("charts.speed_why", lang))).to_be_visible()
    table = page.locator("[data-testid='stDataFrame']").first.inner_text()
    assert t("speed.col_peak", lang) not in table  # a CPU: no column of "None"
    assert page.locator(EXCEPTIONS).count() == 0
    shot(page, f"speed_{lang}")


@pytest.mark.parametrize("lang", LANGS)
def test_the_mask_hover_names_the_cell_and_says_selected(page, app_url, lang):
    page.goto(app_url + f"/?L=16&k=4&H=1&lang={lang}")
    wait_idle(page)
    wait_for_plot(page)
    plot = page.locator(".st-key-maps_chart .js-plotly-plot")
    box = plot.bounding_box()
    # The centre of the mask panel (bottom left: xaxis3 / yaxis3), from plotly's own layout.
    x, y = page.evaluate("""() => {
      const L = document.querySelector('.st-key-maps_chart .js-plotly-plot')._fullLayout;
      return [L.xaxis3._offset + L.xaxis3._length * 0.47, L.yaxis3._offset + L.yaxis3._length * 0.53];
    }""")
    page.mouse.move(box["x"] + x, box["y"] + y)
    hover = page.locator(".st-key-maps_chart .hoverlayer .hovertext")
    expect(hover.first).to_be_visible(timeout=10_000)
    text = hover.first.text_content()  # SVG text: the hover line, then the panel's name
    assert re.search(t("charts.hover_query", lang, i=r"\d+") + " → " + t("charts.hover_key", lang, j=r"\d+"), text), text
    assert (t("charts.mask_selected", lang) in text) or (t("charts.mask_not_selected", lang) in text), text
    assert not re.search(r"\d\.\d", text), text  # the mask says a word, not 1.00 / 0.00
    SHOTS.mkdir(parents=True, exist_ok=True)
    page.screenshot(path=str(SHOTS / f"maps_hover_{lang}.png"))  # the window as it is, hover label included
    shot(page, f"maps_{lang}")


@pytest.mark.parametrize("lang", LANGS)
def test_the_explainer_controls_are_its_own(page, app_url, lang):
    page.goto(app_url + f"/?view=explain&lang={lang}")
    wait_idle(page)
    expect(page.get_by_role("slider", name=t("explain.k", lang))).to_be_visible(timeout=30_000)
    expect(page.get_by_text(t("explain.match", lang))).to_be_visible()
    assert page.locator(EXCEPTIONS).count() == 0
    shot(page, f"explain_{lang}")
