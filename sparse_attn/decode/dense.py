"""Dense decoding: the new queries against every key of the cache (the baseline every sparse decoder is measured by).

Two forms of the same function: ``dense_decode`` spells out scores, softmax
and the weighted sum (one read of K and one of V per KV group, the group's
query heads batched into one matrix product), and ``sdpa_decode`` calls
``F.scaled_dot_product_attention`` with the few queries, as a model's decode
step does without a sparse method.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from einops import rearrange

from .._checks import resolve_scale
from .cache import KVCache
from .result import BytesRead, DecodeResult, DecodeSelection, check_query, query_positions

__all__ = ["dense_decode", "sdpa_decode", "scaled_scores", "future_mask"]


def future_mask(positions: torch.Tensor, length: int) -> torch.Tensor | None:
    """(T, length) bool, True where query t may see key j (j <= its position); None when every query sees all."""
    if positions.numel() == 1:
        return None  # the one query is the newest token: it sees the whole cache
    return torch.arange(length, device=positions.device) <= positions.view(-1, 1)


def scaled_scores(q: torch.Tensor, cache: KVCache, scale: float, positions: torch.Tensor) -> torch.Tensor:
    """(B, Hkv, G * T, length) scores of every query against every key, -inf after each query's position.

    Rows are ordered (g, t): a KV group's G query heads and T queries share
    one product with the group's keys, so K is read once per group. The query
    is scaled first (a tiny tensor) so that half-precision scores are rounded
    once, by the product itself.
    """
    Hkv = cache.num_kv_heads
    acc = torch.promote_types(q.dtype, torch.float32)
    qs = rearrange((q.to(acc) * scale).to(q.dtype), "b (hk g) t d -> b hk (g t) d", hk=Hkv)
    scores = qs @ cache.keys.transpose(-1, -2)
    mask = future_mask(positions, cache.length)
    if mask is not None:
        scores = scores.masked_fill(~mask.repeat(q.shape[1] // Hkv, 1), float("-inf"))
    return scores


def _result(out: torch.Tensor, cache: KVCache, positions: torch.Tensor) -> DecodeResult:
    sel = DecodeSelection("all", None, 1, positions, cache.length)
    rows = cache.batch_size * cache.num_kv_heads * cache.length * cache.itemsize
    read = BytesRead(rows * cache.head_dim, rows * cache.value_dim)
    return DecodeResult(out, sel, lambda: read)


def dense_decode(q: torch.Tensor, cache: KVCache, *, scale: float | None = None) -> DecodeResult:
    """Exact attention of q (B, H, T, D), the cache's last T tokens, over every key up to each query.

    Query t sits at position ``cache.length - T + t`` and sees keys 0 .. that
    position (the T queries are causal among themselves): the last T rows of
    the parallel causal forward on the cache's tokens. Reads all of K and V.
    """
    B, H, T, D = check_query(q, cache)
    scale = resolve_scale(scale, D)
    pos = query_positions(T, cache)
    # Half inputs: softmax accumulates in float32 inside the kernel and writes the input dtype.
    weights = torch.softmax(scaled_scores(q, cache, scale, pos), dim=-1)
    out = rearrange(weights @ cache.values, "b hk (g t) d -> b (hk g) t d", t=T)
    return _result(out, cache, pos)


def sdpa_decode(q: torch.Tensor, cache: KVCache, *, scale: float | None = None) -> DecodeResult:
    """``dense_decode`` through ``F.scaled_dot_product_attention`` (the decode step of a model without sparsity)."""
    B, H, T, D = check_query(q, cache)
    scale = resolve_scale(scale, D)
    pos = query_positions(T, cache)
    out = F.scaled_dot_product_attention(q, cache.keys, cache.values, attn_mask=future_mask(pos, cache.length),
                                         scale=scale, enable_gqa=H != cache.num_kv_heads)
    return _result(out, cache, pos)
