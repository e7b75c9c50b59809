"""The served app in a real Chromium: load, heatmaps with data, the k slider, 中文, a shared URL (timing: test_charts_browser)."""
import os
import re
from pathlib import Path

from playwright.sync_api import expect

from sparse_attn.i18n import t

from .helpers import MAPS, set_slider, signature, wait_for_new_signature, wait_for_plot, wait_idle

SHOTS = os.environ.get("SPARSE_ATTN_SCREENSHOTS")  # a folder: save the screenshots there (docs/screenshots)
NSA_LESSON_ZH = "lang=zh&lesson=nsa&pattern=sink_local&method=nsa&block=16&nblocks=4&window=32&initial=1&local=2&log=true"


def open_app(page, url, query=""):
    page.goto(url + "/" + query)
    wait_idle(page)
    return wait_for_plot(page)


def k_slider(page, lang="en"):
    return page.get_by_role("slider", name=t("setting.top_k", lang))


def test_page_loads_with_heatmaps_that_hold_data(page, app_url):
    sig = open_app(page, app_url)
    expect(page.get_by_role("heading", name=t("app.title", "en"))).to_be_visible()
    assert sig[0] == sig[1] == 256 and sig[2] > 0  # the sparse map: 256 x 256 with selected keys
    dense = signature(page, MAPS, 0)
    # Every dense row sums to 1, to the float16 the maps are sent in (weights below 6e-8 round to 0: the
    # band's far keys, which the colour scale shows as 0 anyway).
    assert dense[2] > 0.9 * 256 * 256 and abs(dense[3] - 256) < 256 * 1e-3
    assert page.locator("[data-testid='stException']").count() == 0


def test_moving_k_updates_the_sparse_heatmap(page, app_url):
    before = open_app(page, app_url)
    slider = k_slider(page)
    assert slider.input_value() == "32"
    set_slider(page, slider, 24)
    # The slider can show 24 before the rerun it sends has started (presses are coalesced): wait for
    # the run that writes k=24 into the URL, then for it to finish, so the map read is k = 24's.
    page.wait_for_url(re.compile(r"[?&]k=24\b"), timeout=60_000)
    wait_for_new_signature(page, before)
    wait_idle(page)
    after = signature(page)
    assert slider.input_value() == "24"
    assert after[2] < before[2]  # fewer keys per query are selected
    assert "k=24" in page.url


def test_switching_to_chinese_shows_chinese_labels(page, app_url):
    open_app(page, app_url)
    page.locator("[data-testid='stSidebar']").get_by_text("中文").click()
    expect(page.get_by_role("heading", name=t("app.title", "zh"))).to_be_visible(timeout=30_000)
    wait_idle(page)
    for key in ("tab.maps", "tab.speed", "setting.seq_len", "metric.mass_kept"):
        expect(page.get_by_text(t(key, "zh"), exact=True).first).to_be_visible()
    expect(k_slider(page, "zh")).to_be_visible()
    assert "lang=zh" in page.url
    if SHOTS:  # the README's Chinese picture: the NSA lesson
        open_app(page, app_url, "?" + NSA_LESSON_ZH)
        page.screenshot(path=str(Path(SHOTS) / "app_zh.png"))


def test_a_shared_url_restores_its_settings(page, app_url):
    sig = open_app(page, app_url, "?lang=zh&L=128&k=8&method=hybrid&causal=true")
    expect(page.get_by_role("heading", name=t("app.title", "zh"))).to_be_visible()
    assert k_slider(page, "zh").input_value() == "8"
    assert sig[0] == sig[1] == 128
    expect(page.get_by_text(t("method.hybrid", "zh")).first).to_be_visible()
    assert re.search(r"[?&]k=8\b", page.url) and "method=hybrid" in page.url


def test_english_screenshot_and_explainer(page, app_url):
    open_app(page, app_url, "?lesson=sinks&pattern=sink_local&method=topk&k=16&log=true&view=maps")
    if SHOTS:  # the README's English picture
        page.screenshot(path=str(Path(SHOTS) / "app_en.png"))
    page.get_by_role("tab", name=t("tab.explain", "en")).click()
    wait_idle(page)
    expect(page.get_by_text(t("explain.match", "en"))).to_be_visible(timeout=30_000)
    if SHOTS:
        page.screenshot(path=str(Path(SHOTS) / "explain_en.png"), full_page=True)
