"""NSA decoding: the compressed cache, the selected blocks and the sliding window, gated, for the newest queries.

Per step NSA reads one compressed key and value per ``stride`` tokens, the
``num_selected_blocks`` blocks its compressed scores pick (shared by a KV
group, as NSA selects for GQA) and the last ``sliding_window_size`` tokens;
the branches are read separately, as NSA's kernels read them. The
compressed rows come from the cache (``KVCache(compress_block_size=...)``),
emitted as blocks fill.
"""
from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from einops import rearrange, reduce

from .._checks import resolve_scale
from ..ops.dense import safe_softmax
from ..ops.nsa import check_nsa_options
from ..ops.nsa.attention import _check_gates
from ..topk import stable_topk
from .cache import KVCache
from .gather import shared_gather_attention
from .result import BytesRead, DecodeResult, DecodeSelection, check_query, query_positions, rows_read

__all__ = ["nsa_decode", "selection_importance"]

_HALF = (torch.float16, torch.bfloat16)


def nsa_decode(q: torch.Tensor, cache: KVCache, *, gates, sliding_window_size: int, selection_block_size: int,
               num_selected_blocks: int, compress_block_size: int | None = None,
               compress_block_sliding_stride: int | None = None, num_initial_blocks: int = 1,
               num_local_blocks: int = 2, scale: float | None = None) -> DecodeResult:
    """gates[..., 0] * compressed + gates[..., 1] * selected + gates[..., 2] * sliding, for the last T queries.

    Equals the last T rows of ``nsa_attention(..., causal=True)`` on the
    cache's tokens with the default options (mean pooling, a selection shared
    by each KV group, importance by overlap): a compressed block is seen once
    it has ended, the selection takes the forced blocks (initial, and the
    local ones ending at the query's block) and then the most important
    blocks that start at or before the query, lower block first among equal
    importance, and the window holds the query's ``sliding_window_size``
    latest tokens.

    Args:
        q: (B, H, T, D). cache: a ``KVCache`` built with ``compress_block_size``.
        gates: broadcastable to (B, H, T, 3) (compressed, selected, sliding).
        compress_block_size, compress_block_sliding_stride: optional; when
            given they must be the cache's (its compressed rows are fixed).
        The rest as ``nsa_attention``.

    Half inputs: compressed scores come from the half product (float32
    accumulation, rounded once) and are normalised and ranked in float32.
    """
    B, H, T, D = check_query(q, cache)
    cache._need_compressed()
    bs, stride = cache.compress_block_size, cache.compress_block_sliding_stride
    for name, given, kept in (("compress_block_size", compress_block_size, bs),
                              ("compress_block_sliding_stride", compress_block_sliding_stride, stride)):
        if given is not None and given != kept:
            raise ValueError(f"{name} ({given}) must be the cache's ({kept}): compressed blocks are fixed when the "
                             "cache is built")
    check_nsa_options(sliding_window_size, bs, stride, selection_block_size, num_selected_blocks,
                      num_initial_blocks=num_initial_blocks, num_local_blocks=num_local_blocks)
    scale = resolve_scale(scale, D)
    g = _check_gates(gates, B, H, T, q)
    L, Hkv, sel = cache.length, cache.num_kv_heads, selection_block_size
    pos = query_positions(T, cache)

    out_cmp, p_cmp = _compressed(q, cache, scale, pos)
    importance = selection_importance(reduce(p_cmp, "b (hk g) t n -> b hk t n", "sum", hk=Hkv), bs, stride, sel,
                                      math.ceil(L / sel))
    blocks = _select(importance, pos, num_selected_blocks, sel, num_initial_blocks, num_local_blocks)
    out_sel = _selected(q, cache, blocks, sel, pos, scale)
    out_slide, lo = _sliding(q, cache, sliding_window_size, pos, scale)
    out = torch.addcmul(torch.addcmul(out_cmp * g[..., 0:1], out_sel, g[..., 1:2]), out_slide, g[..., 2:3])

    selection = DecodeSelection("blocks", blocks, sel, pos, L, window=sliding_window_size)
    extras = {"compressed_weights": p_cmp, "importance": importance, "gates": g}

    # Every compressed block in the cache has ended: the newest query reads them all (counted at this step's length).
    summaries = B * Hkv * cache.num_compressed * (D + cache.value_dim) * cache._ck.element_size()

    def count() -> BytesRead:
        units = rearrange(blocks, "b hk t s -> b hk (t s)")
        ends = rearrange((pos + 1).view(1, 1, T, 1).expand_as(blocks), "b hk t s -> b hk (t s)")
        rows = rows_read(units, ends, sel, L, Hkv) + B * Hkv * (L - lo)
        return BytesRead(rows * D * cache.itemsize, rows * cache.value_dim * cache.itemsize, summaries)

    return DecodeResult(out, selection, count, extras)


