"""viz: pooling that keeps what matters, one colour scale, labels in the reader's language."""
import base64
import json
import math

import numpy as np
import pytest
import torch
import plotly.io as pio
from hypothesis import given, settings, strategies as st

from sparse_attn import viz
from sparse_attn.i18n import t


def z_of(trace) -> np.ndarray:
    """A heatmap's z, whether plotly kept it as a list or a typed array."""
    z = trace.z
    if isinstance(z, dict):  # plotly 6+ JSON: {"dtype", "bdata", "shape"}
        return np.frombuffer(base64.b64decode(z["bdata"]), z["dtype"]).reshape([int(n) for n in z["shape"].split(",")])
    return np.asarray(z)


@given(Lq=st.integers(1, 40), Lk=st.integers(1, 40), cells=st.integers(1, 12), seed=st.integers(0, 999))
@settings(max_examples=60, deadline=None)
def test_pooling_matches_brute_force(Lq, Lk, cells, seed):
    x = torch.randn(Lq, Lk, generator=torch.Generator().manual_seed(seed))
    for mode in ("max", "mean"):
        p = viz.pool_map(x, cells, mode)
        assert p.values.shape[0] <= cells and p.values.shape[1] <= cells
        for i in range(p.values.shape[0]):
            for j in range(p.values.shape[1]):
                block = x[i * p.step_q : (i + 1) * p.step_q, j * p.step_k : (j + 1) * p.step_k]
                want = block.max() if mode == "max" else block.mean()
                assert p.values[i, j] == pytest.approx(want.item(), rel=1e-5, abs=1e-6)


def test_signed_max_pooling_keeps_the_largest_magnitude_with_its_sign():
    x = torch.zeros(4, 4)
    x[0, 0], x[1, 1] = 0.2, -0.9
    p = viz.pool_map(x, 2, "max", signed=True)
    assert p.values[0, 0] == pytest.approx(-0.9)


