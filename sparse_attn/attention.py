"""Dense attention (the reference) and top-k attention that streams over key chunks.

Shapes follow ``F.scaled_dot_product_attention``: q is (B, H, Lq, D), k and v
are (B, Hkv, Lk, D) and (B, Hkv, Lk, Dv), H a multiple of Hkv (grouped-query
attention: query head h reads kv head h // (H // Hkv)). ``causal=True`` is
SDPA's ``is_causal=True``: query i sees keys 0..i (top-left aligned).
"""
from __future__ import annotations

from typing import NamedTuple

import torch
import torch.nn.functional as F
from einops import rearrange

from ._checks import check_int, check_qkv, resolve_scale
from .topk import StreamingTopK

__all__ = ["Selection", "dense_attention", "topk_attention", "causal_mask", "gather_kv", "weighted_gather_sum"]


class Selection(NamedTuple):
    """What a sparse method attended to, per query: (B, H, Lq, K) each.

    ``indices`` are key positions (-1 in a slot that holds no allowed key);
    ``weights`` are the effective attention weights on those keys (0 in
    empty slots). For top-k they sum to 1 per row with at least one allowed key.
    """

    indices: torch.Tensor
    weights: torch.Tensor

    def to_dense(self, num_keys: int) -> torch.Tensor:
        """The effective (B, H, Lq, num_keys) attention matrix: weights scattered to their keys.

        A key picked twice (sampling with replacement) gets the sum of its weights.
        """
        idx = self.indices
        out = self.weights.new_zeros(*idx.shape[:-1], num_keys)
        valid = idx >= 0
        return out.scatter_add_(-1, idx.clamp(min=0), self.weights.masked_fill(~valid, 0))

    def mask(self, num_keys: int) -> torch.Tensor:
        """Boolean (B, H, Lq, num_keys): True where a key was selected (with any weight)."""
        idx = self.indices
        hits = torch.zeros(*idx.shape[:-1], num_keys, dtype=torch.int32, device=idx.device)
        # scatter_add, not scatter: empty slots (-1, clamped to 0) must not overwrite a real pick of key 0.
        return hits.scatter_add_(-1, idx.clamp(min=0), (idx >= 0).to(torch.int32)) > 0


def causal_mask(Lq: int, Lk: int, device=None, q_offset: int = 0) -> torch.Tensor:
    """Boolean (Lq, Lk) mask, True where query ``q_offset + i`` may see key j (j <= i)."""
    i = torch.arange(q_offset, q_offset + Lq, device=device).unsqueeze(-1)
    j = torch.arange(Lk, device=device)
    return j <= i


def _safe_softmax(scores: torch.Tensor) -> torch.Tensor:
    """Softmax over the last dim that gives 0, not NaN, on rows with no allowed (finite) entry."""
    weights = torch.softmax(scores, dim=-1)
    empty = torch.isneginf(scores).all(dim=-1, keepdim=True)
    return weights.masked_fill(empty, 0.0)


def dense_attention(q, k, v, *, causal: bool = False, scale: float | None = None, return_weights: bool = False):
    """Exact softmax(q k^T * scale) v: the reference every approximation is measured against.

    Args:
        q: (B, H, Lq, D); k: (B, Hkv, Lk, D); v: (B, Hkv, Lk, Dv), one floating
            dtype and one device; H a multiple of Hkv.
        causal: SDPA's ``is_causal`` (query i sees keys 0..i).
        scale: multiplies the scores; default 1/sqrt(D).
        return_weights: also return the (B, H, Lq, Lk) attention weights.

    Returns:
        out (B, H, Lq, Dv) in q's dtype, or (out, weights). It holds the full
        score matrix: use it for reference and small inputs. A query with no
        allowed key (only when Lk = 0) gets zeros, as SDPA gives; NaN in the
        inputs propagates as in torch.
    """
    B, H, Hkv, Lq, Lk, D, Dv = check_qkv(q, k, v)
    scale = resolve_scale(scale, D)
    qg = rearrange(q, "b (hk g) i d -> b hk g i d", hk=Hkv)
    scores = torch.einsum("bhgid,bhjd->bhgij", qg, k) * scale
    if causal:
        scores = scores.masked_fill(~causal_mask(Lq, Lk, q.device), float("-inf"))
    weights = _safe_softmax(scores)
    out = torch.einsum("bhgij,bhjd->bhgid", weights, v)
    out = rearrange(out, "b hk g i d -> b (hk g) i d")
    if return_weights:
        return out, rearrange(weights, "b hk g i j -> b (hk g) i j")
    return out


def gather_kv(x: torch.Tensor, indices: torch.Tensor) -> torch.Tensor:
    """Rows of ``x`` (B, Hkv, L, D) picked per query: ``indices`` (B, Hkv, R, K) -> (B, Hkv, R, K, D).

    Differentiable with respect to ``x``; indices must be in [0, L).
    """
    B, Hkv, L, D = x.shape
    R, K = indices.shape[-2:]
    # Flat indexing avoids expanding x to (B, Hkv, R, L, D) for torch.gather.
    base = torch.arange(B * Hkv, device=x.device).view(B, Hkv, 1, 1) * L
    flat = (indices + base).reshape(-1)
    return x.reshape(B * Hkv * L, D)[flat].view(B, Hkv, R, K, D)


def weighted_gather_sum(x: torch.Tensor, indices: torch.Tensor, weights: torch.Tensor) -> torch.Tensor:
    """``sum_s weights[..., s] * x[b, h, indices[..., s]]``: (B, Hkv, L, D), (B, Hkv, R, K) x2 -> (B, Hkv, R, D).

    ``F.embedding_bag`` gathers and reduces in one pass, so the (R, K, D)
    block of picked rows that ``gather_kv`` would build never exists: that
    block is larger than the score tile it came from whenever K * D > chunk.
    Differentiable with respect to ``x`` and ``weights``; indices must be in [0, L).
    """
    B, Hkv, L, D = x.shape
    R, K = indices.shape[-2:]
    base = torch.arange(B * Hkv, device=x.device).view(B, Hkv, 1, 1) * L
    if K == 0 or L == 0:
        return x.new_zeros(B, Hkv, R, D)
    flat = (indices + base).reshape(B * Hkv * R, K)
    out = F.embedding_bag(flat, x.reshape(B * Hkv * L, D), per_sample_weights=weights.reshape(B * Hkv * R, K).to(x.dtype),
                          mode="sum")
    return out.view(B, Hkv, R, D)


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
            (B, H, Lq, min(top_k, Lk)).

    Returns:
        out (B, H, Lq, Dv), or (out, Selection). Ties between equal scores are
        broken as ``torch.topk`` breaks them. A query with no allowed key gets
        zeros; NaN in the inputs propagates. Gradients reach q, k and v through
        the selected entries (selection itself is not differentiable).
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
    if q.is_cuda and chunk_size is not None and not need_grad and not return_selection and Lq and Lk:
        # On CUDA the streaming form runs as two fused Triton passes that keep
        # the scores on chip (same result up to ties and rounding).
        from .kernels.topk_fused import fused_topk_attention, triton_supports

        if triton_supports(q):
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
        weights = _safe_softmax(vals)
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

    qb is (B, Hkv, G, nq, D). Returns values and indices (B, Hkv, G, nq, K);
    slots no allowed key could fill hold -inf and index -1.
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
