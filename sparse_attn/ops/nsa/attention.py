"""Block-sparse attention in the style of DeepSeek's Native Sparse Attention (NSA).

Three branches look at the keys in three ways, and per-head gates mix them:

- compressed (``compression.py``): keys and values are pooled over blocks of
  ``compress_block_size`` tokens (one block every
  ``compress_block_sliding_stride`` tokens); queries attend to the pooled
  keys. Cheap, coarse, and it scores every region.
- selected (``selection.py``, ``selected.py``): the compressed attention
  weights say which regions matter; each query (or each KV group, when its
  query heads share) takes ``num_selected_blocks`` blocks of
  ``selection_block_size`` tokens and attends to their tokens at full
  resolution: as in the NSA paper, n counts the initial block and the two
  local blocks (the query's own and the previous one), which are always
  taken, and the other slots go to the most important blocks.
- sliding (``sparse_attn.ops.sliding_window``): each query attends to its
  ``sliding_window_size`` nearest tokens.

Shapes follow ``F.scaled_dot_product_attention``: q (B, H, Lq, D), k (B, Hkv,
Lk, D), v (B, Hkv, Lk, Dv), H a multiple of Hkv. Query i sits at position i
(top-left aligned, as SDPA's ``is_causal``). With ``causal=True`` no branch
sees the future: a compressed block is visible to query i only once it has
ended (its last token <= i), selection never picks a block that starts after
i, and inside a picked block only keys j <= i count.
"""
from __future__ import annotations

from typing import NamedTuple, Sequence

import torch
from einops import rearrange, reduce

from ..._checks import check_int, check_qkv, resolve_scale
from ...kernels import dispatch
from ..dense import safe_softmax
from ..sliding_window import sliding_window_attention, sliding_window_mask
from .compression import _compressed_fused, compress_kv, compressed_attention, mean_pool
from .selected import _selected_gated, _selected_impl
from .selection import check_forcing, forced_blocks, importance_to_selection_blocks, select_blocks, selected_token_mask

__all__ = ["NSAMaps", "nsa_attention", "check_nsa_options"]


class NSAMaps(NamedTuple):
    """What each branch looked at, for drawing. Maps are effective attention weights.

    compressed, selected, sliding, combined: (B, H, Lq, Lk). ``combined`` is
        the gate-weighted sum of the three, so ``combined @ v`` is the output
        when keys/values are compressed by mean pooling (the default). With
        another ``compress_fn`` the compressed map spreads each block's weight
        evenly over its tokens: where the weight came from, not an exact identity.
    compressed_weights: (B, H, Lq, Nc) the compact compressed attention,
        float32 for half inputs (float64 stays float64), as ranked.
    importance: (B, Hs, Lq, Nsel) selection-block scores (0 = not eligible
        unless forced), in the dtype of ``compressed_weights``.
    block_indices: (B, Hs, Lq, S) picked selection blocks in ``select_blocks``'
        order (forced first), -1 in empty slots; Hs is Hkv when query heads
        share their selection, else H.
    gates: (B, H, Lq, 3) gates of (compressed, selected, sliding).
    forced: (B, Hs, Lq, S) bool, True where the slot of ``block_indices``
        holds a forced block (initial or local, picked whatever its
        importance), False for a block picked by importance and for -1.
    """

    compressed: torch.Tensor
    selected: torch.Tensor
    sliding: torch.Tensor
    combined: torch.Tensor
    compressed_weights: torch.Tensor
    importance: torch.Tensor
    block_indices: torch.Tensor
    gates: torch.Tensor
    forced: torch.Tensor


