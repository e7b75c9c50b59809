"""GPU checks and tables for the kernels, in one run: ``python -m benchmarks.gpu OUT_DIR [SECTION ...]``.

Correctness first (each kernel against a float64 reference on the GPU), then
launch tuning, then the tables docs/benchmarks.md records: the selected-block
branch against SDPA's backends, top-k attention, whole NSA and where its time
goes. Times come from ``sparse_attn.timing.time_fn`` (median and IQR), peak
memory from ``sparse_attn.timing.cuda_peak_bytes``. Each section writes its
rows to OUT_DIR/gpu_results.json as it finishes, so a run cut short keeps what
it measured.

Shapes are the NSA paper's: bf16, causal, B=1, 64 query heads over 4 KV heads,
head dim 128; selection blocks of 64 (16 of them), compression blocks of 32
with stride 16, a window of 512.
"""
from __future__ import annotations

import argparse
import json
import sys
import time
import traceback
from pathlib import Path

import torch
import torch.nn.functional as F
from einops import reduce
from torch.nn.attention import SDPBackend, sdpa_kernel

from sparse_attn.kernels import compressed as compressed_kernel
from sparse_attn.kernels.dispatch import reference_only
from sparse_attn.kernels.selected_block import selected_block_attention_triton
from sparse_attn.kernels.topk_fused import fused_topk_attention, fused_topk_select
from sparse_attn.ops.dense import dense_attention
from sparse_attn.ops.nsa import (compress_kv, compressed_attention, importance_to_selection_blocks, nsa_attention,
                                 random_block_indices, select_blocks, selected_block_attention,
                                 sliding_window_attention)
from sparse_attn.ops.topk import topk_attention
from sparse_attn.timing import cuda_peak_bytes, time_fn

B, H, HKV, D = 1, 64, 4, 128
NSA = dict(sliding_window_size=512, compress_block_size=32, compress_block_sliding_stride=16,
           selection_block_size=64, num_selected_blocks=16, causal=True)
EQUAL_GATES = (1 / 3, 1 / 3, 1 / 3)


class Recorder:
    """Rows per section, saved after every row (a run cut short keeps what it measured)."""

    def __init__(self, out_dir: str | Path):
        self.path = Path(out_dir) / "gpu_results.json"
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self.results: dict = {"sections": {}}

    def save(self) -> None:
        self.path.write_text(json.dumps(self.results, indent=1))

    def record(self, section: str, row: dict) -> None:
        self.results["sections"].setdefault(section, []).append(row)
        print(section, json.dumps(row), flush=True)
        self.save()

    def guard(self, section: str, label: dict, fn) -> dict:
        """Run one case; a failure (out of memory, a backend that refuses the shapes) is a row, and the run goes on."""
        try:
            row = fn()
        except Exception as e:  # noqa: BLE001 - the sweep must go on
            torch.cuda.empty_cache()
            row = {"error": f"{type(e).__name__}: {str(e).splitlines()[0][:200]}"}
        self.record(section, {**label, **row})
        return row


def timed(fn, min_run_time: float = 0.3, min_runs: int = 7) -> dict:
    peak = cuda_peak_bytes(fn)
    t = time_fn(fn, min_run_time=min_run_time, min_runs=min_runs)
    return {"median_ms": t.median * 1e3, "iqr_ms": t.iqr * 1e3, "runs": t.runs, "peak_extra_mib": peak / 2**20}


def rel(out, ref) -> float:
    return ((out.double() - ref).norm() / ref.norm()).item()


def sdpa(backend):
    def run(q, k, v):
        with sdpa_kernel([backend]):
            return F.scaled_dot_product_attention(q, k, v, is_causal=True, enable_gqa=True)
    return run


# ``dense`` pinned to one SDPA backend, labelled as the benchmark command line labels it.
PINNED_DENSE = {"dense (flash)": sdpa(SDPBackend.FLASH_ATTENTION), "dense (cudnn)": sdpa(SDPBackend.CUDNN_ATTENTION)}


