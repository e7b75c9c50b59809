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
import contextlib
import json
import sys
import time
import traceback
from pathlib import Path

import torch
import torch.nn.functional as F
from einops import reduce
from torch.nn.attention import SDPBackend, sdpa_kernel

from sparse_attn.kernels import block_select
from sparse_attn.kernels import compressed as compressed_kernel
from sparse_attn.kernels import gate_combine
from sparse_attn.kernels import selected_block as selected_kernel
from sparse_attn.kernels import sliding_band, sliding_flex
from sparse_attn.kernels.dispatch import reference_only
from sparse_attn.kernels.selected_block import selected_block_attention_triton
from sparse_attn.kernels.topk_fused import fused_topk_attention, fused_topk_select
from sparse_attn.ops.dense import dense_attention
from sparse_attn.ops.nsa import (compress_kv, compressed_attention, importance_to_selection_blocks, nsa_attention,
                                 random_block_indices, select_blocks, selected_block_attention,
                                 sliding_window_attention)
from sparse_attn.ops.nsa import attention as nsa_module
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
    for dtype in (torch.bfloat16, torch.float16, torch.float32):  # float32 with its own tiles (DEFAULTS_FP32)
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


def correctness_select_sliding(rec: Recorder) -> None:
    """The fused selection against select_blocks' stable sort (exact), and the FlexAttention window against float64."""
    cbs, st, sbs, S = (NSA[k] for k in ("compress_block_size", "compress_block_sliding_stride",
                                        "selection_block_size", "num_selected_blocks"))
    for L in (8192, 65536):
        q, k, v = inputs(L)
        _, imp = compressed_kernel.compressed_attention_triton(q, compress_kv(k, cbs, st), compress_kv(v, cbs, st),
                                                               cbs, st, causal=True, selection_block_size=sbs,
                                                               num_keys=L)
        q = k = v = None
        for causal, ni, nl in ((True, 1, 2), (False, 1, 2), (True, 0, 0), (True, 2, 3)):
            got = block_select.select_blocks_triton(imp, S, sbs, causal=causal, num_initial_blocks=ni,
                                                    num_local_blocks=nl)
            with reference_only():
                want = select_blocks(imp, S, sbs, causal=causal, num_initial_blocks=ni, num_local_blocks=nl)
            same = (got == want).all(-1)
            rec.record("correctness_select", {"L": L, "importance": "compressed kernel (float32)", "causal": causal,
                                              "initial": ni, "local": nl, "rows": same.numel(),
                                              "rows_differing": int((~same).sum()), "pass": bool(same.all())})
        # Heavy ties: importance rounded to 3 levels, some zeros, half dtypes.
        for dtype in (torch.float32, torch.bfloat16, torch.float16):
            tied = ((imp * 3 / imp.amax(-1, keepdim=True).clamp(min=1e-30)).round() / 3).to(dtype)
            got = block_select.select_blocks_triton(tied, S, sbs, causal=True)
            with reference_only():
                want = select_blocks(tied, S, sbs, causal=True)
            same = (got == want).all(-1)
            rec.record("correctness_select", {"L": L, "importance": f"3 levels, {str(dtype)[6:]}", "causal": True,
                                              "rows": same.numel(), "rows_differing": int((~same).sum()),
                                              "pass": bool(same.all())})
        imp = None
        torch.cuda.empty_cache()
    for dtype, limit in ((torch.bfloat16, 1e-2), (torch.float16, 2e-3), (torch.float32, 1e-4)):
        for causal in (True, False):
            for L, W in ((4096, 512), (3000, 100)):
                q, k, v = inputs(L, dtype)
                with torch.no_grad():
                    out = sliding_window_attention(q, k, v, W, causal=causal)
                    with reference_only():
                        chunked = sliding_window_attention(q, k, v, W, causal=causal)
                ref = sliding_window_attention(q.double(), k.double(), v.double(), W, causal=causal)
                err = rel(out, ref)
                rec.record("correctness_sliding", {"dtype": str(dtype)[6:], "causal": causal, "L": L, "window": W,
                                                   "flex_rel_err": err, "chunked_sdpa_rel_err": rel(chunked, ref),
                                                   "nan": bool(out.isnan().any()),
                                                   "pass": err < limit and not bool(out.isnan().any())})
                q = k = v = out = chunked = ref = None
                torch.cuda.empty_cache()


def tune_select(rec: Recorder, L: int = 65536) -> None:
    cbs, st, sbs, S = (NSA[k] for k in ("compress_block_size", "compress_block_sliding_stride",
                                        "selection_block_size", "num_selected_blocks"))
    q, k, v = inputs(L)
    _, imp = compressed_kernel.compressed_attention_triton(q, compress_kv(k, cbs, st), compress_kv(v, cbs, st),
                                                           cbs, st, causal=True, selection_block_size=sbs, num_keys=L)
    q = k = v = None
    configs = [{"elements": e, "num_warps": w} for e in (1024, 2048, 4096, 8192) for w in (1, 2, 4, 8)]
    best = _fastest(rec, "tune_select", L, configs,
                    lambda **cfg: block_select.select_blocks_triton(imp, S, sbs, causal=True, **cfg))
    if best is not None:
        block_select.DEFAULTS.update(best)
        rec.results["best_select_config"] = best


def tune_compressed_fp32(rec: Recorder, L: int = 16384) -> None:
    q, k, v = inputs(L, torch.float32)
    cbs, st = NSA["compress_block_size"], NSA["compress_block_sliding_stride"]
    kc, vc = compress_kv(k, cbs, st), compress_kv(v, cbs, st)
    configs = [dict(rows=r, block_n=n, num_warps=w, num_stages=s)
               for r, n, w, s in ((128, 32, 8, 2), (128, 32, 4, 2), (128, 32, 8, 1), (64, 32, 4, 2),
                                  (128, 64, 8, 1), (64, 64, 4, 2), (256, 32, 8, 1), (256, 16, 8, 2),
                                  (128, 16, 4, 3), (64, 32, 4, 3))]
    best = _fastest(rec, "tune_compressed_fp32", L, configs, lambda **cfg: compressed_kernel.compressed_attention_triton(
        q, kc, vc, cbs, st, causal=True, selection_block_size=NSA["selection_block_size"], num_keys=L, **cfg))
    if best is not None:
        compressed_kernel.DEFAULTS_FP32.update(best)
        rec.results["best_compressed_fp32_config"] = best


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


# --------------------------------------------------------------------------- stages, before and after; peers


def _forced_reference(fn):
    def run(*args, **kwargs):
        with reference_only():
            return fn(*args, **kwargs)
    return run


@contextlib.contextmanager
def previous_selection_and_window():
    """nsa_attention with select_blocks' stable sort and the chunked-SDPA window: the stages as of run 11."""
    saved = nsa_module.select_blocks, nsa_module.sliding_window_attention
    nsa_module.select_blocks, nsa_module.sliding_window_attention = map(_forced_reference, saved)
    try:
        yield
    finally:
        nsa_module.select_blocks, nsa_module.sliding_window_attention = saved


@contextlib.contextmanager
def compressed_dtypes(dtypes):
    saved = compressed_kernel._DISPATCH_DTYPES
    compressed_kernel._DISPATCH_DTYPES = dtypes
    try:
        yield
    finally:
        compressed_kernel._DISPATCH_DTYPES = saved


@contextlib.contextmanager
def previous_kernels():
    """The selected and compressed kernels of --previous in place of today's, inside nsa_attention, and the
    gated sum as its own pass, and the window through FlexAttention (as before run 23)."""
    saved = (selected_kernel.selected_block_attention_triton, compressed_kernel.compressed_attention_triton,
             nsa_module._selected_gated, sliding_band.ENABLED)
    selected_kernel.selected_block_attention_triton = PREVIOUS["selected_prev"].selected_block_attention_triton
    compressed_kernel.compressed_attention_triton = PREVIOUS["compressed_prev"].compressed_attention_triton
    nsa_module._selected_gated = lambda *a, **k: None
    sliding_band.ENABLED = False
    try:
        yield
    finally:
        (selected_kernel.selected_block_attention_triton, compressed_kernel.compressed_attention_triton,
         nsa_module._selected_gated, sliding_band.ENABLED) = saved