def check_nsa_options(sliding_window_size, compress_block_size, compress_block_sliding_stride,
                      selection_block_size, num_selected_blocks, *, num_initial_blocks=1, num_local_blocks=2) -> int:
    """Check NSA's block and window sizes and forced-block counts (as ``nsa_attention`` documents them).

    Returns the compression stride. ``num_initial_blocks + num_local_blocks``
    may not exceed ``num_selected_blocks`` unless that is 0 (branch off).
    """
    check_int(sliding_window_size, "sliding_window_size", minimum=1)
    check_int(compress_block_size, "compress_block_size", minimum=1)
    stride = compress_block_size if compress_block_sliding_stride is None else compress_block_sliding_stride
    check_int(stride, "compress_block_sliding_stride", minimum=1)
    if stride > compress_block_size:
        raise ValueError(
            f"compress_block_sliding_stride must be between 1 and compress_block_size ({compress_block_size}), got {stride}"
        )
    check_int(selection_block_size, "selection_block_size", minimum=1)
    check_forcing(num_selected_blocks, num_initial_blocks, num_local_blocks)
    return stride


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
    return safe_softmax(scores.masked_fill(~mask, float("-inf")))


def _gate(out_cmp, out_sel, out_slide, g):
    """g[..., 0] * compressed + g[..., 1] * selected + g[..., 2] * sliding.

    On CUDA without autograd one Triton pass (``sparse_attn.kernels.gate_combine``);
    else two fused multiply-adds, fewer passes over (B, H, Lq, Dv) than three
    products and two sums (at long lengths each pass costs milliseconds: docs/benchmarks.md).
    """
    if dispatch.use_triton(out_cmp, out_sel, out_slide, g):  # before importing the kernel (and Triton)
        from ...kernels import gate_combine

        if gate_combine.triton_supports(out_cmp, out_sel, out_slide, g):
            return gate_combine.gate_combine_triton(out_cmp, out_sel, out_slide, g)
    return torch.addcmul(torch.addcmul(out_cmp * g[..., 0:1], out_sel, g[..., 1:2]), out_slide, g[..., 2:3])


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
    num_initial_blocks: int = 1,
    num_local_blocks: int = 2,
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
        num_selected_blocks: blocks each query attends to, >= 0, forced ones
            included; 0 turns the selected branch off (its output is zeros).
        num_initial_blocks, num_local_blocks: forced blocks, as in the NSA
            paper's "1 initial block and 2 local blocks" (the defaults): the
            first ``num_initial_blocks`` blocks and the ``num_local_blocks``
            blocks ending at the query's own block (own, previous, ...) are
            always selected, whatever their importance; causal keeps only
            those that start at or before the query (see ``forced_blocks``).
            Their sum may not exceed ``num_selected_blocks``; 0 and 0 give
            the plain top-importance selection.
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

    Importance is computed and ranked in float32 for half inputs (float64
    stays float64), on the PyTorch path and in the fused kernel; among exactly
    equal importances the lower block index wins (``select_blocks``).

    Returns:
        out (B, H, Lq, Dv), or (out, NSAMaps). Inputs shorter than one
        compressed block have no compressed keys yet: that branch gives zeros,
        the selected branch sees only its forced blocks (none when forcing is
        off) and the sliding window still answers. No NaN from masking.
    """
    B, H, Hkv, Lq, Lk, D, Dv = check_qkv(q, k, v)
    stride = check_nsa_options(sliding_window_size, compress_block_size, compress_block_sliding_stride,
                               selection_block_size, num_selected_blocks, num_initial_blocks=num_initial_blocks,
                               num_local_blocks=num_local_blocks)
    scale = resolve_scale(scale, D)
    g = _check_gates(gates, B, H, Lq, q)
    k_fn, v_fn = _check_compress_fn(compress_fn)

    # compressed
    fused = None
    if (compress_fn is None and query_heads_share_selected_kv and not interpolated_importance_score
            and not use_diff_topk and not return_maps):
        fused = _compressed_fused(q, k, v, compress_block_size, stride, selection_block_size, causal, scale)
    if fused is not None:
        # The kernel returns the group-summed importance itself (float32); the (H, Lq, Nc) weights never exist.
        out_cmp, importance = fused
    else:
        # The pooled keys score the blocks: mean pooling runs in float32 for half inputs, so a bfloat16
        # run ranks exactly as a float32 run on the same values. A given compress_fn keeps its own dtype.
        pool = torch.promote_types(q.dtype, torch.float32) if compress_fn is None else q.dtype
        k_cmp = compress_kv(k.to(pool), compress_block_size, stride, k_fn)
        v_cmp = compress_kv(v.to(pool), compress_block_size, stride, v_fn)
        out_cmp, p_cmp = compressed_attention(q, k_cmp, v_cmp, compress_block_size, stride, causal=causal,
                                              scale=scale)

    # selected: compressed weights -> selection-block importance -> top blocks
    if fused is None:
        Nc = k_cmp.shape[2]
        M = importance_to_selection_blocks(Nc, compress_block_size, stride, selection_block_size, Lk,
                                           interpolate=interpolated_importance_score, dtype=p_cmp.dtype,
                                           device=q.device)
        if query_heads_share_selected_kv:
            # Sum the group's weights before mapping them: the same value (the map is
            # linear) for G times fewer multiplies (docs/benchmarks.md).
            importance = reduce(p_cmp, "b (hk g) i n -> b hk i n", "sum", hk=Hkv) @ M  # (B, Hkv, Lq, Nsel)
        else:
            importance = p_cmp @ M  # (B, H, Lq, Nsel)
    block_indices = select_blocks(importance, num_selected_blocks, selection_block_size, causal=causal,
                                  num_initial_blocks=num_initial_blocks, num_local_blocks=num_local_blocks)
    bias = None
    if use_diff_topk and block_indices.shape[-1] > 0:
        picked = importance.gather(-1, block_indices.clamp(min=0)).masked_fill(block_indices < 0, 0)
        bias = (picked - picked.detach()).to(q.dtype)

    # sliding (before the selected branch, whose kernel can take the gated sum into its store)
    out_slide = sliding_window_attention(q, k, v, sliding_window_size, causal=causal, scale=scale)

    out = None
    if bias is None and not return_maps:
        out = _selected_gated(q, k, v, block_indices, selection_block_size, causal, scale, out_cmp, out_slide, g)
    if out is None:
        out_sel = _selected_impl(q, k, v, block_indices, selection_block_size, causal, scale, block_bias=bias)
        out = _gate(out_cmp, out_sel, out_slide, g)
    if not return_maps:
        return out

    with torch.no_grad():
        # Mean pooling gives every token of block c the weight p_c / block_size.
        spread = p_cmp.new_zeros(Nc, Lk)
        for c in range(Nc):
            spread[c, c * stride : c * stride + compress_block_size] = 1.0 / compress_block_size
        m_cmp = (p_cmp.detach() @ spread).to(q.dtype)
        sel_mask = selected_token_mask(block_indices, selection_block_size, Lk, causal=causal)
        m_sel = _dense_weights(q.detach(), k.detach(), sel_mask, scale)
        win = sliding_window_mask(Lq, Lk, sliding_window_size, causal=causal, device=q.device)
        m_slide = _dense_weights(q.detach(), k.detach(), win[None, None], scale)
        gd = g.detach()
        combined = gd[..., 0:1] * m_cmp + gd[..., 1:2] * m_sel + gd[..., 2:3] * m_slide
        is_forced = forced_blocks(Lq, importance.shape[-1], selection_block_size, causal=causal,
                                  num_initial_blocks=num_initial_blocks, num_local_blocks=num_local_blocks,
                                  device=q.device)
        slot = block_indices.clamp(min=0)
        forced = is_forced.expand(*block_indices.shape[:2], -1, -1).gather(-1, slot) & (block_indices >= 0)
    maps = NSAMaps(m_cmp, m_sel, m_slide, combined, p_cmp.detach(), importance.detach(), block_indices, gd, forced)
    return out, maps
