"""Block-sparse attention in the style of DeepSeek's Native Sparse Attention (NSA).

Three branches look at the keys in three ways, and per-head gates mix them:

- compressed: keys and values are pooled over blocks of ``compress_block_size``
  tokens (one block every ``compress_block_sliding_stride`` tokens); queries
  attend to the pooled keys. Cheap, coarse, and it scores every region.
- selected: the compressed attention weights say which regions matter; each
  query (or each KV group, when its query heads share) takes the top
  ``num_selected_blocks`` blocks of ``selection_block_size`` tokens and attends
  to their tokens at full resolution.
- sliding: each query attends to its ``sliding_window_size`` nearest tokens.

Shapes follow ``F.scaled_dot_product_attention``: q (B, H, Lq, D), k (B, Hkv,
Lk, D), v (B, Hkv, Lk, Dv), H a multiple of Hkv. Query i sits at position i
(top-left aligned, as SDPA's ``is_causal``). With ``causal=True`` no branch
sees the future: a compressed block is visible to query i only once it has
ended (its last token <= i), selection never picks a block that starts after
i, and inside a picked block only keys j <= i count.

``selected_block_attention`` is the selected branch on its own, with the block
indices given: the contract a fused GPU kernel implements.
"""
from __future__ import annotations

import math
from typing import Callable, NamedTuple, Sequence

import torch
import torch.nn.functional as F
from einops import rearrange, reduce

from ._checks import check_int, check_qkv, resolve_scale
from .attention import _safe_softmax, gather_kv

__all__ = [
    "NSAMaps",
    "compress_kv",
    "compressed_attention",
    "importance_to_selection_blocks",
    "mean_pool",
    "nsa_attention",
    "select_blocks",
    "selected_block_attention",
    "sliding_window_attention",
]

# Elements one query chunk may gather (keys + values) before the next chunk
# starts: about 64 MiB in float64, so memory stays flat in Lq.
_GATHER_BUDGET = 1 << 23
# Queries per step of the sliding branch: its keys are a band of chunk + window.
_SLIDING_CHUNK = 512


class NSAMaps(NamedTuple):
    """What each branch looked at, for drawing. Maps are effective attention weights.

    compressed, selected, sliding, combined: (B, H, Lq, Lk). ``combined`` is
        the gate-weighted sum of the three, so ``combined @ v`` is the output
        when keys/values are compressed by mean pooling (the default). With
        another ``compress_fn`` the compressed map spreads each block's weight
        evenly over its tokens: where the weight came from, not an exact identity.
    compressed_weights: (B, H, Lq, Nc) the compact compressed attention.
    importance: (B, Hs, Lq, Nsel) selection-block scores (0 = not eligible).
    block_indices: (B, Hs, Lq, S) picked selection blocks, -1 in empty slots;
        Hs is Hkv when query heads share their selection, else H.
    gates: (B, H, Lq, 3) gates of (compressed, selected, sliding).
    """

    compressed: torch.Tensor
    selected: torch.Tensor
    sliding: torch.Tensor
    combined: torch.Tensor
    compressed_weights: torch.Tensor
    importance: torch.Tensor
    block_indices: torch.Tensor
    gates: torch.Tensor


# --------------------------------------------------------------------------- compressed


def mean_pool(blocks: torch.Tensor) -> torch.Tensor:
    """Default compression: (B, Hkv, Nc, block, D) -> (B, Hkv, Nc, D), the mean over each block."""
    return reduce(blocks, "b h n w d -> b h n d", "mean")


def num_compressed_blocks(length: int, block_size: int, stride: int) -> int:
    """Whole blocks that fit: block c covers tokens [c * stride, c * stride + block_size)."""
    return 0 if length < block_size else (length - block_size) // stride + 1


