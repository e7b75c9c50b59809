"""Top-k attention: each query attends only to its ``top_k`` highest-scoring keys.

Two ways to find them, one rule: score all keys at once (``chunk_size=None``,
the full-score approach), or stream over key chunks with a running top-k
(``StreamingTopK``) so the (Lq, Lk) score matrix never exists. On CUDA the
streaming form runs as fused Triton kernels (``sparse_attn.kernels.topk_fused``).
Every path breaks ties the same way (the lower key index wins), so on equal
scores the chunking does not change which keys are picked. Shapes and masking
as ``sparse_attn.ops.dense``.
"""
from __future__ import annotations

import torch
from einops import rearrange

from .._checks import check_int, check_qkv, resolve_scale
from ..kernels import dispatch
from ..selection import Selection, gather_kv, weighted_gather_sum
from ..topk import StreamingTopK
from .dense import causal_mask, safe_softmax

__all__ = ["topk_attention"]


def topk_attention(
    q,
    k,
    v,
    top_k: int,
    *,
    causal: bool = False,
    scale: float | None = None,
    chunk_size: int | None = None,
    query_chunk_size: int | None = None,
    return_selection: bool = False,
):
    """Each query attends only to its ``top_k`` highest-scoring allowed keys.

    With ``chunk_size`` set, scores are made one (query block x key chunk) tile
    at a time and merged with a running top-k (``StreamingTopK``), so peak
    memory grows with Lq * (top_k + chunk_size), never Lq * Lk. Causal key
    chunks that lie wholly in a query block's future are skipped.

    Args:
        q: (B, H, Lq, D); k: (B, Hkv, Lk, D); v: (B, Hkv, Lk, Dv); H a multiple
            of Hkv; one floating dtype and one device.
        top_k: keys per query, >= 1. At least the number of allowed keys means
            all of them: the result is dense attention.
        causal: SDPA's ``is_causal``.
        scale: default 1/sqrt(D).
        chunk_size: keys scored per step (>= 1); None scores all keys at once
            (the full-score approach).
        query_chunk_size: queries per step (>= 1); default ``chunk_size``.
        return_selection: also return ``Selection(indices, weights)``, each
            (B, H, Lq, min(top_k, Lk)). Each row lists its picks by score,
            highest first, equal scores in ascending key index, then its
            empty slots (index -1, weight 0).

    Returns:
        out (B, H, Lq, Dv), or (out, Selection). Among equal scores the lower
        key index wins, on every path: full-score, streaming at any
        ``chunk_size`` / ``query_chunk_size``, and the fused kernels. The paths
        then pick the same keys, in the same order, wherever they compute the
        same scores; a score's last bit can depend on the matmul's tile shape,
        so keys whose scores differ by rounding alone may still swap. A query
        with no allowed key gets zeros; NaN in the inputs propagates (NaN
        ranks above every score, as in ``torch.topk``). Gradients reach q, k
        and v through the selected entries (selection itself is not
        differentiable).
    """
    B, H, Hkv, Lq, Lk, D, Dv = check_qkv(q, k, v)
    check_int(top_k, "top_k", minimum=1)
    check_int(chunk_size, "chunk_size", minimum=1, allow_none=True)
    check_int(query_chunk_size, "query_chunk_size", minimum=1, allow_none=True)
    scale = resolve_scale(scale, D)
    K = min(top_k, Lk)
    kc = chunk_size or max(Lk, 1)
    qc = query_chunk_size or chunk_size or max(Lq, 1)
    need_grad = torch.is_grad_enabled() and (q.requires_grad or k.requires_grad or v.requires_grad)
    # scale > 0: the kernels rank raw scores q.k, which a negative or zero scale would reorder.
    if chunk_size is not None and not return_selection and Lq and Lk and scale > 0 and dispatch.use_triton(q, k, v):
        # Gate first: the kernel module imports Triton. The fused passes keep the scores on chip
        # (same tie rule; the same result up to the rounding of the scores).
        from ..kernels.topk_fused import fused_topk_attention, triton_supports

        if triton_supports(q, k, v):
            return fused_topk_attention(q, k, v, top_k, causal=causal, scale=scale)

    qg = rearrange(q, "b (hk g) i d -> b hk g i d", hk=Hkv)
    outs, sel_idx, sel_w = [], [], []
    for i0 in range(0, Lq, qc):
        qb = qg[:, :, :, i0 : i0 + qc]
        nq = qb.shape[3]
        with torch.no_grad():
            vals, idx = _select_block(qb, k, K, kc, scale, causal, i0)
        valid = idx >= 0
        if causal:
            valid &= idx <= torch.arange(i0, i0 + nq, device=q.device).view(nq, 1)
        idx_safe = idx.clamp(min=0)
        flat = lambda t: rearrange(t, "b hk g i s -> b hk (g i) s")  # noqa: E731
        if need_grad:
            # Recompute the selected scores so autograd sees them; the streaming
            # pass above ran without a graph and kept no score tiles alive.
            k_sel = gather_kv(k, flat(idx_safe))
            vals = torch.einsum("bhrd,bhrsd->bhrs", rearrange(qb, "b hk g i d -> b hk (g i) d"), k_sel) * scale
            vals = rearrange(vals, "b hk (g i) s -> b hk g i s", i=nq)
        vals = vals.masked_fill(~valid, float("-inf"))
        weights = safe_softmax(vals)
        out = weighted_gather_sum(v, flat(idx_safe), flat(weights))
        outs.append(rearrange(out, "b hk (g i) d -> b hk g i d", i=nq))
        if return_selection:
            sel_idx.append(idx.masked_fill(~valid, -1))
            sel_w.append(weights.detach())

    if Lq == 0:
        out = q.new_zeros(B, H, 0, Dv)
        selection = Selection(q.new_zeros(B, H, 0, K, dtype=torch.long), q.new_zeros(B, H, 0, K))
    else:
        out = rearrange(torch.cat(outs, dim=3), "b hk g i d -> b (hk g) i d")
        selection = None
        if return_selection:
            to_heads = lambda parts: rearrange(torch.cat(parts, dim=3), "b hk g i s -> b (hk g) i s")  # noqa: E731
            selection = Selection(to_heads(sel_idx), to_heads(sel_w))
    return (out, selection) if return_selection else out


