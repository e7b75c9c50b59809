"""Exact attention over given key positions per query: the last step of every method that picks its keys by rule.

StreamingLLM (``streaming_llm.py``) and Quest (``quest.py``) differ only in
how they choose the positions; the softmax over the chosen keys is this one.
"""
from __future__ import annotations

import torch
from einops import rearrange

from ..selection import Selection, gather_kv, weighted_gather_sum
from .dense import safe_softmax

__all__ = ["indexed_attention"]


# Queries per step: the keys a step gathers are (chunk, K, D) per head, never (Lq, K, D).
QUERY_CHUNK = 512


def indexed_attention(q, k, v, indices: torch.Tensor, scale: float, *, return_selection: bool = False):
    """Each query's exact softmax attention over its own key positions.

    Args:
        q: (B, H, Lq, D); k: (B, Hkv, Lk, D); v: (B, Hkv, Lk, Dv), already
            checked (``check_qkv``); H a multiple of Hkv.
        indices: int64 (B, Hkv, Lq, K), one key set per KV group that its
            query heads share, or (B, H, Lq, K), one per query head. Values in
            [-1, Lk); -1 is an empty slot; a position at most once per row
            (a repeat would count twice in the softmax).
        scale: multiplies the scores (already resolved).
        return_selection: also return ``Selection(indices, weights)``, each
            (B, H, Lq, K); empty slots hold -1 and weight 0.

    Returns:
        out (B, H, Lq, Dv), or (out, Selection). A query with no key gets
        zeros. Queries run ``QUERY_CHUNK`` at a time. Gradients reach q, k and
        v through the picked keys.
    """
    B, H, Lq, _ = q.shape
    if k.shape[2] == 0:  # no key can be read: every slot is empty, and gather_kv needs a row to point at
        indices = indices[..., :0]
    K = indices.shape[-1]
    # Filled block by block: a list of blocks and their concatenation would hold the output twice.
    out = q.new_empty(B, H, Lq, v.shape[-1])
    sel = Selection(indices.new_empty(B, H, Lq, K), q.new_empty(B, H, Lq, K)) if return_selection else None
    for i0 in range(0, Lq, QUERY_CHUNK):
        i1 = min(Lq, i0 + QUERY_CHUNK)
        out[:, :, i0:i1], idx, weights = _attend(q[:, :, i0:i1], k, v, indices[:, :, i0:i1], scale)
        if sel is not None:
            sel.indices[:, :, i0:i1], sel.weights[:, :, i0:i1] = idx, weights
    return out if sel is None else (out, sel)


def _attend(q, k, v, indices, scale):
    """One block of queries: (out, indices, weights), the last two per query head (B, H, Lq, K)."""
    B, H, Lq, _ = q.shape
    Hkv = k.shape[1]
    G, K = H // Hkv, indices.shape[-1]
    idx = rearrange(indices, "b (hk g) i s -> b hk g i s", hk=Hkv)  # g = 1 when the group shares its keys
    valid = idx >= 0
    safe = idx.clamp(min=0)
    k_sel = rearrange(gather_kv(k, rearrange(safe, "b hk g i s -> b hk (g i) s")), "b hk (g i) s d -> b hk g i s d",
                      g=idx.shape[2])
    qg = rearrange(q, "b (hk g) i d -> b hk g i d", hk=Hkv)
    # matmul broadcasts one shared key set (g = 1) over the group's G query heads: it is gathered once, not G times.
    scores = (qg.unsqueeze(-2) @ k_sel.transpose(-1, -2)).squeeze(-2) * scale
    weights = safe_softmax(scores.masked_fill(~valid, float("-inf")))
    per_head = lambda t: rearrange(t.expand(B, Hkv, G, Lq, K), "b hk g i s -> b hk (g i) s")  # noqa: E731
    out = rearrange(weighted_gather_sum(v, per_head(safe), per_head(weights)), "b hk (g i) d -> b (hk g) i d", g=G)
    to_heads = lambda t: rearrange(t.expand(B, Hkv, G, Lq, K), "b hk g i s -> b (hk g) i s")  # noqa: E731
    return out, to_heads(idx.masked_fill(~valid, -1)), to_heads(weights.detach())
