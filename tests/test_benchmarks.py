"""The benchmark tools: the seed baseline computes the right thing, and the CLI measures and reports."""
import json
import subprocess
import sys

import pytest
import torch
import torch.nn.functional as F

from benchmarks.cases import Case, sweep_cases
from benchmarks.cli import main
from benchmarks.report import report_html, sweep_figures, upgrade_row
from benchmarks.runner import add_speedup, measure_case, run_case_subprocess, run_sweep, timed_call
from sparse_attn.methods import METHODS
from sparse_attn.ops.sampling import sampled_attention
from sparse_attn.ops.seed_topk import seed_topk_attention
from sparse_attn.ops.topk import topk_attention
from sparse_attn.timing import time_fn

# Names the benchmarks used before there was one registry; none of them is a key now.
OLD_NAMES = ["sdpa", "sdpa_flash", "sdpa_cudnn", "full_topk", "streaming_topk", "fused_topk", "prefilter_topk", "sampled"]


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
    torch.testing.assert_close(seed_topk_attention(q, k, v, top_k, causal=causal), ref, rtol=1e-10, atol=1e-10)


def test_time_fn_gives_at_least_min_runs():
    t = time_fn(lambda: torch.ones(64).sum(), min_run_time=0.01, min_runs=4)
    assert t.runs >= 4 and t.median > 0 and t.iqr >= 0 and min(t.times) <= t.median <= max(t.times)


@pytest.mark.parametrize("method", ["dense", "seed_topk", "topk_full", "topk"])
def test_measure_case_in_a_fresh_process(method):
    case = Case.build(method=method, length=256, heads=2, head_dim=16, top_k=8, chunk_size=64,
                      min_run_time=0.01, min_runs=3)
    row = run_case_subprocess(case, timeout=120)
    assert "error" not in row, row
    assert row["runs"] >= 3 and row["median_s"] > 0
    assert row["peak_rss_bytes"] > row["peak_extra_bytes"] >= 0


def test_streaming_holds_less_than_the_full_score_matrix():
    # The full-score modes hold an (H, L, L) float32 matrix: 2 * 2048^2 * 4 B = 32 MiB.
    rows = {m: run_case_subprocess(Case.build(method=m, length=2048, heads=2, head_dim=16, top_k=8, chunk_size=128),
                                   timing=False, timeout=120)
            for m in ("seed_topk", "topk")}
    assert rows["seed_topk"]["peak_extra_bytes"] > 32 * 2**20
    assert rows["topk"]["peak_extra_bytes"] < rows["seed_topk"]["peak_extra_bytes"] / 4


def test_bad_cases_are_named():
    with pytest.raises(ValueError, match="method must be one of"):
        measure_case(Case(method="nope", length=8))
    with pytest.raises(ValueError, match="method must be one of") as e:
        measure_case(Case(method="sdpa", length=8))
    assert all(key in str(e.value) for key in METHODS)
    with pytest.raises(ValueError, match="SDPA backend applies to"):
        measure_case(Case(method="topk", length=8, sdpa_backend="math"))
    if not torch.cuda.is_available():
        with pytest.raises(ValueError, match="CUDA is not available"):
            measure_case(Case(method="dense", length=8, device="cuda"))


@pytest.mark.parametrize("method", list(METHODS))
def test_every_registry_method_is_measured_through_the_registry(method):
    case = Case.build(method=method, length=64, heads=4, kv_heads=2, head_dim=8, top_k=4, num_samples=8,
                      chunk_size=16, selection_block_size=8, num_selected_blocks=3, compress_block_size=8,
                      compress_block_sliding_stride=4, sliding_window_size=8, causal=True)
    row = measure_case(case, timing=False)
    assert row["method"] == method and row["peak_extra_bytes"] >= 0


def test_a_row_round_trips_into_its_case():
    case = Case.build(method="nsa", length=128, kv_heads=2, seed=3, top_k=7, num_samples=11, chunk_size=None,
                      selection_block_size=32, num_selected_blocks=3, compress_block_size=16,
                      compress_block_sliding_stride=8, sliding_window_size=64, causal=True, sdpa_backend="default")
    row = json.loads(json.dumps({**case.to_row(), "median_s": 1e-3, "runs": 3, "note": "x"}))
    assert Case.from_row(row) == case
    assert case.config.seed == 3 and "seed" in row
    # Settings are named as the ops' keyword arguments, with the benchmark's own defaults.
    defaults = Case.from_row({"method": "topk", "length": 8}).to_row()
    assert {k: defaults[k] for k in ("top_k", "chunk_size", "selection_block_size", "num_selected_blocks",
                                     "compress_block_size", "compress_block_sliding_stride",
                                     "sliding_window_size")} == dict(
        top_k=64, chunk_size=1024, selection_block_size=64, num_selected_blocks=16, compress_block_size=32,
        compress_block_sliding_stride=16, sliding_window_size=512)