@contextlib.contextmanager
def window_through_flex():
    """The window through FlexAttention instead of the band kernel (sliding_window_attention's dispatch)."""
    saved = sliding_band.ENABLED
    sliding_band.ENABLED = False
    try:
        yield
    finally:
        sliding_band.ENABLED = saved


@contextlib.contextmanager
def compressed_defaults(**cfg):
    saved = dict(compressed_kernel.DEFAULTS)
    compressed_kernel.DEFAULTS.update(cfg)
    try:
        yield
    finally:
        compressed_kernel.DEFAULTS.clear()
        compressed_kernel.DEFAULTS.update(saved)


def plain_topk(imp, S, sbs, L):
    """Eligible blocks by torch.topk: no forcing, ties as topk leaves them (the selection before run 11)."""
    ok = (imp > 0) & (torch.arange(imp.shape[-1], device="cuda") * sbs <= torch.arange(L, device="cuda")[:, None])
    vals, idx = imp.masked_fill(~ok, float("-inf")).topk(S, dim=-1)
    return idx.masked_fill(vals.isneginf(), -1)


def stages(rec: Recorder, lengths=(16384, 65536)) -> None:
    """Whole NSA and each stage, now and as of run 11 (select_blocks' sort, chunked-SDPA window), same process."""
    cbs, st = NSA["compress_block_size"], NSA["compress_block_sliding_stride"]
    sbs, S, win = NSA["selection_block_size"], NSA["num_selected_blocks"], NSA["sliding_window_size"]
    scale = D ** -0.5
    for L in lengths:
        q, k, v = inputs(L)
        lab = {"L": L, "dtype": "bfloat16"}
        g = torch.full((B, H, L, 3), 1 / 3, device="cuda", dtype=q.dtype)
        with torch.no_grad():
            for name, run in PINNED_DENSE.items():
                rec.guard("stages", {**lab, "stage": name}, lambda run=run: timed(lambda: run(q, k, v)))
            rec.guard("stages", {**lab, "stage": "nsa (now)", "compressed": dict(compressed_kernel.DEFAULTS)},
                      lambda: timed(lambda: nsa_attention(q, k, v, gates=EQUAL_GATES, **NSA), min_runs=9))
            if {"selected_prev", "compressed_prev"} <= PREVIOUS.keys():  # --previous: the kernels as they were
                with previous_kernels():
                    rec.guard("stages", {**lab, "stage": "nsa (before: --previous kernels)"},
                              lambda: timed(lambda: nsa_attention(q, k, v, gates=EQUAL_GATES, **NSA), min_runs=9))
                rec.guard("stages", {**lab, "stage": "nsa (now, again)"},
                          lambda: timed(lambda: nsa_attention(q, k, v, gates=EQUAL_GATES, **NSA), min_runs=9))
                rec.guard("stages", {**lab, "stage": "dense (cudnn), again"},
                          lambda: timed(lambda: PINNED_DENSE["dense (cudnn)"](q, k, v)))
            with previous_selection_and_window():
                rec.guard("stages", {**lab, "stage": "nsa (sort + chunked SDPA window, as run 11)"},
                          lambda: timed(lambda: nsa_attention(q, k, v, gates=EQUAL_GATES, **NSA), min_runs=7))
            kc, vc = compress_kv(k, cbs, st), compress_kv(v, cbs, st)
            rec.guard("stages", {**lab, "stage": "compress_kv (k and v)"},
                      lambda: timed(lambda: (compress_kv(k, cbs, st), compress_kv(v, cbs, st))))
            rec.guard("stages", {**lab, "stage": "compressed kernel (out + importance)"},
                      lambda: timed(lambda: compressed_kernel.compressed_attention_triton(
                          q, kc, vc, cbs, st, causal=True, selection_block_size=sbs, num_keys=L)))
            if "compressed_prev" in PREVIOUS:
                prev_cmp = PREVIOUS["compressed_prev"].compressed_attention_triton
                rec.guard("stages", {**lab, "stage": "compressed kernel (before: --previous)"},
                          lambda: timed(lambda: prev_cmp(q, kc, vc, cbs, st, causal=True, selection_block_size=sbs,
                                                         num_keys=L)))
            out_cmp, imp = compressed_kernel.compressed_attention_triton(q, kc, vc, cbs, st, causal=True,
                                                                         selection_block_size=sbs, num_keys=L)
            rec.guard("stages", {**lab, "stage": "select: fused kernel (now)", **block_select.DEFAULTS},
                      lambda: timed(lambda: select_blocks(imp, S, sbs, causal=True)))
            with reference_only():
                rec.guard("stages", {**lab, "stage": "select: stable sort (run 11)"},
                          lambda: timed(lambda: select_blocks(imp, S, sbs, causal=True)))
            rec.guard("stages", {**lab, "stage": "select: torch.topk, no forcing, no tie rule (run 10)"},
                      lambda: timed(lambda: plain_topk(imp, S, sbs, L)))
            idx = select_blocks(imp, S, sbs, causal=True)
            rec.guard("stages", {**lab, "stage": "selected kernel"},
                      lambda: timed(lambda: selected_block_attention_triton(q, k, v, idx, sbs, causal=True)))
            out_sel = selected_block_attention_triton(q, k, v, idx, sbs, causal=True)
            rec.guard("stages", {**lab, "stage": "sliding: band kernel (now)"},
                      lambda: timed(lambda: sliding_window_attention(q, k, v, win, causal=True, scale=scale)))
            with window_through_flex():
                rec.guard("stages", {**lab, "stage": "sliding: FlexAttention (run 22)"},
                          lambda: timed(lambda: sliding_window_attention(q, k, v, win, causal=True, scale=scale)))
            with reference_only():
                rec.guard("stages", {**lab, "stage": "sliding: chunked SDPA (run 11)"},
                          lambda: timed(lambda: sliding_window_attention(q, k, v, win, causal=True, scale=scale)))
            out_win = sliding_window_attention(q, k, v, win, causal=True, scale=scale)
            # A shape FlexAttention could not compile would have timed the chunked path under "now": say so.
            rec.results["flex_fallbacks"] = [str(key) for key in sliding_flex._failed]
            rec.guard("stages", {**lab, "stage": "gates: one Triton pass (now)"},
                      lambda: timed(lambda: gate_combine.gate_combine_triton(out_cmp, out_sel, out_win, g)))
            ref = (g[..., 0:1].double() * out_cmp.double() + g[..., 1:2].double() * out_sel.double()
                   + g[..., 2:3].double() * out_win.double())
            rec.record("correctness_gate", {"L": L, "rel_err_triton": rel(gate_combine.gate_combine_triton(
                out_cmp, out_sel, out_win, g), ref), "rel_err_addcmul": rel(torch.addcmul(torch.addcmul(
                    out_cmp * g[..., 0:1], out_sel, g[..., 1:2]), out_win, g[..., 2:3]), ref)})
            ref = None
            rec.guard("stages", {**lab, "stage": "gates: two addcmul (PyTorch fallback)"},
                      lambda: timed(lambda: torch.addcmul(torch.addcmul(out_cmp * g[..., 0:1], out_sel, g[..., 1:2]),
                                                          out_win, g[..., 2:3])))
            rec.guard("stages", {**lab, "stage": "gates: three products, two sums (run 11)"},
                      lambda: timed(lambda: g[..., 0:1] * out_cmp + g[..., 1:2] * out_sel + g[..., 2:3] * out_win))
        q = k = v = kc = vc = imp = idx = out_cmp = out_sel = out_win = g = None
        torch.cuda.empty_cache()
        if L > 16384:  # float32 at 65536: the PyTorch compressed path needs about 100 GiB; the kernel 1.2 s (run 12)
            continue
        # float32: the compressed kernel with its own tiles, against the PyTorch compressed path (L^2 memory).
        q, k, v = inputs(L, torch.float32)
        lab = {"L": L, "dtype": "float32", **compressed_kernel.DEFAULTS_FP32}
        with torch.no_grad():
            rec.guard("stages", {**lab, "stage": "nsa (now: PyTorch compressed path, fused selection, FlexAttention)"},
                      lambda: timed(lambda: nsa_attention(q, k, v, gates=EQUAL_GATES, **NSA), min_runs=3))
            with previous_selection_and_window():
                rec.guard("stages", {**lab, "stage": "nsa (PyTorch compressed path, sort, chunked SDPA: run 11)"},
                          lambda: timed(lambda: nsa_attention(q, k, v, gates=EQUAL_GATES, **NSA), min_runs=3))
            with compressed_dtypes(compressed_kernel._DISPATCH_DTYPES + (torch.float32,)):
                rec.guard("stages", {**lab, "stage": "nsa (float32 compressed kernel)"},
                          lambda: timed(lambda: nsa_attention(q, k, v, gates=EQUAL_GATES, **NSA), min_runs=3))
            kc, vc = compress_kv(k, cbs, st), compress_kv(v, cbs, st)
            rec.guard("stages", {**lab, "stage": "compressed kernel (out + importance)"},
                      lambda: timed(lambda: compressed_kernel.compressed_attention_triton(
                          q, kc, vc, cbs, st, causal=True, selection_block_size=sbs, num_keys=L)))
        q = k = v = kc = vc = None
        torch.cuda.empty_cache()


