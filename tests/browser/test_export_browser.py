"""In Chromium: a chart's PNG is drawn by the page itself (plotly's camera button), with no request anywhere."""
from urllib.parse import urlsplit

import pytest

from sparse_attn.i18n import t

from .helpers import wait_for_plot, wait_idle

PNG = b"\x89PNG\r\n\x1a\n"


@pytest.mark.parametrize("lang", ["en", "zh"])
def test_png_export_happens_in_the_browser_without_a_request(page, app_url, lang):
    page.goto(f"{app_url}/?lang={lang}")
    wait_idle(page)
    wait_for_plot(page)
    assert page.get_by_text(t("export.png_hint", lang)).count() == 1
    seen = []
    page.on("request", lambda r: seen.append(r.url))
    page.on("websocket", lambda ws: seen.append(ws.url))
    chart = page.locator(".st-key-maps_chart .js-plotly-plot")
    chart.hover()
    camera = page.locator(".st-key-maps_chart .modebar-btn[data-title*='png' i]")
    with page.expect_download(timeout=60_000) as info:
        camera.click()
    download = info.value
    assert download.suggested_filename == "attention_maps.png"
    data = open(download.path(), "rb").read()
    assert data.startswith(PNG) and len(data) > 50_000
    # Twice the chart's size on screen (charts.PNG_SCALE): sharp enough for slides.
    width = int.from_bytes(data[16:20], "big")
    assert width >= 2 * chart.bounding_box()["width"] - 2
    # The image is made from what the page holds: nothing leaves the app's own origin (the page hands its
    # own blob: to the download; the page may fetch its own media, such as the CSV buttons' files).
    origin = urlsplit(app_url).netloc
    assert all(u.startswith(("data:", "blob:")) or urlsplit(u).netloc == origin for u in seen), seen
    assert any(u.startswith("blob:") for u in seen)  # the watch itself works: it saw the download
