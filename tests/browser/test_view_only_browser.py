"""In Chromium: pooling, log scale and language redraw the maps from the cached computation (counted, not timed)."""
import re

import pytest
from playwright.sync_api import expect

from sparse_attn.i18n import t
from sparse_attn.ui.compute import CALL_LOG_ENV
from sparse_attn.ui.server import serve

from .helpers import signature, wait_for_new_signature, wait_for_plot, wait_idle

CHARTS = ".st-key-maps_chart .js-plotly-plot, .st-key-grid_chart .js-plotly-plot"


@pytest.fixture(scope="module")
def counted_app(tmp_path_factory):
    log = tmp_path_factory.mktemp("calls") / "calls.log"
    with serve(env={CALL_LOG_ENV: str(log)}) as url:
        yield url, log


def _calls(log) -> int:
    return log.read_text().count("view") if log.exists() else 0


def test_view_only_changes_do_not_recompute(page, counted_app):
    url, log = counted_app
    page.goto(url + "/?L=1024")
    wait_idle(page)
    sig = wait_for_plot(page)
    first = _calls(log)
    assert first == 1
    # Each chart is one div for as long as its key lives: a new figure updates it in place (Plotly.react)
    # instead of mounting a new chart. A mark set on the divs now must still be there at the end.
    page.evaluate(f"() => document.querySelectorAll('{CHARTS}').forEach(el => el.dataset.kept = '1')")
    steps = [
        lambda: page.get_by_text(t("viz.pool_mean", "en"), exact=True).click(),
        lambda: page.get_by_text(t("setting.log", "en"), exact=True).click(),
    ]
    for step in steps:
        step()
        sig = wait_for_new_signature(page, sig)  # the picture changed...
        wait_idle(page)
        assert _calls(log) == first  # ...from the cache
    kept = page.evaluate(f"() => [...document.querySelectorAll('{CHARTS}')].map(el => el.dataset.kept === '1')")
    assert kept == [True, True], kept  # pooling and log redrew the same two divs
    # (The language switch relabels the tabs, which Streamlit treats as new tabs: their charts mount anew.)
    page.locator("[data-testid='stSidebar']").get_by_text("中文").click()
    expect(page.get_by_role("heading", name=t("app.title", "zh"))).to_be_visible(timeout=30_000)
    wait_idle(page)
    assert _calls(log) == first
    slider = page.get_by_role("slider", name=t("setting.top_k", "zh"))
    before = signature(page)
    slider.focus()
    page.keyboard.press("ArrowLeft")
    page.wait_for_url(re.compile(r"[?&]k=31\b"), timeout=60_000)
    wait_for_new_signature(page, before)
    wait_idle(page)
    assert _calls(log) == first + 1  # k changes the attention: computed once more
    assert page.locator("[data-testid='stException']").count() == 0


@pytest.mark.parametrize("lang", ["en", "zh"])
def test_a_budget_that_keeps_every_key_says_so(page, counted_app, lang):
    url, _ = counted_app
    page.goto(url + f"/?L=32&k=32&lang={lang}")
    wait_idle(page)
    wait_for_plot(page)
    expect(page.get_by_text(t("note.all_keys_kept", lang, keys=32))).to_be_visible(timeout=30_000)
    assert page.locator("[data-testid='stException']").count() == 0