def _fla():
    try:
        import warnings

        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            from fla.ops.nsa.compression import parallel_nsa_compression
            from fla.ops.nsa.parallel import parallel_nsa, parallel_nsa_fwd, parallel_nsa_topk
            from fla.ops.utils.pooling import mean_pooling
        import fla
    except Exception as e:  # noqa: BLE001 - fla is optional
        return None, f"{type(e).__name__}: {e}"
    return dict(parallel_nsa=parallel_nsa, fwd=parallel_nsa_fwd, topk=parallel_nsa_topk, pool=mean_pooling,
                compression=parallel_nsa_compression, version=getattr(fla, "__version__", "?")), None


def _flex_direct(L, window):
    """FlexAttention as a user would call it: a sliding-window block mask and torch.compile, nothing of ours."""
    from torch.nn.attention.flex_attention import create_block_mask, flex_attention

    mask = create_block_mask(lambda b, h, i, j: (j <= i) & (i - j < window), None, None, L, L, device="cuda")
    compiled = torch.compile(flex_attention, dynamic=False)
    return lambda q, k, v: compiled(q, k, v, block_mask=mask, enable_gqa=True)


def _ours_cmp_slc(q, k, v, bs, S):
    """Compressed + importance + top-S + selected, blocks of bs, no overlap, no window (fla's parallel_nsa setup)."""
    kc, vc = compress_kv(k, bs, bs), compress_kv(v, bs, bs)
    out_cmp, imp = compressed_kernel.compressed_attention_triton(q, kc, vc, bs, bs, causal=True,
                                                                 selection_block_size=bs, num_keys=k.shape[2])
    idx = select_blocks(imp, S, bs, causal=True)
    return out_cmp + selected_block_attention_triton(q, k, v, idx, bs, causal=True), idx


def _float64_cmp_slc(q, k, v, bs, S):
    q, k, v = q.double(), k.double(), v.double()
    kc, vc = compress_kv(k, bs, bs), compress_kv(v, bs, bs)
    out_cmp, p = compressed_attention(q, kc, vc, bs, bs, causal=True, scale=q.shape[-1] ** -0.5)
    imp = reduce(p, "b (hk g) i n -> b hk i n", "sum", hk=k.shape[1]) @ importance_to_selection_blocks(
        kc.shape[2], bs, bs, bs, k.shape[2], dtype=torch.float64, device=q.device)
    idx = select_blocks(imp, S, bs, causal=True)
    return out_cmp + selected_block_attention(q, k, v, idx, bs, causal=True), idx


def peers(rec: Recorder, lengths=(16384, 65536)) -> None:
    """Each stage next to its best peer on the same inputs, and every variant's error against float64."""
    fla, why = _fla()
    rec.results["fla"] = fla["version"] if fla else f"not importable: {why}"
    sbs, S, win = NSA["selection_block_size"], NSA["num_selected_blocks"], NSA["sliding_window_size"]
    t = lambda x: x.transpose(1, 2).contiguous()  # noqa: E731 - (B, H, L, D) <-> fla's (B, L, H, D)
    scale = D ** -0.5

    def fla_selected(qt, kt, vt, idx_t):
        return fla["fwd"](qt, kt, vt, idx_t, S, sbs, scale)[0]

    def fla_cmp_slc(qt, kt, vt, ones):
        return fla["parallel_nsa"](qt, kt, vt, g_cmp=ones, g_slc=ones, block_counts=S, block_size=sbs, window_size=0)

    # Correctness first, at a length where float64 references fit.
    L = 2048
    q, k, v = inputs(L)
    idx = random_block_indices(B, HKV, L, L, S, sbs, True, device="cuda")
    qd, kd, vd = q.double(), k.double(), v.double()
    with torch.no_grad():
        ref = dense_attention(qd, kd, vd, causal=True)
        for name, run in PINNED_DENSE.items():
            rec.guard("peers_correctness", {"L": L, "variant": name}, lambda run=run: {"rel_err": rel(run(q, k, v), ref)})
        ref = sliding_window_attention(qd, kd, vd, win, causal=True)
        rec.guard("peers_correctness", {"L": L, "variant": "sliding: ours (dispatch: band kernel)"},
                  lambda: {"rel_err": rel(sliding_window_attention(q, k, v, win, causal=True), ref)})
        rec.guard("peers_correctness", {"L": L, "variant": "sliding: FlexAttention direct"},
                  lambda: {"rel_err": rel(_flex_direct(L, win)(q, k, v), ref)})
        ref = selected_block_attention(qd, kd, vd, idx, sbs, causal=True)
        ours = selected_block_attention_triton(q, k, v, idx, sbs, causal=True)
        rec.guard("peers_correctness", {"L": L, "variant": "selected: ours, random indices"},
                  lambda: {"rel_err": rel(ours, ref)})
        ref64, idx64 = _float64_cmp_slc(q, k, v, sbs, S)
        mine, my_idx = _ours_cmp_slc(q, k, v, sbs, S)
        rec.guard("peers_correctness", {"L": L, "variant": "compressed + selected (blocks of 64): ours"},
                  lambda: {"rel_err": rel(mine, ref64),
                           "rows_same_blocks_as_float64": ((my_idx.sort(-1).values == idx64.sort(-1).values)
                                                           .all(-1).float().mean().item())})
        if fla:
            qt, kt, vt = t(q), t(k), t(v)
            idx_t = t(idx).to(torch.int32)
            theirs = fla_selected(qt, kt, vt, idx_t).transpose(1, 2)
            rec.guard("peers_correctness", {"L": L, "variant": "selected: fla, same indices"},
                      lambda: {"rel_err": rel(theirs, ref), "rel_diff_ours_vs_fla": rel(ours, theirs.double()),
                               "max_abs_diff_ours_vs_fla": (ours.float() - theirs.float()).abs().max().item()})
            ones = torch.ones(B, L, H, device="cuda", dtype=q.dtype)
            rec.guard("peers_correctness", {"L": L, "variant": "compressed + selected (blocks of 64): fla parallel_nsa"},
                      lambda: {"rel_err": rel(fla_cmp_slc(qt, kt, vt, ones).transpose(1, 2), ref64)})

            def fla_blocks():
                kc, vc = fla["pool"](kt, sbs, None), fla["pool"](vt, sbs, None)
                _, lse = fla["compression"](qt, kc, vc, TK=L, block_size=sbs, scale=scale)
                got = fla["topk"](qt, kc, TK=L, lse=lse, block_counts=S, block_size=sbs, scale=scale)
                got = t(got.long())[..., :S]
                mine_sorted = my_idx.sort(-1).values
                return {"rows_same_blocks_as_ours": (got.sort(-1).values == mine_sorted).all(-1).float().mean().item(),
                        "rows_same_blocks_as_float64": (got.sort(-1).values == idx64.sort(-1).values)
                        .all(-1).float().mean().item()}

            rec.guard("peers_correctness", {"L": L, "variant": "fla's top-16 selection against ours"}, fla_blocks)
    q = k = v = qd = kd = vd = ref = ref64 = None
    torch.cuda.empty_cache()

    for L in lengths:
        q, k, v = inputs(L)
        idx = random_block_indices(B, HKV, L, L, S, sbs, True, device="cuda")
        lab = {"L": L}
        with torch.no_grad():
            for name, run in PINNED_DENSE.items():
                rec.guard("peers", {**lab, "stage": "dense", "variant": name}, lambda run=run: timed(lambda: run(q, k, v)))
            rec.guard("peers", {**lab, "stage": "sliding 512", "variant": "ours (dispatch: band kernel)"},
                      lambda: timed(lambda: sliding_window_attention(q, k, v, win, causal=True)))
            flex = _flex_direct(L, win)
            rec.guard("peers", {**lab, "stage": "sliding 512", "variant": "FlexAttention direct"},
                      lambda: timed(lambda: flex(q, k, v)))
            rec.guard("peers", {**lab, "stage": "selected, same random indices", "variant": "ours"},
                      lambda: timed(lambda: selected_block_attention_triton(q, k, v, idx, sbs, causal=True)))
            rec.guard("peers", {**lab, "stage": "compressed + top-16 + selected (blocks of 64)", "variant": "ours"},
                      lambda: timed(lambda: _ours_cmp_slc(q, k, v, sbs, S)))
            if fla:
                qt, kt, vt = t(q), t(k), t(v)
                idx_t = t(idx).to(torch.int32)
                ones = torch.ones(B, L, H, device="cuda", dtype=q.dtype)
                rec.guard("peers", {**lab, "stage": "selected, same random indices", "variant": "fla"},
                          lambda: timed(lambda: fla_selected(qt, kt, vt, idx_t)))
                ours = selected_block_attention_triton(q, k, v, idx, sbs, causal=True)
                theirs = fla_selected(qt, kt, vt, idx_t).transpose(1, 2)
                rec.record("peers", {**lab, "stage": "selected, same random indices", "variant": "ours vs fla",
                                     "rel_diff": rel(ours, theirs.double()),
                                     "max_abs_diff": (ours.float() - theirs.float()).abs().max().item()})
                ours = theirs = None
                rec.guard("peers", {**lab, "stage": "compressed + top-16 + selected (blocks of 64)",
                                    "variant": "fla parallel_nsa"},
                          lambda: timed(lambda: fla_cmp_slc(qt, kt, vt, ones)))
                qt = kt = vt = idx_t = ones = None
        q = k = v = idx = flex = None
        torch.cuda.empty_cache()


