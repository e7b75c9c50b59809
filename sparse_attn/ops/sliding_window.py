"""Sliding-window attention: each query attends to the keys within ``sliding_window_size`` positions of its own.

NSA's third branch, and StreamingLLM's recent window. Shapes as in SDPA. On
CUDA without autograd, in float16 and bfloat16, it runs as one Triton kernel
when a KV group has at least 8 query heads (``sparse_attn.kernels.sliding_band``),
else through FlexAttention with a sliding-window block mask
(``sparse_attn.kernels.sliding_flex``); elsewhere, chunked SDPA.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

from .._checks import check_int, check_qkv, resolve_scale
from ..kernels import dispatch

__all__ = ["sliding_window_attention", "sliding_window_mask"]

# Queries per step: their keys are a band of chunk + window.
_SLIDING_CHUNK = 512


def sliding_window_mask(Lq: int, Lk: int, sliding_window_size: int, *, causal: bool, device=None, q_offset: int = 0, k_offset: int = 0):
    """Boolean (Lq, Lk): query i sees key j when i - window < j <= i (causal) or |i - j| < window."""
    i = torch.arange(q_offset, q_offset + Lq, device=device).unsqueeze(-1)
    j = torch.arange(k_offset, k_offset + Lk, device=device)
    near = (j > i - sliding_window_size) & (j < i + sliding_window_size)
    return near & (j <= i) if causal else near


def sliding_window_attention(q, k, v, sliding_window_size: int, *, causal: bool = False, scale: float | None = None,
                             query_chunk_size: int | None = None):
    """Each query attends to the keys within ``sliding_window_size`` positions of its own.

    Causal: keys i - sliding_window_size < j <= i (the ``sliding_window_size`` latest tokens,
    itself included). Otherwise |i - j| < sliding_window_size on both sides. Runs SDPA
    on query chunks, each against only its band of keys, so memory grows with
    Lq * (chunk + 2 * window), not Lq * Lk. Shapes as in SDPA; returns
    (B, H, Lq, Dv); a query with no key in reach (Lq > Lk) gets zeros.

    On CUDA in float16 and bfloat16, when no gradient is needed, one kernel
    computes the same function visiting only the key tiles the window touches
    (``query_chunk_size`` does not apply there): ours for groups of 8 or more
    query heads, FlexAttention's otherwise; see docs/benchmarks.md for their
    times on an H200.
    """
    B, H, Hkv, Lq, Lk, D, Dv = check_qkv(q, k, v)
    check_int(sliding_window_size, "sliding_window_size", minimum=1)
    check_int(query_chunk_size, "query_chunk_size", minimum=1, allow_none=True)
    scale = resolve_scale(scale, D)
    if dispatch.use_triton(q, k, v):  # before importing the kernels (Triton, FlexAttention)
        from ..kernels import sliding_band, sliding_flex

        if sliding_band.triton_supports(q, k, v):
            return sliding_band.sliding_band_triton(q, k, v, sliding_window_size, causal=causal, scale=scale)
        if sliding_flex.triton_supports(q, k, v):
            out = sliding_flex.sliding_window_flex(q, k, v, sliding_window_size, causal=causal, scale=scale)
            if out is not None:
                return out
    qc = query_chunk_size or _SLIDING_CHUNK
    outs = []
    for i0 in range(0, Lq, qc):
        i1 = min(Lq, i0 + qc)
        lo = max(0, i0 - sliding_window_size + 1)
        hi = min(Lk, i1 if causal else i1 + sliding_window_size - 1)
        if hi <= lo:
            outs.append(q.new_zeros(B, H, i1 - i0, Dv))
            continue
        mask = sliding_window_mask(i1 - i0, hi - lo, sliding_window_size, causal=causal, device=q.device, q_offset=i0, k_offset=lo)
        outs.append(F.scaled_dot_product_attention(
            q[:, :, i0:i1], k[:, :, lo:hi], v[:, :, lo:hi], attn_mask=mask, scale=scale, enable_gqa=Hkv != H,
        ))
    if not outs:
        return q.new_zeros(B, H, 0, Dv)
    return torch.cat(outs, dim=2)
