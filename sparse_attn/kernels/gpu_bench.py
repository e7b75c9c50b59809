"""GPU checks and benchmarks for the kernels, in one run: ``python -m sparse_attn.kernels.gpu_bench OUT_DIR``.

Correctness first (against float64 references on the GPU), then launch
tuning, then the tables recorded in docs/benchmarks.md: the selected-block
branch against SDPA's backends, whole NSA, and top-k attention. Times come from
``sparse_attn.bench.time_fn`` (torch.utils.benchmark: warm-up, CUDA
synchronisation, median and IQR); peak memory from the CUDA allocator's
high-water mark above what the inputs already hold. Every section writes its
rows to OUT_DIR/gpu_results.json as it finishes, so a run cut short keeps
what it measured.
"""
from __future__ import annotations

import json
import math
import sys
import time
import traceback

import torch
import torch.nn.functional as F
from torch.nn.attention import SDPBackend, sdpa_kernel

from ..attention import gather_kv, topk_attention
from ..bench import time_fn
from .. import nsa as nsa_mod
from ..nsa import _selected_reference, nsa_attention, selected_token_mask
from . import compressed as cmp_mod
from . import topk_fused
from .selected_block import selected_block_attention_triton
from .topk_prefilter import prefilter_topk_attention

RESULTS: dict = {"sections": {}}
OUT = "."


def _save():
    with open(f"{OUT}/gpu_results.json", "w") as f:
        json.dump(RESULTS, f, indent=1)


def _record(section, row):
    RESULTS["sections"].setdefault(section, []).append(row)
    print(section, json.dumps(row), flush=True)
    _save()


def _timed(fn, min_run_time=0.3, min_runs=7):
    torch.cuda.synchronize()
    base = torch.cuda.memory_allocated()
    torch.cuda.reset_peak_memory_stats()
    fn()
    torch.cuda.synchronize()
    peak = torch.cuda.max_memory_allocated() - base
    t = time_fn(fn, device="cuda", min_run_time=min_run_time, min_runs=min_runs)
    return {"median_ms": t.median * 1e3, "iqr_ms": t.iqr * 1e3, "runs": t.runs, "peak_extra_mib": peak / 2**20}


def _guard(section, label, fn):
    """Run one case; on failure (out of memory, unsupported backend) record the error and go on."""
    try:
        row = fn()
    except Exception as e:  # noqa: BLE001 - the sweep must go on
        torch.cuda.empty_cache()
        row = {"error": f"{type(e).__name__}: {str(e).splitlines()[0][:200]}"}
    _record(section, {**label, **row})
    return row


def random_block_indices(B, Hs, L, S, block_size, causal, device, gen=None):
    """Distinct random blocks per query among those it may see (causal: starting at or before it), -1 if fewer."""
    nb = math.ceil(L / block_size)
    out = torch.empty(B, Hs, L, S, dtype=torch.long, device=device)
    for i0 in range(0, L, 8192):  # bounded scratch: (B, Hs, 8192, nb) floats
        i1 = min(L, i0 + 8192)
        r = torch.rand(B, Hs, i1 - i0, nb, device=device, generator=gen)
        if causal:
            allowed = torch.arange(nb, device=device) * block_size <= torch.arange(i0, i1, device=device)[:, None]
            r = r.masked_fill(~allowed, -1.0)
        vals, idx = r.topk(min(S, nb), dim=-1)
        idx = idx.masked_fill(vals < 0, -1)
        out[:, :, i0:i1, : idx.shape[-1]] = idx
        out[:, :, i0:i1, idx.shape[-1]:] = -1
    return out


