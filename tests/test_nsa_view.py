"""The NSA view: per-branch numbers against a direct count over the branch maps, forced blocks, pooling, both languages."""
import base64
import math
import pickle

import numpy as np
import pytest
import torch
from streamlit.testing.v1 import AppTest

from sparse_attn import viz, viz_nsa
from sparse_attn.i18n import LANGS, t
from sparse_attn.methods import METHODS, Config
from sparse_attn.ops.dense import allowed_pairs, dense_attention
from sparse_attn.ops.nsa import NSAMaps, nsa_attention
from sparse_attn.ui import nsa_panel
from sparse_attn.ui.charts import elements as chart_elements
from sparse_attn.ui.charts import spec as chart_spec
from sparse_attn.viz import pool_map

# Partial last blocks (L not a multiple of the block sizes), grouped-query heads sharing one selection,
# overlapping compressed blocks, forcing on and off (off leaves empty slots early in causal rows).
CASES = [
    dict(causal=False, L=90, stride=None, initial=1, local=2, window=12),
    dict(causal=True, L=90, stride=None, initial=1, local=2, window=12),
    dict(causal=True, L=77, stride=4, initial=0, local=0, window=5),
    dict(causal=False, L=64, stride=4, initial=0, local=1, window=100),
]


def run(case, *, B=2, H=4, Hkv=2, D=16, block=8, n=4, seed=0):
    g = torch.Generator().manual_seed(seed)
    L = case["L"]
    q = torch.randn(B, H, L, D, generator=g, dtype=torch.float64)
    k = torch.randn(B, Hkv, L, D, generator=g, dtype=torch.float64)
    v = torch.randn(B, Hkv, L, D, generator=g, dtype=torch.float64)
    kw = dict(sliding_window_size=case["window"], compress_block_size=block, selection_block_size=block,
              num_selected_blocks=n, compress_block_sliding_stride=case["stride"], num_initial_blocks=case["initial"],
              num_local_blocks=case["local"], causal=case["causal"])
    _, maps = nsa_attention(q, k, v, gates=(1 / 3, 1 / 3, 1 / 3), return_maps=True, **kw)
    _, dense = dense_attention(q, k, v, causal=case["causal"], return_weights=True)
    return maps, dense, kw


def metrics_of(maps, dense, kw):
    return viz_nsa.branch_metrics(maps, dense, causal=kw["causal"], sliding_window_size=kw["sliding_window_size"],
                                  selection_block_size=kw["selection_block_size"],
                                  compress_block_size=kw["compress_block_size"],
                                  compress_block_sliding_stride=kw["compress_block_sliding_stride"])


@pytest.mark.parametrize("case", CASES, ids=lambda c: f"causal={c['causal']}-L{c['L']}-stride{c['stride']}")
def test_branch_metrics_match_a_direct_count_over_the_maps(case):
    """In float64 no weight underflows, so a map's support is exactly the keys its branch read."""
    maps, p, kw = run(case)
    got = metrics_of(maps, p, kw)
    B, H, Lq, Lk = p.shape
    support = {b: getattr(maps, b) > 0 for b in viz_nsa.BRANCHES}
    support["exact"] = support["selected"] | support["sliding"]
    allowed = allowed_pairs(Lq, Lk, kw["causal"])
    summaries = (maps.compressed_weights > 0).sum(-1).double().mean(dim=(0, 2))
    for row in viz_nsa.METRIC_ROWS:
        s = support[row]
        want = {
            "covered": s.sum(-1).double().mean(dim=(0, 2)),
            "mass_kept": (p * s).sum(-1).mean(dim=(0, 2)),
            "sparsity": 1 - s.sum(dim=(0, 2, 3)).double() / (B * allowed),
            "summaries": summaries if row in ("compressed", "combined") else torch.zeros(H, dtype=torch.float64),
            "tokens": (torch.zeros(H, dtype=torch.float64) if row == "compressed" else
                       support["exact" if row == "combined" else row].sum(-1).double().mean(dim=(0, 2))),
        }
        if row != "exact":
            want["total_variation"] = 0.5 * (getattr(maps, row) - p).abs().sum(-1).mean(dim=(0, 2))
        for col, value in want.items():
            np.testing.assert_allclose(got[row][col], value.numpy(), rtol=1e-9, atol=1e-12, err_msg=f"{row} {col}")
    assert np.isnan(got["exact"]["total_variation"]).all()


