"""NSA decoding: the compressed cache, the selected blocks and the sliding window, gated, for the newest queries.

Per step NSA reads one compressed key and value per ``stride`` tokens, the
``num_selected_blocks`` blocks its compressed scores pick (shared by a KV
group, as NSA selects for GQA) and the last ``sliding_window_size`` tokens;
the branches are read separately, as NSA's kernels read them. The
compressed rows come from the cache (``KVCache(compress_block_size=...)``),
emitted as blocks fill.
"""
from __future__ import annotations

import functools
import math
from numbers import Real

import torch
import torch.nn.functional as F
from einops import rearrange

from .._checks import resolve_scale
from ..ops.dense import safe_softmax
from ..ops.nsa import check_nsa_options
from ..ops.nsa.attention import _check_gates
from ..ops.nsa.compression import num_compressed_blocks
from .cache import COMPRESSED_ROW_ALIGN, KVCache
from .gather import shared_gather_attention, use_rows_kernel
from .ranking import ranked_topk
from .result import (BytesRead, DecodeResult, DecodeSelection, Lazy, LazyExtras, check_query, query_positions,
                     rows_read)

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
    g = _gates(gates, B, H, T, q)
    L, Hkv, sel = cache.length, cache.num_kv_heads, selection_block_size
    pos = query_positions(T, cache)

    if _use_nsa_kernels(q, cache, num_selected_blocks, sliding_window_size, sel):
        from .nsa_kernel import nsa_step_triton

        out, blocks, importance, p_cmp = nsa_step_triton(
            q, cache, g, scale=scale, window=sliding_window_size, sel=sel, num_selected=num_selected_blocks,
            num_initial=num_initial_blocks, num_local=num_local_blocks)
        lo = max(0, L - T - sliding_window_size + 1)
        p_cmp = Lazy(p_cmp)  # (B, H, T, Nc) float32: made from the kernel's stored scores only when read
    else:
        out_cmp, p_cmp, p_group = _compressed(q, cache, scale)
        importance = selection_importance(p_group, bs, stride, sel, math.ceil(L / sel))
        blocks = _select(importance, L, T, num_selected_blocks, sel, num_initial_blocks, num_local_blocks)
        out_sel = _selected(q, cache, blocks, sel, pos, scale)
        out_slide, lo = _sliding(q, cache, sliding_window_size, pos, scale)
        out = torch.addcmul(torch.addcmul(out_cmp * g[..., 0:1], out_sel, g[..., 1:2]), out_slide, g[..., 2:3])

    selection = DecodeSelection("blocks", blocks, sel, pos, L, window=sliding_window_size)
    extras = LazyExtras(compressed_weights=p_cmp, importance=importance, gates=g)

    # Every compressed block in the cache has ended: the newest query reads them all (counted at this step's length).
    summaries = B * Hkv * cache.num_compressed * (D + cache.value_dim) * cache._ck.element_size()

    def count() -> BytesRead:
        units = rearrange(blocks, "b hk t s -> b hk (t s)")
        ends = rearrange((pos + 1).view(1, 1, T, 1).expand_as(blocks), "b hk t s -> b hk (t s)")
        rows = rows_read(units, ends, sel, L, Hkv) + B * Hkv * (L - lo)
        return BytesRead(rows * D * cache.itemsize, rows * cache.value_dim * cache.itemsize, summaries)

    return DecodeResult(out, selection, count, extras)


