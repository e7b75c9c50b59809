"""Uploads in a real Chromium, in both languages: the uploader in the reader's language, refusals where the picture was.

Streamlit's uploader refuses a file over ``server.maxUploadSize`` in the browser and keeps returning the file
it held before; here the page must say so in place of that file's picture, and keep saying it when a slider
moves, until another file is accepted.
"""
import re

import numpy as np
import pytest
from playwright.sync_api import expect

from sparse_attn.i18n import LANGS, t
from sparse_attn.sources import Source, SourceError, load
from sparse_attn.ui import errors, inputs

from .helpers import wait_for_plot, wait_idle

ERRORS = "[data-testid='stAlertContentError']"
CHART = ".st-key-maps_chart .js-plotly-plot"
MARKDOWN_NAME = "![x](http://a/b.png)[link](http://c).npy"


def shown(markdown: str) -> str:
    """What a reader sees of one of our messages: inline code loses its backticks."""
    return re.sub(r"`+ ?(.*?) ?`+", r"\1", markdown)


def refusal_text(name: str, data: bytes, lang: str) -> str:
    with pytest.raises(SourceError) as info:
        load(Source.file(data=data, name=name, max_bytes=inputs.MAX_UPLOAD_BYTES))
    return shown(errors.message(info.value, lang))


@pytest.fixture(scope="module")
def files(tmp_path_factory):
    d = tmp_path_factory.mktemp("uploads")
    rng = np.random.default_rng(0)
    np.savez(d / "good.npz", q=rng.standard_normal((1, 2, 24, 8)).astype(np.float32),
             k=rng.standard_normal((1, 2, 24, 8)).astype(np.float32))
    with open(d / "big.npy", "wb") as f:  # one byte over the limit, sparse: it takes no disk
        f.truncate(inputs.MAX_UPLOAD_BYTES + 1)
    (d / "notes.npy").write_text("q, k, v\n0.1, 0.2, 0.3\n")
    (d / "model.pkl").write_bytes(b"\x80\x04K\x01.")
    return d


@pytest.mark.parametrize("lang", LANGS)
def test_upload_refusals_replace_the_picture_in_the_readers_language(page, app_url, files, lang):
    page.goto(f"{app_url}/?source=file&lang={lang}")
    wait_idle(page)
    sidebar = page.locator("[data-testid='stSidebar']")
    box = page.locator(f".st-key-{inputs.UPLOAD_KEY}")
    # Streamlit's own words are replaced by ours: the button, and the limit in MiB with the formats.
    hint = t("io.upload_hint", lang, limit="64 MiB")
    expect(sidebar.get_by_text(hint)).to_be_visible()
    expect(box.locator("[data-testid='stFileUploaderDropzoneInstructions']")).to_be_hidden()
    button = box.locator("[data-testid='stFileUploaderDropzone'] button p")
    # The label is our style sheet's, which the page applies once its own element has mounted: wait for it.
    want = f'"{t("io.upload_button", lang)}"'
    page.wait_for_function("([el, want]) => getComputedStyle(el, '::after').content === want",
                           arg=[button.element_handle(), want], timeout=30_000)
    assert button.evaluate("el => getComputedStyle(el).fontSize") == "0px"
    assert not re.search(r"\d\s?MB\b|Browse files|Drag and drop", sidebar.inner_text())

    def pick(path_or_payload):
        box.locator("[data-testid='stFileUploaderDropzoneInput']").set_input_files(path_or_payload)

    def expect_refusal(text):
        expect(page.locator(ERRORS).filter(has_text=text[:40])).to_be_visible(timeout=60_000)
        wait_idle(page)
        assert page.locator(ERRORS).first.inner_text().strip().endswith(text[-20:])
        expect(page.locator(CHART)).to_have_count(0)  # the earlier file's picture is gone

    pick(files / "good.npz")
    wait_for_plot(page)

    # One byte over the limit: the browser refuses it, the page says so where the picture was.
    pick(files / "big.npy")
    big = inputs.Refused("big.npy", inputs.MAX_UPLOAD_BYTES + 1, "size")
    expect_refusal(shown(errors.message(big.error(), lang)))
    expect(sidebar.get_by_text(shown(inputs.refusal_caption(big, lang)))).to_be_visible()
    expect(box.locator("[data-testid='stFileChip'][aria-invalid='true']")).to_have_count(0)  # no English chip
    # A slider moved: the refusal still stands, the old file's picture does not come back.
    slider = page.get_by_role("slider", name=t("setting.top_k", lang))
    slider.focus()
    page.keyboard.press("ArrowRight")
    page.wait_for_url(re.compile(r"[?&]k=33\b"), timeout=30_000)
    wait_idle(page)
    expect_refusal(shown(errors.message(big.error(), lang)))

    # A file of another type, refused in the browser too.
    pick(files / "model.pkl")
    expect_refusal(shown(errors.message(inputs.Refused("model.pkl", 5, "suffix").error(), lang)))

    # Accepted by the browser, refused by the reader: a text file named .npy, and a name full of Markdown.
    pick(files / "notes.npy")
    expect_refusal(refusal_text("notes.npy", (files / "notes.npy").read_bytes(), lang))
    pick({"name": MARKDOWN_NAME, "mimeType": "application/octet-stream", "buffer": b"not an array"})
    expect_refusal(refusal_text(MARKDOWN_NAME, b"not an array", lang))
    error = page.locator(ERRORS).first
    assert error.locator("img").count() == 0 and error.locator("a").count() == 0
    assert MARKDOWN_NAME in error.locator("code").first.inner_text()

    # A good file brings the picture back, and the refusals are gone.
    pick(files / "good.npz")
    wait_for_plot(page)
    wait_idle(page)
    expect(page.locator(ERRORS)).to_have_count(0)
    assert page.locator("[data-testid='stException']").count() == 0