def test_the_numbers_tell_the_compressed_branch_from_the_exact_part():
    """The case the old single map hid: the mix covers every key while the exact part reads few."""
    maps, p, kw = run(dict(CASES[0], L=96))  # whole blocks only: the compressed branch summarises every key
    m = metrics_of(maps, p, kw)
    assert np.allclose(m["combined"]["sparsity"], 0) and np.allclose(m["combined"]["mass_kept"], 1)
    assert np.allclose(m["compressed"]["tokens"], 0) and (m["compressed"]["summaries"] == 96 // 8).all()
    assert (m["exact"]["sparsity"] > 0.5).all() and (m["exact"]["mass_kept"] < 0.95).all()
    assert (m["exact"]["covered"] <= m["selected"]["covered"] + m["sliding"]["covered"]).all()


def brute_categories(maps):
    B, Hs, Lq, S = maps.block_indices.shape
    want = np.zeros((B, Hs, Lq, maps.importance.shape[-1]), np.int8)
    for idx in np.ndindex(B, Hs, Lq, S):
        blk = int(maps.block_indices[idx])
        if blk >= 0:
            want[idx[:3] + (blk,)] = viz_nsa.FORCED if bool(maps.forced[idx]) else viz_nsa.PICKED
    return want


@pytest.mark.parametrize("case", CASES[:3], ids=["forced", "forced-causal", "no-forcing-causal"])
def test_forced_blocks_are_marked_exactly_where_the_maps_say(case):
    maps, _, _ = run(case)
    want = brute_categories(maps)
    got = viz_nsa.selection_categories(maps.block_indices, maps.forced, maps.importance.shape[-1]).numpy()
    np.testing.assert_array_equal(got, want)
    assert (want == viz_nsa.FORCED).any() == bool(case["initial"] + case["local"])
    if not case["initial"]:
        # causal without forcing: the first queries see fewer blocks than slots; -1 must not mark block 0
        assert (maps.block_indices == -1).any()
    # The figure: one trace per kind, non-empty exactly on that kind's cells, hover naming the kind.
    for lang in LANGS:
        grid = viz_nsa.block_grid(maps.block_indices[1, 1], maps.forced[1, 1], maps.importance.shape[-1], 8,
                                  importance=maps.importance[1, 1])
        fig = viz_nsa.block_selection_map(grid, lang=lang)
        by_name = {tr.name: tr for tr in fig.data}
        for kind, key in enumerate(viz_nsa.CATEGORY_KEYS):
            cells = want[1, 1] == kind
            if not cells.any():
                assert t(key, lang) not in by_name
                continue
            tr = by_name[t(key, lang)]
            np.testing.assert_array_equal(~np.isnan(np.asarray(tr.z, dtype=float)), cells)
            assert t(key, lang) in tr.hovertemplate and tr.showlegend
            np.testing.assert_allclose(np.asarray(tr.z, dtype=float)[cells],
                                       maps.importance[1, 1].numpy()[cells], rtol=2**-11)  # viz._compact


def test_pooled_block_grid_keeps_the_strongest_mark():
    maps, _, _ = run(dict(causal=True, L=90, stride=None, initial=1, local=2, window=12), n=3)
    full = viz_nsa.selection_categories(maps.block_indices, maps.forced, 12)[0, 0].numpy()
    grid = viz_nsa.block_grid(maps.block_indices[0, 0], maps.forced[0, 0], 12, 8, max_cells=8)
    assert (grid.step_q, grid.step_b) == (12, 2) and grid.categories.shape == (8, 6) and grid.shape == (90, 12)
    for r, c in np.ndindex(*grid.categories.shape):
        assert grid.categories[r, c] == full[r * 12:(r + 1) * 12, c * 2:(c + 1) * 2].max()


def test_bad_inputs_name_the_argument():
    maps, p, kw = run(CASES[0])
    with pytest.raises(ValueError, match="forced"):
        viz_nsa.selection_categories(maps.block_indices, maps.forced[..., :1], 12)
    with pytest.raises(ValueError, match="num_blocks"):
        viz_nsa.selection_categories(maps.block_indices, maps.forced, 2)
    with pytest.raises(ValueError, match="dense_weights"):
        metrics_of(maps, p[:, :2], kw)
    with pytest.raises(TypeError, match="BlockGrid"):
        viz_nsa.block_selection_map(maps.block_indices)
    with pytest.raises(ValueError, match="shares"):
        viz_nsa.row_mix(torch.zeros(4, 2), torch.zeros(4, 2))


def test_gate_mix_shows_a_branch_that_sees_no_key_yet():
    maps, _, _ = run(CASES[1])
    shares = viz_nsa.branch_shares(maps)
    # causal: before query 7 no compressed block of 8 has ended, so that branch adds nothing and rows sum to 2/3
    assert torch.allclose(shares[..., :7, 0], torch.zeros(()).double())
    assert torch.allclose(shares[..., 7:, :], torch.full((), 1 / 3).double())
    mix = viz_nsa.row_mix(shares[0, 0], maps.gates[0, 0], max_cells=30)
    assert mix.step == 3 and mix.values.shape == (30, 3)
    np.testing.assert_allclose(mix.values[2], shares[0, 0, 6:9].mean(0).numpy(), rtol=1e-6)
    fig = viz_nsa.gate_mix(mix, equal_gates=True, lang="zh")
    assert [tr.name for tr in fig.data] == [t(f"nsa.branch.{b}", "zh") for b in viz_nsa.MIX_BRANCHES]
    assert fig.data[0].x[:2] == ("0–2", "3–5")  # pooled queries named by range, never a half position
    assert fig.layout.title.text == t("nsa.gates_title_equal", "zh")


def test_figures_in_both_languages():
    maps, p, kw = run(CASES[0])
    titles = {}
    for lang in LANGS:
        fig = viz_nsa.nsa_branch_maps(*(getattr(maps, b)[0, 0] for b in viz_nsa.BRANCHES), lang=lang)
        subplot = [a.text for a in fig.layout.annotations]
        assert subplot == [t(f"nsa.map.{b}", lang) for b in viz_nsa.BRANCHES]
        assert fig.layout.title.text == t("nsa.maps_title", lang)
        assert len(fig.data) == 4 and all(tr.coloraxis == "coloraxis" for tr in fig.data)  # one colour scale
        assert t("viz.query_axis", lang) in (fig.layout.yaxis.title.text, fig.layout.yaxis3.title.text)
        grid = viz_nsa.block_grid(maps.block_indices[0, 0], maps.forced[0, 0], maps.importance.shape[-1], 8)
        blocks = viz_nsa.block_selection_map(grid, lang=lang)
        assert blocks.layout.xaxis.title.text == t("nsa.block_axis", lang, size=8)
        titles[lang] = (fig.layout.title.text, blocks.layout.title.text, subplot)
    assert titles["en"] != titles["zh"]
    # one colour scale: its top is the largest weight of the four maps
    top = max(float(getattr(maps, b)[0, 0].max()) for b in viz_nsa.BRANCHES)
    assert math.isclose(fig.layout.coloraxis.cmax, top, rel_tol=1e-6)
    # hover names the cell: "query 3 → key 5: weight ..."
    assert "%{y}" in fig.data[0].hovertemplate and "%{x}" in fig.data[0].hovertemplate


def app_run(L=64, H=4, causal=True, pattern="sink_local"):
    from sparse_attn.sources import synthetic_qkv

    cfg = Config(causal=causal)
    q, k, v = synthetic_qkv(pattern, heads=H, length=L, head_dim=32, seed=0)
    with torch.no_grad():
        dense = METHODS["dense"].run(q, k, v, cfg)
        res = METHODS["nsa"].run(q, k, v, cfg)
    return res, dense, cfg


def test_prepare_keeps_every_head_and_both_poolings_small():
    res, dense, cfg = app_run(L=640, H=2)
    maps = res.extras["nsa"]
    data = nsa_panel.prepare(maps, dense.weights.float(), cfg)
    pickle.dumps(data)  # st.cache_data pickles it
    cells = nsa_panel.map_cells(2, 640, 640)
    assert cells == viz.MAX_CELLS  # two heads fit the budget at full resolution
    step = math.ceil(640 / cells)
    n = math.ceil(640 / step)
    for pool in ("max", "mean"):
        for b in viz_nsa.BRANCHES:
            arr = data["maps"][pool][b]
            assert arr.shape == (2, n, n) and arr.dtype == np.float16
            want = pool_map(getattr(maps, b)[0, 1], cells, pool).values
            np.testing.assert_allclose(arr[1].astype(np.float32), want, rtol=2e-3, atol=1e-7)
    drawn = nsa_panel.pooled_maps(data, 1, "mean")
    assert drawn[0].mode == "mean" and (drawn[0].step_q, drawn[0].step_k) == (step, step) and drawn[0].shape == (640, 640)
    assert data["blocks"]["categories"].shape == (2, n, 40) and data["blocks"]["steps"] == (step, 1)
    assert data["mix"]["values"].shape == (2, n, 3)
    # the numbers are the library's, per head
    want = viz_nsa.branch_metrics(maps, dense.weights.float(), causal=True, sliding_window_size=32,
                                  selection_block_size=16, compress_block_size=16)
    np.testing.assert_allclose(data["metrics"]["exact"]["mass_kept"], want["exact"]["mass_kept"])
    assert data["equal_gates"] and data["settings"]["selection_heads"] == 2


def test_many_heads_at_long_sequences_stay_small():
    # 16 heads: cells per side halve until the four maps x two poolings fit the budget (L=4096 costs the same).
    assert nsa_panel.map_cells(16, 4096, 4096) <= viz.MAX_CELLS and nsa_panel.map_cells(4, 4096, 4096) == viz.MAX_CELLS
    for H, L in ((16, 4096), (4, 4096), (16, 1024), (1, 8192)):
        c = min(L, nsa_panel.map_cells(H, L, L))
        assert 4 * H * 2 * c * c * 2 <= nsa_panel.MAP_BYTES
    # a real prepare at 16 heads, from maps of the right shapes (random weights: only sizes matter here)
    B, H, L, S, Nsel = 1, 16, 1024, 4, 64
    g = torch.Generator().manual_seed(0)
    w = [torch.rand(B, H, L, L, generator=g) for _ in range(4)]
    idx = torch.stack([torch.randperm(Nsel, generator=g)[:S] for _ in range(H * L)]).view(B, H, L, S)
    maps = NSAMaps(*w, torch.rand(B, H, L, 64, generator=g), torch.rand(B, H, L, Nsel, generator=g), idx,
                   torch.full((B, H, L, 3), 1 / 3), idx < 8)
    data = nsa_panel.prepare(maps, w[3], Config())
    size = len(pickle.dumps(data))
    assert data["maps"]["max"]["selected"].shape == (16, 256, 256)
    assert size < 24 * 2**20, size


def _view_script():
    """The NSA view on its own, as the maps panel calls it (run by AppTest; settings from session_state)."""
    import streamlit as st
    import torch

    from sparse_attn.methods import METHODS, Config
    from sparse_attn.sources import synthetic_qkv
    from sparse_attn.ui import nsa_panel

    ss = st.session_state
    cfg = Config(causal=True)
    q, k, v = synthetic_qkv("sink_local", heads=4, kv_heads=ss["kv_heads"], length=96, head_dim=32, seed=0)
    with torch.no_grad():
        dense = METHODS["dense"].run(q, k, v, cfg)
        res = METHODS["nsa"].run(q, k, v, cfg)
    data = nsa_panel.prepare(res.extras["nsa"], dense.weights.float(), cfg)
    nsa_panel.render(data, head=ss["head"], pool="max", log=ss["log"], tokens=None, lang=ss["lang"])


def _app(lang: str, head: int = 1, log: bool = False, kv_heads: int | None = None) -> AppTest:
    at = AppTest.from_function(_view_script, default_timeout=120)
    at.session_state["lang"] = lang
    at.session_state["head"] = head
    at.session_state["log"] = log
    at.session_state["kv_heads"] = kv_heads
    return at.run()


def _spec(chart) -> dict:
    return chart_spec(chart)


def _z(trace: dict) -> np.ndarray:
    zz = trace["z"]
    if isinstance(zz, dict):
        return np.frombuffer(base64.b64decode(zz["bdata"]), zz["dtype"]).reshape(
            [int(n) for n in zz["shape"].split(",")])
    return np.asarray(zz, dtype=float)


@pytest.mark.parametrize("lang", LANGS)
def test_render_draws_the_view_with_a_note_under_each_picture(lang):
    at = _app(lang)
    assert not at.exception, [e.message for e in at.exception]
    charts = chart_elements(at)
    specs = [_spec(c) for c in charts]
    assert len(specs) == 3
    branches, blocks, gates = specs
    assert branches["layout"]["title"]["text"].startswith(t("nsa.maps_title_head", lang, h=1))
    assert [a["text"] for a in branches["layout"]["annotations"]] == [t(f"nsa.map.{b}", lang) for b in viz_nsa.BRANCHES]
    assert all(_z(tr).size and np.nanmax(_z(tr)) > 0 for tr in branches["data"])
    assert {tr["name"] for tr in blocks["data"]} >= {t("nsa.block.forced", lang), t("nsa.block.picked", lang)}
    assert [tr["name"] for tr in gates["data"]] == [t(f"nsa.branch.{b}", lang) for b in viz_nsa.MIX_BRANCHES]
    captions = " ".join(c.value for c in at.caption)
    assert captions.count(f"notebooks/{lang}/ch5_blocks.ipynb") == 3
    assert t("nsa.gates_equal_note", lang) in captions and t("nsa.table_note", lang, h=1) in captions
    table = at.dataframe[0].value
    assert list(table.columns)[0] == t("nsa.col.branch", lang) and len(table) == len(viz_nsa.METRIC_ROWS)
    assert at.subheader[0].value == t("nsa.title", lang, h=1)


def test_render_follows_the_head_and_log_scale_and_names_a_shared_selection():
    at = _app("en", head=3, log=True, kv_heads=2)
    assert not at.exception, [e.message for e in at.exception]
    branches = _spec(chart_elements(at)[0])
    assert t("nsa.maps_title_head", "en", h=3) in branches["layout"]["title"]["text"]
    assert np.nanmax(_z(branches["data"][0])) <= 0  # log10 of weights <= 1
    captions = " ".join(c.value for c in at.caption)
    assert t("nsa.blocks_shared", "en", g=2) in captions


def test_half_precision_runs_keep_the_equal_gate_note_and_count_every_key_read():
    """float16 maps flush tiny weights to 0: the counts come from the blocks and the window, not from the map."""
    from sparse_attn.sources import synthetic_qkv

    cfg = Config(causal=True)
    q, k, v = (x.half() for x in synthetic_qkv("retrieval", heads=2, length=96, head_dim=32, seed=0))
    with torch.no_grad():
        dense = METHODS["dense"].run(q, k, v, cfg)
        res = METHODS["nsa"].run(q, k, v, cfg)
    maps = res.extras["nsa"]
    data = nsa_panel.prepare(maps, dense.weights.float(), cfg)
    assert data["equal_gates"]
    window = data["metrics"]["sliding"]["covered"]
    np.testing.assert_allclose(window, sum(min(i + 1, 32) for i in range(96)) / 96)
