"""NSA's selected branch: each query attends, with one softmax, to the tokens of the key blocks picked for it.

``selected_block_attention`` is the contract a fused GPU kernel implements
(``sparse_attn.kernels.selected_block``, same signature); the PyTorch
reference below runs everywhere.
"""
from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from einops import rearrange

from ..._checks import check_block_indices, check_int, check_qkv, resolve_scale
from ...kernels import dispatch
from ...selection import gather_kv

__all__ = ["selected_block_attention"]

# Elements one query chunk may gather (keys + values) before the next chunk
# starts: about 64 MiB in float64, so memory stays flat in Lq.
_GATHER_BUDGET = 1 << 23


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
    check_block_indices(block_indices, B, H, Hkv, Lq, math.ceil(Lk / block_size), device=q.device)
    return _selected_impl(q, k, v, block_indices, block_size, causal, scale)


def _selected_impl(q, k, v, block_indices, block_size, causal, scale, block_bias=None):
    """Where a faster backend for the selected branch plugs in (inputs already checked).

    ``block_bias`` (same shape as block_indices, or None) is added to the scores
    of every token of a slot; NSA's differentiable top-k uses it. A backend that
    does not take it must leave those calls to the reference.
    """
    if block_bias is None and dispatch.use_triton(q, k, v):  # before importing the kernel (and Triton)
        from ...kernels.selected_block import selected_block_attention_triton, triton_supports

        if triton_supports(q, k, v, block_indices):
            return selected_block_attention_triton(q, k, v, block_indices, block_size, causal=causal, scale=scale)
    return _selected_reference(q, k, v, block_indices, block_size, causal=causal, scale=scale, block_bias=block_bias)


def _selected_gated(q, k, v, block_indices, block_size, causal, scale, out_cmp, out_slide, gates):
    """NSA's gated sum with the selected branch computed inside it, where the kernel takes these inputs.

    Returns ``gates[..., 0] * out_cmp + gates[..., 1] * selected + gates[..., 2] * out_slide`` from one
    kernel (the selected output goes straight into the sum, no separate pass over four tensors), or None
    when the kernel does not apply; the caller then runs the branch and the sum on their own.
    """
    if not dispatch.use_triton(q, k, v, out_cmp, out_slide, gates):
        return None
    from ...kernels.selected_block import selected_block_attention_triton, triton_supports

    if not (triton_supports(q, k, v, block_indices) and out_cmp.dtype == out_slide.dtype == q.dtype
            and out_cmp.shape == out_slide.shape == (*q.shape[:3], v.shape[-1])):
        return None
    return selected_block_attention_triton(q, k, v, block_indices, block_size, causal=causal, scale=scale,
                                           gated=(out_cmp, out_slide, gates))


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
