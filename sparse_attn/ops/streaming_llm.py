"""StreamingLLM (Xiao et al. 2023, arXiv 2309.17453): attention sinks plus a sliding window.

Each query attends to the first ``num_sink_tokens`` keys (the *attention
sinks*, which trained models pour spare attention into) and to its
``sliding_window_size`` most recent keys. The pattern is static: it depends on
positions only, never on the scores. Shapes as in SDPA (``sparse_attn.ops.dense``).
"""
from __future__ import annotations

import torch

from .._checks import check_int, check_qkv, resolve_scale
from .indexed import indexed_attention

__all__ = ["streaming_llm_attention", "streaming_llm_positions", "streaming_llm_pairs", "streaming_llm_width"]


def _check_counts(num_sink_tokens, sliding_window_size) -> None:
    check_int(num_sink_tokens, "num_sink_tokens", minimum=0)
    check_int(sliding_window_size, "sliding_window_size", minimum=0)
    if num_sink_tokens == 0 and sliding_window_size == 0:
        raise ValueError("num_sink_tokens and sliding_window_size cannot both be 0: a query would attend to no key "
                         "(allowed: either >= 1)")


def _window(Lq: int, Lk: int, num_sink_tokens: int, sliding_window_size: int, causal: bool, device=None):
    """Per query: the sinks it sees, and the first and last window key that is not a sink (lo > hi: none)."""
    check_int(Lq, "Lq", minimum=0)
    check_int(Lk, "Lk", minimum=0)
    i = torch.arange(Lq, device=device)
    sinks = min(num_sink_tokens, Lk)
    seen_sinks = (i + 1).clamp(max=sinks) if causal else torch.full_like(i, sinks)
    # The window as sliding_window_attention reads it; its keys below the sinks are sinks already (no key twice).
    lo = (i - sliding_window_size + 1).clamp(min=sinks)
    hi = (i if causal else i + sliding_window_size - 1).clamp(max=Lk - 1)
    return seen_sinks, lo, hi


def streaming_llm_width(Lk: int, num_sink_tokens: int, sliding_window_size: int, *, causal: bool) -> int:
    """K, the slots per query: the sinks there are, then the window's keys that are not sinks (at most)."""
    _check_counts(num_sink_tokens, sliding_window_size)
    sinks = min(num_sink_tokens, check_int(Lk, "Lk", minimum=0))
    span = sliding_window_size if causal else max(2 * sliding_window_size - 1, 0)
    return sinks + min(span, Lk - sinks)


def streaming_llm_positions(Lq: int, Lk: int, num_sink_tokens: int, sliding_window_size: int, *, causal: bool,
                            device=None) -> torch.Tensor:
    """(Lq, K) int64: the keys each query attends to, sinks first, -1 in empty slots; no key twice in a row."""
    _check_counts(num_sink_tokens, sliding_window_size)
    seen_sinks, lo, hi = _window(Lq, Lk, num_sink_tokens, sliding_window_size, causal, device)
    sinks = min(num_sink_tokens, Lk)
    slots = streaming_llm_width(Lk, num_sink_tokens, sliding_window_size, causal=causal) - sinks
    j = torch.arange(sinks, device=device)
    sink_pos = torch.where(j < seen_sinks.unsqueeze(-1), j, -1)
    win_pos = lo.unsqueeze(-1) + torch.arange(slots, device=device)
    win_pos = torch.where(win_pos <= hi.unsqueeze(-1), win_pos, -1)
    return torch.cat([sink_pos, win_pos], dim=-1)


def streaming_llm_pairs(Lq: int, Lk: int, num_sink_tokens: int, sliding_window_size: int, *, causal: bool) -> int:
    """How many (query, key) pairs the pattern holds (sinks and window counted once where they overlap)."""
    _check_counts(num_sink_tokens, sliding_window_size)
    seen_sinks, lo, hi = _window(Lq, Lk, num_sink_tokens, sliding_window_size, causal)
    return int((seen_sinks + (hi - lo + 1).clamp(min=0)).sum())


def streaming_llm_attention(q, k, v, num_sink_tokens: int, sliding_window_size: int, *, causal: bool = False,
                            scale: float | None = None, return_selection: bool = False):
    """Each query attends to the attention sinks and its sliding window, with one exact softmax.

    Key j is in query i's set when j < ``num_sink_tokens`` (a sink), or when
    it is in the window: i - ``sliding_window_size`` < j <= i under
    ``causal`` (the ``sliding_window_size`` latest keys, the query's own
    included), otherwise |i - j| < ``sliding_window_size`` (both sides, as
    ``sliding_window_attention``). Under ``causal`` no key after i counts,
    sinks included. A key that is both a sink and in the window counts once.

    Args:
        q: (B, H, Lq, D); k: (B, Hkv, Lk, D); v: (B, Hkv, Lk, Dv); H a multiple
            of Hkv (the query heads of a group share the pattern, as every head does).
        num_sink_tokens: >= 0; the paper keeps 4.
        sliding_window_size: >= 0; 0 attends to the sinks alone. Not both 0.
        causal: SDPA's ``is_causal`` (query i sits at position i, top-left aligned).
        scale: default 1/sqrt(D).
        return_selection: also return ``Selection(indices, weights)``, each
            (B, H, Lq, K) with K = min(num_sink_tokens, Lk) + the window's slots.

    Returns:
        out (B, H, Lq, Dv), or (out, Selection). A query with no key in reach
        gets zeros. Positions are the keys' own: StreamingLLM's re-indexing of
        positions inside its cache (for rotary embeddings) is not modelled,
        since q and k arrive here with their positions already applied.
    """
    B, H, Hkv, Lq, Lk, D, Dv = check_qkv(q, k, v)
    _check_counts(num_sink_tokens, sliding_window_size)
    scale = resolve_scale(scale, D)
    pos = streaming_llm_positions(Lq, Lk, num_sink_tokens, sliding_window_size, causal=causal, device=q.device)
    return indexed_attention(q, k, v, pos.expand(B, Hkv, *pos.shape), scale, return_selection=return_selection)
