"""Hostile input from the browser: each gets a readable message, the server stays up, a bystander is unaffected.

A bystander (a second browser context, another student) moves its own k slider
after every attack and must get the heatmap its own settings give.
"""
import pickle
import re
import urllib.request

import numpy as np
import pytest
from playwright.sync_api import expect

from benchmarks.classroom_load import RESULT_SIGNATURE, expected_signature, same_signature
from sparse_attn.i18n import catalog, t
from sparse_attn.methods import choices
from sparse_attn.ui import inputs
from tests.browser.helpers import MAPS, signature, trace_count, wait_for_new_signature, wait_for_plot, wait_idle

ERRORS = "[data-testid='stAlertContentError']"
EXCEPTIONS = "[data-testid='stException']"
MIB = 2**20


class Bystander:
    def __init__(self, page, url):
        self.page, self.settings = page, {"L": 128, "H": 2, "pattern": "retrieval", "seed": 77, "k": 12}
        page.goto(url + "/?" + "&".join(f"{k}={v}" for k, v in self.settings.items()))
        wait_idle(page)
        self.sig = wait_for_plot(page)

    def still_fine(self):
        """One more k step; the new heatmap must be this student's own."""
        page = self.page
        slider = page.get_by_role("slider", name=t("setting.top_k", "en"))
        slider.focus()
        step = 1 if self.settings["k"] < 20 else -1
        page.keyboard.press("ArrowRight" if step > 0 else "ArrowLeft")
        wait_for_new_signature(page, self.sig)
        wait_idle(page)
        # The k this student asked for is what the slider shows (a key press can
        # be lost in a rerun); its L, pattern and seed tell its picture from others'.
        self.settings["k"] = int(slider.input_value())
        self.sig = signature(page)
        seen = page.evaluate(RESULT_SIGNATURE, [MAPS, 1])
        assert same_signature(seen, expected_signature(self.settings)), (seen, self.settings)
        assert page.locator(EXCEPTIONS).count() == 0 and page.locator(ERRORS).count() == 0


@pytest.fixture
def bystander(browser, app_url):
    ctx = browser.new_context(viewport={"width": 1400, "height": 1000})
    yield Bystander(ctx.new_page(), app_url)
    ctx.close()


def server_up(url):
    with urllib.request.urlopen(url + "/_stcore/health", timeout=10) as r:
        assert r.read().strip() == b"ok"


def expect_error(page, text, timeout=60_000):
    """A readable error box holding ``text`` (a catalog message or its stable start), and no traceback box."""
    box = page.locator(ERRORS).filter(has_text=text).first
    expect(box).to_be_visible(timeout=timeout)
    assert page.locator(EXCEPTIONS).count() == 0
    return box.inner_text()


def lead(key, lang="en"):
    """A message's text before its first placeholder: what every instance of it starts with."""
    return catalog(lang)[key].split("{")[0].strip()


@pytest.mark.parametrize("method", choices("method"))
def test_the_largest_value_of_every_widget_at_once_is_refused_with_a_message(page, app_url, bystander, method):
    most = dict(L=8192, H=16, D=128, k=512, samples=1024, block=128, nblocks=64, window=1024, chunk=2048,
                dtype="float64", seed=2**31 - 1, causal="true", method=method)
    page.goto(app_url + "/?" + "&".join(f"{k}={v}" for k, v in most.items()))
    wait_idle(page)
    text = expect_error(page, lead("err.budget", "en"))
    assert "MiB" in text
    # The sidebar still works: lowering the length named by the message gives a picture again.
    page.goto(app_url + "/?" + "&".join(f"{k}={v}" for k, v in (most | {"L": 256, "H": 2}).items()))
    wait_idle(page)
    wait_for_plot(page)
    server_up(app_url)
    bystander.still_fine()


def test_the_explainer_sliders_at_their_ends(page, app_url, bystander):
    page.goto(app_url + "/?view=explain")
    wait_idle(page)
    for name in ("explain.length", "explain.chunk", "explain.k"):
        # .first: when a slider's bounds move (a shorter row), its old element can linger for a frame beside the new one
        page.locator(f"[data-testid='stMain'] input[type=range][aria-label='{t(name, 'en')}']").first.focus()
        page.keyboard.press("End")
        wait_idle(page)
    expect(page.get_by_text(t("explain.match", "en"))).to_be_visible(timeout=30_000)
    assert page.locator(EXCEPTIONS).count() == 0
    bystander.still_fine()


def test_a_million_character_paste_gets_a_message(page, app_url, bystander):
    page.goto(app_url + "/?source=model")
    wait_idle(page, 120_000)
    wait_for_plot(page, timeout=120_000)
    box = page.get_by_role("textbox", name=t("setting.text", "en"))
    box.click()
    page.keyboard.press("Control+A")
    page.keyboard.insert_text("attention " * 100_000)  # a paste: one input event of 1,000,000 characters
    page.keyboard.press("Control+Enter")
    wait_idle(page, 120_000)
    expect_error(page, t("err.text_too_long", "en", count=1_000_000, limit=inputs.MAX_TEXT_CHARS))
    # Shortening the text brings the picture back.
    box.fill("attention " * 50)
    page.keyboard.press("Control+Enter")
    wait_idle(page, 120_000)
    sig = wait_for_plot(page, timeout=120_000)
    assert sig[0] == sig[1] > 50 and page.locator(ERRORS).count() == 0
    server_up(app_url)
    bystander.still_fine()


