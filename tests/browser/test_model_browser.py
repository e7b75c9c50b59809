"""The model source in a real Chromium, both languages: the notice before typing, the line view and the overview."""
import os
from pathlib import Path
from urllib.parse import quote

from playwright.sync_api import expect

from sparse_attn.i18n import t
from sparse_attn.sources.sentences import sentence

from .helpers import wait_idle

SHOTS = os.environ.get("SPARSE_ATTN_SCREENSHOTS")  # a folder: save the screenshots there
LINES, OVERVIEW = "model_lines_chart", "model_overview_chart"

# Plotly's own data for one chart: (line traces, heatmaps, the title as drawn, which the theme may wrap in <b>).
CHART = """(key) => {
  const el = document.querySelector('.st-key-' + key + ' .js-plotly-plot');
  if (!el || !el._fullData || !el._fullLayout) return null;
  return [el._fullData.filter(d => d.type === 'scatter' && d.mode === 'lines' && d.x.length > 1).length,
          el._fullData.filter(d => d.type === 'heatmap').length,
          el._fullLayout.title.text];
}"""


def chart(page, key, timeout=120_000):
    page.wait_for_function(f"() => ({CHART})('{key}') !== null", timeout=timeout)
    return page.evaluate(CHART, key)


def open_model(page, url, query):
    page.goto(url + "/?source=model" + query)
    wait_idle(page, timeout=120_000)
    return chart(page, LINES), chart(page, OVERVIEW)


def notice(lang):
    return t("model.notice", lang, vocab="30,522", han=244)


def shoot(page, name):
    if SHOTS:
        Path(SHOTS).mkdir(parents=True, exist_ok=True)
        for key in (LINES, OVERVIEW):
            page.locator(f".st-key-{key}").screenshot(path=str(Path(SHOTS) / f"{name}_{key}.png"))


def test_english_notice_line_view_and_overview(page, app_url):
    lines, overview = open_model(page, app_url, "")
    sidebar = page.locator("[data-testid='stSidebar']")
    # The notice sits beside the text box from the first load: nothing typed yet.
    expect(sidebar.get_by_text(notice("en"))).to_be_visible()
    expect(sidebar.get_by_text(t("model.example", "en"), exact=True)).to_be_visible()
    assert lines[0] > 0 and t("model.lines_title", "en", layer=0, head=0) in lines[2]
    assert overview[1] == 6 * 12 and t("model.overview_title", "en") in overview[2]
    expect(page.get_by_text(t("model.lines_header", "en"), exact=True)).to_be_visible()
    assert page.locator("[data-testid='stException']").count() == 0
    shoot(page, "model_en")


def test_chinese_notice_line_view_and_overview(page, app_url):
    lines, overview = open_model(page, app_url, "&lang=zh")
    expect(page.locator("[data-testid='stSidebar']").get_by_text(notice("zh"))).to_be_visible()
    assert lines[0] > 0 and t("model.lines_title", "zh", layer=0, head=0) in lines[2]
    assert overview[1] == 6 * 12 and t("model.overview_title", "zh") in overview[2]
    assert page.locator("[data-testid='stException']").count() == 0
    shoot(page, "model_zh")


def test_picking_a_chinese_example_fills_the_text_and_opens_its_head(page, app_url):
    open_model(page, app_url, "&lang=zh")
    example = sentence("zh_moon")
    page.locator(".st-key-model_example").click()
    page.get_by_role("option", name=example.text).click()
    wait_idle(page, timeout=120_000)
    expect(page.locator(".st-key-text textarea")).to_have_value(example.text)
    lk = example.look
    title = t("model.lines_title", "zh", layer=lk.layer, head=lk.head)
    page.wait_for_function(f"() => {{ const c = ({CHART})('{LINES}'); return c && c[2].includes({title!r}); }}",
                           timeout=120_000)
    # The link the example names, with its measured weight; and no [UNK] note anywhere.
    expect(page.get_by_text(f"查询“{lk.query_token}”（位置 {lk.query}）把").first).to_be_visible()
    expect(page.get_by_text("[UNK]：")).to_have_count(0)
    assert page.locator("[data-testid='stException']").count() == 0
    shoot(page, "model_zh_example")


def test_unreadable_chinese_says_how_much_is_unknown(page, app_url):
    text = "小猫坐在垫子上，因为那里很暖和。"
    lines, _ = open_model(page, app_url, "&lang=zh&text=" + quote(text))
    expect(page.get_by_text(t("note.unknown_tokens", "zh", share=9 / 16, count=9, total=16))).to_be_visible()
    assert t("model.unknown_sub", "zh", share=9 / 16, count=9, total=16) in lines[2]
    assert page.locator("[data-testid='stException']").count() == 0