def sliding_mask(rec: Recorder, lengths=(65536, 131072)) -> None:
    """What building the sliding-window block mask costs (memory, time), and the window's time at 131072."""
    win = NSA["sliding_window_size"]
    for L in lengths:
        sliding_flex._block_mask.cache_clear()
        torch.cuda.synchronize()
        t0 = time.perf_counter()
        peak = cuda_peak_bytes(lambda: sliding_flex._block_mask(L, L, win, True, "cuda:0"))
        rec.record("sliding_mask", {"L": L, "first_build_s": time.perf_counter() - t0, "peak_extra_mib": peak / 2**20})
        if L == 65536:  # the same mask built without compiling (as before), for the record
            from torch.nn.attention.flex_attention import create_block_mask

            peak = cuda_peak_bytes(lambda: create_block_mask(sliding_flex._window_mod(win, True), None, None, L, L,
                                                             device="cuda", BLOCK_SIZE=sliding_flex._BLOCK))
            rec.record("sliding_mask", {"L": L, "uncompiled_build_peak_extra_mib": peak / 2**20})
            torch.cuda.empty_cache()
        q, k, v = inputs(L)
        with torch.no_grad():
            rec.guard("sliding_mask", {"L": L, "stage": "sliding: FlexAttention"},
                      lambda: timed(lambda: sliding_window_attention(q, k, v, win, causal=True)))
        q = k = v = None
        torch.cuda.empty_cache()


def float32_stages(rec: Recorder, L: int = 16384) -> None:
    """float32 at L=16384: the window through FlexAttention against chunked SDPA, and the whole forward now."""
    q, k, v = inputs(L, torch.float32)
    win, scale = NSA["sliding_window_size"], D ** -0.5
    lab = {"L": L, "dtype": "float32"}
    with torch.no_grad():
        rec.guard("float32", {**lab, "stage": "sliding: FlexAttention"}, lambda: timed(
            lambda: sliding_flex.sliding_window_flex(q, k, v, win, causal=True, scale=scale)))
        with reference_only():
            rec.guard("float32", {**lab, "stage": "sliding: chunked SDPA"},
                      lambda: timed(lambda: sliding_window_attention(q, k, v, win, causal=True, scale=scale)))
        rec.guard("float32", {**lab, "stage": "nsa (now)"},
                  lambda: timed(lambda: nsa_attention(q, k, v, gates=EQUAL_GATES, **NSA), min_runs=3))


# --------------------------------------------------------------------------- query tiles and the group sum (issue 16)

PREVIOUS: dict = {}  # earlier copies of kernel modules (--previous), timed side by side as "before"


def _load_previous(folder: str | None) -> None:
    """Import selected_prev.py / compressed_prev.py (and compressed_exp.py, for tune_split) from ``folder``."""
    import importlib.util

    if not folder:
        return
    for name in ("selected_prev", "compressed_prev", "compressed_exp"):
        path = Path(folder) / f"{name}.py"
        if path.exists():
            spec = importlib.util.spec_from_file_location(name, path)
            mod = importlib.util.module_from_spec(spec)
            spec.loader.exec_module(mod)
            PREVIOUS[name] = mod


def _nsa_indices(q, k, v):
    """The selection nsa_attention makes on these inputs (compressed kernel's importance, forced blocks)."""
    cbs, st, sbs, S = (NSA[key] for key in ("compress_block_size", "compress_block_sliding_stride",
                                            "selection_block_size", "num_selected_blocks"))
    kc, vc = compress_kv(k, cbs, st), compress_kv(v, cbs, st)
    _, imp = compressed_kernel.compressed_attention_triton(q, kc, vc, cbs, st, causal=True,
                                                           selection_block_size=sbs, num_keys=k.shape[2])
    return select_blocks(imp, S, sbs, causal=True), imp


def _select_bands(rec: Recorder, imp, L: int) -> None:
    """The fused selection in causal row bands against one full-width launch (time) and the stable sort (picks)."""
    from triton.testing import do_bench

    sbs, S = NSA["selection_block_size"], NSA["num_selected_blocks"]
    full = lambda Lq, n_sel, sel_block, causal: [(0, Lq, block_select.pow2(n_sel, 16))]  # noqa: E731
    banded = block_select._row_bands
    for name, bands in (("one full-width launch (before)", full), ("causal row bands (now)", banded)):
        block_select._row_bands = bands
        try:
            ms = do_bench(lambda: block_select.select_blocks_triton(imp, S, sbs, causal=True), warmup=50, rep=300,
                          return_mode="median")
        finally:
            block_select._row_bands = banded
        rec.record("tune_tiles", {"kernel": f"select: {name}", "L": L, "median_ms": ms})
    with reference_only():
        want = select_blocks(imp, S, sbs, causal=True)
    tied = (imp * 3 / imp.amax(-1, keepdim=True).clamp(min=1e-30)).round() / 3
    with reference_only():
        want_tied = select_blocks(tied, S, sbs, causal=True)
    for what, x, ref in (("compressed kernel's importance", imp, want), ("3 levels (ties)", tied, want_tied)):
        same = (block_select.select_blocks_triton(x, S, sbs, causal=True) == ref).all(-1)
        rec.record("correctness_select_bands", {"L": L, "importance": what, "rows": same.numel(),
                                                "rows_differing": int((~same).sum()), "pass": bool(same.all())})