def _use_nsa_kernels(q: torch.Tensor, cache: KVCache, num_selected: int, window: int, sel: int) -> bool:
    """Whether the step takes ``nsa_kernel`` (CUDA, Triton, a kernel dtype, sizes its programs hold)."""
    if not q.is_cuda:  # checked first: the kernel modules import Triton
        return False
    from ..kernels import dispatch
    from .nsa_kernel import MAX_BLOCKS, MAX_SELECTED

    return (dispatch.use_triton(q, cache.k, cache.v) and max(q.shape[-1], cache.value_dim) <= 256
            and cache.num_compressed >= 1 and 1 <= num_selected <= MAX_SELECTED and window >= 1
            and -(-cache.length // sel) <= MAX_BLOCKS)


def _gates(gates, B: int, H: int, T: int, q: torch.Tensor) -> torch.Tensor:
    """``_check_gates``, with three plain numbers made a device tensor once, not copied to the device every step.

    A copy from host memory per step would be the step's one transfer, and a
    CUDA graph cannot capture it.
    """
    if (isinstance(gates, (tuple, list)) and len(gates) == 3
            and all(isinstance(x, Real) and not isinstance(x, bool) for x in gates)):
        gates = _constant_gates(tuple(float(x) for x in gates), q.dtype, q.device)
    return _check_gates(gates, B, H, T, q)


@functools.lru_cache(maxsize=16)
def _constant_gates(values: tuple[float, float, float], dtype: torch.dtype, device: torch.device) -> torch.Tensor:
    return torch.tensor(values, dtype=dtype, device=device)


def _compressed(q, cache: KVCache, scale: float):
    """Attention over the compressed cache: out (B, H, T, Dv), weights (B, H, T, Nc) and their sum per KV group.

    Weights are float32 for half inputs. Which blocks each query sees is
    known on the host (query t, at position L - T + t, sees the blocks that
    have ended by then), so the common case of one query, which sees every
    block in the cache, needs no mask and no guard for empty rows.
    """
    B, H, T = q.shape[:3]
    Hkv, G = cache.num_kv_heads, q.shape[1] // cache.num_kv_heads
    Nc = cache.num_compressed
    # The products run over Np >= Nc rows (aligned widths, see cache.COMPRESSED_ROW_ALIGN); columns past Nc are
    # masked to -inf, so they get weight 0 and the result is the one over the Nc blocks.
    Np = min(-(-Nc // COMPRESSED_ROW_ALIGN) * COMPRESSED_ROW_ALIGN, cache._ck.shape[2])
    kc, vc = cache._ck[:, :, :Np], cache._cv[:, :, :Np]
    acc = torch.promote_types(q.dtype, torch.float32)
    if q.dtype in _HALF:
        # Scores from the half product (rounded once); the softmax reads them in float32.
        qs = rearrange((q.to(acc) * scale).to(q.dtype), "b (hk g) t d -> b hk (g t) d", hk=Hkv)
        scores = qs @ kc.transpose(-1, -2)
    else:
        qg = rearrange(q, "b (hk g) t d -> b hk (g t) d", hk=Hkv)
        scores = (qg @ kc.transpose(-1, -2)) * scale
    bs, stride, L = cache.compress_block_size, cache.compress_block_sliding_stride, cache.length
    first_seen = num_compressed_blocks(L - T + 1, bs, stride)  # blocks the step's earliest query sees
    if first_seen < Np:
        scores = scores.masked_fill(_unseen(L, T, G, Np, bs, stride, q.device), float("-inf"))
    if Nc == 0:
        weights = scores.to(acc)
        out = q.new_zeros(*weights.shape[:-1], vc.shape[-1])
    else:
        # An earliest query that sees no block yet has an all -inf row: safe_softmax gives it zeros.
        weights = safe_softmax(scores.to(acc)) if first_seen == 0 else torch.softmax(scores, dim=-1, dtype=acc)
        out = weights.to(vc.dtype) @ vc
    group = weights.view(B, Hkv, G, T, Np).sum(2)[..., :Nc]  # (B, Hkv, T, Nc): what the group's selection ranks by
    to_heads = lambda x: rearrange(x, "b hk (g t) n -> b (hk g) t n", t=T)  # noqa: E731
    return to_heads(out).to(q.dtype), to_heads(weights[..., :Nc]), group


@functools.lru_cache(maxsize=32)
def _unseen(L: int, T: int, G: int, Np: int, bs: int, stride: int, device: torch.device) -> torch.Tensor:
    """(G * T, Np) True where row (g, t) may not read compressed column c: not ended by query t, or padding."""
    last = torch.arange(Np, device=device) * stride + bs - 1
    return (last > torch.arange(L - T, L, device=device).view(-1, 1)).repeat(G, 1)


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
    flat, w = _overlap_map(Nc, num_blocks, compress_block_size, stride, selection_block_size, p.dtype, p.device)
    picked = p[..., flat].view(*p.shape[:-1], num_blocks, w.shape[-1])
    return (picked * w).sum(-1)


@functools.lru_cache(maxsize=32)
def _overlap_map(Nc: int, num_blocks: int, bs: int, stride: int, sel: int, dtype: torch.dtype,
                 device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
    """The compressed blocks each selection block meets (flat (num_blocks * width,) indices) and their overlap weights.

    Fixed by the sizes: kept across steps, so a step pays two kernels for the map, not a dozen.
    """
    s = torch.arange(num_blocks, device=device)
    # Compressed block c overlaps selection block s when c * stride < (s + 1) * sel and c * stride + bs > s * sel.
    c_lo = torch.div(s * sel - bs, stride, rounding_mode="floor").add(1).clamp(min=0)
    c_hi = torch.div((s + 1) * sel - 1, stride, rounding_mode="floor").clamp(max=Nc - 1)
    width = (sel + bs) // stride + 2  # at least the most blocks one selection block meets
    c = c_lo.unsqueeze(-1) + torch.arange(width, device=device)  # (num_blocks, width)
    start = c * stride
    overlap = (torch.minimum(start + bs, (s.unsqueeze(-1) + 1) * sel) - torch.maximum(start, s.unsqueeze(-1) * sel))
    # The parallel map's entries: overlap / bs in float64, then p's dtype.
    w = (overlap.clamp(min=0).double() / bs).masked_fill(c > c_hi.unsqueeze(-1), 0).to(dtype)
    return c.clamp(max=Nc - 1).reshape(-1), w


def _select(importance, L: int, T: int, num_selected: int, sel: int, num_initial: int, num_local: int):
    """(B, Hkv, T, S) block numbers: forced first (ascending), then by falling importance; -1 where none is eligible.

    ``select_blocks``' rule with the queries at their cache positions L - T .. L - 1.
    """
    n = importance.shape[-1]
    S = min(num_selected, n)
    if S == 0:
        return torch.full((*importance.shape[:-1], 0), -1, dtype=torch.long, device=importance.device)
    starts_before, forced = _select_masks(L, T, n, sel, num_initial, num_local, importance.device)
    key = importance.to(torch.promote_types(importance.dtype, torch.float32))
    eligible = key > 0 if starts_before is None else (key > 0) & starts_before
    key = key.masked_fill(~eligible, float("-inf")).masked_fill(forced, float("inf"))
    vals, idx = ranked_topk(key, S)
    return idx.masked_fill(torch.isneginf(vals), -1)


@functools.lru_cache(maxsize=32)
def _select_masks(L: int, T: int, n: int, sel: int, num_initial: int, num_local: int, device: torch.device):
    """(T, n) masks of the blocks that start at or before each query (None: all do) and of the forced ones.

    Fixed by the positions: kept across steps, so a step builds no mask.
    """
    b = torch.arange(n, device=device)
    p = torch.arange(L - T, L, device=device).view(-1, 1)
    own = p // sel
    starts_before = b * sel <= p
    forced = ((b < num_initial) & starts_before) | ((b <= own) & (b > own - num_local))
    # Every block starts at or before the newest query (n = ceil(L / sel)): one query needs no mask for it.
    return (None if T == 1 else starts_before), forced


def _selected(q, cache: KVCache, blocks, sel: int, pos, scale: float):
    """Exact attention over the tokens of each group's picked blocks, up to each query (the gather reads only those)."""
    if blocks.shape[-1] == 0:
        return q.new_zeros(*q.shape[:3], cache.value_dim)
    tok = blocks.unsqueeze(-1) * sel + torch.arange(sel, device=q.device)  # (B, Hkv, T, S, sel)
    ok = (blocks >= 0).unsqueeze(-1) & (tok <= pos.view(-1, 1, 1))
    return shared_gather_attention(q, cache.k, cache.v, tok.masked_fill(~ok, -1).flatten(-2), scale)


def _sliding(q, cache: KVCache, window: int, pos, scale: float):
    """Each query's ``window`` latest tokens, read as one slice: (out (B, H, T, Dv), the slice's first row).

    On the rows kernel's devices the slice goes through it too (one launch, the rows read once; SDPA's
    decode path there is tuned for long rows, not a window of a few hundred); elsewhere SDPA.
    """
    L, T = cache.length, q.shape[2]
    lo = max(0, L - T - window + 1)
    j = torch.arange(lo, L, device=q.device)
    if use_rows_kernel(q, cache.k, cache.v, j):
        from .rows_kernel import rows_attention_triton

        rows = torch.where((j <= pos.view(-1, 1)) & (j > pos.view(-1, 1) - window), j, -1)  # (T, W)
        tokens = rows.expand(q.shape[0], cache.num_kv_heads, T, -1)
        return rows_attention_triton(q, cache.k, cache.v, tokens, scale), lo
    mask = None
    if T > 1:
        mask = (j <= pos.view(-1, 1)) & (j > pos.view(-1, 1) - window)
    out = F.scaled_dot_product_attention(q, cache.keys[:, :, lo:], cache.values[:, :, lo:], attn_mask=mask,
                                         scale=scale, enable_gqa=q.shape[1] != cache.num_kv_heads)
    return out, lo
