"""NSA's block selection: compressed attention weights -> selection-block importance -> forced and top blocks per query."""
from __future__ import annotations

import math

import torch

from ..._checks import check_int
from ...kernels import dispatch

# Elements of importance one sort in select_blocks takes at a time: about 0.5 GiB of scratch
# (float32 key and sorted values, int64 order).
_SORT_BUDGET = 1 << 25

__all__ = ["importance_to_selection_blocks", "check_forcing", "forced_blocks", "select_blocks", "selected_token_mask",
           "random_block_indices"]


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


def check_forcing(num_selected_blocks: int, num_initial_blocks: int, num_local_blocks: int, *,
                  selected_name: str = "num_selected_blocks") -> None:
    """Check the forced-block counts against the number of selected blocks (see ``select_blocks``).

    All three are ints >= 0 and, while the selected branch is on
    (``num_selected_blocks > 0``), the two counts together are at most
    ``num_selected_blocks``: NSA counts its forced blocks inside the n it
    selects. ``selected_name`` is the caller's name for the third argument.
    """
    check_int(num_selected_blocks, selected_name, minimum=0)
    check_int(num_initial_blocks, "num_initial_blocks", minimum=0)
    check_int(num_local_blocks, "num_local_blocks", minimum=0)
    if num_selected_blocks and num_initial_blocks + num_local_blocks > num_selected_blocks:
        raise ValueError(
            f"num_initial_blocks ({num_initial_blocks}) + num_local_blocks ({num_local_blocks}) must not exceed "
            f"{selected_name} ({num_selected_blocks}); set both to 0 to turn forced blocks off"
        )


def forced_blocks(num_queries: int, num_blocks: int, selection_block_size: int, *, causal: bool,
                  num_initial_blocks: int = 1, num_local_blocks: int = 2, device=None) -> torch.Tensor:
    """Boolean (num_queries, num_blocks): True where query i always selects block b, as NSA does.

    Forced are the first ``num_initial_blocks`` blocks (under ``causal`` only
    those that start at or before i) and the ``num_local_blocks`` blocks ending
    at the query's own block ``i // selection_block_size`` (own, previous, ...).
    Blocks that do not exist (before 0, or past the keys when queries outnumber
    them) are not forced. A row has at most ``num_initial_blocks +
    num_local_blocks`` forced blocks, fewer where the two kinds overlap (a query
    in block 0 or 1 with the defaults).
    """
    check_int(num_queries, "num_queries", minimum=0)
    check_int(num_blocks, "num_blocks", minimum=0)
    check_int(selection_block_size, "selection_block_size", minimum=1)
    check_int(num_initial_blocks, "num_initial_blocks", minimum=0)
    check_int(num_local_blocks, "num_local_blocks", minimum=0)
    b = torch.arange(num_blocks, device=device)
    i = torch.arange(num_queries, device=device).unsqueeze(-1)
    own = i // selection_block_size
    initial = b < num_initial_blocks
    if causal:
        initial = initial & (b * selection_block_size <= i)
    # Blocks up to the own block start at or before i, so local ones never look ahead.
    return initial | ((b <= own) & (b > own - num_local_blocks))


def select_blocks(importance: torch.Tensor, num_selected: int, selection_block_size: int, *, causal: bool,
                  num_initial_blocks: int = 1, num_local_blocks: int = 2) -> torch.Tensor:
    """NSA's selection: per row of ``importance`` (B, Hs, Lq, Nsel), the forced blocks and the top eligible ones.

    Every row first takes its forced blocks (``forced_blocks``: block 0 and the
    two blocks ending at the query's own block by default, NSA's "1 initial
    block and 2 local blocks"), whatever their importance; the remaining slots
    go to the other eligible blocks by falling importance. Eligible: importance
    > 0 (some visible compressed block scored it) and, when causal, the block
    starts at or before the query. Importance is ranked in float32 (float64
    stays float64), never in a half type. Ties: among blocks of exactly equal
    importance the LOWER block index wins, on every device.
    ``num_initial_blocks=0, num_local_blocks=0`` gives the plain top-importance
    selection.

    Returns int64 (B, Hs, Lq, min(num_selected, Nsel)): the forced blocks first
    (ascending block index), then the others by falling importance (ascending
    index among equals), -1 in the trailing slots no eligible block fills.
    Not differentiable. Raises ValueError as ``check_forcing`` does.

    On CUDA a Triton kernel (``sparse_attn.kernels.block_select``) gives the
    same answer without the sort, for half and float32 importance with rows
    of up to 4096 blocks; elsewhere, and for float64, the stable sort below.
    """
    check_forcing(num_selected, num_initial_blocks, num_local_blocks, selected_name="num_selected")
    check_int(selection_block_size, "selection_block_size", minimum=1)
    if not isinstance(importance, torch.Tensor) or importance.dim() < 2 or not importance.is_floating_point():
        raise TypeError("importance must be a floating tensor (..., Lq, Nsel)")
    Lq, n_sel = importance.shape[-2:]
    S = min(num_selected, n_sel)
    dev = importance.device
    out = torch.full((*importance.shape[:-1], S), -1, dtype=torch.long, device=dev)
    if S == 0 or out.numel() == 0:
        return out
    if dispatch.use_triton(importance.detach()):  # before importing the kernel (and Triton)
        from ...kernels import block_select

        if block_select.triton_supports(importance.detach()):
            return block_select.select_blocks_triton(importance, num_selected, selection_block_size, causal=causal,
                                                     num_initial_blocks=num_initial_blocks,
                                                     num_local_blocks=num_local_blocks)
    forced = forced_blocks(Lq, n_sel, selection_block_size, causal=causal, num_initial_blocks=num_initial_blocks,
                           num_local_blocks=num_local_blocks, device=dev)
    starts = torch.arange(n_sel, device=dev) * selection_block_size
    rows = max(1, importance[..., 0, 0].numel())
    step = max(1, _SORT_BUDGET // (rows * n_sel))
    for i0 in range(0, Lq, step):  # bounded scratch: the sort holds a key and an int64 index per element
        i1 = min(Lq, i0 + step)
        # bfloat16 has 8 mantissa bits: ranking in it ties (and reorders) blocks float32 tells apart.
        key = importance[..., i0:i1, :].detach().to(torch.promote_types(importance.dtype, torch.float32))
        eligible = key > 0
        if causal:
            eligible = eligible & (starts <= torch.arange(i0, i1, device=dev).unsqueeze(-1))
        # +inf puts forced blocks first; they always fit, as check_forcing bounds their count by S.
        key = key.masked_fill(~eligible, float("-inf")).masked_fill(forced[i0:i1], float("inf"))
        # torch.topk breaks ties arbitrarily (and differently per device); a stable sort keeps equal keys in
        # ascending block order, so the lower index wins. On the GPU it costs about what topk does (docs/nsa.md).
        vals, idx = key.sort(dim=-1, descending=True, stable=True)
        out[..., i0:i1, :] = idx[..., :S].masked_fill(torch.isneginf(vals[..., :S]), -1)
    return out


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