def inputs(L, dtype=torch.bfloat16, heads=H, kv_heads=HKV, head_dim=D):
    q = torch.randn(B, heads, L, head_dim, device="cuda", dtype=dtype)
    k, v = (torch.randn(B, kv_heads, L, head_dim, device="cuda", dtype=dtype) for _ in range(2))
    return q, k, v


# --------------------------------------------------------------------------- correctness


def correctness_selected(rec: Recorder) -> None:
    for dtype in (torch.bfloat16, torch.float16, torch.float32):
        for causal in (True, False):
            for per_head in (False, True):
                for bs, L, Dk, Dv in ((64, 1024, 128, 128), (48, 1000, 64, 32)):
                    q = torch.randn(2, 16, L, Dk, device="cuda", dtype=dtype)
                    k = torch.randn(2, 2, L, Dk, device="cuda", dtype=dtype)
                    v = torch.randn(2, 2, L, Dv, device="cuda", dtype=dtype)
                    idx = random_block_indices(2, 16 if per_head else 2, L, L, 6, bs, causal, device="cuda")
                    idx[:, :, ::7, 1] = -1  # some empty slots in the middle of a row
                    ref = selected_block_attention(q.double(), k.double(), v.double(), idx, bs, causal=causal)
                    with reference_only():
                        torch_path = selected_block_attention(q, k, v, idx, bs, causal=causal)
                    out = selected_block_attention_triton(q, k, v, idx, bs, causal=causal)
                    limit = 1e-4 if dtype == torch.float32 else 1e-2
                    err = rel(out, ref)
                    rec.record("correctness_selected", {
                        "dtype": str(dtype).split(".")[-1], "causal": causal, "per_head": per_head, "block": bs,
                        "L": L, "D": Dk, "Dv": Dv, "torch_rel_err": rel(torch_path, ref), "kernel_rel_err": err,
                        "nan": bool(out.isnan().any()), "pass": err < limit and not bool(out.isnan().any())})


def correctness_topk(rec: Recorder) -> None:
    for dtype in (torch.float32, torch.bfloat16):
        for causal in (False, True):
            for L, K, C in ((4096, 64, None), (3000, 16, 16)):
                q, k, v = inputs(L, dtype, heads=8, kv_heads=2, head_dim=64)
                ref = topk_attention(q.double(), k.double(), v.double(), K, causal=causal)
                out = fused_topk_attention(q, k, v, K, causal=causal, capacity=C)
                over = fused_topk_select(q, k, K, causal=causal, capacity=C).overflow_rows
                rec.record("correctness_topk", {"dtype": str(dtype).split(".")[-1], "causal": causal, "L": L,
                                                "top_k": K, "capacity": C, "rel_err": rel(out, ref),
                                                "nan": bool(out.isnan().any()), "overflow_rows": over})
    # The selection itself against torch.topk of float32 scores (float32 inputs: IEEE scores on both sides).
    L, K = 16384, 64
    for causal in (False, True):
        q, k, _ = inputs(L, torch.float32, heads=8, kv_heads=2, head_dim=64)
        s = (q.view(1, 2, 4, L, 64) @ k[:, :, None].transpose(-1, -2)).view(8, L, L)
        if causal:
            s.masked_fill_(torch.ones(L, L, dtype=torch.bool, device="cuda").triu(1), float("-inf"))
        ref = s.topk(K, dim=-1)
        del s
        want = ref.indices.masked_fill(torch.isneginf(ref.values), -1).sort(-1).values
        sel = fused_topk_select(q, k, K, causal=causal)
        got = sel.indices.masked_fill(torch.isneginf(sel.values), -1).sort(-1).values
        same = (got == want).all(-1)
        # A differing row may differ only by keys tied (to rounding) with the k-th score.
        gap = (sel.values.sort(-1).values - ref.values.sort(-1).values).abs().max().item()
        rec.record("correctness_topk_select", {"causal": causal, "L": L, "top_k": K,
                                               "rows_same_key_set": same.float().mean().item(),
                                               "rows_differing": int((~same).sum().item()),
                                               "max_abs_score_gap_sorted": gap, "overflow_rows": sel.overflow_rows})
        del ref, want, got
        torch.cuda.empty_cache()


