"""Every lesson's link in a real Chromium, in both languages: no exception box, the banner, the first picture drawn."""
import os
from pathlib import Path

import pytest
from playwright.sync_api import expect

from sparse_attn.i18n import LANGS, t
from sparse_attn.ui import lessons

from .helpers import trace_count, wait_idle

SHOTS = os.environ.get("SPARSE_ATTN_LESSON_SHOTS")  # a folder: save a screenshot of every lesson there
FIRST_PICTURE = {"maps": "maps_chart", "budget": "budget_chart", "explain": "explain_chart"}  # view -> chart key


@pytest.mark.parametrize("lang", LANGS)
@pytest.mark.parametrize("lesson_id", lessons.ids())
def test_every_lesson_opens_with_its_banner_and_its_first_picture(page, app_url, lesson_id, lang):
    page.goto(app_url + "/" + lessons.link(lesson_id, lang))
    wait_idle(page, timeout=150_000)
    view = lessons.settings_of(lesson_id)["view"]
    # The flat lesson sweeps every method over every budget on a cold server: allow it its time.
    assert trace_count(page, FIRST_PICTURE[view], timeout=150_000) > 0
    banner = page.locator(".st-key-lesson_banner")
    expect(banner).to_be_visible()
    expect(banner.get_by_text(t("lessons.banner_title", lang, title=lessons.text("title", lesson_id, lang)))).to_be_visible()
    expect(banner.get_by_text(lessons.text("question", lesson_id, lang))).to_be_visible()
    tab = page.get_by_role("tab", name=t(f"tab.{view}", lang))
    expect(tab).to_have_attribute("aria-selected", "true")
    wait_idle(page)
    assert page.locator("[data-testid='stException']").count() == 0
    assert f"lesson={lesson_id}" in page.url
    if SHOTS:
        Path(SHOTS).mkdir(parents=True, exist_ok=True)
        page.screenshot(path=str(Path(SHOTS) / f"{lesson_id}_{lang}.png"), full_page=False)


def test_picking_a_lesson_in_the_sidebar_opens_it(page, app_url):
    page.goto(app_url + "/?lang=zh")
    wait_idle(page)
    sidebar = page.locator("[data-testid='stSidebar']")
    sidebar.get_by_role("combobox", name=t("lessons.picker", "zh")).click()
    page.get_by_role("option", name=lessons.text("title", "chunked", "zh")).click()
    expect(page.locator(".st-key-lesson_banner")).to_be_visible(timeout=60_000)
    wait_idle(page)
    assert trace_count(page, "explain_chart") > 0
    expect(page.get_by_role("tab", name=t("tab.explain", "zh"))).to_have_attribute("aria-selected", "true")
    assert "lesson=chunked" in page.url and "view=explain" in page.url
    page.locator(".st-key-lesson_close button").click()
    expect(page.locator(".st-key-lesson_banner")).to_have_count(0, timeout=30_000)
    wait_idle(page)
    assert "lesson=" not in page.url
    assert page.locator("[data-testid='stException']").count() == 0
