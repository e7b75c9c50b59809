"""The budget sweep: its table, its exact limit, and its CLI."""
import math
from dataclasses import replace

import pandas as pd
import pytest
import torch

from sparse_attn.ops.dense import dense_attention
from sparse_attn.ops.topk import topk_attention
from sparse_attn.metrics import error_vs_uniform, kl_divergence, relative_error
from sparse_attn.methods import METHODS as REGISTRY, Config
from sparse_attn.ops.sampling import sampled_attention
from sparse_attn.sweep import COLUMNS, budget_sweep, default_methods, format_table, main, sweepable

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
    assert {"topk", "topk_full", "sampling", "hybrid", "nsa", "streaming_llm", "quest"} <= set(sweepable())
    assert all(REGISTRY[m].at_budget is not None and REGISTRY[m].run is not None for m in sweepable())
    assert not {"dense", "nsa_selected", "seed_topk"} & set(sweepable())
    # The command line's default: the methods a reader picks, without the timing twin.
    assert default_methods() == [m for m in sweepable() if m != "topk_full"]
    q, k, v = _qkv()
    for bad in ("sampled", "sampled:lsh", "hybrid:lsh", "nsa_selected", "dense", ""):
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
    assert (full.error_vs_uniform_mean < 1e-10).all() and (full.kl_finite == 1).all() and (full.kl_mean.abs() < 1e-12).all()
    small = table[table.budget == 3]
    assert (small.error_mean > 1e-3).all()
    # Deterministic top-k runs once; sampled methods run every seed and vary across them.
    assert small.set_index("method").loc["topk", "seeds"] == 1 and small.set_index("method").loc["topk", "error_std"] == 0
    assert (small[small.method != "topk"].seeds == 3).all()
    assert (small[small.method == "sampling"].error_std > 0).all()
    # Three of 24 keys drop weight on every row (causal rows 0..2 see at most 3 keys: their KL is finite).
    assert (small[small.method == "topk"].kl_finite == (3 / 6 if causal else 0.0)).all()
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
                 "--methods", "topk", "hybrid", "nsa", "streaming_llm", "quest", "--seeds", "2", "--csv", str(path)]) == 0
    printed = capsys.readouterr().out
    assert "pattern=peaked" in printed and "error_vs_uniform" in printed and "±" in printed
    table = pd.read_csv(path)
    assert list(table.columns) == COLUMNS
    assert set(table.method) == {"topk", "hybrid", "nsa", "streaming_llm", "quest"}
    # No StreamingLLM row at 4 (its 4 sinks fill it) nor NSA row (its compressed keys alone need more).
    assert table.groupby("method").size().to_dict() == {"topk": 2, "hybrid": 2, "nsa": 1, "streaming_llm": 1, "quest": 2}
    # A budget of every key is exact for these; NSA's gates mix its branches, and a non-causal window of
    # 64 keys leaves the first and last queries without the far end.
    exact = table[(table.budget == 64) & table.method.isin(["topk", "hybrid", "quest"])]
    assert len(exact) == 3 and (exact.error_mean < 1e-10).all() and (exact.error_vs_uniform_mean < 1e-10).all()
    assert (table[table.method.isin(["nsa", "streaming_llm"])].error_mean > 1e-6).all()


@pytest.mark.parametrize("causal", [False, True])
def test_every_method_matches_direct_calls(causal):
    q, k, v = _qkv(Lq=20, Lk=64, seed=2)
    ref, p = dense_attention(q, k, v, causal=causal, return_weights=True)
    base = Config(causal=causal, proposal="uniform")
    table = budget_sweep(q, k, v, default_methods(), [6, 60], proposals=["uniform"], seeds=[3], causal=causal,
                         config=base)
    assert set(table.method) == set(default_methods())  # NSA, StreamingLLM and Quest among them
    for row in table.itertuples():
        cfg = REGISTRY[row.method].at_budget(base, row.budget, num_keys=64)
        r = REGISTRY[row.method].run(q, k, v, replace(cfg, seed=3))
        assert row.error_mean == pytest.approx(relative_error(r.output, ref).mean().item(), rel=1e-9)
        assert row.error_vs_uniform_mean == pytest.approx(
            error_vs_uniform(r.output, ref, v, causal=causal, reduce="all").item(), rel=1e-9)
        kl = kl_divergence(p, r.weights.to(p.dtype))
        assert row.kl_finite == torch.isfinite(kl).double().mean().item()
        assert row.keys_attended == pytest.approx(r.mask.sum(-1).double().mean().item(), rel=1e-12)
    # A budget below the compressed keys and NSA's forced blocks has no NSA row; Quest reads whole pages.
    assert 6 not in set(table[table.method == "nsa"].budget)
    quest = table[table.method == "quest"].set_index("budget")
    assert quest.loc[6, "keys_attended"] > 6