def _compressed_reference(q, k, v, cbs, stride, sbs, causal, scale):
    """float64 compressed branch and its group-summed, overlap-mapped importance (the PyTorch path, upcast)."""
    kc, vc = compress_kv(k.double(), cbs, stride), compress_kv(v.double(), cbs, stride)
    out, p = compressed_attention(q.double(), kc, vc, cbs, stride, causal=causal, scale=scale)
    M = importance_to_selection_blocks(kc.shape[2], cbs, stride, sbs, k.shape[2], dtype=torch.float64,
                                       device=q.device)
    return out, reduce(p, "b (hk g) i n -> b hk i n", "sum", hk=k.shape[1]) @ M


def correctness_compressed(rec: Recorder) -> None:
    cases = [  # B, H, Hkv, L, D, Dv, compress block, stride, selection block
        (1, 64, 4, 4096, 128, 128, 32, 16, 64),   # the benchmark's shape, shorter
        (2, 12, 4, 1000, 64, 32, 16, 8, 48),      # G=3 (padded), Dv != D, selection block not a power of two
        (1, 8, 8, 777, 128, 128, 32, 32, 64),     # G=1, no overlap between compressed blocks
    ]
    for dtype in (torch.bfloat16, torch.float16):  # float32 takes the PyTorch path (see the kernel's docstring)
        for causal in (True, False):
            for b, h, hkv, L, dk, dv, cbs, st, sbs in cases:
                q = torch.randn(b, h, L, dk, device="cuda", dtype=dtype)
                k = torch.randn(b, hkv, L, dk, device="cuda", dtype=dtype)
                v = torch.randn(b, hkv, L, dv, device="cuda", dtype=dtype)
                scale = dk ** -0.5
                ref_out, ref_imp = _compressed_reference(q, k, v, cbs, st, sbs, causal, scale)
                kc, vc = compress_kv(k, cbs, st), compress_kv(v, cbs, st)
                out, imp = compressed_kernel.compressed_attention_triton(
                    q, kc, vc, cbs, st, causal=causal, scale=scale, selection_block_size=sbs, num_keys=L)
                row = {"dtype": str(dtype).split(".")[-1], "causal": causal, "B": b, "H": h, "Hkv": hkv, "L": L,
                       "D": dk, "Dv": dv, "cbs": cbs, "stride": st, "sbs": sbs,
                       "out_rel_err": rel(out, ref_out), "imp_rel_err": rel(imp, ref_imp),
                       "nan": bool(out.isnan().any() or imp.isnan().any()),
                       "zero_pattern_same": bool(((imp > 0) == (ref_imp > 0)).all())}
                row["pass"] = (row["out_rel_err"] < 1e-2 and row["imp_rel_err"] < 1e-2 and not row["nan"]
                               and row["zero_pattern_same"])
                rec.record("correctness_compressed", row)
    # Whole NSA through the dispatch against float64 nsa_attention on the CPU.
    kw = dict(sliding_window_size=128, compress_block_size=32, compress_block_sliding_stride=16,
              selection_block_size=64, num_selected_blocks=8, causal=True)
    for dtype in (torch.float32, torch.bfloat16):
        q, k, v = inputs(2048, dtype, heads=16, kv_heads=2, head_dim=64)
        with torch.no_grad():
            out = nsa_attention(q, k, v, gates=(0.3, 0.5, 0.2), **kw)
        ref = nsa_attention(q.cpu().double(), k.cpu().double(), v.cpu().double(), gates=(0.3, 0.5, 0.2), **kw)
        rec.record("correctness_compressed", {"case": "nsa_attention dispatch vs float64 CPU", "dtype": str(dtype),
                                              "rel_err": rel(out.cpu(), ref), "nan": bool(out.isnan().any())})