def test_sampling_draws_num_samples_not_top_k():
    case = Case.build(method="sampling", length=64, heads=2, head_dim=8, top_k=1, num_samples=16, seed=5)
    q, k, v = case.inputs()
    out = timed_call(case, q, k, v)()
    ref = sampled_attention(q, k, v, 16, proposal="uniform", generator=torch.Generator().manual_seed(5))
    torch.testing.assert_close(out, ref)


def test_dense_runs_under_a_pinned_sdpa_backend():
    case = Case(method="dense", length=64, heads=2, head_dim=8, sdpa_backend="math")
    q, k, v = case.inputs()
    torch.testing.assert_close(timed_call(case, q, k, v)(), F.scaled_dot_product_attention(q, k, v))
    cases = sweep_cases(["dense", "topk"], [64], sdpa_backends=["default", "math"])
    assert [(c.method, c.sdpa_backend) for c in cases] == [("dense", "default"), ("dense", "math"), ("topk", "default")]


def test_topk_cli_writes_a_table_and_json(tmp_path, capsys):
    out = tmp_path / "rows.json"
    rc = main(["topk", "--lengths", "64", "--heads", "2", "--head-dim", "8", "--top-k", "4",
               "--chunk-size", "16", "--min-run-time", "0.01", "--min-runs", "2", "--json", str(out)])
    assert rc == 0
    printed = capsys.readouterr().out
    assert "| topk | 64 |" in printed and "| seed_topk | 64 |" in printed
    rows = json.loads(out.read_text())
    assert {r["method"] for r in rows} == {"dense", "seed_topk", "topk_full", "topk"}


def test_sweep_goes_on_past_a_case_that_cannot_run(tmp_path):
    out = tmp_path / "sweep"
    rc = main(["sweep", "--methods", "dense", "topk", "--lengths", "32", "--heads", "2",
               "--head-dims", "8", "--top-k", "4", "--chunk-size", "8", "--devices", "cpu", "cuda",
               "--min-run-time", "0.01", "--min-runs", "2", "--out", str(out), "--no-progress"])
    assert rc == 0
    rows = json.loads((tmp_path / "sweep.json").read_text())["rows"]
    assert (tmp_path / "sweep.csv").exists() and "plotly" in (tmp_path / "sweep.html").read_text().lower()
    cpu = [r for r in rows if r["device"] == "cpu"]
    assert len(cpu) == 2 and all(r.get("median_s", 0) > 0 for r in cpu)
    if not torch.cuda.is_available():
        cuda = [r for r in rows if r["device"] == "cuda"]
        assert cuda and all(r.get("note") or r.get("error") for r in cuda)


def test_sweep_notes_cases_it_cannot_run_and_goes_on():
    cases = sweep_cases(["bogus", "dense"], [64, 1 << 40], devices=["cpu"], sdpa_backends=["default", "flash"])
    assert len(cases) == 6
    if not torch.cuda.is_available():
        cases += sweep_cases(["dense"], [64], devices=["cuda"])
    seen = []
    runnable = lambda c: c.method == "dense" and c.sdpa_backend == "default" and c.length == 64 and c.device == "cpu"  # noqa: E731
    rows = run_sweep([c for c in cases if not runnable(c)], progress=False, on_row=seen.append)
    notes = [r["note"] for r in rows]
    assert seen == rows and all(notes)
    assert any("unknown method 'bogus'" in n for n in notes)
    assert any("dense (flash) runs on CUDA only" in n for n in notes)
    assert any(n.startswith("skipped: needs about") for n in notes)  # a length no machine holds
    if not torch.cuda.is_available():
        assert "CUDA is not available" in notes[-1]