def _ref_selected(q, k, v, idx, bs, causal, scale):
    H, Lk = q.shape[1], k.shape[2]
    G = H // k.shape[1]
    keys = selected_token_mask(idx, bs, Lk, causal=causal).repeat_interleave(H // idx.shape[1], 1)
    s = q.double() @ k.double().repeat_interleave(G, 1).transpose(-1, -2) * scale
    w = torch.softmax(s.masked_fill(~keys, float("-inf")), -1).nan_to_num(0.0)
    return w @ v.double().repeat_interleave(G, 1)


def _rel(out, ref):
    return ((out.double() - ref).norm() / ref.norm()).item()


def correctness():
    dev = "cuda"
    for dtype in (torch.bfloat16, torch.float16, torch.float32):
        for causal in (True, False):
            for per_head in (False, True):
                for bs, L, D, Dv in ((64, 1024, 128, 128), (48, 1000, 64, 32)):
                    B, H, Hkv, S = 2, 16, 2, 6
                    q = torch.randn(B, H, L, D, device=dev, dtype=dtype)
                    k = torch.randn(B, Hkv, L, D, device=dev, dtype=dtype)
                    v = torch.randn(B, Hkv, L, Dv, device=dev, dtype=dtype)
                    idx = random_block_indices(B, H if per_head else Hkv, L, S, bs, causal, dev)
                    idx[:, :, ::7, 1] = -1  # some empty slots in the middle of a row
                    scale = 1 / math.sqrt(D)
                    ref = _ref_selected(q, k, v, idx, bs, causal, scale)
                    torch_path = _selected_reference(q, k, v, idx, bs, causal=causal, scale=scale)
                    row = {"dtype": str(dtype).split(".")[-1], "causal": causal, "per_head": per_head,
                           "block": bs, "L": L, "D": D, "Dv": Dv,
                           "torch_rel_err": _rel(torch_path, ref)}
                    for branch in (True, False):
                        out = selected_block_attention_triton(q, k, v, idx, bs, causal=causal, branch=branch)
                        row[f"kernel_rel_err_branch{int(branch)}"] = _rel(out, ref)
                        row[f"kernel_nan_branch{int(branch)}"] = bool(out.isnan().any())
                    limit = 1e-4 if dtype == torch.float32 else 1e-2
                    row["pass"] = all(row[f"kernel_rel_err_branch{b}"] < limit and not row[f"kernel_nan_branch{b}"]
                                      for b in (0, 1))
                    _record("correctness_selected", row)
    # prefilter top-k against the full-score top-k on the GPU (float32: no bf16 near-ties)
    for causal in (False, True):
        q, k, v = (torch.randn(1, h, 4096, 64, device=dev) for h in (8, 8, 8))
        ref, rs = topk_attention(q, k, v, 64, causal=causal, return_selection=True)
        for seg in (4, 8, 32):
            out, s = prefilter_topk_attention(q, k, v, 64, causal=causal, segment=seg, return_selection=True)
            same = (s.indices.sort(-1).values == rs.indices.sort(-1).values).all(-1).float().mean().item()
            _record("correctness_prefilter", {"causal": causal, "segment": seg, "same_key_sets": same,
                                              "rel_err_vs_full_topk": _rel(out, ref.double())})


def correctness_fused():
    for dtype in (torch.float32, torch.bfloat16):
        for causal in (False, True):
            for L, K, C in ((4096, 64, None), (3000, 16, 16)):
                q, k, v = (torch.randn(1, h, L, 64, device="cuda", dtype=dtype) for h in (8, 2, 2))
                ref = topk_attention(q.double(), k.double(), v.double(), K, causal=causal)
                for append in ("mask", "bits", "scan"):
                    out = topk_fused.fused_topk_attention(q, k, v, K, causal=causal, capacity=C, append=append)
                    _record("correctness_fused_topk", {"dtype": str(dtype).split(".")[-1], "causal": causal,
                                                       "L": L, "top_k": K, "capacity": C, "append": append,
                                                       "rel_err": _rel(out, ref), "nan": bool(out.isnan().any()),
                                                       "overflow_rows": topk_fused.last_overflow_rows})
    # Where "mask" and "scan" pick different keys on causal inputs (the discrepancy of run 8).
    q, k = torch.randn(1, 8, 4096, 64, device="cuda"), torch.randn(1, 2, 4096, 64, device="cuda")
    sel = {}
    for append in ("mask", "scan"):
        vals, idx = topk_fused.fused_topk_select(q, k, 64, causal=True, append=append)
        sel[append] = (vals, idx.masked_fill(torch.isneginf(vals), -1).sort(-1).values)
    diff = (sel["mask"][1] != sel["scan"][1]).any(-1).nonzero()
    rows = diff[:, 1]
    _record("correctness_fused_causal_diag", {
        "rows_differing": int(diff.shape[0]), "first": diff[:12].tolist(),
        "row_min": int(rows.min()) if rows.numel() else None, "row_max": int(rows.max()) if rows.numel() else None,
        "keys_differing_first_rows": [int((sel["mask"][1][b, r] != sel["scan"][1][b, r]).sum()) for b, r in diff[:12].tolist()],
        "mask_vals_max_minus_scan": [float(sel["mask"][0][b, r].max() - sel["scan"][0][b, r].max())
                                     for b, r in diff[:6].tolist()]})
    # The selection itself against torch.topk of float32 scores (fp32 inputs: IEEE scores on both sides).
    for causal in (False, True):
        q, k = torch.randn(1, 8, 16384, 64, device="cuda"), torch.randn(1, 2, 16384, 64, device="cuda")
        s = (q.view(1, 2, 4, 16384, 64) @ k[:, :, None].transpose(-1, -2)).view(8, 16384, 16384)
        if causal:
            s.masked_fill_(torch.ones(16384, 16384, dtype=torch.bool, device="cuda").triu(1), float("-inf"))
        ref = s.topk(64, dim=-1)
        del s
        ok = ~torch.isneginf(ref.values)
        want = ref.indices.masked_fill(~ok, -1).sort(-1).values
        for append in ("mask", "bits", "scan"):
            vals, idx = topk_fused.fused_topk_select(q, k, 64, causal=causal, append=append)
            got = idx.masked_fill(torch.isneginf(vals), -1).sort(-1).values
            same = (got == want).all(-1)
            # a differing row must differ only by keys tied (to rounding) with the k-th score
            gap = (vals.sort(-1).values - ref.values.sort(-1).values).abs().max().item()
            _record("correctness_fused_select", {"causal": causal, "L": 16384, "top_k": 64, "append": append,
                                                 "rows_same_key_set": same.float().mean().item(),
                                                 "rows_differing": int((~same).sum().item()),
                                                 "max_abs_score_gap_sorted": gap,
                                                 "overflow_rows": topk_fused.last_overflow_rows})
        del ref, want, ok
        torch.cuda.empty_cache()


def tune(L=65536):
    from triton.testing import do_bench

    B, H, Hkv, D, bs, S = 1, 64, 4, 128, 64, 16
    q = torch.randn(B, H, L, D, device="cuda", dtype=torch.bfloat16)
    k, v = (torch.randn(B, Hkv, L, D, device="cuda", dtype=torch.bfloat16) for _ in range(2))
    idx = random_block_indices(B, Hkv, L, S, bs, True, "cuda")
    best = None
    for branch in (True, False):
        for warps in (2, 4, 8):
            for stages in (1, 2, 3):
                cfg = {"branch": branch, "num_warps": warps, "num_stages": stages}
                try:
                    ms = do_bench(lambda: selected_block_attention_triton(q, k, v, idx, bs, causal=True, **cfg),
                                  warmup=50, rep=300, return_mode="median")
                except Exception as e:  # noqa: BLE001
                    _record("tune", {**cfg, "error": str(e).splitlines()[0][:200]})
                    continue
                _record("tune", {**cfg, "L": L, "median_ms": ms})
                if best is None or ms < best[0]:
                    best = (ms, cfg)
    return best[1]


def selected_table(cfg, lengths=(2048, 4096, 8192, 10240, 12288, 16384, 32768, 65536)):
    B, H, Hkv, D, bs, S = 1, 64, 4, 128, 64, 16
    for L in lengths:
        q = torch.randn(B, H, L, D, device="cuda", dtype=torch.bfloat16)
        k, v = (torch.randn(B, Hkv, L, D, device="cuda", dtype=torch.bfloat16) for _ in range(2))
        idx = random_block_indices(B, Hkv, L, S, bs, True, "cuda")
        lab = {"L": L}
        # (SDPA's memory-efficient backend takes no enable_gqa: "No available kernel" on the first run.)
        for name, backend in (("sdpa_flash", SDPBackend.FLASH_ATTENTION), ("sdpa_cudnn", SDPBackend.CUDNN_ATTENTION)):
            def run(backend=backend):
                with sdpa_kernel([backend]):
                    return F.scaled_dot_product_attention(q, k, v, is_causal=True, enable_gqa=True)
            _guard("selected", {**lab, "method": name}, lambda run=run: _timed(run))
        _guard("selected", {**lab, "method": "triton_selected", **cfg},
               lambda: _timed(lambda: selected_block_attention_triton(q, k, v, idx, bs, causal=True, **cfg)))
        if L <= 8192:
            _guard("selected", {**lab, "method": "torch_selected_reference"},
                   lambda: _timed(lambda: _selected_reference(q, k, v, idx, bs, causal=True, scale=D ** -0.5),
                                  min_run_time=0.1))
        del q, k, v, idx
        torch.cuda.empty_cache()


def nsa_table(lengths=(8192, 16384, 32768, 65536)):
    """Whole NSA (three branches, the Triton selected branch by dispatch), as nsa_attention runs it."""
    B, H, Hkv, D = 1, 64, 4, 128
    kw = dict(gates=(1 / 3, 1 / 3, 1 / 3), sliding_window_size=512, compress_block_size=32,
              compress_block_sliding_stride=16, selection_block_size=64, num_selected_blocks=16, causal=True)
    for L in lengths:
        q = torch.randn(B, H, L, D, device="cuda", dtype=torch.bfloat16)
        k, v = (torch.randn(B, Hkv, L, D, device="cuda", dtype=torch.bfloat16) for _ in range(2))
        with torch.no_grad():
            _guard("nsa", {"L": L, "method": "nsa_attention", **{x: y for x, y in kw.items() if x != "gates"}},
                   lambda: _timed(lambda: nsa_attention(q, k, v, **kw), min_run_time=0.2, min_runs=3))
        del q, k, v
        torch.cuda.empty_cache()


def topk_table():
    B, H, D, K = 1, 8, 64, 64
    for L in (4096, 8192, 16384, 32768):
        q, k, v = (torch.randn(B, H, L, D, device="cuda", dtype=torch.bfloat16) for _ in range(3))
        lab = {"L": L}
        _guard("topk", {**lab, "method": "sdpa"}, lambda: _timed(lambda: F.scaled_dot_product_attention(q, k, v)))
        _guard("topk", {**lab, "method": "qk_matmul"}, lambda: _timed(lambda: q @ k.transpose(-1, -2)))
        if L <= 16384:
            _guard("topk", {**lab, "method": "full_topk"}, lambda: _timed(lambda: topk_attention(q, k, v, K)))
            _guard("topk", {**lab, "method": "streaming_topk", "chunk_size": 1024},
                   lambda: _timed(lambda: topk_attention(q, k, v, K, chunk_size=1024)))
        configs = [{}]  # the defaults: see fused_topk_attention
        if L == 16384:
            configs += [{"append": "scan", "capacity": 256}, {"capacity": 256}, {"num_stages": 3},
                        {"append": "bits"}, {"append": "scan"}, {}]
        for cfg in configs:
            _guard("topk", {**lab, "method": "fused_topk", **cfg},
                   lambda cfg=cfg: _timed(lambda: topk_fused.fused_topk_attention(q, k, v, K, **cfg)))
            RESULTS["sections"]["topk"][-1]["overflow_rows"] = topk_fused.last_overflow_rows
        if L == 16384:
            fused_stages(q, k, v, K)
        del q, k, v
        torch.cuda.empty_cache()


def fused_stages(q, k, v, K, bm=64, bn=64):
    """Each stage of fused_topk_attention timed alone (same calls as the function makes)."""
    import triton

    tf = topk_fused
    B, H, L, D = q.shape
    Hkv = k.shape[1]
    C = max(2 * K, 128)
    n_seg = triton.cdiv(L, bn)
    common = dict(HEAD_DIM=D, BLOCK_M=bm, BLOCK_N=bn, BLOCK_D=D, CAUSAL=False, PRECISION="tf32",
                  num_warps=4, num_stages=2)
    grid = (triton.cdiv(L, bm), B * H)
    strides = (*q.stride(), *k.stride())
    seg = torch.full((B * H, L, n_seg), float("-inf"), device="cuda")
    tau = torch.empty((B * H, L), device="cuda")
    cv = torch.full((B * H, L, C), float("-inf"), device="cuda")
    ci = torch.full((B * H, L, C), -1, dtype=torch.int32, device="cuda")
    cnt = torch.empty((B * H, L), dtype=torch.int32, device="cuda")
    msk = torch.empty((B * H, L, n_seg), dtype=torch.int64, device="cuda")
    vals = torch.empty((B * H, L, K), device="cuda")
    idx = torch.empty((B * H, L, K), dtype=torch.int32, device="cuda")
    out = torch.empty_like(q)
    n_rows = B * H * L
    stages = {
        "1 segment maxima (Triton)": lambda: tf._segment_max[grid](q, k, seg, *strides, H, H // Hkv, L, L, n_seg,
                                                                   **common),
        "2 threshold: k-th segment max (Triton sort)": lambda: tf._kth_largest[(triton.cdiv(n_rows, 16),)](
            seg, tau, n_rows, n_seg, K, BLOCK_R=16, BLOCK_C=tf._pow2(n_seg), num_warps=4),
        "2 threshold: k-th segment max (torch.topk)": lambda: seg.topk(K, dim=-1, sorted=False).values.amin(-1),
        "3a collect: bits of passing keys per row and segment (Triton, mask)": lambda: tf._collect_mask[grid](
            q, k, tau, msk, *strides, H, H // Hkv, L, L, n_seg, **common),
        "3b compact the bits into key indices (Triton, mask)": lambda: tf._compact_mask[
            (triton.cdiv(n_rows, 16),)](msk, ci, cnt, n_rows, n_seg, C, BLOCK_N=bn, BLOCK_R=16,
                                       BLOCK_S=tf._pow2(n_seg), HW_POPC=True, num_warps=4),
        "3c score the candidates again (Triton, mask)": lambda: tf._rescore[(triton.cdiv(n_rows, 32),)](
            q, k, ci, cv, cnt, n_rows, L, H, H // Hkv, C, *strides, HEAD_DIM=D, BLOCK_R=32, BLOCK_D=D,
            num_warps=4),
        "3 collect candidates (Triton, bitmask + popcount)": lambda: tf._collect[grid](
            q, k, tau, cv, ci, cnt, *strides, H, H // Hkv, L, L, C, APPEND=2, HW_POPC=True, **common),
        "3 collect candidates (Triton, prefix sum)": lambda: tf._collect[grid](
            q, k, tau, cv, ci, cnt, *strides, H, H // Hkv, L, L, C, APPEND=0, HW_POPC=True, **common),
        "4 pick k of the candidates (Triton sort)": lambda: tf._pick_k[(triton.cdiv(n_rows, 16),)](
            cv, ci, vals, idx, n_rows, C, K, BLOCK_R=16, BLOCK_C=tf._pow2(C), num_warps=4),
        "4 pick k of the candidates (torch.topk)": lambda: cv.topk(K, dim=-1),
        "3 collect candidates (Triton, atomic append)": lambda: (cnt.zero_(), tf._collect[grid](
            q, k, tau, cv, ci, cnt, *strides, H, H // Hkv, L, L, C, APPEND=1, HW_POPC=True, **common)),
        "5 softmax and gather (Triton)": lambda: tf._softmax_gather[(triton.cdiv(n_rows, 32),)](
            vals, idx, v, out, n_rows, L, H, H // Hkv, K, D ** -0.5, *v.stride(), *out.stride(),
            V_DIM=v.shape[-1], BLOCK_R=32, BLOCK_K=K, BLOCK_DV=tf._pow2(v.shape[-1]), num_warps=4),
        "5 softmax, gather values, weighted sum (torch)": lambda: torch.einsum(
            "bhrs,bhrsd->bhrd", torch.softmax(vals.view(B, H, L, K), -1).to(v.dtype),
            gather_kv(v, idx.view(B, Hkv, (H // Hkv) * L, K).long().clamp(min=0)).view(B, H, L, K, -1)),
        "buffers: fill candidate slots": lambda: (cv.fill_(float("-inf")), ci.fill_(-1)),
    }
    tf._segment_max[grid](q, k, seg, *strides, H, H // Hkv, L, L, n_seg, **common)
    tau.copy_(seg.topk(K, dim=-1, sorted=False).values.amin(-1))
    tf._collect[grid](q, k, tau, cv, ci, cnt, *strides, H, H // Hkv, L, L, C, APPEND=2, HW_POPC=True, **common)
    tf._pick_k[(triton.cdiv(n_rows, 16),)](cv, ci, vals, idx, n_rows, C, K, BLOCK_R=16,
                                            BLOCK_C=tf._pow2(C), num_warps=4)
    _record("fused_stages", {"L": L, "candidates_mean": cnt.float().mean().item(),
                             "candidates_max": cnt.max().item()})
    tf._collect_mask[grid](q, k, tau, msk, *strides, H, H // Hkv, L, L, n_seg, **common)
    cnt2 = torch.empty_like(cnt)
    tf._compact_mask[(triton.cdiv(n_rows, 16),)](msk, ci, cnt2, n_rows, n_seg, C, BLOCK_N=bn, BLOCK_R=16,
                                                  BLOCK_S=tf._pow2(n_seg), HW_POPC=True, num_warps=4)
    _record("fused_stages", {"L": L, "mask_counts_equal_bits_counts": bool(torch.equal(cnt, cnt2))})
    for name, fn in stages.items():
        _guard("fused_stages", {"L": L, "stage": name}, lambda fn=fn: _timed(fn))


def nsa_parts(lengths=(16384, 65536)):
    """Where whole-NSA time goes: each stage of nsa_attention timed on its own."""
    from einops import reduce

    B, H, Hkv, D, cbs, stride, sbs, S, win = 1, 64, 4, 128, 32, 16, 64, 16, 512
    for L in lengths:
        q = torch.randn(B, H, L, D, device="cuda", dtype=torch.bfloat16)
        k, v = (torch.randn(B, Hkv, L, D, device="cuda", dtype=torch.bfloat16) for _ in range(2))
        scale = D ** -0.5
        lab = {"L": L}
        with torch.no_grad():
            kc = nsa_mod.compress_kv(k, cbs, stride)
            vc = nsa_mod.compress_kv(v, cbs, stride)
            _guard("nsa_parts", {**lab, "part": "compress_kv (k and v)"},
                   lambda: _timed(lambda: (nsa_mod.compress_kv(k, cbs, stride), nsa_mod.compress_kv(v, cbs, stride))))
            _guard("nsa_parts", {**lab, "part": "compressed_attention"},
                   lambda: _timed(lambda: nsa_mod.compressed_attention(q, kc, vc, cbs, stride, causal=True,
                                                                       scale=scale), min_runs=3))
            _, p = nsa_mod.compressed_attention(q, kc, vc, cbs, stride, causal=True, scale=scale)
            M = nsa_mod.importance_to_selection_blocks(kc.shape[2], cbs, stride, sbs, L, dtype=q.dtype, device="cuda")
            _guard("nsa_parts", {**lab, "part": "importance: p @ M, then sum over the group (as in nsa.py)"},
                   lambda: _timed(lambda: reduce(p @ M, "b (hk g) i s -> b hk i s", "sum", hk=Hkv), min_runs=3))
            _guard("nsa_parts", {**lab, "part": "importance: sum over the group, then @ M (same value)"},
                   lambda: _timed(lambda: reduce(p, "b (hk g) i n -> b hk i n", "sum", hk=Hkv) @ M, min_runs=3))
            imp = reduce(p, "b (hk g) i n -> b hk i n", "sum", hk=Hkv) @ M
            del p
            _guard("nsa_parts", {**lab, "part": "select_blocks"},
                   lambda: _timed(lambda: nsa_mod.select_blocks(imp, S, sbs, causal=True)))
            idx = nsa_mod.select_blocks(imp, S, sbs, causal=True)
            _guard("nsa_parts", {**lab, "part": "selected (Triton kernel)"},
                   lambda: _timed(lambda: selected_block_attention_triton(q, k, v, idx, sbs, causal=True)))
            _guard("nsa_parts", {**lab, "part": "sliding_window_attention"},
                   lambda: _timed(lambda: nsa_mod.sliding_window_attention(q, k, v, win, causal=True, scale=scale)))
            _guard("nsa_parts", {**lab, "part": "sdpa_cudnn (dense, for scale)"},
                   lambda: _timed(lambda: _cudnn(q, k, v)))
        del q, k, v, kc, vc, imp, idx
        torch.cuda.empty_cache()


# --------------------------------------------------------------------------- fused compressed branch


def _ref_compressed(q, k, v, cbs, stride, sbs, causal, scale):
    """float64 compressed branch and group-summed, overlap-mapped importance (the PyTorch path, upcast)."""
    from einops import reduce

    kc, vc = nsa_mod.compress_kv(k.double(), cbs, stride), nsa_mod.compress_kv(v.double(), cbs, stride)
    out, p = nsa_mod.compressed_attention(q.double(), kc, vc, cbs, stride, causal=causal, scale=scale)
    M = nsa_mod.importance_to_selection_blocks(kc.shape[2], cbs, stride, sbs, k.shape[2], dtype=torch.float64,
                                               device=q.device)
    return out, reduce(p, "b (hk g) i n -> b hk i n", "sum", hk=k.shape[1]) @ M


def correctness_compressed():
    cases = [  # B, H, Hkv, L, D, Dv, cbs, stride, sbs
        (1, 64, 4, 4096, 128, 128, 32, 16, 64),   # the benchmark's shape, shorter
        (2, 12, 4, 1000, 64, 32, 16, 8, 48),      # G=3 (padded), Dv != D, selection block not a power of two
        (1, 8, 8, 777, 128, 128, 32, 32, 64),     # G=1, no overlap between compressed blocks
    ]
    for dtype in (torch.bfloat16, torch.float16, torch.float32):
        for causal in (True, False):
            for B, H, Hkv, L, D, Dv, cbs, st, sbs in cases:
                q = torch.randn(B, H, L, D, device="cuda", dtype=dtype)
                k = torch.randn(B, Hkv, L, D, device="cuda", dtype=dtype)
                v = torch.randn(B, Hkv, L, Dv, device="cuda", dtype=dtype)
                scale = D ** -0.5
                ref_out, ref_imp = _ref_compressed(q, k, v, cbs, st, sbs, causal, scale)
                kc, vc = nsa_mod.compress_kv(k, cbs, st), nsa_mod.compress_kv(v, cbs, st)
                out, imp = cmp_mod.compressed_attention_triton(q, kc, vc, cbs, st, causal=causal, scale=scale,
                                                               selection_block_size=sbs, num_keys=L)
                row = {"dtype": str(dtype).split(".")[-1], "causal": causal, "B": B, "H": H, "Hkv": Hkv, "L": L,
                       "D": D, "Dv": Dv, "cbs": cbs, "stride": st, "sbs": sbs,
                       "out_rel_err": _rel(out, ref_out), "imp_rel_err": _rel(imp, ref_imp),
                       "nan": bool(out.isnan().any() or imp.isnan().any()),
                       "zero_pattern_same": bool(((imp > 0) == (ref_imp > 0)).all())}
                limit = 1e-4 if dtype == torch.float32 else 1e-2
                row["pass"] = row["out_rel_err"] < limit and row["imp_rel_err"] < limit and not row["nan"] \
                    and row["zero_pattern_same"]
                _record("correctness_compressed", row)
    # Whole NSA through the dispatch against float64 nsa_attention (PyTorch path, on the CPU).
    kw = dict(gates=(0.3, 0.5, 0.2), sliding_window_size=128, compress_block_size=32,
              compress_block_sliding_stride=16, selection_block_size=64, num_selected_blocks=8, causal=True)
    for dtype in (torch.float32, torch.bfloat16):
        q = torch.randn(1, 16, 2048, 64, device="cuda", dtype=dtype)
        k, v = (torch.randn(1, 2, 2048, 64, device="cuda", dtype=dtype) for _ in range(2))
        with torch.no_grad():
            out = nsa_attention(q, k, v, **kw)
        ref = nsa_attention(q.cpu().double(), k.cpu().double(), v.cpu().double(), **kw)
        _record("correctness_compressed", {"case": "nsa_attention dispatch vs float64 CPU", "dtype": str(dtype),
                                           "rel_err": _rel(out.cpu(), ref), "nan": bool(out.isnan().any())})


def tune_compressed(L=65536):
    from triton.testing import do_bench

    B, H, Hkv, D = 1, 64, 4, 128
    q = torch.randn(B, H, L, D, device="cuda", dtype=torch.bfloat16)
    k, v = (torch.randn(B, Hkv, L, D, device="cuda", dtype=torch.bfloat16) for _ in range(2))
    kc, vc = nsa_mod.compress_kv(k, 32, 16), nsa_mod.compress_kv(v, 32, 16)
    configs = [dict(rows=r, block_n=n, num_warps=w, num_stages=st)
               for r, n, w, st in ((128, 64, 8, 2), (128, 64, 4, 2), (128, 64, 8, 3), (128, 128, 8, 2),
                                   (128, 32, 4, 2), (128, 64, 4, 3), (64, 64, 4, 2), (256, 64, 8, 2),
                                   (128, 128, 8, 3))]
    best = None
    for cfg in configs:
        try:
            ms = do_bench(lambda: cmp_mod.compressed_attention_triton(q, kc, vc, 32, 16, causal=True,
                                                                      selection_block_size=64, num_keys=L, **cfg),
                          warmup=50, rep=300, return_mode="median")
        except Exception as e:  # noqa: BLE001
            _record("tune_compressed", {**cfg, "error": str(e).splitlines()[0][:200]})
            continue
        _record("tune_compressed", {**cfg, "L": L, "median_ms": ms})
        if best is None or ms < best[0]:
            best = (ms, cfg)
    if best is not None:
        cmp_mod.DEFAULTS.update(best[1])  # the whole-NSA table below runs with the winner
        RESULTS["best_compressed_config"] = best[1]


def nsa_fused_table(lengths=(8192, 16384, 32768, 65536)):
    """Whole NSA with the fused compressed branch, SDPA flash and cuDNN in the same process, and its parts."""
    B, H, Hkv, D, cbs, st, sbs, S, win = 1, 64, 4, 128, 32, 16, 64, 16, 512
    kw = dict(gates=(1 / 3, 1 / 3, 1 / 3), sliding_window_size=win, compress_block_size=cbs,
              compress_block_sliding_stride=st, selection_block_size=sbs, num_selected_blocks=S, causal=True)
    for L in lengths:
        q = torch.randn(B, H, L, D, device="cuda", dtype=torch.bfloat16)
        k, v = (torch.randn(B, Hkv, L, D, device="cuda", dtype=torch.bfloat16) for _ in range(2))
        lab = {"L": L, **cmp_mod.DEFAULTS}
        scale = D ** -0.5
        with torch.no_grad():
            for name, backend in (("sdpa_flash", SDPBackend.FLASH_ATTENTION),
                                  ("sdpa_cudnn", SDPBackend.CUDNN_ATTENTION)):
                def run(backend=backend):
                    with sdpa_kernel([backend]):
                        return F.scaled_dot_product_attention(q, k, v, is_causal=True, enable_gqa=True)
                _guard("nsa_fused", {**lab, "method": name}, lambda run=run: _timed(run))
            _guard("nsa_fused", {**lab, "method": "nsa_attention (fused compressed)"},
                   lambda: _timed(lambda: nsa_attention(q, k, v, **kw), min_runs=5))
            kc, vc = nsa_mod.compress_kv(k, cbs, st), nsa_mod.compress_kv(v, cbs, st)
            _guard("nsa_fused", {**lab, "method": "part: compress_kv (k and v)"},
                   lambda: _timed(lambda: (nsa_mod.compress_kv(k, cbs, st), nsa_mod.compress_kv(v, cbs, st))))
            _guard("nsa_fused", {**lab, "method": "part: compressed kernel (out + importance)"},
                   lambda: _timed(lambda: cmp_mod.compressed_attention_triton(
                       q, kc, vc, cbs, st, causal=True, selection_block_size=sbs, num_keys=L)))
            _guard("nsa_fused", {**lab, "method": "part: compressed kernel (out only)"},
                   lambda: _timed(lambda: cmp_mod.compressed_attention_triton(q, kc, vc, cbs, st, causal=True)))
            _, imp = cmp_mod.compressed_attention_triton(q, kc, vc, cbs, st, causal=True,
                                                         selection_block_size=sbs, num_keys=L)
            _guard("nsa_fused", {**lab, "method": "part: select_blocks"},
                   lambda: _timed(lambda: nsa_mod.select_blocks(imp, S, sbs, causal=True)))
            idx = nsa_mod.select_blocks(imp, S, sbs, causal=True)
            _guard("nsa_fused", {**lab, "method": "part: selected (Triton)"},
                   lambda: _timed(lambda: selected_block_attention_triton(q, k, v, idx, sbs, causal=True)))
            _guard("nsa_fused", {**lab, "method": "part: sliding_window_attention"},
                   lambda: _timed(lambda: nsa_mod.sliding_window_attention(q, k, v, win, causal=True, scale=scale)))
            if L <= 16384:  # the PyTorch compressed path, for comparison (its memory grows as L^2)
                _guard("nsa_fused", {**lab, "method": "part: compressed_attention (PyTorch)"},
                       lambda: _timed(lambda: nsa_mod.compressed_attention(q, kc, vc, cbs, st, causal=True,
                                                                           scale=scale), min_runs=3))
        del q, k, v, kc, vc, imp, idx
        torch.cuda.empty_cache()


def _cudnn(q, k, v):
    with sdpa_kernel([SDPBackend.CUDNN_ATTENTION]):
        return F.scaled_dot_product_attention(q, k, v, is_causal=True, enable_gqa=True)


SECTIONS = ("correctness", "correctness_fused", "tune", "selected", "topk", "nsa", "nsa_parts",
            "correctness_compressed", "tune_compressed", "nsa_fused")


def main(argv=None):
    """python -m sparse_attn.kernels.gpu_bench OUT_DIR [SECTION ...] (default: all, in order)."""
    global OUT
    argv = sys.argv[1:] if argv is None else argv
    OUT = argv[0] if argv else "."
    sections = argv[1:] or list(SECTIONS)
    import triton

    p = torch.cuda.get_device_properties(0)
    RESULTS["env"] = {"device": p.name, "sm_count": p.multi_processor_count, "torch": torch.__version__,
                      "triton": triton.__version__, "cuda": torch.version.cuda,
                      "cudnn": torch.backends.cudnn.version()}
    print(RESULTS["env"], flush=True)
    torch.manual_seed(0)
    cfg = {"branch": False, "num_warps": 4, "num_stages": 2}  # the defaults, tuned on the first run
    steps = {"correctness": correctness, "correctness_fused": correctness_fused, "topk": topk_table,
             "nsa": nsa_table, "nsa_parts": nsa_parts, "correctness_compressed": correctness_compressed,
             "tune_compressed": tune_compressed, "nsa_fused": nsa_fused_table}
    for name in sections:
        t0 = time.time()
        try:
            if name == "tune":
                cfg = tune()
                RESULTS["best_config"] = cfg
            elif name == "selected":
                selected_table(cfg)
            else:
                steps[name]()
        except Exception:  # noqa: BLE001
            RESULTS.setdefault("failures", []).append({name: traceback.format_exc()[-2000:]})
            traceback.print_exc()
        RESULTS.setdefault("section_seconds", {})[name] = time.time() - t0
        _save()
    return 0


if __name__ == "__main__":
    sys.exit(main())
