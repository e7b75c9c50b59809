"""Pictures that explain themselves: hovers that name cells, mask categories, clean log axes, honest timing."""
import base64
import math
import re
import time
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch
from streamlit.testing.v1 import AppTest

from sparse_attn import viz
from sparse_attn.i18n import LANGS, t
from sparse_attn.timing import NOISY_IQR, Timing, time_until_stable
from sparse_attn.ui.charts import elements as chart_elements
from sparse_attn.ui.charts import spec as chart_spec


def z_of(trace) -> np.ndarray:
    return _arr(trace.z)


def _arr(v) -> np.ndarray:
    """A plotly array, whether a list (None for a gap) or plotly 6+'s base64 typed array."""
    if isinstance(v, dict):
        shape = [int(n) for n in str(v.get("shape", "-1")).split(",")]
        return np.frombuffer(base64.b64decode(v["bdata"]), v["dtype"]).reshape(shape)
    if isinstance(v, np.ndarray) and v.dtype != object:
        return v
    return np.array([np.nan if y is None else y for y in np.asarray(v, dtype=object).ravel()], dtype=float).reshape(
        np.shape(v))

APP = str(Path(__file__).resolve().parent.parent / "app.py")
CELL = re.compile(r"^\d+(–\d+)?$")  # a position or a range of positions: never 123.5


def _maps(L, k=3, seed=0):
    g = torch.Generator().manual_seed(seed)
    dense = torch.softmax(torch.randn(L, L, generator=g) * 2, -1)
    keep = dense >= dense.topk(k, -1).values[:, -1:]
    sparse = torch.where(keep, dense, 0.0)
    return dense, sparse / sparse.sum(-1, keepdim=True), keep


def heatmaps(fig):
    return [tr for tr in fig.data if tr.type == "heatmap"]


def mask_traces(fig):
    """The mask's heatmaps by their legend name (the scatter beside each carries it)."""
    legend = {tr.legendgroup: tr.name for tr in fig.data if tr.type == "scatter" and tr.legendgroup}
    return {legend[tr.legendgroup]: tr for tr in heatmaps(fig) if tr.legendgroup in legend}


# --- maps: hover, mask categories, axis titles -------------------------------------------------------------------

@pytest.mark.parametrize("lang", LANGS)
def test_hover_names_the_query_and_key_tokens(lang):
    tokens = ["The", "cat", "sat", "on", "the", "mat"]
    dense, sparse, mask = _maps(6, k=2)
    fig = viz.attention_maps(dense, sparse, mask, tokens=tokens, lang=lang)
    d = fig.data[0]
    assert list(d.x) == [f"{i} ({w})" for i, w in enumerate(tokens)] == list(d.y)
    q, k = t("charts.hover_query", lang, i="%{y}"), t("charts.hover_key", lang, j="%{x}")
    assert d.hovertemplate.startswith(f"{q} → {k}") and t("charts.hover_weight", lang, w="%{z:.3g}") in d.hovertemplate
    assert fig.layout.xaxis.type == fig.layout.yaxis.type == "category"  # "0 (The)" is a label, not a number
    assert list(fig.layout.xaxis.ticktext) == tokens  # few tokens: they label the axis