def compress_kv(x: torch.Tensor, block_size: int, stride: int, compress_fn: Callable = mean_pool) -> torch.Tensor:
    """Pool (B, Hkv, L, D) into (B, Hkv, Nc, D), one row per whole block of ``block_size`` tokens.

    Tokens after the last whole block are not summarised yet (Nc may be 0).
    ``compress_fn`` maps (B, Hkv, Nc, block_size, D) to (B, Hkv, Nc, D).
    """
    B, Hkv, L, D = x.shape
    n = num_compressed_blocks(L, block_size, stride)
    if n == 0:
        blocks = x.new_zeros(B, Hkv, 0, block_size, D)
    else:
        # unfold puts the window last: (B, Hkv, Nc, D, block)
        blocks = rearrange(x.unfold(2, block_size, stride), "b h n d w -> b h n w d")
    out = compress_fn(blocks)
    if not isinstance(out, torch.Tensor) or tuple(out.shape) != (B, Hkv, n, D):
        raise ValueError(
            f"compress_fn must map {tuple(blocks.shape)} to {(B, Hkv, n, D)}, got {tuple(getattr(out, 'shape', ()))}"
        )
    return out


def compressed_visibility(Lq: int, n: int, block_size: int, stride: int, causal: bool, device=None) -> torch.Tensor:
    """Boolean (Lq, Nc): True where query i may see compressed block c (causal: the block has ended)."""
    if not causal:
        return torch.ones(Lq, n, dtype=torch.bool, device=device)
    last = torch.arange(n, device=device) * stride + block_size - 1
    return last <= torch.arange(Lq, device=device).unsqueeze(-1)


def compressed_attention(q, k_cmp, v_cmp, block_size: int, stride: int, *, causal: bool, scale: float):
    """Queries attend to compressed keys. Returns out (B, H, Lq, Dv) and weights (B, H, Lq, Nc).

    A query that sees no whole block yet (causal, i < block_size - 1) gets zeros.
    """
    Hkv = k_cmp.shape[1]
    qg = rearrange(q, "b (hk g) i d -> b hk g i d", hk=Hkv)
    scores = torch.einsum("bhgid,bhnd->bhgin", qg, k_cmp) * scale
    if causal:
        seen = compressed_visibility(q.shape[2], k_cmp.shape[2], block_size, stride, True, q.device)
        scores = scores.masked_fill(~seen, float("-inf"))
    weights = _safe_softmax(scores)
    out = torch.einsum("bhgin,bhnd->bhgid", weights, v_cmp)
    return rearrange(out, "b hk g i d -> b (hk g) i d"), rearrange(weights, "b hk g i n -> b (hk g) i n")


# --------------------------------------------------------------------------- selection


def importance_to_selection_blocks(
    num_compressed: int,
    compress_block_size: int,
    stride: int,
    selection_block_size: int,
    num_keys: int,
    *,
    interpolate: bool = False,
    dtype=torch.float32,
    device=None,
) -> torch.Tensor:
    """The (Nc, Nsel) matrix that turns compressed-block weights into selection-block importance.

    By overlap (default): entry (c, s) is the fraction of compressed block c's
    tokens that lie in selection block s, so the rows of a weight vector are
    shared out in proportion. With ``interpolate=True``: importance is linear
    interpolation of the compressed weights, read at the selection block's
    centre from the compressed blocks' centres (clamped at both ends). When
    the two block sizes and the stride are equal both give the identity.
    """
    n_sel = math.ceil(num_keys / selection_block_size)
    M = torch.zeros(num_compressed, n_sel, dtype=torch.float64)
    if num_compressed == 0 or n_sel == 0:
        return M.to(dtype=dtype, device=device)
    c = torch.arange(num_compressed, dtype=torch.float64)
    s = torch.arange(n_sel, dtype=torch.float64)
    if not interpolate:
        c0 = (c * stride).unsqueeze(-1)
        s0 = (s * selection_block_size).unsqueeze(0)
        overlap = torch.minimum(c0 + compress_block_size, s0 + selection_block_size) - torch.maximum(c0, s0)
        M = overlap.clamp(min=0) / compress_block_size
    else:
        centre_s = s * selection_block_size + (selection_block_size - 1) / 2
        pos = ((centre_s - (compress_block_size - 1) / 2) / stride).clamp(0, num_compressed - 1)
        lo = pos.floor().long()
        hi = (lo + 1).clamp(max=num_compressed - 1)
        frac = pos - lo
        cols = torch.arange(n_sel)
        M.index_put_((lo, cols), 1 - frac, accumulate=True)
        M.index_put_((hi, cols), frac, accumulate=True)
    return M.to(dtype=dtype, device=device)


