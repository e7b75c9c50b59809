"""StreamingLLM decoding: the attention sinks and the latest tokens, whatever the scores.

The pattern is fixed by positions, so a step reads ``num_sink_tokens +
sliding_window_size`` rows of K and V at most, however long the cache grows.
"""
from __future__ import annotations

import torch

from .._checks import resolve_scale
from ..ops.streaming_llm import _check_counts
from .cache import KVCache
from .gather import shared_gather_attention
from .result import BytesRead, DecodeResult, DecodeSelection, check_query, query_positions, rows_read

__all__ = ["streaming_llm_decode"]


def streaming_llm_decode(q: torch.Tensor, cache: KVCache, num_sink_tokens: int, sliding_window_size: int, *,
                         scale: float | None = None) -> DecodeResult:
    """Each query attends to the first ``num_sink_tokens`` keys and its ``sliding_window_size`` latest ones.

    Equals the last T rows of ``streaming_llm_attention(..., causal=True)``
    on the cache's tokens: a key that is both a sink and in the window
    counts once, and no key after the query counts. The selection is
    (1, 1, T, K) key positions (the same for every sequence and head), sinks
    first, -1 in empty slots.
    """
    B, H, T, D = check_query(q, cache)
    _check_counts(num_sink_tokens, sliding_window_size)
    scale = resolve_scale(scale, D)
    L = cache.length
    pos = query_positions(T, cache)
    sinks = min(num_sink_tokens, L)
    slots = min(sliding_window_size, L - sinks)
    j = torch.arange(sinks, device=q.device)
    p = pos.view(-1, 1)
    sink_pos = torch.where(j <= p, j, -1)
    lo = (p - sliding_window_size + 1).clamp(min=sinks)  # window keys that are sinks are sinks already
    win = lo + torch.arange(slots, device=q.device)
    positions = torch.cat([sink_pos, torch.where(win <= p, win, -1)], dim=-1)  # (T, K)
    out = shared_gather_attention(q, cache.k, cache.v, positions.expand(B, cache.num_kv_heads, T, -1), scale)
    sel = DecodeSelection("keys", positions[None, None], 1, pos, L)

    def count() -> BytesRead:
        units = positions.reshape(1, 1, -1)
        rows = rows_read(units, (units + 1).masked_fill(units < 0, 0), 1, L, cache.num_kv_heads) * B
        return BytesRead(rows * D * cache.itemsize, rows * cache.value_dim * cache.itemsize)

    return DecodeResult(out, sel, count)
