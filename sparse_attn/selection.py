"""What a sparse method attended to, and how to read the picked keys and values.

``Selection`` is the common answer of every selecting op (indices and
effective weights per query); ``gather_kv`` and ``weighted_gather_sum`` read
the picked rows of k or v without expanding them to one copy per query.
"""
from __future__ import annotations

from typing import NamedTuple

import torch
import torch.nn.functional as F

__all__ = ["Selection", "gather_kv", "weighted_gather_sum"]


class Selection(NamedTuple):
    """What a sparse method attended to, per query: (B, H, Lq, K) each.

    ``indices`` are key positions (-1 in a slot that holds no allowed key);
    ``weights`` are the effective attention weights on those keys (0 in
    empty slots). For top-k they sum to 1 per row with at least one allowed
    key, and a row lists its keys by score, highest first, equal scores in
    ascending key index, then its empty slots (the same on every top-k path).
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
