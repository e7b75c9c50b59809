"""The NSA view in a real Chromium: its branch maps, selection blocks and gate mix draw, in both languages."""
import os
from pathlib import Path

import pytest

from sparse_attn import viz_nsa
from sparse_attn.i18n import t

from .helpers import signature, trace_count, wait_idle

SHOTS = os.environ.get("SPARSE_ATTN_SCREENSHOTS")  # a folder: save the screenshots there


@pytest.mark.parametrize("lang", ["en", "zh"])
def test_nsa_view_draws_its_branch_maps(page, app_url, lang):
    page.goto(app_url + "/?method=nsa" + ("&lang=zh" if lang == "zh" else ""))
    wait_idle(page, 120_000)
    assert trace_count(page, "nsa_branches", 120_000) == 4
    for trace in range(4):  # compressed, selected, sliding, mix: 256 x 256 maps with weight in them
        rows, cols, nonzero, total = signature(page, "nsa_branches", trace)
        assert (rows, cols) == (256, 256) and nonzero > 0 and total > 0
    titles = page.evaluate(
        "() => document.querySelector('.st-key-nsa_branches .js-plotly-plot')._fullLayout.annotations.map(a => a.text)")
    assert titles == [t(f"nsa.map.{b}", lang) for b in viz_nsa.BRANCHES]
    names = page.evaluate(
        "() => document.querySelector('.st-key-nsa_blocks .js-plotly-plot')._fullData.map(d => d.name)")
    assert t("nsa.block.forced", lang) in names and t("nsa.block.picked", lang) in names
    assert trace_count(page, "nsa_gates") == 3
    assert page.get_by_text(t("nsa.title", lang, h=0), exact=True).count() == 1
    assert page.locator("[data-testid='stException']").count() == 0
    if SHOTS:
        for key in ("nsa_branches", "nsa_blocks", "nsa_gates"):
            page.locator(f".st-key-{key}").evaluate("e => e.scrollIntoView({block: 'start'})")
            page.wait_for_timeout(500)
            page.screenshot(path=str(Path(SHOTS) / f"{key}_{lang}.png"))
