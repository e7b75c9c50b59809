"""NSA's block selection: compressed attention weights -> selection-block importance -> the top blocks per query."""
from __future__ import annotations

import math

import torch

__all__ = ["importance_to_selection_blocks", "select_blocks", "selected_token_mask", "random_block_indices"]


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


def selected_token_mask(block_indices: torch.Tensor, block_size: int, num_keys: int, *, causal: bool) -> torch.Tensor:
    """Boolean (B, Hs, Lq, num_keys): the keys a selection covers (for drawing and tests; O(Lq * Lk))."""
    Lq = block_indices.shape[2]
    block_of_key = torch.arange(num_keys, device=block_indices.device) // block_size
    mask = (block_indices.unsqueeze(-1) == block_of_key).any(dim=-2)
    if causal:
        mask &= torch.arange(num_keys, device=block_indices.device) <= torch.arange(Lq, device=block_indices.device).unsqueeze(-1)
    return mask


def random_block_indices(B: int, Hkv: int, Lq: int, Lk: int, S: int, block_size: int, causal: bool,
                         seed: int = 0, device="cpu") -> torch.Tensor:
    """(B, Hkv, Lq, S) int64: distinct random blocks per query among those it may see, -1 where fewer exist.

    A selection with no intelligence behind it: the baseline a learned or
    scored selection must beat, and the indices kernel benchmarks time the
    selected branch on (as other NSA kernels benchmark it).
    """
    nb = math.ceil(Lk / block_size)
    # Drawn where they are used: at 64k tokens the scratch is too large to draw on the CPU and copy.
    g = torch.Generator(device=device).manual_seed(seed)
    out = torch.full((B, Hkv, Lq, S), -1, dtype=torch.long, device=device)
    for i0 in range(0, Lq, 4096):  # bounded scratch: (B, Hkv, 4096, nb) floats
        i1 = min(Lq, i0 + 4096)
        r = torch.rand(B, Hkv, i1 - i0, nb, generator=g, device=device)
        if causal:
            seen = torch.arange(nb, device=device) * block_size <= torch.arange(i0, i1, device=device)[:, None]
            r = r.masked_fill(~seen, -1.0)
        vals, idx = r.topk(min(S, nb), dim=-1)
        out[:, :, i0:i1, : idx.shape[-1]] = idx.masked_fill(vals < 0, -1)
    return out