def _compressed(q, cache: KVCache, scale: float, pos):
    """Attention over the compressed cache: out (B, H, T, Dv) and weights (B, H, T, Nc) (float32 for half inputs)."""
    Hkv, T = cache.num_kv_heads, q.shape[2]
    kc, vc = cache.compressed_keys, cache.compressed_values
    acc = torch.promote_types(q.dtype, torch.float32)
    if q.dtype in _HALF:
        qs = rearrange((q.to(acc) * scale).to(q.dtype), "b (hk g) t d -> b hk (g t) d", hk=Hkv)
        scores = (qs @ kc.transpose(-1, -2)).to(acc)
    else:
        qg = rearrange(q, "b (hk g) t d -> b hk (g t) d", hk=Hkv)
        scores = (qg @ kc.transpose(-1, -2)) * scale
    last = torch.arange(kc.shape[2], device=q.device) * cache.compress_block_sliding_stride \
        + cache.compress_block_size - 1
    seen = (last <= pos.view(-1, 1)).repeat(q.shape[1] // Hkv, 1)  # rows (g, t)
    weights = safe_softmax(scores.masked_fill(~seen, float("-inf")))
    out = weights.to(vc.dtype) @ vc if kc.shape[2] else q.new_zeros(*weights.shape[:-1], vc.shape[-1])
    to_heads = lambda x: rearrange(x, "b hk (g t) n -> b (hk g) t n", t=T)  # noqa: E731
    return to_heads(out).to(q.dtype), to_heads(weights)


def selection_importance(p: torch.Tensor, compress_block_size: int, stride: int, selection_block_size: int,
                         num_blocks: int) -> torch.Tensor:
    """Compressed weights p (..., Nc) -> selection-block importance (..., num_blocks), by token overlap.

    The same numbers as ``p @ importance_to_selection_blocks(...)`` without
    the (Nc, num_blocks) matrix: selection block s only overlaps the few
    compressed blocks whose tokens meet its own, so each block sums those.
    """
    Nc = p.shape[-1]
    if Nc == 0 or num_blocks == 0:
        return p.new_zeros(*p.shape[:-1], num_blocks)
    bs, sel = compress_block_size, selection_block_size
    s = torch.arange(num_blocks, device=p.device)
    # Compressed block c overlaps selection block s when c * stride < (s + 1) * sel and c * stride + bs > s * sel.
    c_lo = torch.div(s * sel - bs, stride, rounding_mode="floor").add(1).clamp(min=0)
    c_hi = torch.div((s + 1) * sel - 1, stride, rounding_mode="floor").clamp(max=Nc - 1)
    width = (sel + bs) // stride + 2  # at least the most blocks one selection block meets
    c = c_lo.unsqueeze(-1) + torch.arange(width, device=p.device)  # (num_blocks, width)
    start = c * stride
    overlap = (torch.minimum(start + bs, (s.unsqueeze(-1) + 1) * sel) - torch.maximum(start, s.unsqueeze(-1) * sel))
    # The parallel map's entries: overlap / bs in float64, then p's dtype.
    w = (overlap.clamp(min=0).double() / bs).masked_fill(c > c_hi.unsqueeze(-1), 0).to(p.dtype)
    picked = p[..., c.clamp(max=Nc - 1).reshape(-1)].view(*p.shape[:-1], num_blocks, width)
    return (picked * w).sum(-1)


def _select(importance, pos, num_selected: int, sel: int, num_initial: int, num_local: int):
    """(B, Hkv, T, S) block numbers: forced first (ascending), then by falling importance; -1 where none is eligible.

    ``select_blocks``' rule with the queries at their cache positions.
    """
    n = importance.shape[-1]
    S = min(num_selected, n)
    if S == 0:
        return torch.full((*importance.shape[:-1], 0), -1, dtype=torch.long, device=importance.device)
    b = torch.arange(n, device=importance.device)
    p = pos.view(-1, 1)
    own = p // sel
    starts_before = b * sel <= p
    forced = ((b < num_initial) & starts_before) | ((b <= own) & (b > own - num_local))
    key = importance.to(torch.promote_types(importance.dtype, torch.float32))
    key = key.masked_fill(~((key > 0) & starts_before), float("-inf")).masked_fill(forced, float("inf"))
    vals, idx = stable_topk(key, S)
    return idx.masked_fill(torch.isneginf(vals), -1)


def _selected(q, cache: KVCache, blocks, sel: int, pos, scale: float):
    """Exact attention over the tokens of each group's picked blocks, up to each query (the gather reads only those)."""
    if blocks.shape[-1] == 0:
        return q.new_zeros(*q.shape[:3], cache.value_dim)
    tok = rearrange(blocks.unsqueeze(-1) * sel + torch.arange(sel, device=q.device), "b hk t s w -> b hk t (s w)")
    ok = (blocks >= 0).repeat_interleave(sel, dim=-1) & (tok <= pos.view(-1, 1))
    return shared_gather_attention(q, cache.k, cache.v, tok.masked_fill(~ok, -1), scale)


def _sliding(q, cache: KVCache, window: int, pos, scale: float):
    """Each query's ``window`` latest tokens, read as one slice: (out (B, H, T, Dv), the slice's first row)."""
    L, T = cache.length, q.shape[2]
    lo = max(0, L - T - window + 1)
    mask = None
    if T > 1:
        j = torch.arange(lo, L, device=q.device)
        mask = (j <= pos.view(-1, 1)) & (j > pos.view(-1, 1) - window)
    out = F.scaled_dot_product_attention(q, cache.keys[:, :, lo:], cache.values[:, :, lo:], attn_mask=mask,
                                         scale=scale, enable_gqa=q.shape[1] != cache.num_kv_heads)
    return out, lo
