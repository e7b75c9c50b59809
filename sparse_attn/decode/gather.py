"""Exact attention over picked cache rows that a KV group's query heads share: each row is gathered once.

NSA's selected blocks and StreamingLLM's sinks and window are the same for
every query head of a group. Broadcasting one gathered block over the
group's heads in a batched product makes PyTorch copy it once per head
(an expand it cannot view); putting the heads in the product's rows instead
reads each gathered row once.

On CUDA (``kernels.dispatch.use_triton``) the split-K kernel of
``rows_kernel`` does the same without the gather: each picked row is read
once from the cache, in one pass, with no tensor of picked rows in between.
"""
from __future__ import annotations

import torch
from einops import rearrange

from ..ops.dense import safe_softmax
from ..selection import gather_kv

__all__ = ["shared_gather_attention", "use_rows_kernel"]


def use_rows_kernel(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, tokens: torch.Tensor) -> bool:
    """Whether ``rows_kernel`` takes this step's picked rows (CUDA, Triton, a kernel dtype; see ``kernels.dispatch``)."""
    if not q.is_cuda:  # checked first: the kernel module imports Triton, which is slow and only pays on a GPU
        return False
    from . import rows_kernel

    return rows_kernel.supports(q, k, v, tokens)


def shared_gather_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, tokens: torch.Tensor,
                            scale: float) -> torch.Tensor:
    """Softmax attention of q (B, H, T, D) over rows ``tokens`` (B, Hkv, T, K) of k (B, Hkv, N, D) and v.

    ``tokens`` holds row numbers in [0, N), -1 in empty slots; a row at most
    once per query. Returns (B, H, T, Dv); a query with no row gets zeros.
    Half inputs: scores and weights in float32.
    """
    if use_rows_kernel(q, k, v, tokens):
        from .rows_kernel import rows_attention_triton

        return rows_attention_triton(q, k, v, tokens, scale)
    Hkv = k.shape[1]
    valid = tokens >= 0
    safe = tokens.clamp(min=0)
    ks, vs = gather_kv(k, safe), gather_kv(v, safe)  # (B, Hkv, T, K, D / Dv)
    qg = rearrange(q, "b (hk g) t d -> b hk t g d", hk=Hkv)
    scores = (qg @ ks.transpose(-1, -2)).to(torch.promote_types(q.dtype, torch.float32)) * scale  # (B, Hkv, T, G, K)
    weights = safe_softmax(scores.masked_fill(~valid.unsqueeze(-2), float("-inf")))
    return rearrange(weights.to(vs.dtype) @ vs, "b hk t g d -> b (hk g) t d")
