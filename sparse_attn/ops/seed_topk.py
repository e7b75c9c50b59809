"""The seed's top-k attention with its crash fixed: the baseline the library's top-k is measured against.

It holds the whole (Lq, Lk) score matrix, then gathers the picked keys *and*
values once per query, (B, H, Lq, K, D), and scores the picked keys again.
``sparse_attn.ops.topk`` makes the same selection without the second gather
and the re-scoring, and can stream over key chunks instead of holding the matrix.
"""
from __future__ import annotations

import torch

from .._checks import check_int, check_qkv
from .dense import causal_mask

__all__ = ["seed_topk_attention"]


def seed_topk_attention(q, k, v, top_k: int, *, causal: bool = False):
    """The seed's algorithm with its crash fixed, kept as the baseline it was.

    Whole (Lq, Lk) score matrix, ``torch.topk``, gather the picked keys *and*
    values (B, H, Lq, K, D), score the picked keys again, softmax, weighted
    sum. The library's ``topk_attention`` does the same selection without
    the second gather and the re-scoring. Shapes as ``topk_attention``.
    """
    check_qkv(q, k, v)
    check_int(top_k, "top_k", minimum=1)
    H, Hkv, D = q.shape[1], k.shape[1], q.shape[-1]
    k, v = (t.repeat_interleave(H // Hkv, dim=1) for t in (k, v))
    scores = q @ k.transpose(-2, -1) / D**0.5
    if causal:
        scores = scores.masked_fill(~causal_mask(q.shape[2], k.shape[2], q.device), float("-inf"))
    K = min(top_k, k.shape[2])
    idx = torch.topk(scores, K, dim=-1).indices  # (B, H, Lq, K)
    pick = lambda t: torch.gather(  # noqa: E731  the seed's gather, with the index expanded to 5-d
        t.unsqueeze(2).expand(-1, -1, idx.shape[2], -1, -1), 3, idx.unsqueeze(-1).expand(-1, -1, -1, -1, t.shape[-1]))
    k_sel, v_sel = pick(k), pick(v)
    att = (q.unsqueeze(3) @ k_sel.transpose(3, 4)).squeeze(3) / D**0.5
    if causal:
        att = att.masked_fill(idx > torch.arange(q.shape[2], device=q.device).view(-1, 1), float("-inf"))
    return (torch.softmax(att, dim=-1).unsqueeze(3) @ v_sel).squeeze(3)