def select_blocks(importance: torch.Tensor, num_selected: int, selection_block_size: int, *, causal: bool):
    """Top ``num_selected`` eligible blocks per row of ``importance`` (B, Hs, Lq, Nsel).

    Eligible: importance > 0 (some visible compressed block scored it) and,
    when causal, the block starts at or before the query. Returns indices
    (B, Hs, Lq, min(num_selected, Nsel)) int64, -1 in slots with no eligible
    block, ordered by falling importance. Not differentiable.
    """
    Lq, n_sel = importance.shape[-2:]
    S = min(num_selected, n_sel)
    eligible = importance > 0
    if causal:
        starts = torch.arange(n_sel, device=importance.device) * selection_block_size
        eligible &= starts <= torch.arange(Lq, device=importance.device).unsqueeze(-1)
    vals, idx = importance.detach().masked_fill(~eligible, float("-inf")).topk(S, dim=-1)
    return idx.masked_fill(torch.isneginf(vals), -1)


# --------------------------------------------------------------------------- selected branch


def _check_block_indices(block_indices, B: int, H: int, Hkv: int, Lq: int, num_blocks: int) -> None:
    if not isinstance(block_indices, torch.Tensor):
        raise TypeError(f"block_indices must be a torch.Tensor, got {type(block_indices).__name__}")
    if block_indices.dtype != torch.int64:
        raise TypeError(f"block_indices must be int64, got {block_indices.dtype}")
    shape = tuple(block_indices.shape)
    if len(shape) != 4 or shape[0] != B or shape[1] not in (Hkv, H) or shape[2] != Lq:
        raise ValueError(
            f"block_indices must have shape (B, Hkv, Lq, S) = ({B}, {Hkv}, {Lq}, S) or "
            f"(B, H, Lq, S) = ({B}, {H}, {Lq}, S), got {shape}"
        )
    if block_indices.numel() == 0:
        return
    lo, hi = int(block_indices.min()), int(block_indices.max())
    if lo < -1 or hi >= num_blocks:
        raise ValueError(
            f"block_indices must lie in [-1, {num_blocks}) (-1 = empty slot, {num_blocks} blocks of keys), "
            f"got values from {lo} to {hi}"
        )
    # A block listed twice would count its tokens twice in the softmax.
    srt = block_indices.sort(dim=-1).values
    if ((srt[..., 1:] == srt[..., :-1]) & (srt[..., 1:] >= 0)).any():
        raise ValueError("block_indices must not repeat a block number within a row (only -1 may repeat)")


def selected_block_attention(q, k, v, block_indices, block_size, *, causal=False, scale=None):
    """Each query attends, with one softmax, to the tokens of its selected key blocks.

    Args:
        q: (B, H, Lq, D); k: (B, Hkv, Lk, D); v: (B, Hkv, Lk, Dv); H a multiple of Hkv.
        block_indices: int64, (B, Hkv, Lq, S) (one selection shared by the query
            heads of a KV group) or (B, H, Lq, S) (one per query head). Entries
            are block numbers in [0, ceil(Lk / block_size)), -1 for an empty
            slot; a row never repeats a block. Block b holds keys
            [b * block_size, (b + 1) * block_size) cut at Lk.
        block_size: tokens per block, >= 1.
        causal: query i only sees keys j <= i, also inside a selected block.
        scale: default 1/sqrt(D).

    Returns:
        (B, H, Lq, Dv) in q's dtype. A query with no allowed key gets zeros.
        Differentiable in q, k and v. Memory: keys are gathered block by block
        for a chunk of queries at a time, never an (Lq, Lk) matrix.
    """
    B, H, Hkv, Lq, Lk, D, Dv = check_qkv(q, k, v)
    check_int(block_size, "block_size", minimum=1)
    scale = resolve_scale(scale, D)
    _check_block_indices(block_indices, B, H, Hkv, Lq, math.ceil(Lk / block_size))
    return _selected_impl(q, k, v, block_indices, block_size, causal, scale)


