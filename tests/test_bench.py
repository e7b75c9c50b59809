"""The benchmark tools: the seed baseline computes the right thing, and the CLI measures and reports."""
import json

import pytest
import torch

from sparse_attn import bench
from sparse_attn.attention import topk_attention


@pytest.mark.parametrize("causal", [False, True])
@pytest.mark.parametrize("heads", [(4, 4), (4, 2)])
@pytest.mark.parametrize("top_k", [3, 40])
def test_seed_baseline_is_top_k_attention(causal, heads, top_k):
    H, Hkv = heads
    g = torch.Generator().manual_seed(3)
    q = torch.randn(2, H, 25, 8, generator=g, dtype=torch.float64)
    k = torch.randn(2, Hkv, 25, 8, generator=g, dtype=torch.float64)
    v = torch.randn(2, Hkv, 25, 5, generator=g, dtype=torch.float64)
    ref = topk_attention(q, k, v, top_k, causal=causal)
    torch.testing.assert_close(bench.seed_topk_attention(q, k, v, top_k, causal=causal), ref, rtol=1e-10, atol=1e-10)


def test_time_fn_gives_at_least_min_runs():
    t = bench.time_fn(lambda: torch.ones(64).sum(), min_run_time=0.01, min_runs=4)
    assert t.runs >= 4 and t.median > 0 and t.iqr >= 0 and min(t.times) <= t.median <= max(t.times)


@pytest.mark.parametrize("method", ["sdpa", "seed_topk", "full_topk", "streaming_topk"])
def test_measure_case_in_a_fresh_process(method):
    case = bench.Case(method=method, length=256, heads=2, head_dim=16, top_k=8, chunk_size=64,
                      min_run_time=0.01, min_runs=3)
    row = bench.run_case_subprocess(case, timeout=120)
    assert "error" not in row, row
    assert row["runs"] >= 3 and row["median_s"] > 0
    assert row["peak_rss_bytes"] > row["peak_extra_bytes"] >= 0


def test_streaming_holds_less_than_the_full_score_matrix():
    # The full-score modes hold an (H, L, L) float32 matrix: 2 * 2048^2 * 4 B = 32 MiB.
    rows = {m: bench.run_case_subprocess(bench.Case(method=m, length=2048, heads=2, head_dim=16, top_k=8,
                                                    chunk_size=128), timing=False, timeout=120)
            for m in ("seed_topk", "streaming_topk")}
    assert rows["seed_topk"]["peak_extra_bytes"] > 32 * 2**20
    assert rows["streaming_topk"]["peak_extra_bytes"] < rows["seed_topk"]["peak_extra_bytes"] / 4


def test_bad_cases_are_named():
    with pytest.raises(ValueError, match="method must be one of"):
        bench.measure_case(bench.Case(method="nope", length=8))
    if not torch.cuda.is_available():
        with pytest.raises(ValueError, match="CUDA is not available"):
            bench.measure_case(bench.Case(method="sdpa", length=8, device="cuda"))


def test_topk_cli_writes_a_table_and_json(tmp_path, capsys):
    out = tmp_path / "rows.json"
    rc = bench.main(["topk", "--lengths", "64", "--heads", "2", "--head-dim", "8", "--top-k", "4",
                     "--chunk-size", "16", "--min-run-time", "0.01", "--min-runs", "2", "--json", str(out)])
    assert rc == 0
    printed = capsys.readouterr().out
    assert "| streaming_topk | 64 |" in printed and "| seed_topk | 64 |" in printed
    rows = json.loads(out.read_text())
    assert {r["method"] for r in rows} == {"sdpa", "seed_topk", "full_topk", "streaming_topk"}


def test_sweep_goes_on_past_a_case_that_cannot_run(tmp_path):
    out = tmp_path / "sweep"
    rc = bench.main(["sweep", "--methods", "sdpa", "streaming_topk", "--lengths", "32", "--heads", "2",
                     "--head-dims", "8", "--top-k", "4", "--chunk-sizes", "8", "--devices", "cpu", "cuda",
                     "--min-run-time", "0.01", "--min-runs", "2", "--out", str(out), "--no-progress"])
    assert rc == 0
    rows = json.loads((tmp_path / "sweep.json").read_text())["rows"]
    assert (tmp_path / "sweep.csv").exists() and "plotly" in (tmp_path / "sweep.html").read_text().lower()
    cpu = [r for r in rows if r["device"] == "cpu"]
    assert len(cpu) == 2 and all(r.get("median_s", 0) > 0 for r in cpu)
    if not torch.cuda.is_available():
        cuda = [r for r in rows if r["device"] == "cuda"]
        assert cuda and all(r.get("note") or r.get("error") for r in cuda)
