"""NSA's block selection as one Triton kernel: forced blocks, then the top eligible ones, without torch.topk.

``sparse_attn.ops.nsa.select_blocks`` ranks each row of the (..., Lq, Nsel)
importance with a stable sort of the whole row (the tie rule: among equal
importances the lower block index wins), a chunk of queries at a time, and
keeps the first S entries: a sort and an int64 index per element, for S
picks out of Nsel. Here one program holds a tile of BLOCK_Q whole rows in
registers, builds the same sort key (forced blocks +inf, ineligible ones
-inf, the others their float32 importance) and takes the S largest by S
rounds of "largest value, lowest index among equals, then strike it out".
Nothing but the (..., Lq, S) answer reaches memory. Long causal rows go in
bands of one launch each, as wide as the blocks they may pick (``_row_bands``).

Exactly ``select_blocks``: forced blocks first in ascending order (they all
hold +inf), then the others by falling importance, ascending index among
equals, -1 in the trailing slots no eligible block fills. Eligible: importance
> 0 and, when causal, the block starts at or before the query. Importance is
read in its own dtype and compared in float32 (float16 and bfloat16 convert
exactly), so the kernel and the sort agree bit for bit.

Rows up to ``MAX_BLOCKS`` selection blocks (262144 tokens with blocks of 64);
``select_blocks`` sorts longer rows itself.
"""
from __future__ import annotations

import torch

from .._checks import check_int
from . import dispatch
from ._triton import pow2, require_triton, tl, triton

__all__ = ["select_blocks_triton", "triton_supports", "MAX_BLOCKS", "DEFAULTS"]

# Widest row one program keeps in registers (power of two).
MAX_BLOCKS = 4096
_DTYPES = (torch.float16, torch.bfloat16, torch.float32)
# elements: row-tile size per program (BLOCK_Q = elements // padded row width, at least 1). The fastest
# of 16 launches tried at L=65536 on an H200 (docs/benchmarks.md); 2 warps and 4096 or 8192 elements were
# within 5%.
DEFAULTS = {"elements": 4096, "num_warps": 1}
# Causal rows go in bands (``_row_bands``) only from this row width on: on an H200 the bands took the
# selection from 1.68 to 1.27 ms at L=65536 (1024 blocks), but from 0.140 to 0.188 ms at L=16384
# (256 blocks), where the extra launches cost more than the columns saved (docs/benchmarks.md).
BAND_FROM = 512


def triton_supports(importance: torch.Tensor) -> bool:
    """True when ``select_blocks`` may use the kernel: the dispatch rule, a half or float32 importance,
    rows of at most ``MAX_BLOCKS`` blocks. float64 importance stays on the sort (float64 ranks in float64)."""
    return (dispatch.use_triton(importance, dtypes=_DTYPES) and importance.dim() >= 2
            and 0 < importance.shape[-1] <= MAX_BLOCKS)


if triton is not None:

    @triton.jit
    def _select_fwd(
        IMP, OUT,
        stride_ir, stride_ii, stride_is,
        stride_or, stride_oi, stride_os,
        row0, row_end, n_sel, S, sel_block, n_init, n_local,
        BLOCK_Q: tl.constexpr, BLOCK_C: tl.constexpr, CAUSAL: tl.constexpr,
    ):
        pid_q = tl.program_id(0)
        r = tl.program_id(1).to(tl.int64)
        rows = row0 + pid_q * BLOCK_Q + tl.arange(0, BLOCK_Q)
        cols = tl.arange(0, BLOCK_C)
        row_ok = rows < row_end
        col_ok = cols < n_sel
        x = tl.load(IMP + r * stride_ir + rows[:, None].to(tl.int64) * stride_ii + cols[None, :] * stride_is,
                    mask=row_ok[:, None] & col_ok[None, :], other=0.0).to(tl.float32)
        c2 = cols[None, :]
        i2 = rows[:, None]
        # As select_blocks: eligible = scored (> 0) and, causal, started at or before the query.
        eligible = (x > 0) & col_ok[None, :]
        initial = c2 < n_init
        if CAUSAL:
            started = c2 * sel_block <= i2
            eligible = eligible & started
            initial = initial & started
        # forced_blocks: the initial blocks and the n_local blocks ending at the own block (none before 0).
        own = i2 // sel_block
        forced = (initial | ((c2 <= own) & (c2 > own - n_local))) & col_ok[None, :]
        key = tl.where(forced, float("inf"), tl.where(eligible, x, float("-inf")))
        out_row = OUT + r * stride_or + rows.to(tl.int64) * stride_oi
        for s in range(S):
            m = tl.max(key, 1)
            # The lowest index holding the row's largest key: the stable sort's next entry.
            pick = tl.min(tl.where(key == m[:, None], c2, BLOCK_C), 1)
            tl.store(out_row + s * stride_os, tl.where(m == float("-inf"), -1, pick).to(tl.int64), mask=row_ok)
            key = tl.where(c2 == pick[:, None], float("-inf"), key)