def test_pooled_hover_gives_ranges_never_half_positions():
    dense, sparse, mask = _maps(4096 // 4)
    fig = viz.attention_maps(dense, sparse, mask, max_cells=128)  # 1024 -> 128 cells of 8
    for tr in heatmaps(fig):
        labels = list(tr.x) + list(tr.y)
        assert all(CELL.match(s) for s in labels), [s for s in labels if not CELL.match(s)][:3]
        assert tr.x[0] == "0–7" and tr.x[1] == "8–15" and tr.x[-1] == "1016–1023"
        assert tr.hovertemplate.startswith(t("charts.hover_queries", "en", i="%{y}") + " → "
                                           + t("charts.hover_keys", "en", j="%{x}"))
    assert t("charts.hover_weight_max", "en", w="%{z:.3g}") in fig.data[0].hovertemplate  # says it is the max
    # Ticks are round positions placed on the cells that hold them.
    assert list(fig.layout.xaxis.ticktext) == ["0", "256", "512", "768"]
    assert list(fig.layout.xaxis.tickvals) == ["0–7", "256–263", "512–519", "768–775"]


@pytest.mark.parametrize("lang", LANGS)
def test_the_mask_hover_says_selected_or_not(lang):
    dense, sparse, mask = _maps(16)
    fig = viz.attention_maps(dense, sparse, mask, lang=lang)
    cats = mask_traces(fig)
    sel, off = t("charts.mask_selected", lang), t("charts.mask_not_selected", lang)
    assert set(cats) == {sel, off}
    for name, tr in cats.items():
        assert tr.hovertemplate.split("<extra>")[0].endswith(name) and "%{z" not in tr.hovertemplate
        assert tr.hoverongaps is False  # a gap belongs to another category: no hover from this trace there
    np.testing.assert_array_equal(~np.isnan(z_of(cats[sel])), mask.numpy())
    assert [tr.legendgroup for tr in heatmaps(fig)][3:] == ["mask_not_selected", "mask_selected"]  # selected on top
    assert fig.layout.legend.title.text == t("charts.mask_legend", lang)


@pytest.mark.parametrize("lang", LANGS)
def test_hybrid_masks_tell_top_k_keys_from_sampled_ones(lang):
    dense, sparse, mask = _maps(20, k=6)
    exact = mask & (dense >= dense.topk(2, -1).values[:, -1:])
    fig = viz.attention_maps(dense, sparse, mask, mask_exact=exact, lang=lang)
    cats = mask_traces(fig)
    names = {c: t(viz.MASK_CATEGORIES[c][0], lang) for c in ("not_selected", "sampled", "exact")}
    assert set(cats) == set(names.values())
    legend = [tr.name for tr in fig.data if tr.type == "scatter"]
    assert legend == [names["not_selected"], names["sampled"], names["exact"]]
    np.testing.assert_array_equal(~np.isnan(z_of(cats[names["exact"]])), exact.numpy())
    np.testing.assert_array_equal(~np.isnan(z_of(cats[names["sampled"]])), (mask & ~exact).numpy())
    # "Not selected" lies under every cell (one byte each) and before the others: plotly's hover takes the
    # topmost trace holding a cell, so a selected cell never reads "not selected".
    bottom = z_of(cats[names["not_selected"]])
    assert bottom.dtype == np.uint8 and bottom.shape == mask.shape
    order = [tr.legendgroup for tr in heatmaps(fig)]
    assert order[3:] == ["mask_not_selected", "mask_sampled", "mask_exact"]
    # Sampled and exact keys get different colours.
    assert cats[names["sampled"]].colorscale[-1][1] != cats[names["exact"]].colorscale[-1][1]


def test_hybrid_masks_from_pooled_maps_and_under_mean_pooling():
    dense, sparse, mask = _maps(1100, k=8)
    exact = mask & (dense >= dense.topk(2, -1).values[:, -1:])
    pooled = {name: viz.pool_map(m.float(), 512, "mean") for name, m in (("mask", mask), ("exact", exact))}
    diff = viz.pool_map(sparse - dense, 512, "mean", signed=True)
    fig = viz.attention_maps(viz.pool_map(dense, 512, "mean"), viz.pool_map(sparse, 512, "mean"), pooled["mask"],
                             diff=diff, mask_exact=pooled["exact"], lang="zh")
    cats = mask_traces(fig)
    top = cats[t("charts.mask_exact", "zh")]
    np.testing.assert_array_equal(~np.isnan(z_of(top)), pooled["exact"].values > 0)
    # Mean pooling: the colour's depth and the hover are the share of the cell's keys that were selected.
    np.testing.assert_allclose(z_of(top)[pooled["exact"].values > 0],
                               pooled["mask"].values[pooled["exact"].values > 0], rtol=2**-11)
    assert "%{z:.0%}" in top.hovertemplate
    with pytest.raises(ValueError, match="mask_exact"):
        viz.attention_maps(dense, sparse, mask, mask_exact=viz.pool_map(exact.float(), 100))


def test_axis_titles_only_on_the_outer_panels():
    dense, sparse, mask = _maps(32)
    for lang in LANGS:
        lay = viz.attention_maps(dense, sparse, mask, lang=lang).layout
        key, query = t("viz.key_axis", lang), t("viz.query_axis", lang)
        # xaxis, xaxis2: top row; xaxis3, xaxis4: bottom row. yaxis, yaxis3: left column.
        assert lay.xaxis.title.text is None and lay.xaxis2.title.text is None
        assert lay.xaxis3.title.text == lay.xaxis4.title.text == key
        assert lay.yaxis.title.text == lay.yaxis3.title.text == query
        assert lay.yaxis2.title.text is None and lay.yaxis4.title.text is None
        # The legend sits below the bottom row's axis titles, not on them.
        assert lay.legend.y < 0 and lay.legend.yanchor == "top"


def test_head_grid_panels_are_square_with_tick_numbers():
    fig = viz.head_grid(torch.rand(8, 256, 256), lang="zh")
    lay = fig.to_plotly_json()["layout"]
    for h in range(8):
        n = "" if h == 0 else str(h + 1)
        y, x = lay[f"yaxis{n}"], lay[f"xaxis{n}"]
        assert y["scaleanchor"] == f"x{n}"  # a square panel, whatever the width
        assert x["ticktext"] == y["ticktext"] == ["0", "64", "128", "192"]
    assert fig.layout.height >= 250 * 2
    assert all("%{y}" in tr.hovertemplate and "%{x}" in tr.hovertemplate for tr in fig.data)


# --- log axes: budget and timing charts ----------------------------------------------------------------------------

def _sampling_sweep():
    rows = []
    for method, slope in (("topk", 1.0), ("sampling", 0.5)):
        for b in (1, 2, 4, 8, 16, 32, 64):
            err = 0.8 * b ** -slope
            std = 1.5 * err if method == "sampling" else 0.0  # a spread larger than the mean
            if method == "topk" and b == 64:
                err = 0.0
            rows.append({"method": method, "budget": b, "error_mean": err, "error_std": std, "tv_mean": err / 2})
    return pd.DataFrame(rows)


def _bars(tr):
    y = np.asarray(tr.y, dtype=float)
    e = tr.error_y
    up = np.asarray(e.array, dtype=float) if e.array is not None else np.zeros_like(y)
    down = np.asarray(e.arrayminus, dtype=float) if e.arrayminus is not None else up
    return y, y - down, y + up


@pytest.mark.parametrize("lang", LANGS)
def test_budget_chart_keeps_every_point_and_bar_inside_a_positive_log_axis(lang):
    df = _sampling_sweep()
    fig = viz.budget_curve(df, exact_below=1e-12, current=8, lang=lang)
    ax = fig.layout.yaxis
    lo, hi = 10 ** ax.range[0], 10 ** ax.range[1]
    bars = 0
    for tr in fig.data:
        if tr.y is None or not len(tr.y) or tr.y[0] is None:
            continue
        y = np.asarray(tr.y, dtype=float)
        assert (y[np.isfinite(y)] > 0).all() and (y[np.isfinite(y)] >= lo).all() and (y[np.isfinite(y)] <= hi).all()
        if tr.error_y is not None and tr.error_y.array is not None:
            y, low, high = _bars(tr)
            ok = np.isfinite(y)
            assert (low[ok] > 0).all() and (low[ok] >= lo).all() and (high[ok] <= hi).all()
            bars += 1
    assert bars == 1  # only the sampling line has a spread
    logs = np.log10(np.asarray(ax.tickvals, dtype=float))
    np.testing.assert_allclose(logs, np.round(logs), atol=1e-12)  # decades only: no "8 9 1 2 3"
    assert not any("µ" in s or "μ" in s for s in ax.ticktext)
    assert fig.layout.shapes[0].x0 == 8  # the reader's budget
    # The chart's title is its tab's name, in the reader's language.
    assert fig.layout.title.text.startswith(t("tab.budget", lang))
    assert t("viz.error_axis", lang) in fig.layout.title.text
    # No spread column for this metric: no bars.
    assert all(tr.error_y.array is None for tr in viz.budget_curve(df, y="tv_mean", lang=lang).data)


@pytest.mark.parametrize("lo,hi", [(0.013, 0.9), (1.5, 8.0), (2.0, 2.0), (0.02, 3000.0), (150.0, 160.0), (7e-5, 3e4)])
def test_log_ticks_are_labelled_round_values_that_hold_the_data(lo, hi):
    ax = viz.log_ticks(lo, hi)
    vals = np.asarray(ax["tickvals"])
    assert len(vals) >= 2 and ax["range"][0] <= math.log10(lo) and ax["range"][1] >= math.log10(hi)
    mant = vals / 10.0 ** np.floor(np.log10(vals) + 1e-9)
    assert np.all(np.isin(np.round(mant, 9), [1, 2, 5]))
    if math.log10(hi / lo) >= 2:
        np.testing.assert_allclose(np.log10(vals), np.round(np.log10(vals)), atol=1e-12)
    assert not any(s.endswith(("µ", "m", "k")) for s in ax["ticktext"])
    with pytest.raises(ValueError, match="lo must be a finite number > 0"):
        viz.log_ticks(0.0, 1.0)


def _timings():
    rows = []
    for method, base in (("dense", 0.4), ("topk", 3.0)):
        for L in (64, 128, 256, 512):
            med = base * (L / 64) ** 1.5
            rows.append({"method": method, "seq_len": L, "median_ms": med, "q1_ms": med * 0.3, "q3_ms": med * 1.9,
                         "iqr_ms": med * 1.6, "noisy": L == 128})
    return pd.DataFrame(rows)


@pytest.mark.parametrize("lang", LANGS)
def test_timing_chart_bars_are_the_quartiles_and_stay_on_the_chart(lang):
    df = _timings()
    fig = viz.scaling_plot(df, spread=("q1_ms", "q3_ms"), noisy="noisy", lang=lang)
    ax = fig.layout.yaxis
    lo, hi = 10 ** ax.range[0], 10 ** ax.range[1]
    for tr in fig.data:
        y, low, high = _bars(tr)
        part = df[df.method == tr.name].sort_values("seq_len")
        np.testing.assert_allclose(low, part.q1_ms) and np.testing.assert_allclose(high, part.q3_ms)
        assert (low >= lo).all() and (high <= hi).all() and (y > 0).all()
        assert list(tr.marker.symbol) == ["circle", "circle-open", "circle", "circle"]  # the noisy point is open
    assert list(fig.layout.xaxis.tickvals) == [64, 128, 256, 512]
    assert list(fig.layout.xaxis.ticktext) == ["64", "128", "256", "512"]
    assert all(re.fullmatch(r"[0-9.]+|10<sup>−?\d+</sup>", s) for s in ax.ticktext)
    assert fig.layout.title.text.startswith(t("tab.speed", lang)) and ax.title.text == t("viz.time_axis", lang)
    # An IQR column drawn half each side never reaches 0 on the log axis.
    wide = df.assign(iqr_ms=df.median_ms * 4)
    for tr in viz.scaling_plot(wide, spread="iqr_ms").data:
        y, low, high = _bars(tr)
        assert (low > 0).all()
    # A zero or negative median (a broken row) is not drawn on a log axis.
    broken = pd.concat([df, pd.DataFrame([{"method": "dense", "seq_len": 1024, "median_ms": 0.0, "q1_ms": 0.0,
                                           "q3_ms": 0.0, "iqr_ms": 0.0, "noisy": False}])])
    assert all((np.asarray(tr.y) > 0).all() for tr in viz.scaling_plot(broken).data)
    with pytest.raises(ValueError, match="no column 'q9'"):
        viz.scaling_plot(df, spread=("q1_ms", "q9"))


# --- timing --------------------------------------------------------------------------------------------------------

def test_time_until_stable_reports_quartiles_and_stops_at_its_time():
    x = torch.randn(64, 64)
    tm = time_until_stable(lambda: x @ x, max_time=0.5)
    assert tm.runs >= 5 and tm.q1 <= tm.median <= tm.q3 and tm.iqr == pytest.approx(tm.q3 - tm.q1)
    assert min(tm.times) <= tm.q1 and tm.q3 <= max(tm.times)  # inclusive quartiles stay in the measured range
    start = time.perf_counter()
    slow = time_until_stable(lambda: time.sleep(0.12), max_time=0.3, min_runs=20)
    # About max_time, plus the warm-up call and the block that crossed it; never the 20 runs asked for.
    assert time.perf_counter() - start < 0.3 + 3 * 0.12 + 0.3 and slow.runs < 20
    assert slow.median == pytest.approx(0.12, abs=0.05)
    with pytest.raises(ValueError, match="max_time"):
        time_until_stable(lambda: None, max_time=0)


def test_noisy_means_a_wide_spread_or_too_few_runs():
    assert Timing(1.0, 0.05, [1.0] * 5).noisy() is False
    assert Timing(1.0, NOISY_IQR * 1.5, [1.0] * 5).noisy() is True
    assert Timing(1.0, 0.0, [1.0, 1.0]).noisy() is True  # two runs cannot show a spread
    assert Timing(0.0, 0.0, [0.0] * 5).noisy() is True


def test_run_sweep_rows_and_where_it_stops():
    from sparse_attn.ui import speed, state

    s = state.defaults() | {"H": 1, "D": 16}
    df, stopped = speed.run_sweep(s, [64], 30.0, "en", min_run_time=0.01)
    assert stopped is None and len(df) == len(speed.timed_methods(s))
    assert (df.q1_ms <= df.median_ms).all() and (df.median_ms <= df.q3_ms).all() and (df.runs >= 3).all()
    assert df.noisy.dtype == bool and (df.memory_est > 0).all() and df.memory_peak.isna().all()  # CPU: no peak
    df, stopped = speed.run_sweep(s, [64, 128], 0.0, "en")
    assert df.empty and stopped.missing == stopped.total == 2 * len(speed.timed_methods(s)) and stopped.need_s is None


def test_the_table_shows_memory_in_binary_units_and_no_cuda_column_on_a_cpu():
    from sparse_attn.ui import speed

    assert [speed.format_bytes(b) for b in (80, 3 * 2**10, 5.5 * 2**20, 2**31, float("nan"))] == [
        "80 B", "3 KiB", "5.5 MiB", "2 GiB", "—"]
    df = pd.DataFrame([{"method": "dense", "seq_len": 64, "median_ms": 0.5, "q1_ms": 0.4, "q3_ms": 0.6, "iqr_ms": 0.2,
                        "runs": 9, "noisy": True, "memory_est": 3.0 * 2**20, "memory_peak": float("nan")}])
    for lang in LANGS:
        cpu = speed.table(df, {"dense": "SDPA"}, "cpu", lang)
        assert t("speed.col_peak", lang) not in cpu.columns
        assert cpu[t("speed.col_memory", lang)].tolist() == ["3 MiB"]
        assert cpu[t("charts.col_spread", lang)].tolist() == ["40%"]
        assert t("speed.col_peak", lang) in speed.table(df, {"dense": "SDPA"}, "cuda", lang).columns


# --- the tabs under AppTest ----------------------------------------------------------------------------------------

def _app(**query) -> AppTest:
    at = AppTest.from_file(APP, default_timeout=180)
    for key, value in query.items():
        at.query_params[key] = str(value)
    return at.run()


def _captions(at) -> list[str]:
    return [c.value for c in at.caption]


def _noted(at, picture: str, lang: str) -> bool:
    """The picture's reading note is under it (the note may go on with a link to its chapter)."""
    return any(c.startswith(t(f"guide.{picture}", lang)) for c in _captions(at))


@pytest.mark.parametrize("lang", LANGS)
def test_the_timing_tab_says_finished_or_stopped_never_both(lang):
    at = _app(view="speed", L=64, H=1, D=16, lang=lang)
    at.multiselect(key="sp_lengths").set_value([64, 128])
    at.button(key="sp_run").click().run()
    assert not at.exception, [e.message for e in at.exception]
    cancelled = t("speed.cancelled", lang, budget=30)
    assert at.success and at.success[0].value == t("speed.done", lang, n=6)
    assert not [w for w in at.warning if w.value == cancelled]
    captions = _captions(at)
    assert _noted(at, "speed", lang) and t("charts.speed_why", lang) in captions
    [table] = at.dataframe
    assert t("speed.col_peak", lang) not in table.value.columns  # a CPU: no column of "None"
    assert all(re.fullmatch(r"[\d.]+ (B|KiB|MiB|GiB)", v) for v in table.value[t("speed.col_memory", lang)])
    fig = chart_spec(chart_elements(at)[0])
    assert all((_arr(tr["y"]) > 0).all() for tr in fig["data"])
    # A budget too small for anything: stopped, and no green "finished" beside it.
    at.number_input(key="sp_budget").set_value(1)
    at.multiselect(key="sp_lengths").set_value([64, 128, 256, 512, 1024, 2048, 4096])
    at.button(key="sp_run").click().run()
    assert [w for w in at.warning if w.value == t("speed.cancelled", lang, budget=1)] and not at.success


@pytest.mark.parametrize("lang", LANGS)
def test_the_budget_tab_has_a_positive_log_axis_its_tabs_title_and_a_note(lang):
    at = _app(view="budget", L=64, H=2, method="hybrid", lang=lang)
    assert not at.exception, [e.message for e in at.exception]
    fig = chart_spec(chart_elements(at)[0])
    for tr in fig["data"]:
        ys = _arr(tr.get("y") or []).ravel()
        assert (ys[np.isfinite(ys)] > 0).all(), tr["name"]  # NaN is a gap
    assert fig["layout"]["title"]["text"].startswith(t("tab.budget", lang))
    assert _noted(at, "budget", lang)


@pytest.mark.parametrize("lang", LANGS)
def test_the_explainer_labels_its_controls_as_its_own(lang):
    at = _app(view="explain", lang=lang)
    assert not at.exception, [e.message for e in at.exception]
    main = [s.label for s in at.main.slider]
    assert t("explain.k", lang) in main and t("explain.chunk", lang) in main
    sidebar = {s.label for s in at.sidebar.slider} | {s.label for s in at.sidebar.select_slider}
    assert not sidebar & set(main)  # no control here shares a name with the sidebar's
    assert _noted(at, "explain", lang)
    # A shorter row keeps k and the chunk size within it, and says so for k.
    at.slider(key="ex_k").set_value(20).run()
    at.slider(key="ex_n").set_value(8).run()
    assert at.slider(key="ex_k").value == 8 and at.slider(key="ex_chunk").value <= 8
    assert at.info and at.info[0].value == t("explain.k_clipped", lang, k=20, n=8)


def test_the_chart_component_serves_the_installed_plotly_js(tmp_path, monkeypatch):
    import plotly

    from sparse_attn.ui import charts

    monkeypatch.setattr(charts, "ASSETS", tmp_path)
    charts._install_plotly_js()
    src = (Path(plotly.__file__).parent / "package_data" / "plotly.min.js").read_bytes()
    assert (tmp_path / "plotly.min.js").read_bytes() == src  # the version plotly.py writes its figures for
    (tmp_path / "plotly.min.js").write_bytes(b"stale")
    charts._install_plotly_js()
    assert (tmp_path / "plotly.min.js").read_bytes() == src  # an older copy is replaced
    assert [p.name for p in tmp_path.iterdir()] == ["plotly.min.js"]  # no temporary file left behind
    assert (Path(charts.__file__).with_name("plot_assets") / "plot.js").is_file()


def test_every_chart_is_the_plot_component_with_its_figure():
    at = _app(L=64, H=2)
    assert not at.exception, [e.message for e in at.exception]
    charts_ = chart_elements(at)
    assert len(charts_) == 2 and {e.proto.component_name for e in charts_} == {"sparse-attn.plot"}
    maps = chart_spec(charts_[0])
    assert [tr["type"] for tr in maps["data"]].count("heatmap") >= 4 and maps["layout"]["height"] > 0
