"""Dense attention: exact softmax(q k^T * scale) v, the reference every approximation is measured against.

Shapes follow ``F.scaled_dot_product_attention``: q is (B, H, Lq, D), k and v
are (B, Hkv, Lk, D) and (B, Hkv, Lk, Dv), H a multiple of Hkv (grouped-query
attention: query head h reads kv head h // (H // Hkv)). ``causal=True`` is
SDPA's ``is_causal=True``: query i sees keys 0..i (top-left aligned).
"""
from __future__ import annotations

import torch
from einops import rearrange

from .._checks import check_qkv, resolve_scale

__all__ = ["dense_attention", "causal_mask", "allowed_pairs", "safe_softmax"]


def causal_mask(Lq: int, Lk: int, device=None, q_offset: int = 0) -> torch.Tensor:
    """Boolean (Lq, Lk) mask, True where query ``q_offset + i`` may see key j (j <= i)."""
    i = torch.arange(q_offset, q_offset + Lq, device=device).unsqueeze(-1)
    j = torch.arange(Lk, device=device)
    return j <= i


def allowed_pairs(Lq: int, Lk: int, causal: bool) -> int:
    """How many (query, key) pairs the mask allows: causal query i sees keys 0..i."""
    if not causal:
        return Lq * Lk
    n = min(Lq, Lk)  # rows 0..n-1 see i+1 keys; later rows see all Lk
    return n * (n + 1) // 2 + (Lq - n) * Lk


def safe_softmax(scores: torch.Tensor) -> torch.Tensor:
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
    weights = safe_softmax(scores)
    out = torch.einsum("bhgij,bhjd->bhgid", weights, v)
    out = rearrange(out, "b hk g i d -> b (hk g) i d")
    if return_weights:
        return out, rearrange(weights, "b hk g i j -> b (hk g) i j")
    return out