def test_a_single_selected_key_survives_max_pooling():
    mask = torch.zeros(4096, 4096)
    mask[1234, 3210] = 1.0
    p = viz.pool_map(mask, 512, "max")
    assert p.values.shape == (512, 512) and p.values.sum() == 1.0 and p.values[1234 // 8, 3210 // 8] == 1.0


def test_small_maps_pass_through_unpooled():
    x = torch.rand(30, 20)
    p = viz.pool_map(x, 512)
    assert p.mode == "none" and np.array_equal(p.values, x.numpy())


def _maps(L, seed=0):
    g = torch.Generator().manual_seed(seed)
    dense = torch.softmax(torch.randn(L, L, generator=g), -1)
    keep = dense >= dense.topk(3, -1).values[:, -1:]
    sparse = torch.where(keep, dense, 0.0)
    sparse = sparse / sparse.sum(-1, keepdim=True)
    return dense, sparse, keep


def heatmaps(fig):
    return [tr for tr in fig.data if tr.type == "heatmap"]


def test_attention_maps_share_one_colour_scale_and_show_the_difference():
    dense, sparse, mask = _maps(24)
    fig = viz.attention_maps(dense, sparse, mask)
    d, s, diff, not_selected, selected = heatmaps(fig)
    assert d.coloraxis == s.coloraxis == "coloraxis" and diff.coloraxis != d.coloraxis
    assert fig.layout.coloraxis.cmax == pytest.approx(max(dense.max(), sparse.max()).item())
    # Sent at float16's precision in float32 (viz._compact): three significant digits, as the hover shows.
    np.testing.assert_allclose(z_of(diff), (sparse - dense).numpy(), rtol=2**-11, atol=0)
    # The mask is split by category: "not selected" under every cell, "selected" above it on its own cells.
    np.testing.assert_array_equal(~np.isnan(z_of(selected)), mask.numpy())
    assert z_of(not_selected).dtype == np.uint8 and z_of(not_selected).shape == mask.shape
    assert "pooled" not in fig.layout.title.text


def test_large_maps_are_pooled_and_say_so():
    dense, sparse, mask = _maps(1100)
    fig = viz.attention_maps(dense, sparse, mask, pool="mean")
    assert all(z_of(tr).shape[0] <= viz.MAX_CELLS and z_of(tr).shape[1] <= viz.MAX_CELLS for tr in heatmaps(fig))
    step = math.ceil(1100 / viz.MAX_CELLS)
    assert f"mean-pooled {step}×{step}" in fig.layout.title.text
    zh = viz.attention_maps(dense, sparse, mask, pool="max", lang="zh")
    assert t("viz.pool_max", "zh") in zh.layout.title.text
    # Pooled cells are named by the original token positions they cover; the last one is ragged.
    x = list(fig.data[0].x)
    last = (1100 - 1) // step * step
    assert len(x) == math.ceil(1100 / step) and x[:2] == [f"0–{step - 1}", f"{step}–{2 * step - 1}"]
    assert x[-1] == (f"{last}–1099" if last < 1099 else "1099")


def test_log_scale_shows_log10_weights():
    dense, sparse, mask = _maps(16)
    fig = viz.attention_maps(dense, sparse, mask, log=True)
    np.testing.assert_allclose(z_of(fig.data[0]), np.log10(np.maximum(dense.numpy(), viz.LOG_FLOOR)), rtol=2**-11)


def test_tokens_label_the_axes_only_when_few():
    dense, sparse, mask = _maps(10)
    tokens = [f"w{i}" for i in range(10)]
    fig = viz.attention_maps(dense, sparse, mask, tokens=tokens)
    assert list(fig.layout.xaxis.ticktext) == tokens and list(fig.layout.yaxis.ticktext) == tokens
    dense, sparse, mask = _maps(60)
    fig = viz.attention_maps(dense, sparse, mask, tokens=[f"w{i}" for i in range(60)])
    assert list(fig.layout.xaxis.ticktext) == ["0", "10", "20", "30", "40", "50"]  # too many: round positions


def test_axis_titles_follow_the_language():
    dense, sparse, mask = _maps(8)
    for lang in ("en", "zh"):
        fig = viz.heatmap(dense, lang=lang)
        assert fig.layout.xaxis.title.text == t("viz.key_axis", lang)
        assert fig.layout.yaxis.title.text == t("viz.query_axis", lang)


def test_head_grid_one_panel_per_head():
    w = torch.rand(6, 50, 50)
    fig = viz.head_grid(w, max_cells=16)
    assert len(fig.data) == 6 and all(z_of(tr).shape == (13, 13) or z_of(tr).shape[0] <= 16 for tr in fig.data)
    assert {tr.coloraxis for tr in fig.data} == {"coloraxis"}


def test_chunked_topk_figure_highlights_the_true_topk():
    x = torch.tensor([5.0, 1, 9, 3, 7, 2, 8, 6, 4, 0])
    fig = viz.chunked_topk_figure(x, 3, 4)
    final = fig.data[-1]
    blue = [i for i, c in zip(final.x, final.marker.color) if c == "#1f77b4"]
    assert sorted(blue) == sorted(torch.topk(x, 3).indices.tolist())
    assert len(fig.data) == 3 + 1  # three chunks and the merge


def test_bad_input_is_named():
    with pytest.raises(ValueError, match="2-d"):
        viz.heatmap(torch.rand(2, 3, 4))
    with pytest.raises(ValueError, match="mode"):
        viz.pool_map(torch.rand(3, 3), 2, "median")
    with pytest.raises(ValueError, match="k must be"):
        viz.chunked_topk_figure(torch.rand(5), 6, 2)
    with pytest.raises(ValueError, match="diff"):
        viz.attention_maps(viz.pool_map(torch.rand(3, 3)), torch.rand(3, 3), torch.rand(3, 3) > 0.5)


def test_curves_are_log_log():
    import pandas as pd

    df = pd.DataFrame({"method": ["a", "a", "b", "b"], "seq_len": [256, 512, 256, 512],
                       "median_ms": [1.0, 4.0, 2.0, 3.0], "iqr_ms": [0.1] * 4})
    fig = viz.scaling_plot(df, names={"a": "A"}, lang="zh")
    assert fig.layout.xaxis.type == fig.layout.yaxis.type == "log" and fig.data[0].name == "A"
    assert fig.layout.xaxis.title.text == t("viz.seq_len_axis", "zh")
    b = viz.budget_curve(df.rename(columns={"seq_len": "budget", "median_ms": "error_mean"}))
    assert len(b.data) == 2 and b.layout.xaxis.type == "log" and b.layout.yaxis.type == "log"


def _sweep_like(seed=0):
    """A sweep-shaped table: three methods over budgets 1..256, one exact at the top budgets and one with a gap."""
    import pandas as pd

    rng = np.random.default_rng(seed)
    budgets = [1, 2, 4, 8, 16, 32, 64, 128, 256]
    rows = []
    for method, slope in (("topk", 1.0), ("quest", 0.5), ("nsa", 0.1)):
        for b in budgets:
            err = float(rng.uniform(0.5, 2.0) * b ** -slope)
            if method != "nsa" and b >= 128:
                err = 0.0 if b == 256 else 3e-16  # exact, and exact up to rounding
            if method == "nsa" and b == 4:
                err = float("inf")
            rows.append({"method": method, "budget": b, "error_mean": err, "error_vs_uniform_mean": 2 * err})
    return pd.DataFrame(rows)


def test_budget_curve_keeps_zero_off_the_log_axis_and_marks_exact_points():
    df = _sweep_like()
    fig = viz.budget_curve(df, exact_below=1e-12, lang="en")
    plotted = np.concatenate([np.asarray(tr.y, dtype=float) for tr in fig.data if tr.y is not None and len(tr.y)])
    plotted = plotted[~np.isnan(plotted)]
    assert (plotted > 0).all() and np.isfinite(plotted).all()  # no zero, negative or inf on the log axis
    real = df.error_mean[(df.error_mean > 1e-12) & np.isfinite(df.error_mean)]
    floor = 10.0 ** (math.floor(math.log10(real.min())) - 1)
    exact = [tr for tr in fig.data if tr.marker.symbol == viz.EXACT_SYMBOL and tr.showlegend is False]
    assert sorted(tr.name for tr in exact) == ["quest", "topk"]
    for tr in exact:
        assert list(tr.x) == [128.0, 256.0] and list(tr.y) == [floor, floor]
        assert list(tr.customdata) == [3e-16, 0.0]  # the hover keeps the measured value
    # Two methods exact at one budget nest as rings of different sizes.
    assert exact[0].marker.size[0] != exact[1].marker.size[0]
    # The lines stop before the exact points and leave a gap at inf.
    main = {tr.name: np.asarray(tr.y, dtype=float) for tr in fig.data if tr.mode == "lines+markers"}
    assert np.isnan(main["topk"][-2:]).all() and np.isnan(main["nsa"][2]) and np.isfinite(main["nsa"][3:]).all()
    # One legend entry explains the markers; the floor's tick says "exact".
    assert [tr.name for tr in fig.data if tr.showlegend is not False and tr.marker.symbol == viz.EXACT_SYMBOL] == [
        t("viz.exact_legend", "en")]
    ax = fig.layout.yaxis
    assert ax.ticktext[0] == t("viz.exact_tick", "en") and ax.tickvals[0] == pytest.approx(floor)
    assert 10 ** ax.range[0] < floor and 10 ** ax.range[1] > df.error_mean[np.isfinite(df.error_mean)].max()


def test_budget_curve_ticks_are_decades_and_budgets():
    fig = viz.budget_curve(_sweep_like(1), y="error_vs_uniform_mean", exact_below=1e-12, lang="zh")
    ax = fig.layout.yaxis
    logs = np.log10(np.asarray(ax.tickvals, dtype=float))
    np.testing.assert_allclose(logs, np.round(logs), atol=1e-12)  # whole decades only
    assert np.all(np.diff(logs) == 1) and len(logs) >= 2
    assert not any("µ" in s or "μ" in s for s in ax.ticktext)  # no SI prefixes on an error axis
    assert all(s in ("0.1", "1", "10", t("viz.exact_tick", "zh")) or s.startswith("10<sup>") for s in ax.ticktext)
    assert list(fig.layout.xaxis.tickvals) == [1, 2, 4, 8, 16, 32, 64, 128, 256]
    assert list(fig.layout.xaxis.ticktext) == ["1", "2", "4", "8", "16", "32", "64", "128", "256"]
    # The chart names its metric, in the reader's language.
    assert ax.title.text == t("viz.error_vs_uniform_axis", "zh")
    assert t("viz.error_vs_uniform_axis", "zh") in fig.layout.title.text
    # A narrow range still gets two decade ticks.
    import pandas as pd

    narrow = viz.budget_curve(pd.DataFrame({"method": ["a", "a"], "budget": [4, 8], "error_mean": [0.3, 0.5]}))
    assert list(narrow.layout.yaxis.tickvals) == [0.1, 1.0]


def test_budget_curve_spans_many_decades_with_every_other_tick():
    import pandas as pd

    df = pd.DataFrame({"method": ["a"] * 3, "budget": [1, 2, 4], "error_mean": [10.0, 1e-3, 1e-9]})
    logs = np.log10(np.asarray(viz.budget_curve(df).layout.yaxis.tickvals, dtype=float))
    assert logs[0] == -9 and logs[-1] == 1 and np.all(np.diff(logs) == 2)


def test_budget_curve_marks_the_current_budget():
    fig = viz.budget_curve(_sweep_like(), exact_below=1e-12, current=32, lang="zh")
    [line] = fig.layout.shapes
    assert line.type == "line" and line.x0 == line.x1 == 32 and (line.y0, line.y1, line.yref) == (0, 1, "paper")
    assert line.label.text == t("viz.current_budget", "zh", value="32")
    own = viz.budget_curve(_sweep_like(), current=8, current_label="k = 8")
    assert own.layout.shapes[0].label.text == "k = 8" and own.layout.shapes[0].x0 == 8
    assert not viz.budget_curve(_sweep_like()).layout.shapes


def test_budget_curve_bad_input_is_named():
    df = _sweep_like()
    with pytest.raises(ValueError, match="no column 'tv_mean'"):
        viz.budget_curve(df, y="tv_mean")
    with pytest.raises(ValueError, match="current must be a finite number > 0"):
        viz.budget_curve(df, current=0)
    with pytest.raises(TypeError, match="exact_below must be a number"):
        viz.budget_curve(df, exact_below="0")
    with pytest.raises(ValueError, match="exact_below must be >= 0"):
        viz.budget_curve(df, exact_below=-1.0)


def test_the_library_and_its_pictures_never_import_streamlit():
    import subprocess
    import sys

    code = ("import sys, sparse_attn, sparse_attn.viz, sparse_attn.methods, sparse_attn.i18n; "
            "assert 'streamlit' not in sys.modules, 'streamlit was imported'")
    subprocess.run([sys.executable, "-c", code], check=True, timeout=120)


def test_the_difference_scale_has_a_floor_so_rounding_noise_stays_white():
    dense = torch.softmax(torch.randn(16, 16), -1)
    noisy = dense + 1e-8 * torch.randn(16, 16)  # float32 rounding between two exact paths
    fig = viz.attention_maps(dense, noisy, torch.ones(16, 16, dtype=torch.bool))
    assert fig.layout.coloraxis2.cmax == viz.DIFF_FLOOR and fig.layout.coloraxis2.cmin == -viz.DIFF_FLOOR
    real = dense.clone()
    real[3, 5] += 0.25  # a real error spans the scale
    fig = viz.attention_maps(dense, real, torch.ones(16, 16, dtype=torch.bool))
    assert abs(fig.layout.coloraxis2.cmax - 0.25) < 1e-6


@settings(max_examples=60, deadline=None)
@given(st.lists(st.floats(width=32, allow_nan=True, allow_infinity=True), min_size=1, max_size=64))
def test_compact_keeps_eleven_significant_bits_and_zeroes_the_rest(values):
    x = np.array(values, np.float32)
    z = viz._compact(x)
    finite = np.isfinite(x)
    assert z.dtype == np.float32 and z.shape == x.shape
    # Rounded to nearest at 2**-11 relative (an overflow to inf only next to float32's largest value).
    ok = np.isinf(z[finite]) & (np.abs(x[finite]) > 3.4e38)
    err = np.abs(z[finite].astype(np.float64) - x[finite])
    # Subnormals (below 1.2e-38, never a weight) keep fewer bits: their error is absolute, half of 2**-136.
    bound = np.maximum(2.0**-11 * np.abs(x[finite].astype(np.float64)), 2.0**-137)
    assert (ok | (err <= bound)).all()
    assert (z[finite].view(np.uint32) & 0x1FFF == 0).all()
    assert np.array_equal(np.signbit(z[finite]), np.signbit(x[finite]))
    assert np.array_equal(np.isnan(z), np.isnan(x)) and np.array_equal(z[np.isinf(x)], x[np.isinf(x)])


def _every_builder(lang):
    dense, sparse, mask = _maps(40)
    grid = torch.stack([dense, sparse, dense.T])
    from sparse_attn import viz_nsa
    figs = [viz.heatmap(dense, lang=lang), viz.attention_maps(dense, sparse, mask, log=True, lang=lang),
            viz.attention_maps(dense, sparse, mask, mask_exact=mask & (dense > dense.mean()), lang=lang),
            viz.head_grid(grid, lang=lang), viz_nsa.nsa_branch_maps(dense, sparse, dense, sparse, lang=lang)]
    return figs


@pytest.mark.parametrize("lang", ["en", "zh"])
def test_unvalidated_map_figures_are_valid_plotly(lang):
    """The map builders skip plotly's validation for speed; rebuilding with validation on must accept them."""
    import plotly.graph_objects as go

    for fig in _every_builder(lang):
        spec = fig.to_dict()
        again = go.Figure(spec)  # raises on any misspelled property or out-of-range value
        assert len(again.data) == len(fig.data) and again.layout.title.text == fig.layout.title.text


def test_subplot_layout_matches_make_subplots():
    from plotly.subplots import make_subplots

    for rows, cols, hs, vs in ((2, 2, 0.1, 0.14), (3, 4, 0.06, 0.08), (1, 3, 0.05, 0.3)):
        titles = [f"p{i}" for i in range(rows * cols)]
        want = make_subplots(rows=rows, cols=cols, subplot_titles=titles, horizontal_spacing=hs,
                             vertical_spacing=vs).layout
        got = viz._subplots(rows, cols, titles, horizontal_spacing=hs, vertical_spacing=vs)
        for i in range(rows * cols):
            n = viz._axis_id(i)
            for ax in ("xaxis", "yaxis"):
                assert got[ax + n]["anchor"] == want[ax + n].anchor
                np.testing.assert_allclose(got[ax + n]["domain"], want[ax + n].domain, atol=1e-9)
        for a, b in zip(got["annotations"], want.annotations, strict=True):
            assert a["text"] == b.text
            assert a["x"] == pytest.approx(b.x) and a["y"] == pytest.approx(b.y)


def test_panels_are_addressed_by_row_and_column_as_on_make_subplots():
    dense, sparse, mask = _maps(16)
    fig = viz.attention_maps(dense, sparse, mask)
    fig.update_xaxes(showticklabels=False, row=1)
    fig.update_yaxes(showticklabels=False, col=2)
    assert [fig.layout[a].showticklabels for a in ("xaxis", "xaxis2", "xaxis3", "xaxis4")] == [False, False, None, None]
    assert [fig.layout[a].showticklabels for a in ("yaxis", "yaxis2", "yaxis3", "yaxis4")] == [None, False, None, False]
    grid = viz.head_grid(torch.stack([dense] * 6), cols=4)
    grid.update_xaxes(range=[0, 3], row=2, col=2)
    assert list(grid.layout.xaxis6.range) == [0, 3] and grid.layout.xaxis5.range is None


def _decoded(obj):
    """A figure's JSON with every typed array ({dtype, bdata, shape}) turned back into a nested list, and unset
    properties left out (plotly.js reads null, {} and a missing key alike: plotly's encoder writes any of them)."""
    if isinstance(obj, dict):
        if set(obj) >= {"dtype", "bdata"}:
            a = np.frombuffer(base64.b64decode(obj["bdata"]), dtype=np.dtype(obj["dtype"]))
            return a.reshape([int(n) for n in obj["shape"].split(",")] if "shape" in obj else -1).tolist()
        out = {k: _decoded(v) for k, v in obj.items()}
        return {k: v for k, v in out.items() if v is not None and v != {}}
    if isinstance(obj, list):
        return [_decoded(v) for v in obj]
    return obj


@pytest.mark.parametrize("lang", ["en", "zh"])
def test_plain_map_figures_encode_as_plotly_encodes_their_figures(lang):
    """``plain=True`` skips plotly's object model, and ``chart_wire`` its encoder: the browser gets the same values."""
    from sparse_attn import viz_nsa
    from sparse_attn.ui import chart_wire

    dense, sparse, mask = _maps(40)
    grid = torch.stack([dense, sparse, dense.T])
    blocks = viz_nsa.block_grid(torch.tensor([[0, 2], [1, 0]]), torch.tensor([[True, False], [False, True]]), 3, 4,
                                importance=torch.rand(2, 3))
    builders = [
        lambda **kw: viz.attention_maps(dense, sparse, mask, log=True, lang=lang, **kw),
        lambda **kw: viz.attention_maps(dense, sparse, mask, mask_exact=mask & (dense > dense.mean()), lang=lang, **kw),
        lambda **kw: viz.head_grid(grid, lang=lang, **kw),
        lambda **kw: viz_nsa.nsa_branch_maps(dense, sparse, dense, sparse, lang=lang, **kw),
        lambda **kw: viz_nsa.block_selection_map(blocks, lang=lang, **kw),
    ]
    for build in builders:
        plain = build(plain=True)
        assert isinstance(plain, dict) and set(plain) == {"data", "layout"}
        want = json.loads(pio.to_json(build(), validate=False))
        payload = chart_wire.pack(plain, config={"displaylogo": False}, failed="x")
        assert len(payload) % 8 == 0 and chart_wire.unpack(payload)["config"] == {"displaylogo": False}
        got = chart_wire.unpack(payload)["figure"]
        np.testing.assert_equal(_decoded(got), _decoded(want))  # NaN (a gap) equals NaN here


def test_the_wire_carries_a_plotly_figure_and_a_dict_with_a_gap_as_plotly_json():
    """What ``chart_wire`` cannot split (a ``go.Figure``; a NaN in a list, which JSON lacks) goes as plotly's JSON."""
    import plotly.graph_objects as go

    from sparse_attn.ui import chart_wire

    fig = go.Figure(go.Scatter(x=[1, 2, 3], y=np.array([1.0, 2.5, 4.0])))
    head = chart_wire.unpack(chart_wire.pack(fig, config={}, failed="x"))
    assert head["blobs"] == [] and _decoded(head["figure"])["data"][0]["y"] == [1.0, 2.5, 4.0]
    gap = {"data": [{"type": "scatter", "y": [1.0, float("nan")], "z": np.ones((2, 2), np.float32)}], "layout": {}}
    head = chart_wire.unpack(chart_wire.pack(gap, config={}, failed="x"))
    assert head["blobs"] == [] and head["figure"]["data"][0]["y"] == [1.0, None]  # plotly writes null
    assert _decoded(head["figure"])["data"][0]["z"] == [[1.0, 1.0], [1.0, 1.0]]