def test_speedup_and_report_from_rows():
    pytest.importorskip("plotly")
    rows = []
    for n, t_dense, t_sel in ((1024, 2e-3, 4e-3), (4096, 3e-2, 1e-2)):
        for m, t in (("dense", t_dense), ("nsa_selected", t_sel)):
            rows.append({**Case(method=m, length=n).to_row(), "median_s": t, "iqr_s": t / 10,
                         "runs": 5, "peak_extra_bytes": n * 1024})
    rows.append({**Case(method="nsa", length=4096).to_row(), "note": "skipped: out of memory"})
    add_speedup(rows)
    assert rows[1]["speedup_vs_dense"] == pytest.approx(0.5) and rows[3]["speedup_vs_dense"] == pytest.approx(3.0)
    figs = sweep_figures(rows)
    assert [f.layout.xaxis.type for f in figs] == ["log"] * 3
    speed = {t.name: list(t.y) for t in figs[2].data}
    assert speed["nsa_selected"] == pytest.approx([0.5, 3.0])
    page = report_html(rows, {"torch": torch.__version__})
    assert page.count("<tr>") == len(rows) + 1 and "skipped: out of memory" in page and "plotly" in page


def test_rows_written_under_the_old_names_read_under_the_registry_keys():
    old = {"method": "sdpa_flash", "length": 64, "block_size": 64, "num_blocks": 16, "compress_block": 32,
           "compress_stride": 16, "window": 512, "top_k": 8, "speedup_vs_sdpa": 1.5}
    new = upgrade_row(old)
    assert (new["method"], new["sdpa_backend"]) == ("dense", "flash")
    assert (new["selection_block_size"], new["num_selected_blocks"], new["compress_block_size"],
            new["compress_block_sliding_stride"], new["sliding_window_size"]) == (64, 16, 32, 16, 512)
    assert new["speedup_vs_dense"] == 1.5
    assert upgrade_row({"method": "sampled", "length": 8, "top_k": 8})["num_samples"] == 8
    row = Case(method="topk", length=8).to_row()
    assert upgrade_row(row) is row


def test_report_cli_rebuilds_the_page_of_a_recorded_sweep(tmp_path, capsys):
    pytest.importorskip("plotly")
    out = tmp_path / "nsa.html"
    assert main(["report", "docs/gpu/h200_sweep_nsa.json", "--out", str(out)]) == 0
    page = out.read_text()
    assert "dense (flash)" in page and "nsa_selected" in page and ">sdpa<" not in page


@pytest.mark.parametrize("command", ["topk", "sweep"])
@pytest.mark.parametrize("name", OLD_NAMES + ["nope"])
def test_cli_refuses_a_method_that_is_not_a_registry_key(command, name, capsys):
    with pytest.raises(SystemExit) as e:
        main([command, "--methods", "dense", name, "--lengths", "8"])
    assert e.value.code == 2
    err = capsys.readouterr().err
    assert f"got {name!r}" in err and all(repr(key) in err for key in METHODS)


@pytest.mark.parametrize("command", ["topk", "sweep", "report", "_case"])
def test_every_subcommand_has_help(command, capsys):
    with pytest.raises(SystemExit) as e:
        main([command, "--help"])
    assert e.value.code == 0 and "usage: python -m benchmarks" in capsys.readouterr().out


def test_the_module_runs_as_a_command():
    proc = subprocess.run([sys.executable, "-m", "benchmarks", "sweep", "--help"], capture_output=True, text=True,
                          timeout=120)
    assert proc.returncode == 0, proc.stderr
    assert "--sdpa-backends" in proc.stdout and "--num-samples" in proc.stdout and "--selection-block-size" in proc.stdout


def test_tensor_memory_counts_new_storages_once_and_subtracts_freed_ones():
    from sparse_attn.timing import peak_tensor_bytes

    x = torch.randn(256, 256)  # an input: exists before, never counted

    def two_at_once():
        a = x * 2            # 256 KiB
        b = a.t()            # a view: no new bytes
        c = a + 1            # 256 KiB more, while a is alive
        del a, b
        return c.sum()       # 4 bytes, after a is freed
    assert peak_tensor_bytes(two_at_once) == 2 * 256 * 256 * 4

    def one_at_a_time():
        for _ in range(3):
            (x * 2).sum()    # each product freed before the next
    assert peak_tensor_bytes(one_at_a_time) == 256 * 256 * 4 + 4
    assert peak_tensor_bytes(lambda: None) == 0