def test_kl_is_not_averaged_over_infinite_rows():
    q, k, v = _qkv(Lq=8, Lk=64, seed=3)
    t = budget_sweep(q, k, v, ["topk", "nsa"], [4, 64], seeds=[0]).set_index(["method", "budget"])
    assert t.loc[("topk", 4), "kl_finite"] == 0 and math.isnan(t.loc[("topk", 4), "kl_mean"])
    assert t.loc[("topk", 64), "kl_finite"] == 1 and abs(t.loc[("topk", 64), "kl_mean"]) < 1e-12
    # NSA's compressed branch weighs every key of a whole block: rows can be finite without being exact.
    nsa = t.loc[("nsa", 64)]
    assert nsa.kl_finite == 1 and nsa.kl_mean > 1e-3 and nsa.error_mean > 1e-3


def test_format_table_joins_mean_and_spread():
    q, k, v = _qkv()
    table = budget_sweep(q, k, v, ["topk", "sampling"], [3], proposals=["uniform"], seeds=[0, 1])
    shown = format_table(table).set_index("method")
    assert list(shown.columns) == ["proposal", "budget", "seeds", "error", "error_vs_uniform", "mass_kept", "tv",
                                   "kl_finite", "kl_mean", "keys_attended"]
    s = table.set_index("method").loc["sampling"]
    assert shown.loc["sampling", "error"] == f"{s.error_mean:.4g} ± {s.error_std:.4g}"
    assert shown.loc["topk", "error"] == f"{table.error_mean[0]:.4g}" and shown.loc["topk", "kl_mean"] == "-"


# --- stopping: a deadline, a should_stop callback, progress and a shared reference -----------------------------------

def test_a_past_deadline_runs_nothing_and_says_so():
    import time

    q, k, v = _qkv()
    table = budget_sweep(q, k, v, ["topk", "sampling"], [3, 6], seeds=[0, 1], deadline=time.monotonic() - 1)
    assert table.empty and list(table.columns) == COLUMNS
    # topk runs one seed per budget, sampling two: six runs planned, none done.
    assert table.attrs == {"stopped": "deadline", "runs": (0, 6)}


def test_should_stop_is_asked_before_every_run_and_keeps_only_whole_rows():
    q, k, v = _qkv()
    steps, asked = [], []

    def stop():
        asked.append(len(steps))
        return len(steps) >= 4  # stop once four runs are done: the second sampling row has one of two seeds

    table = budget_sweep(q, k, v, ["topk", "sampling"], [3, 6], seeds=[0, 1], should_stop=stop,
                         on_step=lambda *a: steps.append(a))
    assert steps == [(1, 6, "topk", 3), (2, 6, "topk", 6), (3, 6, "sampling", 3), (4, 6, "sampling", 3)]
    assert asked == [0, 0, 1, 2, 3, 4]  # once before the reference, then before each run
    assert table.attrs == {"stopped": "should_stop", "runs": (4, 6)}
    assert list(zip(table.method, table.budget)) == [("topk", 3), ("topk", 6), ("sampling", 3)]
    # The rows it kept are the rows a full sweep gives.
    full = budget_sweep(q, k, v, ["topk", "sampling"], [3, 6], seeds=[0, 1])
    assert full.attrs == {"stopped": None, "runs": (6, 6)}
    pd.testing.assert_frame_equal(table, full.iloc[:3], check_like=False)


def test_a_deadline_reached_midway_keeps_what_finished():
    import time

    q, k, v = _qkv()
    now = [0.0]
    clock = time.monotonic

    def step(done, total, method, budget):
        if done == 2:
            now[0] = 1e9  # the clock jumps past the deadline after the second run

    import sparse_attn.sweep as sweep_mod

    original = sweep_mod._time.monotonic
    try:
        sweep_mod._time.monotonic = lambda: clock() + now[0]
        table = budget_sweep(q, k, v, ["topk", "hybrid"], [3, 6], seeds=[0], deadline=clock() + 3600, on_step=step)
    finally:
        sweep_mod._time.monotonic = original
    assert table.attrs == {"stopped": "deadline", "runs": (2, 4)}
    assert list(zip(table.method, table.budget)) == [("topk", 3), ("topk", 6)]


def test_a_reference_given_is_used_and_bad_stop_arguments_are_refused():
    q, k, v = _qkv()
    ref = dense_attention(q, k, v, return_weights=True)
    pd.testing.assert_frame_equal(budget_sweep(q, k, v, ["topk"], [3], reference=ref),
                                  budget_sweep(q, k, v, ["topk"], [3]))
    with pytest.raises(TypeError, match="deadline must be"):
        budget_sweep(q, k, v, ["topk"], [3], deadline="soon")
    with pytest.raises(TypeError, match="should_stop must be callable"):
        budget_sweep(q, k, v, ["topk"], [3], should_stop=True)
    with pytest.raises(TypeError, match="on_step must be callable"):
        budget_sweep(q, k, v, ["topk"], [3], on_step=1)