def _npy(path, array, allow_pickle=False):
    np.save(path, array, allow_pickle=allow_pickle)
    return path


def upload(page, path):
    page.locator("[data-testid='stFileUploaderDropzoneInput']").set_input_files(str(path))


def test_hostile_uploads_each_get_a_message(page, app_url, bystander, tmp_path):
    page.goto(app_url + "/?source=file")
    wait_idle(page)
    expect(page.get_by_text(lead("err.no_upload", "en")[:30])).to_be_visible()
    rng = np.random.default_rng(0)
    good = rng.standard_normal((1, 2, 16, 8)).astype(np.float32)
    cases = [
        # An object array: the bytes hold a pickle, which the app refuses to open.
        (_npy(tmp_path / "pickled.npy", np.array([{"q": 1}, None], dtype=object), allow_pickle=True), "pickle"),
        (_npy(tmp_path / "nans.npy", np.where(rng.random(good.shape) < 0.1, np.nan, good).astype(np.float32)),
         "NaN"),
        (_npy(tmp_path / "shape.npy", good[0]), "shape"),
    ]
    for path, text in cases:
        upload(page, path)
        wait_idle(page)
        expect_error(page, text)
        server_up(app_url)
    # A pickle under its own name never reaches the server: the uploader accepts only the array formats.
    evil = tmp_path / "evil.pkl"
    evil.write_bytes(pickle.dumps({"q": 1}))
    upload(page, evil)
    expect(page.get_by_text(re.compile(r"not (allowed|permitted|supported)", re.I)).first).to_be_visible(timeout=30_000)
    # Just over the server's upload limit (.streamlit/config.toml maxUploadSize = 64 MiB), as a sparse file
    # that takes no disk: the uploader refuses it by size before sending a byte, and the server would too.
    big = tmp_path / "big.npy"
    with open(big, "wb") as f:
        f.truncate(inputs.MAX_UPLOAD_BYTES + 1)
    upload(page, big)
    expect(page.get_by_text(re.compile(r"(64(\.0)?\s?MB|too large|smaller)", re.I)).first).to_be_visible(timeout=30_000)
    assert page.locator(EXCEPTIONS).count() == 0
    server_up(app_url)
    bystander.still_fine()


def test_rapid_clicking_during_a_timing_run(page, app_url, bystander):
    page.goto(app_url + "/?view=speed&L=64&H=2&D=16")
    wait_idle(page)
    run = page.get_by_role("button", name=t("speed.run", "en"))
    run.click()
    page.wait_for_timeout(300)
    for _ in range(12):  # an impatient student: every click restarts or queues behind the lock, never a second lock
        run.click(timeout=10_000)
        page.wait_for_timeout(100)
    bystander.still_fine()  # another student's maps keep coming while the timing runs
    # Finished, or stopped at its time budget on a busy machine: either way a message, never an exception.
    done = page.get_by_text(t("speed.done", "en", n=0)[:15])
    expect(done.or_(page.get_by_text(t("speed.cancelled", "en", budget=0)[:15]))).to_be_visible(timeout=180_000)
    wait_idle(page, 180_000)
    assert page.locator(EXCEPTIONS).count() == 0 and page.locator(ERRORS).count() == 0
    server_up(app_url)


def test_a_timing_run_over_its_budget_is_cancelled_with_a_message(page, app_url, bystander):
    page.goto(app_url + "/?view=speed&H=4")
    wait_idle(page)
    lengths = page.locator("[data-testid='stMain'] [data-testid='stMultiSelect']").first
    lengths.click()
    page.keyboard.type("8192")
    page.keyboard.press("Enter")
    page.keyboard.press("Escape")
    wait_idle(page)
    budget = page.get_by_role("spinbutton", name=t("speed.time_budget", "en"))
    budget.fill("1")
    budget.press("Enter")
    wait_idle(page)
    page.get_by_role("button", name=t("speed.run", "en")).click()
    expect(page.get_by_text(t("speed.cancelled", "en", budget=1))).to_be_visible(timeout=120_000)
    wait_idle(page)
    assert page.locator(EXCEPTIONS).count() == 0
    bystander.still_fine()


def test_an_injected_fault_breaks_only_its_panel(page, faulty_app):
    url, log = faulty_app
    page.goto(url + "/?L=64&H=2")
    wait_idle(page)
    text = expect_error(page, lead("err.unexpected", "en"))
    assert "injected fault in the maps panel" in text
    # The rest of the page works: the sidebar, the accuracy tab's chart and the explainer.
    expect(page.get_by_role("slider", name=t("setting.top_k", "en"))).to_be_visible()
    page.get_by_role("tab", name=t("tab.budget", "en")).click()
    wait_idle(page, 120_000)
    assert trace_count(page, "budget_chart", timeout=120_000) >= 1
    page.get_by_role("tab", name=t("tab.explain", "en")).click()
    wait_idle(page)
    expect(page.get_by_text(t("explain.match", "en"))).to_be_visible(timeout=30_000)
    assert page.locator(EXCEPTIONS).count() == 0
    # The server logged the injected fault with its traceback, and nothing else went wrong.
    logged = log.read_text()
    assert logged.count("Traceback") >= 1 and logged.count("Traceback") == logged.count("injected fault in the maps panel")
