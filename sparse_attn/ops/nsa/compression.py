"""NSA's compressed branch: keys and values pooled over blocks, and queries attending to the pooled keys.

Block c covers tokens [c * stride, c * stride + block_size). With
``causal=True`` a block is visible to query i only once it has ended (its
last token <= i). On CUDA the branch and the selection importance run as one
Triton kernel (``sparse_attn.kernels.compressed``).
"""
from __future__ import annotations

from typing import Callable

import torch
from einops import rearrange, reduce

from ...kernels import dispatch
from ..dense import safe_softmax

__all__ = ["mean_pool", "num_compressed_blocks", "compress_kv", "compressed_visibility", "compressed_attention"]


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

    Scores and softmax are float32 for half inputs (float64 stays float64), as
    in the fused kernel: the weights rank NSA's blocks, and half-precision
    weights would reorder them. ``out`` is in q's dtype, ``weights`` in that
    float32 / float64. A query that sees no whole block yet (causal,
    i < block_size - 1) gets zeros.
    """
    Hkv = k_cmp.shape[1]
    acc = torch.promote_types(q.dtype, torch.float32)
    qg = rearrange(q.to(acc), "b (hk g) i d -> b hk g i d", hk=Hkv)
    scores = torch.einsum("bhgid,bhnd->bhgin", qg, k_cmp.to(acc)) * scale
    if causal:
        seen = compressed_visibility(q.shape[2], k_cmp.shape[2], block_size, stride, True, q.device)
        scores = scores.masked_fill(~seen, float("-inf"))
    weights = safe_softmax(scores)
    out = torch.einsum("bhgin,bhnd->bhgid", weights, v_cmp.to(acc)).to(q.dtype)
    return rearrange(out, "b hk g i d -> b (hk g) i d"), rearrange(weights, "b hk g i n -> b (hk g) i n")


def _compressed_fused(q, k, v, block_size, stride, selection_block_size, causal, scale):
    """The fused Triton compressed branch, or None where it does not apply (CPU, autograd, no Triton).

    Returns (out, importance) as nsa_attention's PyTorch path computes them
    for a shared selection and overlap mapping, importance in float32. One
    difference: k and v are mean-pooled in their own dtype (the kernel's tiles
    are one dtype), where the PyTorch path pools half inputs in float32.
    """
    if not dispatch.use_triton(q, k, v):  # before importing the kernel (and Triton)
        return None
    from ...kernels.compressed import compressed_attention_triton, triton_supports

    k_cmp, v_cmp = compress_kv(k, block_size, stride), compress_kv(v, block_size, stride)
    if not triton_supports(q, k_cmp, v_cmp):
        return None
    try:
        return compressed_attention_triton(q, k_cmp, v_cmp, block_size, stride, causal=causal, scale=scale,
                                           selection_block_size=selection_block_size, num_keys=k.shape[2])
    except Exception as e:  # noqa: BLE001 - only a launch the chip cannot fit falls back
        # Tiles that need more shared memory than this GPU has (a large head dim in float32, say):
        # the PyTorch path computes the same thing.
        if type(e).__name__ != "OutOfResources":
            raise
        return None
