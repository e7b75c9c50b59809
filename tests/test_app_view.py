"""The maps panel's cached computation: every head and both poolings at once, so view-only changes recompute nothing."""
import numpy as np
import pytest
import torch
from streamlit.testing.v1 import AppTest

from sparse_attn import viz
from sparse_attn.ui import compute
from sparse_attn.ui.charts import elements as chart_elements
from tests.test_app import APP, ok


def _maps(H=3, Lq=700, Lk=1100, seed=0):
    g = torch.Generator().manual_seed(seed)
    dense = torch.softmax(torch.randn(H, Lq, Lk, generator=g) * 3, dim=-1)
    keep = torch.rand(H, Lq, Lk, generator=g) < 0.05
    sparse = torch.where(keep, dense, 0.0)
    sparse = sparse / sparse.sum(-1, keepdim=True).clamp(min=1e-30)
    exact = keep & (torch.rand(H, Lq, Lk, generator=g) < 0.5)
    return dense, sparse, keep, exact


@pytest.mark.parametrize("shape", [(3, 700, 1100), (2, 200, 300), (1, 1, 1)])
def test_pooled_maps_match_pooling_each_head_alone(shape):
    # The derived pools (a mean difference from two means, a boolean max from its mean) must equal
    # viz.pool_map on the full map, head by head, to float16's rounding.
    dense, sparse, mask, exact = _maps(*shape)
    maps = compute.pooled_maps(dense, sparse, mask, exact)
    direct = {"dense": dense, "sparse": sparse, "mask": mask.float(), "exact": exact.float(), "diff": sparse - dense}
    for pool in compute.POOLS:
        for kind, full in direct.items():
            for h in range(shape[0]):
                got = maps[pool][kind].head(h)
                want = viz.pool_map(full[h], viz.MAX_CELLS, pool, signed=kind == "diff")
                assert (got.step_q, got.step_k, got.shape) == (want.step_q, want.step_k, want.shape)
                if kind in ("mask", "exact") and pool == "max":
                    assert np.array_equal(got.values > 0, want.values > 0), (pool, kind, h)
                else:
                    np.testing.assert_allclose(got.values, want.values, rtol=2e-3, atol=2e-6, err_msg=f"{pool} {kind} {h}")
                assert got.values.dtype == np.float32


def test_maps_small_enough_to_draw_as_they_are_are_stored_once():
    dense, sparse, mask, _ = _maps(2, 64, 64)
    maps = compute.pooled_maps(dense, sparse, mask)
    assert maps["max"] is maps["mean"]
    assert maps["max"]["dense"].mode == "none" and maps["max"]["dense"].values.dtype == np.float16


@pytest.mark.parametrize("L", [600, 1024, 130])  # grid pooled from the raw map, from the pooled map, from a "none"
def test_pick_clamps_the_head_and_returns_its_maps(L):
    dense, sparse, mask, _ = _maps(2, L, L)
    data = {"shape": (2, L, L), "maps": compute.pooled_maps(dense, sparse, mask),
            "grid": {p: compute._grid(compute.pooled_maps(dense, sparse, mask)[p]["sparse"], sparse, p)
                     for p in compute.POOLS}}
    view = compute.pick(data, 7, "mean")
    assert view["head"] == 1
    np.testing.assert_allclose(view["maps"]["dense"].values, viz.pool_map(dense[1], viz.MAX_CELLS, "mean").values,
                               rtol=2e-3, atol=1e-7)
    grid = viz.pool_map(sparse[1], compute.GRID_CELLS, "mean")
    assert (view["grid"][1].step_q, view["grid"][1].shape) == (grid.step_q, grid.shape)
    np.testing.assert_allclose(view["grid"][1].values, grid.values, rtol=2e-3, atol=1e-7)


def _calls(path) -> int:
    return path.read_text().count("view") if path.exists() else 0


def test_view_only_changes_recompute_nothing(tmp_path, monkeypatch):
    log = tmp_path / "calls.log"
    monkeypatch.setenv(compute.CALL_LOG_ENV, str(log))
    compute.view.clear()
    at = AppTest.from_file(APP, default_timeout=120)
    at.query_params["L"] = "1024"  # pooled: "max" and "mean" differ
    at.run()
    ok(at)
    assert _calls(log) == 1
    before = chart_elements(at)[0].proto.bytes
    for change in (lambda: at.radio(key="pool").set_value("mean"), lambda: at.toggle(key="log").set_value(True),
                   lambda: at.slider(key="head").set_value(2), lambda: at.radio(key="lang").set_value("zh")):
        change()
        at.run()
        ok(at)
        assert _calls(log) == 1  # still the first run's computation
    assert chart_elements(at)[0].proto.bytes != before  # and the picture did change
    at.slider(key="top_k").set_value(16)
    at.run()
    ok(at)
    assert _calls(log) == 2  # a setting that changes the attention does recompute
