"""In Chromium: the server restarts under an open page; the page reconnects, and the student's next change sticks.

The restarted server holds no session: the first run of the new one is that change, and the URL it brings
still says what the page showed before. The widget's value must win (issue: a restart lost the change).
"""
import os
import re

from playwright.sync_api import expect

from sparse_attn.i18n import t
from sparse_attn.ui.server import free_port, serve

from .helpers import wait_idle

SHOTS = os.environ.get("RESTART_SHOTS")  # a folder: screenshots of the reconnected page, to look at
STATUS = "[data-testid='stConnectionStatus']"  # Streamlit's "connecting" badge, shown while the socket is down


def _k(page, lang):
    return page.get_by_role("slider", name=t("setting.top_k", lang))


# Set when the app reports a run, so a test can wait for the run its action started to end (not an earlier one).
WATCH_RUNS = """() => { const app = document.querySelector("[data-testid='stApp']"); window.__ran = false;
  new MutationObserver(() => { if (app.getAttribute('data-test-script-state') === 'running') window.__ran = true; })
    .observe(app, {attributes: true}); }"""
RAN = """() => window.__ran && document.querySelector("[data-testid='stApp']")
  .getAttribute('data-test-script-state') === 'notRunning'"""


def _one_run(page, action) -> None:
    """Do ``action`` and wait until the run it starts has ended."""
    wait_idle(page)
    page.evaluate(WATCH_RUNS)
    action()
    page.wait_for_function(RAN, timeout=90_000)


def test_after_a_server_restart_the_next_change_sticks(page, tmp_path):
    port = free_port()
    with serve(port=port, log_path=tmp_path / "first.log") as url:
        page.goto(url + "/?k=8&L=64&lang=zh")
        wait_idle(page, timeout=90_000)
        expect(_k(page, "zh")).to_have_value("8", timeout=90_000)
    expect(page.locator(STATUS)).to_be_visible(timeout=30_000)  # the page knows its server is gone

    with serve(port=port, log_path=tmp_path / "second.log") as url:
        expect(page.locator(STATUS)).to_have_count(0, timeout=60_000)  # reconnected
        if SHOTS:
            page.screenshot(path=os.path.join(SHOTS, "reconnected_zh.png"))
        slider = _k(page, "zh")
        # One key press, no retry: this run is the new session's first, and a reverted value must show as such.
        _one_run(page, lambda: (slider.focus(), page.keyboard.press("ArrowRight")))
        expect(slider).to_have_value("9", timeout=5_000)
        assert re.search(r"[?&]k=9(&|$)", page.url), page.url
        assert "L=64" in page.url and "lang=zh" in page.url  # the rest of the page's settings came through too
        # One more run (the language): k is still the student's.
        _one_run(page, lambda: page.locator("[data-testid='stSidebar']").get_by_text("English", exact=True).click())
        expect(page.get_by_role("heading", name=t("app.title", "en"))).to_be_visible(timeout=5_000)
        expect(_k(page, "en")).to_have_value("9", timeout=5_000)
        assert re.search(r"[?&]lang=en(&|$)", page.url) and re.search(r"[?&]k=9(&|$)", page.url), page.url
        if SHOTS:
            page.screenshot(path=os.path.join(SHOTS, "after_change_en.png"))
        assert page.locator("[data-testid='stException']").count() == 0
    for log in ("first.log", "second.log"):
        text = (tmp_path / log).read_text()
        assert "Traceback" not in text, text[-4000:]