# --------------------------------------------------------------------------- launch tuning


def _fastest(rec: Recorder, section: str, L: int, configs: list[dict], launch) -> dict | None:
    """Time ``launch(**cfg)`` for every launch config with Triton's do_bench; record each, return the fastest."""
    from triton.testing import do_bench

    best = None
    for cfg in configs:
        try:
            ms = do_bench(lambda: launch(**cfg), warmup=50, rep=300, return_mode="median")
        except Exception as e:  # noqa: BLE001 - a config the chip cannot launch is a row, not the end
            rec.record(section, {**cfg, "error": str(e).splitlines()[0][:200]})
            continue
        rec.record(section, {**cfg, "L": L, "median_ms": ms})
        if best is None or ms < best[0]:
            best = (ms, cfg)
    return None if best is None else best[1]


def tune_selected(rec: Recorder, L: int = 65536) -> dict:
    q, k, v = inputs(L)
    bs = NSA["selection_block_size"]
    idx = random_block_indices(B, HKV, L, L, NSA["num_selected_blocks"], bs, True, device="cuda")
    configs = [{"num_warps": w, "num_stages": s} for w in (2, 4, 8) for s in (1, 2, 3)]
    return _fastest(rec, "tune_selected", L, configs,
                    lambda **cfg: selected_block_attention_triton(q, k, v, idx, bs, causal=True, **cfg)) or {}


def tune_compressed(rec: Recorder, L: int = 65536) -> None:
    q, k, v = inputs(L)
    cbs, st = NSA["compress_block_size"], NSA["compress_block_sliding_stride"]
    kc, vc = compress_kv(k, cbs, st), compress_kv(v, cbs, st)
    configs = [dict(rows=r, block_n=n, num_warps=w, num_stages=s)
               for r, n, w, s in ((128, 64, 8, 2), (128, 64, 4, 2), (128, 64, 8, 3), (128, 128, 8, 2),
                                  (128, 32, 4, 2), (128, 64, 4, 3), (64, 64, 4, 2), (256, 64, 8, 2),
                                  (128, 128, 8, 3))]
    best = _fastest(rec, "tune_compressed", L, configs, lambda **cfg: compressed_kernel.compressed_attention_triton(
        q, kc, vc, cbs, st, causal=True, selection_block_size=NSA["selection_block_size"], num_keys=L, **cfg))
    if best is not None:
        compressed_kernel.DEFAULTS.update(best)  # the whole-NSA table runs with the winner
        rec.results["best_compressed_config"] = best


# --------------------------------------------------------------------------- tables


def selected_table(rec: Recorder, cfg: dict, lengths=(2048, 4096, 8192, 10240, 12288, 16384, 32768, 65536)) -> None:
    bs = NSA["selection_block_size"]
    for L in lengths:
        q, k, v = inputs(L)
        idx = random_block_indices(B, HKV, L, L, NSA["num_selected_blocks"], bs, True, device="cuda")
        lab = {"L": L}
        # (SDPA's memory-efficient backend takes no enable_gqa.)
        for name, run in PINNED_DENSE.items():
            rec.guard("selected", {**lab, "method": name}, lambda run=run: timed(lambda: run(q, k, v)))
        rec.guard("selected", {**lab, "method": "nsa_selected (Triton)", **cfg},
                  lambda: timed(lambda: selected_block_attention_triton(q, k, v, idx, bs, causal=True, **cfg)))
        if L <= 8192:
            with reference_only():
                rec.guard("selected", {**lab, "method": "nsa_selected (PyTorch reference)"},
                          lambda: timed(lambda: selected_block_attention(q, k, v, idx, bs, causal=True),
                                        min_run_time=0.1))
        q = k = v = idx = None  # free before the next length allocates
        torch.cuda.empty_cache()