def _tile_overlap(idx, queries: int) -> dict:
    """How much a tile of consecutive queries shares: leading slots equal in all of them, distinct blocks."""
    B_, Hs, L, S = idx.shape
    t = idx[:, :, : L // queries * queries].reshape(B_, Hs, L // queries, queries, S)
    eq = (t == t[:, :, :, :1]).all(3)
    shared = eq.int().cumprod(-1).sum(-1).float()
    flat = t.reshape(B_, Hs, L // queries, queries * S).sort(-1).values
    distinct = ((flat[..., 1:] != flat[..., :-1]) & (flat[..., 1:] >= 0)).sum(-1) + (flat[..., 0] >= 0)
    return {"queries": queries, "mean_shared_slots": shared.mean().item(),
            "mean_distinct_blocks_per_tile": distinct.float().mean().item(),
            "blocks_loaded_vs_one_query_per_program": ((queries * S - (queries - 1) * shared) / (queries * S))
            .mean().item()}


def correctness_tiles(rec: Recorder) -> None:
    """The query-tile selected kernel and the group-sum-first compressed kernel against float64, every setting."""
    sbs, S = NSA["selection_block_size"], NSA["num_selected_blocks"]
    L = 4096
    for dtype, limit in ((torch.bfloat16, 1e-2), (torch.float16, 2e-3), (torch.float32, 1e-4)):
        q, k, v = inputs(L, dtype)
        for kind in ("nsa selection", "random"):
            idx = (_nsa_indices(q, k, v)[0] if kind == "nsa selection" else
                   random_block_indices(B, HKV, L, L, S, sbs, True, device="cuda"))
            ref = selected_block_attention(q.double(), k.double(), v.double(), idx, sbs, causal=True)
            # (float32 with 8 queries of 32 keys, or 4 of 64, needs more shared memory than an H200 has: run 17.)
            for cfg in ({"queries": 1}, {"queries": 4, "block_nb": 32}, {"queries": 2, "block_nb": 64}) + (
                    () if dtype == torch.float32 else ({"queries": 8, "block_nb": 32}, {"queries": 4, "block_nb": 64})):
                row = {"dtype": str(dtype)[6:], "L": L, "indices": kind, **cfg}

                def check(cfg=cfg):
                    out = torch.full_like(q, float("nan"))  # poisoned: every element must be written
                    out.copy_(selected_block_attention_triton(q, k, v, idx, sbs, causal=True, **cfg))
                    err = rel(out, ref)
                    return {"rel_err": err, "nan": bool(out.isnan().any()),
                            "pass": err < limit and not bool(out.isnan().any())}

                rec.guard("correctness_tiles", {"kernel": "selected", **row}, check)
        q = k = v = idx = ref = None
        torch.cuda.empty_cache()
    cbs, st = NSA["compress_block_size"], NSA["compress_block_sliding_stride"]
    for dtype in (torch.bfloat16, torch.float16):
        q, k, v = inputs(L, dtype)
        ref_out, ref_imp = _compressed_reference(q, k, v, cbs, st, sbs, True, D ** -0.5)
        kc, vc = compress_kv(k, cbs, st), compress_kv(v, cbs, st)
        for sum_first in (True, False):
            out, imp = compressed_kernel.compressed_attention_triton(q, kc, vc, cbs, st, causal=True,
                                                                     selection_block_size=sbs, num_keys=L,
                                                                     sum_first=sum_first)
            row = {"kernel": "compressed", "dtype": str(dtype)[6:], "L": L, "sum_first": sum_first,
                   "out_rel_err": rel(out, ref_out), "imp_rel_err": rel(imp, ref_imp),
                   "zero_pattern_same": bool(((imp > 0) == (ref_imp > 0)).all()),
                   "nan": bool(out.isnan().any() or imp.isnan().any())}
            row["pass"] = row["out_rel_err"] < 1e-2 and row["imp_rel_err"] < 1e-2 and row["zero_pattern_same"]
            rec.record("correctness_tiles", row)
        q = k = v = kc = vc = ref_out = ref_imp = None
        torch.cuda.empty_cache()


def tune_tiles(rec: Recorder, lengths=(16384, 65536)) -> None:
    """Selected kernel per launch (query tiles) on NSA's own selection and on random indices; compressed
    kernel with the group sum before / after the map. Earlier copies (--previous) in the same process."""
    from triton.testing import do_bench

    cbs, st, sbs, S = (NSA[key] for key in ("compress_block_size", "compress_block_sliding_stride",
                                            "selection_block_size", "num_selected_blocks"))
    sel_cfgs = [{"queries": 1, "num_warps": 4, "num_stages": 2}]
    sel_cfgs += [{"queries": qn, "block_nb": nb, "num_warps": w, "num_stages": s}
                 for qn, nb, w, s in ((2, 64, 4, 2), (4, 32, 4, 2), (4, 32, 4, 3), (4, 32, 8, 2), (4, 64, 4, 2),
                                      (4, 64, 8, 2), (8, 32, 4, 2), (8, 32, 8, 2), (8, 16, 4, 3), (16, 16, 8, 2))]
    cmp_cfgs = [dict(sum_first=sf, rows=r, block_n=n, num_warps=w, num_stages=s)
                for sf, r, n, w, s in ((False, 256, 64, 8, 2), (False, 256, 64, 8, 3), (True, 256, 64, 8, 2),
                                       (True, 256, 64, 8, 3), (True, 256, 64, 8, 4), (True, 256, 32, 8, 3),
                                       (True, 128, 64, 4, 3))]
    best = {}
    for L in lengths:
        q, k, v = inputs(L)
        nsa_idx, imp = _nsa_indices(q, k, v)
        _select_bands(rec, imp, L)
        imp = None
        for qn in (2, 4, 8, 16):
            rec.record("tile_overlap", {"L": L, "indices": "nsa selection", **_tile_overlap(nsa_idx, qn)})
        rand_idx = random_block_indices(B, HKV, L, L, S, sbs, True, device="cuda")
        rec.record("tile_overlap", {"L": L, "indices": "random", **_tile_overlap(rand_idx, 4)})
        for kind, idx in (("nsa selection", nsa_idx), ("random", rand_idx)):
            if "selected_prev" in PREVIOUS:
                fn = PREVIOUS["selected_prev"].selected_block_attention_triton
                rec.record("tune_tiles", {"kernel": "selected (before: one query per program)", "L": L,
                                          "indices": kind, "median_ms": do_bench(
                                              lambda: fn(q, k, v, idx, sbs, causal=True), warmup=50, rep=300,
                                              return_mode="median")})
            for cfg in sel_cfgs:
                try:
                    ms = do_bench(lambda: selected_block_attention_triton(q, k, v, idx, sbs, causal=True, **cfg),
                                  warmup=50, rep=300, return_mode="median")
                except Exception as e:  # noqa: BLE001 - a launch the chip refuses is a row
                    rec.record("tune_tiles", {"kernel": "selected", "L": L, "indices": kind, **cfg,
                                              "error": str(e).splitlines()[0][:200]})
                    continue
                rec.record("tune_tiles", {"kernel": "selected", "L": L, "indices": kind, **cfg, "median_ms": ms})
                best.setdefault(("selected", kind), {}).setdefault(str(cfg), []).append(ms)
        kc, vc = compress_kv(k, cbs, st), compress_kv(v, cbs, st)
        if "compressed_prev" in PREVIOUS:
            fn = PREVIOUS["compressed_prev"].compressed_attention_triton
            rec.record("tune_tiles", {"kernel": "compressed (before)", "L": L, "median_ms": do_bench(
                lambda: fn(q, kc, vc, cbs, st, causal=True, selection_block_size=sbs, num_keys=L),
                warmup=50, rep=300, return_mode="median")})
        for cfg in cmp_cfgs:
            try:
                ms = do_bench(lambda: compressed_kernel.compressed_attention_triton(
                    q, kc, vc, cbs, st, causal=True, selection_block_size=sbs, num_keys=L, **cfg),
                    warmup=50, rep=300, return_mode="median")
            except Exception as e:  # noqa: BLE001
                rec.record("tune_tiles", {"kernel": "compressed", "L": L, **cfg, "error": str(e).splitlines()[0][:200]})
                continue
            rec.record("tune_tiles", {"kernel": "compressed", "L": L, **cfg, "median_ms": ms})
            best.setdefault(("compressed", ""), {}).setdefault(str(cfg), []).append(ms)
        rec.record("tune_tiles", {"kernel": "compressed: output only (pass 1)", "L": L, "median_ms": do_bench(
            lambda: compressed_kernel.compressed_attention_triton(q, kc, vc, cbs, st, causal=True),
            warmup=50, rep=300, return_mode="median")})
        q = k = v = kc = vc = nsa_idx = rand_idx = None
        torch.cuda.empty_cache()
    # The launch with the least total time over every length, on NSA's own selection, becomes the default here.
    import ast

    for key, target in ((("selected", "nsa selection"), selected_kernel.DEFAULTS),
                        (("compressed", ""), compressed_kernel.DEFAULTS)):
        every = {c: sum(t) for c, t in best.get(key, {}).items() if len(t) == len(lengths)}
        if every:
            cfg = ast.literal_eval(min(every, key=every.get))
            target.update(cfg)
            rec.results.setdefault("tiles_defaults", {})[key[0]] = cfg


def _pair(first, second, side):
    """``first()`` on this stream and ``second()`` on ``side``, joined: what two branches cost together."""
    def run():
        side.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(side):
            second()
        first()
        torch.cuda.current_stream().wait_stream(side)
    return run


def levers(rec: Recorder, lengths=(16384, 65536)) -> None:
    """Two branches at once on two streams against one after the other (does a compute-bound kernel fill
    what an L2-bound one leaves?), and FlexAttention's kernel options for the window."""
    from triton.testing import do_bench

    cbs, st = NSA["compress_block_size"], NSA["compress_block_sliding_stride"]
    sbs, win = NSA["selection_block_size"], NSA["sliding_window_size"]
    scale = D ** -0.5
    bench = lambda fn: do_bench(fn, warmup=50, rep=300, return_mode="median")  # noqa: E731
    for L in lengths:
        q, k, v = inputs(L)
        kc, vc = compress_kv(k, cbs, st), compress_kv(v, cbs, st)
        with torch.no_grad():
            _, imp = compressed_kernel.compressed_attention_triton(q, kc, vc, cbs, st, causal=True,
                                                                   selection_block_size=sbs, num_keys=L)
            idx = select_blocks(imp, NSA["num_selected_blocks"], sbs, causal=True)
            imp = None
            half, hq = HKV // 2, H // 2
            qa, qb = q[:, :hq].contiguous(), q[:, hq:].contiguous()
            kca, vca = kc[:, :half].contiguous(), vc[:, :half].contiguous()
            kb, vb, idxb = k[:, half:].contiguous(), v[:, half:].contiguous(), idx[:, half:].contiguous()
            cmp_a = lambda: compressed_kernel.compressed_attention_triton(  # noqa: E731
                qa, kca, vca, cbs, st, causal=True, selection_block_size=sbs, num_keys=L)
            sel_b = lambda: selected_block_attention_triton(qb, kb, vb, idxb, sbs, causal=True)  # noqa: E731
            sel_all = lambda: selected_block_attention_triton(q, k, v, idx, sbs, causal=True)  # noqa: E731
            slide = lambda: sliding_window_attention(q, k, v, win, causal=True, scale=scale)  # noqa: E731
            side = torch.cuda.Stream(priority=0)
            side_hi = torch.cuda.Stream(priority=-1)
            for name, fn in (("compressed (heads 0-1) alone", cmp_a), ("selected (heads 2-3) alone", sel_b),
                             ("compressed (heads 0-1) + selected (heads 2-3), one stream",
                              lambda: (cmp_a(), sel_b())),
                             ("compressed (heads 0-1) || selected (heads 2-3), two streams",
                              _pair(cmp_a, sel_b, side)),
                             ("selected alone", sel_all), ("sliding alone", slide),
                             ("selected + sliding, one stream", lambda: (sel_all(), slide())),
                             ("selected || sliding, two streams", _pair(sel_all, slide, side)),
                             ("selected || sliding (high priority), two streams", _pair(sel_all, slide, side_hi))):
                rec.guard("levers", {"L": L, "what": "pair", "case": name}, lambda fn=fn: {"median_ms": bench(fn)})
            qa = qb = kca = vca = kb = vb = idxb = idx = None
            # FlexAttention's own kernel options for the window (each compiles once).
            mask = sliding_flex._block_mask(L, L, win, True, str(q.device))
            flex = sliding_flex._flex(True)
            for opts in ({}, {"USE_TMA": True}, {"BLOCKS_ARE_CONTIGUOUS": True, "ROWS_GUARANTEED_SAFE": True},
                         {"BLOCK_M": 128, "BLOCK_N": 128, "num_warps": 8, "num_stages": 2}):
                def fl(opts=opts):
                    fn = lambda: flex(q, k, v, block_mask=mask, scale=scale, enable_gqa=True,  # noqa: E731
                                      kernel_options=opts or None)
                    out = fn()
                    ref = slide()
                    return {"median_ms": bench(fn), "max_abs_diff_to_default": (out.float() - ref.float()).abs()
                            .max().item()}
                if L == lengths[-1] or not opts:
                    rec.guard("levers", {"L": L, "what": "sliding: FlexAttention", "kernel_options": opts}, fl)
        q = k = v = kc = vc = None
        torch.cuda.empty_cache()


def tune_split(rec: Recorder, lengths=(16384, 65536)) -> None:
    """The compressed kernel's second pass fused (one kernel) or as a kernel of its own, over launch settings;
    where pass 2's time goes (--previous's compressed_exp.py: the same pass with parts left out); the
    fastest over both lengths becomes the default for the sections after this one."""
    from triton.testing import do_bench

    cbs, st, sbs = NSA["compress_block_size"], NSA["compress_block_sliding_stride"], NSA["selection_block_size"]
    bench = lambda fn: do_bench(fn, warmup=50, rep=300, return_mode="median")  # noqa: E731
    fused = dict(compressed_kernel.DEFAULTS, split=False)
    cfgs = [fused, dict(fused, reshape_map=False)]
    for r2, n2, w2, s2, rmap in ((256, 32, 8, 3, True), (256, 32, 8, 3, False), (256, 64, 8, 3, True),
                                 (256, 16, 8, 3, True), (128, 32, 4, 4, True), (512, 32, 8, 3, True)):
        cfgs.append(dict(fused, split=True, rows2=r2, block_n2=n2, num_warps2=w2, num_stages2=s2, reshape_map=rmap))
    best: dict = {}
    for L in lengths:
        q, k, v = inputs(L)
        kc, vc = compress_kv(k, cbs, st), compress_kv(v, cbs, st)
        with torch.no_grad():
            ref_out, ref_imp = compressed_kernel.compressed_attention_triton(
                q, kc, vc, cbs, st, causal=True, selection_block_size=sbs, num_keys=L, **fused)
            for cfg in cfgs:
                def one(cfg=cfg):
                    run = lambda: compressed_kernel.compressed_attention_triton(  # noqa: E731
                        q, kc, vc, cbs, st, causal=True, selection_block_size=sbs, num_keys=L, **cfg)
                    out, imp = run()
                    ms = bench(run)
                    best.setdefault(str(cfg), []).append(ms)
                    return {"median_ms": ms, "out_equal_to_fused": bool(torch.equal(out, ref_out)),
                            "imp_max_rel_to_fused": ((imp - ref_imp).abs().max() / ref_imp.abs().max()).item()}
                rec.guard("tune_split", {"L": L, **cfg}, one)
            rec.guard("tune_split", {"L": L, "what": "output only (pass 1)"}, lambda: {"median_ms": bench(
                lambda: compressed_kernel.compressed_attention_triton(q, kc, vc, cbs, st, causal=True))})
            exp = PREVIOUS.get("compressed_exp")
            if exp is not None:
                names = ("pass 2 whole", "no atomic add per tile (one at the end)", "no mapping product, no atomics",
                         "no group sum either (row sums of the weights)", "no exponentials either (row sums of QK^T)")
                for mode, name in enumerate(names):
                    rec.guard("tune_split", {"L": L, "what": f"split, pass 2 parts: {name}", "mode": mode},
                              lambda mode=mode: {"median_ms": bench(lambda: exp.compressed_attention_triton(
                                  q, kc, vc, cbs, st, causal=True, selection_block_size=sbs, num_keys=L,
                                  split=True, mode=mode))})
        q = k = v = kc = vc = ref_out = ref_imp = None
        torch.cuda.empty_cache()
    import ast

    every = {c: sum(t) for c, t in best.items() if len(t) == len(lengths)}
    if every:
        cfg = ast.literal_eval(min(every, key=every.get))
        compressed_kernel.DEFAULTS.update(cfg)
        rec.results.setdefault("tiles_defaults", {})["compressed"] = cfg
        rec.record("tune_split", {"chosen": cfg, "total_ms": every[str(cfg)], "fused_total_ms": every.get(str(fused))})


def whole(rec: Recorder, lengths=(16384, 65536)) -> None:
    """Whole nsa_attention against SDPA cuDNN and flash in one process, now and with --previous's kernels,
    and the compressed kernel now and before (the stage that changed)."""
    cbs, st, sbs = NSA["compress_block_size"], NSA["compress_block_sliding_stride"], NSA["selection_block_size"]
    for L in lengths:
        q, k, v = inputs(L)
        lab = {"L": L, "dtype": "bfloat16"}
        nsa = lambda: nsa_attention(q, k, v, gates=EQUAL_GATES, **NSA)  # noqa: E731
        with torch.no_grad():
            for name, run in PINNED_DENSE.items():
                rec.guard("whole", {**lab, "stage": name}, lambda run=run: timed(lambda: run(q, k, v)))
            rec.guard("whole", {**lab, "stage": "nsa (now)", "compressed": dict(compressed_kernel.DEFAULTS)},
                      lambda: timed(nsa, min_runs=9))
            if {"selected_prev", "compressed_prev"} <= PREVIOUS.keys():
                with previous_kernels():
                    rec.guard("whole", {**lab, "stage": "nsa (before: --previous kernels)"},
                              lambda: timed(nsa, min_runs=9))
            rec.guard("whole", {**lab, "stage": "nsa (now, again)"}, lambda: timed(nsa, min_runs=9))
            with window_through_flex():
                rec.guard("whole", {**lab, "stage": "nsa (now, window through FlexAttention)"},
                          lambda: timed(nsa, min_runs=9))
            rec.guard("whole", {**lab, "stage": "dense (cudnn), again"},
                      lambda: timed(lambda: PINNED_DENSE["dense (cudnn)"](q, k, v)))
            kc, vc = compress_kv(k, cbs, st), compress_kv(v, cbs, st)
            rec.guard("whole", {**lab, "stage": "compressed kernel (out + importance)"},
                      lambda: timed(lambda: compressed_kernel.compressed_attention_triton(
                          q, kc, vc, cbs, st, causal=True, selection_block_size=sbs, num_keys=L)))
            if "compressed_prev" in PREVIOUS:
                prev_cmp = PREVIOUS["compressed_prev"].compressed_attention_triton
                rec.guard("whole", {**lab, "stage": "compressed kernel (before: --previous)"},
                          lambda: timed(lambda: prev_cmp(q, kc, vc, cbs, st, causal=True, selection_block_size=sbs,
                                                         num_keys=L)))
        q = k = v = kc = vc = None
        torch.cuda.empty_cache()


def levers23(rec: Recorder, lengths=(16384, 65536)) -> None:
    """Run 23's changes one at a time, each against the code without it in the same process: pass 2 of the
    compressed kernel transposed (the group sum inside each thread), the window as our band kernel against
    FlexAttention, and the gated sum in the selected kernel's store; GPU correctness of each. (Call 1 of run 23 also timed FlexAttention's
    ROWS_GUARANTEED_SAFE for the window: NaN, see docs/benchmarks.md; dropped.)"""
    from triton.testing import do_bench

    cbs, st, sbs = NSA["compress_block_size"], NSA["compress_block_sliding_stride"], NSA["selection_block_size"]
    win, scale = NSA["sliding_window_size"], D ** -0.5
    bench = lambda fn: do_bench(fn, warmup=50, rep=300, return_mode="median")  # noqa: E731
    # Correctness at 4096 against float64: the gated selected kernel (output poisoned first) and pass 2 transposed.
    L = 4096
    q, k, v = inputs(L)
    idx, _ = _nsa_indices(q, k, v)
    gates = torch.rand(B, H, L, 3, device="cuda", dtype=q.dtype)
    oc, ow = torch.randn_like(q), torch.randn_like(q)
    with torch.no_grad():
        ref = selected_block_attention(q.double(), k.double(), v.double(), idx, sbs, causal=True)
        gd = gates.double()
        ref = gd[..., 0:1] * oc.double() + gd[..., 1:2] * ref + gd[..., 2:3] * ow.double()
        for queries in (1, 4):
            out = torch.full_like(q, float("nan"))
            out.copy_(selected_block_attention_triton(q, k, v, idx, sbs, causal=True, queries=queries,
                                                      gated=(oc, ow, gates)))
            err = rel(out, ref)
            rec.record("levers23_correctness", {"what": "selected kernel, gated sum in the store", "L": L,
                                                "queries": queries, "rel_err": err, "nan": bool(out.isnan().any()),
                                                "pass": err < 1e-2 and not bool(out.isnan().any())})
        ref_out, ref_imp = _compressed_reference(q, k, v, cbs, st, sbs, True, scale)
        kc, vc = compress_kv(k, cbs, st), compress_kv(v, cbs, st)
        for t2 in (True, False):
            out, imp = compressed_kernel.compressed_attention_triton(q, kc, vc, cbs, st, causal=True,
                                                                     selection_block_size=sbs, num_keys=L,
                                                                     transpose2=t2)
            row = {"what": "compressed kernel", "transpose2": t2, "L": L, "out_rel_err": rel(out, ref_out),
                   "imp_rel_err": rel(imp, ref_imp), "zero_pattern_same": bool(((imp > 0) == (ref_imp > 0)).all()),
                   "nan": bool(out.isnan().any() or imp.isnan().any())}
            row["pass"] = row["out_rel_err"] < 1e-2 and row["imp_rel_err"] < 1e-2 and row["zero_pattern_same"]
            rec.record("levers23_correctness", row)
        for causal in (True, False):
            ref = sliding_window_attention(q.double(), k.double(), v.double(), win, causal=causal, scale=scale)
            out = torch.full_like(q, float("nan"))
            out.copy_(sliding_band.sliding_band_triton(q, k, v, win, causal=causal, scale=scale))
            with window_through_flex():
                flex_err = rel(sliding_window_attention(q, k, v, win, causal=causal, scale=scale), ref)
            err = rel(out, ref)
            rec.record("levers23_correctness", {"what": "sliding band kernel", "L": L, "window": win, "causal": causal,
                                                "rel_err": err, "flex_rel_err": flex_err,
                                                "nan": bool(out.isnan().any()),
                                                "pass": err < 1e-2 and not bool(out.isnan().any())})
    q = k = v = idx = gates = oc = ow = ref = ref_out = ref_imp = kc = vc = out = None
    torch.cuda.empty_cache()
    for L in lengths:
        q, k, v = inputs(L)
        kc, vc = compress_kv(k, cbs, st), compress_kv(v, cbs, st)
        g = torch.full((B, H, L, 3), 1 / 3, device="cuda", dtype=q.dtype)
        with torch.no_grad():
            run = {t2: (lambda t2=t2: compressed_kernel.compressed_attention_triton(
                q, kc, vc, cbs, st, causal=True, selection_block_size=sbs, num_keys=L, transpose2=t2))
                for t2 in (True, False)}
            out_t, imp_t = run[True]()
            out_n, imp_n = run[False]()
            cmp_row = {"out_equal": bool(torch.equal(out_t, out_n)),
                       "imp_max_rel_diff": ((imp_t - imp_n).abs().max() / imp_n.abs().max()).item(),
                       "zero_pattern_same": bool(torch.equal(imp_t > 0, imp_n > 0))}
            out_t = imp_t = out_n = None
            for t2 in (True, False, True):
                rec.guard("levers23", {"L": L, "what": "compressed kernel", "transpose2": t2},
                          lambda t2=t2: {"median_ms": bench(run[t2]), **cmp_row})
            if "compressed_prev" in PREVIOUS:
                prev = PREVIOUS["compressed_prev"].compressed_attention_triton
                rec.guard("levers23", {"L": L, "what": "compressed kernel (before: --previous)"},
                          lambda: {"median_ms": bench(lambda: prev(q, kc, vc, cbs, st, causal=True,
                                                                   selection_block_size=sbs, num_keys=L))})
            out_cmp, imp = run[True]()
            idx = select_blocks(imp, NSA["num_selected_blocks"], sbs, causal=True)
            imp = None
            out_win = sliding_window_attention(q, k, v, win, causal=True, scale=scale)
            with window_through_flex():
                flex_win = sliding_window_attention(q, k, v, win, causal=True, scale=scale)
            win_diff = {"max_abs_diff_band_vs_flex": (out_win.float() - flex_win.float()).abs().max().item(),
                        "nan": bool(out_win.isnan().any())}
            flex_win = None
            band = lambda: sliding_band.sliding_band_triton(q, k, v, win, causal=True, scale=scale)  # noqa: E731
            flexw = lambda: sliding_flex.sliding_window_flex(q, k, v, win, causal=True, scale=scale)  # noqa: E731
            for name, fn in (("sliding: band kernel", band), ("sliding: FlexAttention", flexw),
                             ("sliding: band kernel, again", band), ("sliding: FlexAttention, again", flexw)):
                rec.guard("levers23", {"L": L, "what": name}, lambda fn=fn: {"median_ms": bench(fn), **win_diff})
            for cfg in ({"rows": 256, "block_n": 64, "num_warps": 8, "num_stages": 2},
                        {"rows": 256, "block_n": 128, "num_warps": 8, "num_stages": 2},
                        {"rows": 128, "block_n": 64, "num_warps": 4, "num_stages": 3}):
                rec.guard("levers23", {"L": L, "what": "sliding: band kernel", **cfg}, lambda cfg=cfg: {
                    "median_ms": bench(lambda: sliding_band.sliding_band_triton(q, k, v, win, causal=True,
                                                                                 scale=scale, **cfg))})
            sel = lambda: selected_block_attention_triton(q, k, v, idx, sbs, causal=True)  # noqa: E731
            gated = lambda: selected_block_attention_triton(q, k, v, idx, sbs, causal=True,  # noqa: E731
                                                            gated=(out_cmp, out_win, g))
            apart = lambda: gate_combine.gate_combine_triton(out_cmp, sel(), out_win, g)  # noqa: E731
            diff = (gated().float() - apart().float()).abs().max().item()
            for name, fn in (("selected kernel alone", sel), ("selected kernel + gated sum pass", apart),
                             ("selected kernel with the gated sum in its store", gated),
                             ("selected kernel + gated sum pass, again", apart),
                             ("selected kernel with the gated sum in its store, again", gated)):
                rec.guard("levers23", {"L": L, "what": name}, lambda fn=fn: {"median_ms": bench(fn),
                                                                            "max_abs_diff_gated_vs_apart": diff})
        q = k = v = kc = vc = g = out_cmp = out_win = idx = None
        torch.cuda.empty_cache()


def tune_t2(rec: Recorder, lengths=(16384, 65536)) -> None:
    """Launch settings of the transposed second pass (transpose2), the compressed kernel whole; each launch's
    importance against the default's. The fastest over both lengths becomes the default for the sections
    after this one if it gains more than 2%."""
    from triton.testing import do_bench

    cbs, st, sbs = NSA["compress_block_size"], NSA["compress_block_sliding_stride"], NSA["selection_block_size"]
    cfgs = [dict(rows2=r, block_n2=n, num_warps2=w, num_stages2=s)
            for r, n, w, s in ((256, 64, 8, 3), (256, 64, 8, 4), (256, 64, 8, 2), (256, 128, 8, 3), (256, 128, 8, 2),
                               (512, 64, 8, 3), (128, 64, 4, 3), (256, 64, 4, 3), (512, 128, 8, 2))]
    total: dict = {}
    for L in lengths:
        q, k, v = inputs(L)
        kc, vc = compress_kv(k, cbs, st), compress_kv(v, cbs, st)
        with torch.no_grad():
            _, ref = compressed_kernel.compressed_attention_triton(q, kc, vc, cbs, st, causal=True,
                                                                   selection_block_size=sbs, num_keys=L)
            for cfg in cfgs:
                def one(cfg=cfg):
                    run = lambda: compressed_kernel.compressed_attention_triton(  # noqa: E731
                        q, kc, vc, cbs, st, causal=True, selection_block_size=sbs, num_keys=L, **cfg)
                    imp = run()[1]
                    ms = do_bench(run, warmup=50, rep=300, return_mode="median")
                    total.setdefault(str(cfg), []).append(ms)
                    return {"median_ms": ms, "imp_max_rel_to_default": ((imp - ref).abs().max() / ref.abs().max()).item()}
                rec.guard("tune_t2", {"L": L, **cfg}, one)
        q = k = v = kc = vc = ref = None
        torch.cuda.empty_cache()
    every = {c: sum(t) for c, t in total.items() if len(t) == len(lengths)}
    if every and str(cfgs[0]) in every:
        import ast

        best = min(every, key=every.get)
        # Only a clear gain replaces the default for the sections after this one (do_bench's noise is ~1%).
        adopted = every[best] < 0.98 * every[str(cfgs[0])]
        if adopted:
            compressed_kernel.DEFAULTS.update(ast.literal_eval(best))
        rec.record("tune_t2", {"fastest": best, "total_ms": every[best], "default_total_ms": every[str(cfgs[0])],
                               "adopted": adopted})


def ceilings(rec: Recorder) -> None:
    """The chip's two ceilings as measured here: a device-to-device copy (bytes read + written) and a bf16 matmul."""
    from triton.testing import do_bench

    x = torch.randn(2**30, device="cuda", dtype=torch.bfloat16)  # 2 GiB
    y = torch.empty_like(x)
    ms = do_bench(lambda: y.copy_(x), warmup=50, rep=300, return_mode="median")
    rec.record("ceilings", {"what": "copy 2 GiB (read + write)", "median_ms": ms, "TB_per_s": 2 * x.numel() * 2 / ms / 1e9})
    x = y = None
    a, b = (torch.randn(8192, 8192, device="cuda", dtype=torch.bfloat16) for _ in range(2))
    ms = do_bench(lambda: a @ b, warmup=50, rep=300, return_mode="median")
    rec.record("ceilings", {"what": "bf16 matmul 8192^3", "median_ms": ms, "TFLOP_per_s": 2 * 8192**3 / ms / 1e9})
    torch.cuda.empty_cache()


def check_dense(rec: Recorder) -> None:
    """The reference everything is judged by, on the GPU: SDPA against float64 dense attention."""
    q, k, v = inputs(2048, torch.bfloat16, heads=16, kv_heads=2, head_dim=64)
    ref = dense_attention(q.double(), k.double(), v.double(), causal=True)
    rec.record("check_dense", {"rel_err_sdpa_bf16": rel(F.scaled_dot_product_attention(
        q, k, v, is_causal=True, enable_gqa=True), ref)})


RUNS = {"check_dense": check_dense, "ceilings": ceilings, "sliding_mask": sliding_mask, "float32": float32_stages, "correctness_selected": correctness_selected, "correctness_topk": correctness_topk,
        "correctness_compressed": correctness_compressed, "correctness_select_sliding": correctness_select_sliding,
        "tune_compressed": tune_compressed, "tune_compressed_fp32": tune_compressed_fp32, "tune_select": tune_select,
        "topk": topk_table, "nsa": nsa_table, "stages": stages,
        "peers": peers, "correctness_tiles": correctness_tiles, "tune_tiles": tune_tiles, "levers": levers,
        "tune_split": tune_split, "whole": whole, "levers23": levers23, "tune_t2": tune_t2}  # tune_selected and selected pass the tuned launch along (see main)
SECTIONS = ("check_dense", "ceilings", "correctness_selected", "correctness_topk", "correctness_compressed",
            "correctness_select_sliding", "tune_selected", "tune_compressed", "tune_compressed_fp32", "tune_select",
            "selected", "topk", "nsa", "stages", "peers", "sliding_mask", "float32", "correctness_tiles",
            "tune_tiles", "levers", "tune_split", "whole", "levers23", "tune_t2")


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m benchmarks.gpu", description=__doc__.split("\n")[0])
    ap.add_argument("out_dir", help="where gpu_results.json goes")
    ap.add_argument("sections", nargs="*", metavar="SECTION", help=f"from {list(SECTIONS)} (default: all, in this order)")
    ap.add_argument("--previous", metavar="DIR", help="a folder with earlier copies of the kernel modules "
                    "(selected_prev.py, compressed_prev.py), timed side by side as 'before'")
    args = ap.parse_args(argv)
    unknown = [s for s in args.sections if s not in SECTIONS]
    if unknown:
        ap.error(f"unknown section(s) {unknown}; choose from {list(SECTIONS)}")
    if not torch.cuda.is_available():
        ap.error("these checks and tables need a CUDA device")
    import triton

    rec = Recorder(args.out_dir)
    _load_previous(args.previous)
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