def _select_block(qb, k, K, kc, scale, causal, i0):
    """Top-K scores and key indices for one query block, streaming over key chunks.

    qb is (B, Hkv, G, nq, D). Returns values and indices (B, Hkv, G, nq, K),
    highest score first, equal scores in ascending key index (``StreamingTopK``'s
    rule: a later chunk's key never displaces an equal earlier one); slots no
    allowed key could fill hold -inf and index -1.
    """
    B, Hkv, G, nq, _ = qb.shape
    Lk = k.shape[2]
    # A positive scale does not change which keys win: rank raw dot products
    # and scale only the K winners, saving a pass over every score tile.
    tile_scale = 1.0 if scale > 0 else scale
    acc = StreamingTopK(K)
    last_query = i0 + nq - 1
    for j0 in range(0, Lk, kc):
        if causal and j0 > last_query:
            break
        s = torch.einsum("bhgid,bhjd->bhgij", qb, k[:, :, j0 : j0 + kc])
        if tile_scale != 1.0:
            s = s * tile_scale
        if causal and j0 + s.shape[-1] - 1 > i0:
            s = s.masked_fill(~causal_mask(nq, s.shape[-1], qb.device, q_offset=i0 - j0), float("-inf"))
        acc.update(s, offset=j0)
    if acc.values is None:  # Lk == 0: nothing to select
        shape = (B, Hkv, G, nq, K)
        return qb.new_full(shape, float("-inf")), torch.full(shape, -1, dtype=torch.long, device=qb.device)
    vals, idx = acc.result(sorted=True)
    if tile_scale == 1.0:
        vals = vals * scale
    if vals.shape[-1] < K:  # causal blocks that have seen fewer than K keys
        pad = K - vals.shape[-1]
        vals = torch.nn.functional.pad(vals, (0, pad), value=float("-inf"))
        idx = torch.nn.functional.pad(idx, (0, pad), value=-1)
    return vals, idx