def topk_table(rec: Recorder) -> None:
    K = 64
    for L in (4096, 8192, 16384, 32768):
        q, k, v = (torch.randn(1, 8, L, 64, device="cuda", dtype=torch.bfloat16) for _ in range(3))
        lab = {"L": L}
        rec.guard("topk", {**lab, "method": "dense"}, lambda: timed(lambda: F.scaled_dot_product_attention(q, k, v)))
        rec.guard("topk", {**lab, "method": "q @ k^T alone"}, lambda: timed(lambda: q @ k.transpose(-1, -2)))
        if L <= 16384:
            rec.guard("topk", {**lab, "method": "topk_full"}, lambda: timed(lambda: topk_attention(q, k, v, K)))
            with reference_only():
                rec.guard("topk", {**lab, "method": "topk (PyTorch reference, chunk 1024)"},
                          lambda: timed(lambda: topk_attention(q, k, v, K, chunk_size=1024)))
        row = rec.guard("topk", {**lab, "method": "topk (fused Triton, chunk 1024)"},
                        lambda: timed(lambda: topk_attention(q, k, v, K, chunk_size=1024)))
        if "error" not in row:
            rec.results["sections"]["topk"][-1]["overflow_rows"] = fused_topk_select(q, k, K).overflow_rows
        if L == 16384:
            topk_stages(rec, q, k, v, K)
        q = k = v = None  # free before the next length allocates
        torch.cuda.empty_cache()


def topk_stages(rec: Recorder, q, k, v, K: int) -> None:
    """The fused top-k's selection and its softmax-and-gather, each timed alone (non-causal: the mask path)."""
    L = q.shape[2]
    rec.guard("topk_stages", {"L": L, "stage": "selection (fused_topk_select)"},
              lambda: timed(lambda: fused_topk_select(q, k, K)))
    rec.guard("topk_stages", {"L": L, "stage": "whole (fused_topk_attention)"},
              lambda: timed(lambda: fused_topk_attention(q, k, v, K)))
    rec.guard("topk_stages", {"L": L, "stage": "torch.topk over the full score matrix, for scale"},
              lambda: timed(lambda: (q @ k.transpose(-1, -2)).topk(K, dim=-1)))


def nsa_table(rec: Recorder, lengths=(8192, 16384, 32768, 65536)) -> None:
    """Whole NSA as nsa_attention dispatches it, with SDPA flash and cuDNN in the same process, and its parts."""
    cbs, st = NSA["compress_block_size"], NSA["compress_block_sliding_stride"]
    sbs, S, win = NSA["selection_block_size"], NSA["num_selected_blocks"], NSA["sliding_window_size"]
    for L in lengths:
        q, k, v = inputs(L)
        lab = {"L": L, **compressed_kernel.DEFAULTS}
        scale = D ** -0.5
        with torch.no_grad():
            for name, run in PINNED_DENSE.items():
                rec.guard("nsa", {**lab, "method": name}, lambda run=run: timed(lambda: run(q, k, v)))
            rec.guard("nsa", {**lab, "method": "nsa"},
                      lambda: timed(lambda: nsa_attention(q, k, v, gates=EQUAL_GATES, **NSA), min_runs=5))
            kc, vc = compress_kv(k, cbs, st), compress_kv(v, cbs, st)
            rec.guard("nsa", {**lab, "method": "part: compress_kv (k and v)"},
                      lambda: timed(lambda: (compress_kv(k, cbs, st), compress_kv(v, cbs, st))))
            rec.guard("nsa", {**lab, "method": "part: compressed kernel (out + importance)"},
                      lambda: timed(lambda: compressed_kernel.compressed_attention_triton(
                          q, kc, vc, cbs, st, causal=True, selection_block_size=sbs, num_keys=L)))
            _, imp = compressed_kernel.compressed_attention_triton(q, kc, vc, cbs, st, causal=True,
                                                                   selection_block_size=sbs, num_keys=L)
            rec.guard("nsa", {**lab, "method": "part: select_blocks"},
                      lambda: timed(lambda: select_blocks(imp, S, sbs, causal=True)))
            idx = select_blocks(imp, S, sbs, causal=True)
            rec.guard("nsa", {**lab, "method": "part: selected (Triton)"},
                      lambda: timed(lambda: selected_block_attention_triton(q, k, v, idx, sbs, causal=True)))
            rec.guard("nsa", {**lab, "method": "part: sliding_window_attention"},
                      lambda: timed(lambda: sliding_window_attention(q, k, v, win, causal=True, scale=scale)))
            if L <= 16384:  # the PyTorch compressed path, for comparison (its memory grows as L^2)
                rec.guard("nsa", {**lab, "method": "part: compressed_attention (PyTorch)"},
                          lambda: timed(lambda: compressed_attention(q, kc, vc, cbs, st, causal=True, scale=scale),
                                        min_runs=3))
        q = k = v = kc = vc = imp = idx = None  # free before the next length allocates
        torch.cuda.empty_cache()


