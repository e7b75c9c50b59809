"""Top-k decoding: score every key (all of K is read), keep the ``top_k`` best, read only their values.

The saving is half at most: K is still read in full to find the winners,
only V shrinks to k rows. That is why block methods (Quest, NSA) summarise
the keys instead of scoring each one.
"""
from __future__ import annotations

import torch
from einops import rearrange

from .._checks import check_int, resolve_scale
from ..ops.dense import safe_softmax
from ..selection import weighted_gather_sum
from ..topk import stable_topk
from .cache import KVCache
from .dense import scaled_scores
from .result import BytesRead, DecodeResult, DecodeSelection, check_query, query_positions, rows_read

__all__ = ["topk_decode"]


def topk_decode(q: torch.Tensor, cache: KVCache, top_k: int, *, scale: float | None = None) -> DecodeResult:
    """Each query attends to its ``top_k`` highest-scoring keys up to its position.

    Equals the last T rows of ``topk_attention(..., causal=True)`` on the
    cache's tokens, with the same tie rule (the lower key index wins).
    ``top_k`` at least the keys a query sees gives dense attention. Each query
    head picks its own keys; the selection is (B, H, T, min(top_k, length)),
    by falling score, -1 in slots no key fills. Reads all of K and the
    distinct V rows the group's heads picked.
    """
    B, H, T, D = check_query(q, cache)
    check_int(top_k, "top_k", minimum=1)
    scale = resolve_scale(scale, D)
    pos = query_positions(T, cache)
    K = min(top_k, cache.length)
    scores = scaled_scores(q, cache, scale, pos)  # (B, Hkv, G * T, L)
    vals, idx = stable_topk(scores, K)
    # Early queries of a step may see fewer than K keys: their spare slots hold -inf.
    valid = ~torch.isneginf(vals)
    idx = idx.masked_fill(~valid, -1)
    weights = safe_softmax(vals.float() if vals.dtype in (torch.float16, torch.bfloat16) else vals)
    out = weighted_gather_sum(cache.v, idx.clamp(min=0), weights.to(cache.dtype))
    heads = lambda t: rearrange(t, "b hk (g t) s -> b (hk g) t s", t=T)  # noqa: E731
    out = rearrange(out, "b hk (g t) d -> b (hk g) t d", t=T)
    sel = DecodeSelection("keys", heads(idx), 1, pos, cache.length, weights=heads(weights))

    L = cache.length  # counted later, maybe after the cache grew: the step's length, not the cache's

    def count() -> BytesRead:
        units = rearrange(idx, "b hk r s -> b hk (r s)")
        ends = (units + 1).masked_fill(units < 0, 0)
        v_rows = rows_read(units, ends, 1, L, cache.num_kv_heads)
        k_rows = cache.batch_size * cache.num_kv_heads * L
        return BytesRead(k_rows * cache.head_dim * cache.itemsize, v_rows * cache.value_dim * cache.itemsize)

    return DecodeResult(out, sel, count)
