"""The budget sweep: its table, its exact limit, and its CLI."""
import math

import pandas as pd
import pytest
import torch

from sparse_attn.ops.dense import dense_attention
from sparse_attn.ops.topk import topk_attention
from sparse_attn.metrics import relative_error
from sparse_attn.methods import METHODS as REGISTRY, Config
from sparse_attn.ops.sampling import sampled_attention
from sparse_attn.sweep import COLUMNS, budget_sweep, main, sweepable

F64 = torch.float64
METHODS = ["topk", "sampling", "hybrid"]
PROPOSALS = ["uniform", "oracle", "lsh"]
# (method, proposal) rows the table holds: sampling with each proposal, the hybrid with two.
ROWS = [("topk", ""), ("sampling", "uniform"), ("sampling", "oracle"), ("sampling", "lsh"), ("hybrid", "uniform"),
        ("hybrid", "lsh")]


def _qkv(Lq=6, Lk=24, seed=0):
    g = torch.Generator().manual_seed(seed)
    return (torch.randn(1, 2, Lq, 8, generator=g, dtype=F64), torch.randn(1, 1, Lk, 8, generator=g, dtype=F64),
            torch.randn(1, 1, Lk, 4, generator=g, dtype=F64))


def test_only_registry_keys_a_budget_drives():
    assert sweepable() == ["topk", "topk_full", "sampling", "hybrid"]
    assert all(m in REGISTRY for m in sweepable())
    q, k, v = _qkv()
    for bad in ("sampled", "sampled:lsh", "hybrid:lsh", "nsa", "dense", ""):
        with pytest.raises(ValueError, match="method must be"):
            budget_sweep(q, k, v, [bad], [4])
    with pytest.raises(ValueError, match="proposal must be"):
        budget_sweep(q, k, v, ["sampling"], [4], proposals=["gauss"])


def test_hybrid_splits_the_budget():
    q, k, v = _qkv()
    cfg = REGISTRY["hybrid"].at_budget(Config(), 7)
    assert (cfg.top_k, cfg.num_samples) == (3, 4)
    assert REGISTRY["hybrid"].at_budget(Config(), 1) is None  # no exact key and draw in a budget of one
    _, sel = sampled_attention(q, k, v, cfg.num_samples, top_k=cfg.top_k, generator=torch.Generator().manual_seed(0),
                               return_selection=True)
    _, top = topk_attention(q, k, v, 3, return_selection=True)
    assert sel.indices.shape[-1] == 7
    assert torch.equal(sel.indices[..., :3].sort(-1).values, top.indices.sort(-1).values)


@pytest.mark.parametrize("causal", [False, True])
def test_table_and_full_budget(causal):
    q, k, v = _qkv()
    table = pd.concat([budget_sweep(q, k, v, METHODS[:2], [3, 24, 50], proposals=PROPOSALS, seeds=[0, 1, 2],
                                    causal=causal),
                       budget_sweep(q, k, v, ["hybrid"], [3, 24, 50], proposals=["uniform", "lsh"], seeds=[0, 1, 2],
                                    causal=causal)], ignore_index=True)
    assert isinstance(table, pd.DataFrame) and list(table.columns) == COLUMNS
    assert len(table) == len(ROWS) * 3
    assert table.groupby(["method", "proposal"]).size().to_dict() == {r: 3 for r in ROWS}
    full = table[table.budget >= 24]
    assert (full.error_mean < 1e-10).all() and (full.error_std < 1e-10).all()
    assert (full.mass_kept_mean > 1 - 1e-12).all() and (full.tv_mean < 1e-12).all()
    small = table[table.budget == 3]
    assert (small.error_mean > 1e-3).all()
    # Deterministic top-k runs once; sampled methods run every seed and vary across them.
    assert small.set_index("method").loc["topk", "seeds"] == 1 and small.set_index("method").loc["topk", "error_std"] == 0
    assert (small[small.method != "topk"].seeds == 3).all()
    assert (small[small.method == "sampling"].error_std > 0).all()
    assert table.time_ms.isna().all()


def test_numbers_match_direct_calls():
    q, k, v = _qkv(seed=1)
    ref = dense_attention(q, k, v)
    table = budget_sweep(q, k, v, ["topk", "sampling"], [5], proposals=["uniform"], seeds=[4, 9]).set_index("method")
    out = topk_attention(q, k, v, 5)
    assert table.loc["topk", "error_mean"] == pytest.approx(relative_error(out, ref).mean().item(), rel=1e-12)
    errs = [relative_error(sampled_attention(q, k, v, 5, proposal="uniform",
                                             generator=torch.Generator().manual_seed(s)), ref).mean().item()
            for s in (4, 9)]
    assert table.loc["sampling", "error_mean"] == pytest.approx(sum(errs) / 2, rel=1e-12)
    assert table.loc["sampling", "error_std"] == pytest.approx(abs(errs[0] - errs[1]) / 2, rel=1e-9)


def test_timing_column():
    q, k, v = _qkv()
    table = budget_sweep(q, k, v, ["topk"], [4], seeds=[0], time=True, min_run_time=0.01)
    assert math.isfinite(table.time_ms[0]) and math.isfinite(table.time_iqr_ms[0])


def test_bad_input():
    q, k, v = _qkv()
    with pytest.raises(ValueError, match="budget"):
        budget_sweep(q, k, v, ["topk"], [0])
    with pytest.raises(ValueError, match="method"):
        budget_sweep(q, k, v, ["dense"], [4])
    with pytest.raises(ValueError, match="seeds"):
        budget_sweep(q, k, v, ["topk"], [4], seeds=[])


def test_cli_writes_csv(tmp_path, capsys):
    path = tmp_path / "sweep.csv"
    assert main(["--pattern", "peaked", "--length", "64", "--heads", "2", "--head-dim", "32", "--budgets", "4", "64",
                 "--methods", "topk", "hybrid", "--seeds", "2", "--csv", str(path)]) == 0
    printed = capsys.readouterr().out
    assert "pattern=peaked" in printed and "hybrid" in printed
    table = pd.read_csv(path)
    assert list(table.columns) == COLUMNS and len(table) == 4
    assert (table[table.budget == 64].error_mean < 1e-10).all()