def _compressed_fused(q, k, v, k_cmp, v_cmp, block_size, stride, selection_block_size, causal, scale):
    """The fused Triton compressed branch, or None where it does not apply (CPU, autograd, no Triton).

    Returns (out, importance) as nsa_attention's PyTorch path computes them for
    a shared selection and overlap mapping (importance in float32).
    """
    if not q.is_cuda or (torch.is_grad_enabled() and any(t.requires_grad for t in (q, k, v))):
        return None  # forward-only kernel: training and CPU calls take the reference
    from .kernels.compressed import compressed_attention_triton, triton_supports

    if not triton_supports(q, k_cmp, v_cmp):
        return None
    return compressed_attention_triton(q, k_cmp, v_cmp, block_size, stride, causal=causal, scale=scale,
                                       selection_block_size=selection_block_size, num_keys=k.shape[2])


def _selected_impl(q, k, v, block_indices, block_size, causal, scale, block_bias=None):
    """Where a faster backend for the selected branch plugs in (inputs already checked).

    ``block_bias`` (same shape as block_indices, or None) is added to the scores
    of every token of a slot; NSA's differentiable top-k uses it. A backend that
    does not take it must leave those calls to the reference.
    """
    if q.is_cuda and block_bias is None and not (
        torch.is_grad_enabled() and (q.requires_grad or k.requires_grad or v.requires_grad)
    ):
        # The Triton kernel is forward-only; training and CPU calls take the reference.
        from .kernels.selected_block import selected_block_attention_triton, triton_supports

        if triton_supports(q, block_indices):
            return selected_block_attention_triton(q, k, v, block_indices, block_size, causal=causal, scale=scale)
    return _selected_reference(q, k, v, block_indices, block_size, causal=causal, scale=scale, block_bias=block_bias)