def check_dense(rec: Recorder) -> None:
    """The reference everything is judged by, on the GPU: SDPA against float64 dense attention."""
    q, k, v = inputs(2048, torch.bfloat16, heads=16, kv_heads=2, head_dim=64)
    ref = dense_attention(q.double(), k.double(), v.double(), causal=True)
    rec.record("check_dense", {"rel_err_sdpa_bf16": rel(F.scaled_dot_product_attention(
        q, k, v, is_causal=True, enable_gqa=True), ref)})


RUNS = {"check_dense": check_dense, "correctness_selected": correctness_selected, "correctness_topk": correctness_topk,
        "correctness_compressed": correctness_compressed, "tune_compressed": tune_compressed, "topk": topk_table,
        "nsa": nsa_table}  # tune_selected and selected pass the tuned launch along (see main)
SECTIONS = ("check_dense", "correctness_selected", "correctness_topk", "correctness_compressed", "tune_selected",
            "tune_compressed", "selected", "topk", "nsa")


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m benchmarks.gpu", description=__doc__.split("\n")[0])
    ap.add_argument("out_dir", help="where gpu_results.json goes")
    ap.add_argument("sections", nargs="*", metavar="SECTION", help=f"from {list(SECTIONS)} (default: all, in this order)")
    args = ap.parse_args(argv)
    unknown = [s for s in args.sections if s not in SECTIONS]
    if unknown:
        ap.error(f"unknown section(s) {unknown}; choose from {list(SECTIONS)}")
    if not torch.cuda.is_available():
        ap.error("these checks and tables need a CUDA device")
    import triton

    rec = Recorder(args.out_dir)
    p = torch.cuda.get_device_properties(0)
    rec.results["env"] = {"device": p.name, "sm_count": p.multi_processor_count, "torch": torch.__version__,
                          "triton": triton.__version__, "cuda": torch.version.cuda,
                          "cudnn": torch.backends.cudnn.version()}
    print(rec.results["env"], flush=True)
    torch.manual_seed(0)
    selected_cfg = {"num_warps": 4, "num_stages": 2}  # the kernel's defaults, unless tune_selected runs first
    for name in args.sections or SECTIONS:
        t0 = time.time()
        try:
            if name == "tune_selected":
                selected_cfg = tune_selected(rec) or selected_cfg
                rec.results["best_selected_config"] = selected_cfg
            elif name == "selected":
                selected_table(rec, selected_cfg)
            else:
                RUNS[name](rec)
        except Exception:  # noqa: BLE001 - one section's failure is recorded, the others still run
            rec.results.setdefault("failures", []).append({name: traceback.format_exc()[-2000:]})
            traceback.print_exc()
        rec.results.setdefault("section_seconds", {})[name] = time.time() - t0
        rec.save()
    return 0


if __name__ == "__main__":
    sys.exit(main())