def select_blocks_triton(importance: torch.Tensor, num_selected: int, selection_block_size: int, *, causal: bool,
                         num_initial_blocks: int = 1, num_local_blocks: int = 2, elements: int | None = None,
                         num_warps: int | None = None) -> torch.Tensor:
    """``select_blocks`` in one kernel: int64 (..., Lq, min(num_selected, Nsel)), the same picks and order.

    ``importance`` (..., Lq, Nsel) float16 / bfloat16 / float32 on CUDA (or on the
    CPU under Triton's interpreter), Nsel <= ``MAX_BLOCKS``. The counts are
    checked by ``select_blocks``, which calls this; ``elements`` and ``num_warps``
    tune the launch (``DEFAULTS``) and never change the result.
    """
    require_triton("select_blocks_triton")
    check_int(selection_block_size, "selection_block_size", minimum=1)
    Lq, n_sel = importance.shape[-2:]
    if n_sel > MAX_BLOCKS:
        raise ValueError(f"importance has {n_sel} blocks per row; the kernel takes at most {MAX_BLOCKS}")
    S = min(num_selected, n_sel)
    lead = importance.shape[:-2]
    out = torch.full((*lead, Lq, S), -1, dtype=torch.long, device=importance.device)
    if S == 0 or out.numel() == 0:
        return out
    imp = importance.detach().reshape(-1, Lq, n_sel)
    o = out.view(-1, Lq, S)
    for row0, row_end, block_c in _row_bands(Lq, n_sel, selection_block_size, causal):
        block_q = max(1, (elements or DEFAULTS["elements"]) // block_c)
        block_q = min(pow2(block_q, 1), pow2(row_end - row0, 1))
        grid = (triton.cdiv(row_end - row0, block_q), imp.shape[0])
        _select_fwd[grid](
            imp, o, *imp.stride(), *o.stride(),
            row0, row_end, n_sel, S, selection_block_size, num_initial_blocks, num_local_blocks,
            BLOCK_Q=block_q, BLOCK_C=block_c, CAUSAL=bool(causal),
            num_warps=num_warps or DEFAULTS["num_warps"],
        )
    return out


def _row_bands(Lq: int, n_sel: int, sel_block: int, causal: bool) -> list[tuple[int, int, int]]:
    """(first row, end row, row width) launches. Causal query i can pick only the i // sel_block + 1 blocks
    that start at or before it, so rows are cut into bands whose eligible blocks fit in 16, 32, 64, ...
    columns: each program scans only those (about half the columns of a full-width launch at L=65536).
    Rows narrower than ``BAND_FROM`` take one launch."""
    full = pow2(n_sel, 16)
    if not causal or full < BAND_FROM:
        return [(0, Lq, full)]
    bands, row0, width = [], 0, 16
    while row0 < Lq:
        end = Lq if width >= full else min(Lq, width * sel_block)  # rows i < width * sel_block see <= width blocks
        if end > row0:
            bands.append((row0, end, min(width, full)))
        row0, width = end, width * 2
    return bands