def _selected_reference(q, k, v, block_indices, block_size, *, causal, scale, block_bias=None, query_chunk_size=None):
    """Pure-PyTorch selected-block attention, chunked over queries (see ``selected_block_attention``).

    Per chunk of queries, the union of the blocks they picked is gathered once
    and every query of the chunk is scored against it, with the blocks it did
    not pick masked out. Gathering per query instead would copy each key once
    per query that picks it (S * block_size * D per query); the union costs at
    most Lk * D per chunk and the scores at most chunk * Lk.
    """
    B, H, Lq, D = q.shape
    Hkv, Lk, Dv = k.shape[1], k.shape[2], v.shape[-1]
    S = block_indices.shape[-1]
    if Lq == 0 or Lk == 0 or S == 0:
        return q.new_zeros(B, H, Lq, Dv)
    nb = math.ceil(Lk / block_size)
    groups = "b (hk g) i s -> b hk g i s" if block_indices.shape[1] != Hkv else "b hk i s -> b hk 1 i s"
    idx = rearrange(block_indices, groups, hk=Hkv)  # (B, Hkv, G or 1, Lq, S)
    bias = None if block_bias is None else rearrange(block_bias, groups, hk=Hkv)
    qg = rearrange(q * scale, "b (hk g) i d -> b hk g i d", hk=Hkv)
    # Per chunk the boolean mask holds B * Hkv * g * n * Lk entries at most; the
    # spelled-out softmax (with a bias) also holds a few float scores per head.
    per_query = B * max(Lk, 1) * (idx.shape[1] * idx.shape[2] if block_bias is None else 4 * H)
    qc = query_chunk_size or max(1, _GATHER_BUDGET // per_query)
    offsets = torch.arange(block_size, device=q.device)
    # With a score bias (differentiable top-k) the softmax is spelled out. A
    # large finite negative, not -inf, masks: masked keys get weight exactly 0
    # and rows with no key are zeroed once at the end.
    neg = torch.finfo(q.dtype).min
    outs = []
    for i0 in range(0, Lq, qc):
        blk = idx[:, :, :, i0 : i0 + qc]
        n = blk.shape[3]
        # picked[..., c]: the query picked block c; the extra column nb soaks up -1 slots.
        picked = blk.new_zeros(*blk.shape[:-1], nb + 1, dtype=torch.bool)
        picked.scatter_(-1, blk.masked_fill(blk < 0, nb), True)
        used = picked[..., :nb].flatten(2, 3).any(dim=2)  # (B, Hkv, nb)
        U = int(used.sum(-1).max())
        if U == 0:
            outs.append(qg.new_zeros(*qg.shape[:3], n, Dv))
            continue
        # Stable sort puts the used blocks first, in order; any padding is masked below.
        union = torch.sort(used.to(torch.uint8), dim=-1, descending=True, stable=True).indices[..., :U]
        tok = union.unsqueeze(-1) * block_size + offsets  # (B, Hkv, U, bs)
        flat = rearrange(tok.clamp(max=Lk - 1), "b h u w -> b h 1 (u w)")
        ks = gather_kv(k, flat)[:, :, 0]  # (B, Hkv, U * bs, D)
        vs = gather_kv(v, flat)[:, :, 0]
        cols = union.unsqueeze(2).unsqueeze(3).expand(*picked.shape[:4], U)
        # Last key query i may see: i when causal, and never past the end (partial last block).
        last = torch.arange(i0, i0 + n, device=q.device) if causal else torch.full((n,), Lk - 1, device=q.device)
        in_reach = tok[:, :, None, None] <= last.clamp(max=Lk - 1).view(n, 1, 1)  # (B, Hkv, 1, n, U, bs)
        valid = (picked.gather(-1, cols).unsqueeze(-1) & in_reach).flatten(-2)  # (B, Hkv, g, n, U * bs)
        qb = qg[:, :, :, i0 : i0 + n]
        if bias is None:
            # SDPA fuses scores, mask and softmax (a row with no allowed key gives 0).
            sdpa = F.scaled_dot_product_attention(
                rearrange(qb, "b h g n d -> (b h) g n d"), rearrange(ks, "b h t d -> (b h) 1 t d"),
                rearrange(vs, "b h t d -> (b h) 1 t d"), attn_mask=rearrange(valid, "b h g n t -> (b h) g n t"),
                scale=1.0, enable_gqa=qb.shape[2] > 1,
            )
            outs.append(rearrange(sdpa, "(b h) g n d -> b h g n d", b=B))
            continue
        slot_bias = picked.new_zeros(picked.shape, dtype=q.dtype)
        slot_bias = slot_bias.scatter(-1, blk.masked_fill(blk < 0, nb), bias[:, :, :, i0 : i0 + n])
        scores = qb @ ks.unsqueeze(2).transpose(-1, -2)  # (B, Hkv, G, n, U * bs)
        scores = scores + slot_bias.gather(-1, cols).repeat_interleave(block_size, dim=-1)
        weights = torch.softmax(scores.masked_fill(~valid, neg), dim=-1)
        outs.append((weights @ vs.unsqueeze(2)) * valid.any(dim=-1, keepdim=True))
    return rearrange(torch.cat(outs, dim=3), "b hk g i d -> b (hk g) i d")


def selected_token_mask(block_indices: torch.Tensor, block_size: int, num_keys: int, *, causal: bool) -> torch.Tensor:
    """Boolean (B, Hs, Lq, num_keys): the keys a selection covers (for drawing and tests; O(Lq * Lk))."""
    Lq = block_indices.shape[2]
    block_of_key = torch.arange(num_keys, device=block_indices.device) // block_size
    mask = (block_indices.unsqueeze(-1) == block_of_key).any(dim=-2)
    if causal:
        mask &= torch.arange(num_keys, device=block_indices.device) <= torch.arange(Lq, device=block_indices.device).unsqueeze(-1)
    return mask


# --------------------------------------------------------------------------- sliding window


def sliding_window_mask(Lq: int, Lk: int, window_size: int, *, causal: bool, device=None, q_offset: int = 0, k_offset: int = 0):
    """Boolean (Lq, Lk): query i sees key j when i - window < j <= i (causal) or |i - j| < window."""
    i = torch.arange(q_offset, q_offset + Lq, device=device).unsqueeze(-1)
    j = torch.arange(k_offset, k_offset + Lk, device=device)
    near = (j > i - window_size) & (j < i + window_size)
    return near & (j <= i) if causal else near


def sliding_window_attention(q, k, v, window_size: int, *, causal: bool = False, scale: float | None = None,
                             query_chunk_size: int | None = None):
    """Each query attends to the keys within ``window_size`` positions of its own.

    Causal: keys i - window_size < j <= i (the ``window_size`` latest tokens,
    itself included). Otherwise |i - j| < window_size on both sides. Runs SDPA
    on query chunks, each against only its band of keys, so memory grows with
    Lq * (chunk + 2 * window), not Lq * Lk. Shapes as in SDPA; returns
    (B, H, Lq, Dv); a query with no key in reach (Lq > Lk) gets zeros.
    """
    B, H, Hkv, Lq, Lk, D, Dv = check_qkv(q, k, v)
    check_int(window_size, "sliding_window_size", minimum=1)
    check_int(query_chunk_size, "query_chunk_size", minimum=1, allow_none=True)
    scale = resolve_scale(scale, D)
    qc = query_chunk_size or _SLIDING_CHUNK
    outs = []
    for i0 in range(0, Lq, qc):
        i1 = min(Lq, i0 + qc)
        lo = max(0, i0 - window_size + 1)
        hi = min(Lk, i1 if causal else i1 + window_size - 1)
        if hi <= lo:
            outs.append(q.new_zeros(B, H, i1 - i0, Dv))
            continue
        mask = sliding_window_mask(i1 - i0, hi - lo, window_size, causal=causal, device=q.device, q_offset=i0, k_offset=lo)
        outs.append(F.scaled_dot_product_attention(
            q[:, :, i0:i1], k[:, :, lo:hi], v[:, :, lo:hi], attn_mask=mask, scale=scale, enable_gqa=Hkv != H,
        ))
    if not outs:
        return q.new_zeros(B, H, 0, Dv)
    return torch.cat(outs, dim=2)


# --------------------------------------------------------------------------- all three


def _check_gates(gates, B: int, H: int, Lq: int, like: torch.Tensor) -> torch.Tensor:
    if isinstance(gates, torch.Tensor):
        g = gates.to(dtype=like.dtype, device=like.device)
    elif isinstance(gates, Sequence):
        g = torch.as_tensor(gates, dtype=like.dtype, device=like.device)
    else:
        raise TypeError(f"gates must be a tensor or a sequence of 3 numbers, got {type(gates).__name__}")
    target = (B, H, Lq, 3)
    try:
        if g.dim() == 0 or g.shape[-1] != 3 or torch.broadcast_shapes(g.shape, target) != target:
            raise RuntimeError
    except RuntimeError:
        raise ValueError(
            f"gates must broadcast to (B, H, Lq, 3) = {target} (last dim: compressed, selected, sliding), "
            f"got shape {tuple(g.shape)}"
        ) from None
    return g.expand(target)


def _check_compress_fn(compress_fn):
    if compress_fn is None:
        return mean_pool, mean_pool
    if callable(compress_fn):
        return compress_fn, compress_fn
    if isinstance(compress_fn, (tuple, list)) and len(compress_fn) == 2 and all(map(callable, compress_fn)):
        return tuple(compress_fn)
    raise TypeError("compress_fn must be a callable or a pair of callables (for keys, for values)")


def _dense_weights(q, k, mask, scale):
    """(B, H, Lq, Lk) softmax weights over the keys allowed by ``mask`` (B or 1, H or Hkv or 1, Lq, Lk)."""
    Hkv = k.shape[1]
    qg = rearrange(q, "b (hk g) i d -> b hk g i d", hk=Hkv)
    scores = rearrange(torch.einsum("bhgid,bhjd->bhgij", qg, k), "b hk g i j -> b (hk g) i j") * scale
    if mask.shape[1] not in (1, q.shape[1]):
        mask = mask.repeat_interleave(q.shape[1] // mask.shape[1], dim=1)
    return _safe_softmax(scores.masked_fill(~mask, float("-inf")))


def nsa_attention(
    q,
    k,
    v,
    *,
    gates,
    sliding_window_size: int,
    compress_block_size: int,
    selection_block_size: int,
    num_selected_blocks: int,
    compress_block_sliding_stride: int | None = None,
    causal: bool = False,
    query_heads_share_selected_kv: bool = True,
    interpolated_importance_score: bool = False,
    use_diff_topk: bool = False,
    compress_fn=None,
    scale: float | None = None,
    return_maps: bool = False,
):
    """NSA: gates[..., 0] * compressed + gates[..., 1] * selected + gates[..., 2] * sliding.

    Args:
        q: (B, H, Lq, D); k: (B, Hkv, Lk, D); v: (B, Hkv, Lk, Dv); H a multiple of Hkv.
        gates: tensor (or sequence) broadcastable to (B, H, Lq, 3): the weight
            of the compressed, selected and sliding branch per query and head.
        sliding_window_size: >= 1 (see ``sliding_window_attention``).
        compress_block_size: tokens pooled into one compressed key, >= 1.
        compress_block_sliding_stride: tokens between compressed blocks, in
            [1, compress_block_size]; default compress_block_size (no overlap).
        selection_block_size: tokens per selectable block, >= 1.
        num_selected_blocks: blocks each query attends to, >= 0; 0 turns the
            selected branch off (its output is zeros).
        causal: no branch sees keys after the query (see the module docstring).
        query_heads_share_selected_kv: the query heads of a KV group sum their
            importance and share one selection (as NSA does for GQA); else each
            head selects its own blocks.
        interpolated_importance_score: map compressed scores onto selection
            blocks by interpolation instead of by overlap
            (see ``importance_to_selection_blocks``).
        use_diff_topk: straight-through selection: each picked block's scores
            get ``s - s.detach()`` added (s its importance), zero in the forward
            pass, so the gradient reaches the importance scores and through them
            q and the compression.
        compress_fn: callable (B, Hkv, Nc, block, D) -> (B, Hkv, Nc, D), or a
            pair (for keys, for values); default ``mean_pool``.
        scale: default 1/sqrt(D).
        return_maps: also return ``NSAMaps``: (B, H, Lq, Lk) maps, O(Lq * Lk):
            for drawing at small L.

    Returns:
        out (B, H, Lq, Dv), or (out, NSAMaps). Inputs shorter than one block
        have no compressed or selected keys yet; those branches give zeros and
        the sliding window still answers. No NaN from masking.
    """
    B, H, Hkv, Lq, Lk, D, Dv = check_qkv(q, k, v)
    check_int(sliding_window_size, "sliding_window_size", minimum=1)
    check_int(compress_block_size, "compress_block_size", minimum=1)
    stride = compress_block_size if compress_block_sliding_stride is None else compress_block_sliding_stride
    check_int(stride, "compress_block_sliding_stride", minimum=1)
    if stride > compress_block_size:
        raise ValueError(
            f"compress_block_sliding_stride must be between 1 and compress_block_size ({compress_block_size}), got {stride}"
        )
    check_int(selection_block_size, "selection_block_size", minimum=1)
    check_int(num_selected_blocks, "num_selected_blocks", minimum=0)
    scale = resolve_scale(scale, D)
    g = _check_gates(gates, B, H, Lq, q)
    k_fn, v_fn = _check_compress_fn(compress_fn)

    # compressed
    k_cmp = compress_kv(k, compress_block_size, stride, k_fn)
    v_cmp = compress_kv(v, compress_block_size, stride, v_fn)
    fused = None
    if (compress_fn is None and query_heads_share_selected_kv and not interpolated_importance_score
            and not use_diff_topk and not return_maps):
        fused = _compressed_fused(q, k, v, k_cmp, v_cmp, compress_block_size, stride, selection_block_size,
                                  causal, scale)
    if fused is not None:
        # The kernel returns the group-summed importance itself; the (H, Lq, Nc) weights never exist.
        out_cmp, importance = fused
    else:
        out_cmp, p_cmp = compressed_attention(q, k_cmp, v_cmp, compress_block_size, stride, causal=causal,
                                              scale=scale)

    # selected: compressed weights -> selection-block importance -> top blocks
    Nc = k_cmp.shape[2]
    if fused is None:
        M = importance_to_selection_blocks(Nc, compress_block_size, stride, selection_block_size, Lk,
                                           interpolate=interpolated_importance_score, dtype=q.dtype, device=q.device)
        if query_heads_share_selected_kv:
            # Sum the group's weights before mapping them: the same value (the map is
            # linear) for G times fewer multiplies; at L=65536 on an H200, 38 ms instead of 238.
            importance = reduce(p_cmp, "b (hk g) i n -> b hk i n", "sum", hk=Hkv) @ M  # (B, Hkv, Lq, Nsel)
        else:
            importance = p_cmp @ M  # (B, H, Lq, Nsel)
    block_indices = select_blocks(importance, num_selected_blocks, selection_block_size, causal=causal)
    bias = None
    if use_diff_topk and block_indices.shape[-1] > 0:
        picked = importance.gather(-1, block_indices.clamp(min=0)).masked_fill(block_indices < 0, 0)
        bias = picked - picked.detach()
    out_sel = _selected_impl(q, k, v, block_indices, selection_block_size, causal, scale, block_bias=bias)

    # sliding
    out_slide = sliding_window_attention(q, k, v, sliding_window_size, causal=causal, scale=scale)

    out = g[..., 0:1] * out_cmp + g[..., 1:2] * out_sel + g[..., 2:3] * out_slide
    if not return_maps:
        return out

    with torch.no_grad():
        # Mean pooling gives every token of block c the weight p_c / block_size.
        spread = q.new_zeros(Nc, Lk)
        for c in range(Nc):
            spread[c, c * stride : c * stride + compress_block_size] = 1.0 / compress_block_size
        m_cmp = p_cmp.detach() @ spread
        sel_mask = selected_token_mask(block_indices, selection_block_size, Lk, causal=causal)
        m_sel = _dense_weights(q.detach(), k.detach(), sel_mask, scale)
        win = sliding_window_mask(Lq, Lk, sliding_window_size, causal=causal, device=q.device)
        m_slide = _dense_weights(q.detach(), k.detach(), win[None, None], scale)
        gd = g.detach()
        combined = gd[..., 0:1] * m_cmp + gd[..., 1:2] * m_sel + gd[..., 2:3] * m_slide
    maps = NSAMaps(m_cmp, m_sel, m_slide, combined, p_cmp.detach(), importance.detach(), block_indices, gd)
    return out, maps
