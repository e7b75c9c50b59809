"""``ranking.ranked_topk`` as one Triton launch per step: each row's keys made and sorted in one program.

``torch.topk`` over the int64 keys of ``ranking`` runs a radix select in
several passes and launches (at B=32, 64k and grouped Quest, 128 rows of
4096 pages: about 64 us, a quarter of the step). A decode step ranks only a
few thousand pages or blocks per row, which one program holds in registers.
It builds the same keys (the value's float32 bits in an order-preserving
integer, the reversed index below them: all distinct), finds the k-th
largest key bit by bit (32 counts over the row for the value, a dozen for
ties at it; no data movement), writes
the k keys at or above it to a scratch row in order of position, and places
each at its rank among those k. The picks are ``stable_topk``'s, slot for
slot. (``tl.sort`` was tried first: 60 us for those 128 rows on an H200,
slower than ``torch.topk``.)

``rank_keys`` and ``store_top`` are shared with the NSA selection kernel.
"""
from __future__ import annotations

import torch

from ..kernels import dispatch
from ..kernels._triton import pow2, tl, triton

__all__ = ["topk_indices_triton", "supports", "MAX_ROW", "MAX_K"]

MAX_ROW = 16384  # the longest row one program ranks (int64 keys in registers: 128 KiB at 16 warps)
MAX_K = 512  # picks per row: their ranks take a (k, k) comparison


def supports(x: torch.Tensor) -> bool:
    """True when the kernel may rank ``x``'s last dim (CUDA, a kernel dtype, a row short enough for one program)."""
    return dispatch.use_triton(x) and 1 <= x.shape[-1] <= MAX_ROW


def supports_k(k: int) -> bool:
    return 1 <= k <= MAX_K


def num_warps_for(rows: int, device: torch.device) -> int:
    """Warps per program: few when programs queue (more of them resident at once), 16 when the rows leave
    multiprocessors idle.

    ``python -m benchmarks.decode_launch`` on an H200 (graph replays, 4096 bf16 values per row, k = 128):
    2048 rows took 145 us at 2 warps, 160 at 4 and 295 at 16; 128 rows 21.2, 22.7 and 24.0 us at 4, 8 and
    16 warps (16 was chosen from eager timings that the host's launches dominated; the steps of H200 run 22
    were measured with it).
    """
    from .rows_kernel import _multiprocessors

    return 16 if rows <= 2 * _multiprocessors(device) else 2


if triton is not None:

    @triton.jit
    def rank_keys(x, offs, n, ok):
        """int64 keys that order like x (float32), ties to the lower index; lanes past ``ok`` rank last."""
        x = tl.where(x == 0.0, 0.0, x)  # -0.0 and +0.0 are equal values: they must tie, not order by sign
        bits = x.to(tl.int32, bitcast=True)
        ordered = bits ^ ((bits >> 31) & 0x7FFFFFFF)  # negative floats order backwards in their magnitude bits
        key = (ordered.to(tl.int64) << 32) | (n - 1 - offs).to(tl.int64)
        return tl.where(ok, key, -9223372036854775807 - 1)

    @triton.jit
    def key_index(key, n):
        return n - 1 - (key & 0xFFFFFFFF)

    @triton.jit
    def store_top(key, n, k, SCR, OUT, BLOCK_K: tl.constexpr, LOG_BLOCK: tl.constexpr, NEG_INF_EMPTY: tl.constexpr):
        """Write the indices of the k largest of ``key`` (distinct int64 from rank_keys, 2**LOG_BLOCK lanes) to
        OUT[0 .. k), largest first; SCR: k int64 of scratch. NEG_INF_EMPTY: a pick of value -inf is written -1."""
        # The k-th largest value word, bit by bit from the top (the words read unsigned, sign bit flipped): 32
        # counts over the row. Lanes past the row hold the smallest key, word 0 here: never above a real one.
        hi = (key >> 32).to(tl.int32)
        rev = (key & 0xFFFFFFFF).to(tl.int32)
        u = (hi ^ (-2147483647 - 1)).to(tl.uint32, bitcast=True)
        tau = tl.full([], 0, tl.uint32)
        bit = tl.full([], 1, tl.uint32) << 31
        for _ in range(32):
            cand = tau | bit
            tau = tl.where(tl.sum((u >= cand).to(tl.int32), 0) >= k, cand, tau)
            bit = bit >> 1
        above = u > tau
        at = u == tau
        need = k - tl.sum(above.to(tl.int32), 0)  # >= 1: ties at that value, taken by index (largest rev first)
        low = tl.full([], 0, tl.int32)
        bit2 = tl.full([], 1, tl.int32) << (LOG_BLOCK - 1)
        for _ in range(LOG_BLOCK):
            cand = low | bit2
            low = tl.where(tl.sum((at & (rev >= cand)).to(tl.int32), 0) >= need, cand, low)
            bit2 = bit2 >> 1
        picked = above | (at & (rev >= low))  # exactly k lanes: the keys are distinct
        slot = tl.cumsum(picked.to(tl.int32), 0) - 1
        tl.store(SCR + slot, key, mask=picked)
        tl.debug_barrier()  # every pick is in the scratch row before any thread reads it back
        offs_k = tl.arange(0, BLOCK_K)
        kk = tl.load(SCR + offs_k, mask=offs_k < k, other=-9223372036854775807 - 1)
        rank = tl.sum((kk[None, :] > kk[:, None]).to(tl.int32), 1)
        idx = key_index(kk, n)
        if NEG_INF_EMPTY:  # the high word of -inf's key: its float32 bits 0xFF800000 with the low 31 flipped
            idx = tl.where((kk >> 32) == -2139095041, -1, idx)
        tl.store(OUT + rank, idx, mask=offs_k < k)

    @triton.jit
    def _topk_rows(X, OUT, SCR, N, stride_xr, stride_or, K, BLOCK: tl.constexpr, BLOCK_K: tl.constexpr,
                   LOG_BLOCK: tl.constexpr):
        r = tl.program_id(0).to(tl.int64)
        offs = tl.arange(0, BLOCK)
        ok = offs < N
        x = tl.load(X + r * stride_xr + offs, mask=ok, other=0.0).to(tl.float32)
        store_top(rank_keys(x, offs, N, ok), N, K, SCR + r * K, OUT + r * stride_or, BLOCK_K, LOG_BLOCK, False)


def topk_indices_triton(x: torch.Tensor, k: int, *, num_warps: int | None = None) -> torch.Tensor:
    """``ranked_topk(x, k).indices`` for x (..., N) float16 / bfloat16 / float32 with N <= MAX_ROW, k <= N.

    NaN must not occur in x (as for ``ranked_topk``).
    """
    if triton is None:
        raise RuntimeError("topk_indices_triton needs Triton, which is not installed")
    n = x.shape[-1]
    if not 0 <= k <= min(n, MAX_K) or n > MAX_ROW:
        raise ValueError(f"k must be in 0..min(row, {MAX_K}) and the row at most {MAX_ROW} long, got k={k}, row {n}")
    rows = x.reshape(-1, n)
    if rows.stride(-1) != 1:
        rows = rows.contiguous()
    out = torch.empty(*x.shape[:-1], k, dtype=torch.int64, device=x.device)
    if out.numel() == 0:
        return out
    block = pow2(n, 16)
    scratch = torch.empty(rows.shape[0], k, dtype=torch.int64, device=x.device)
    _topk_rows[(rows.shape[0],)](rows, out, scratch, n, rows.stride(0), k, k, BLOCK=block, BLOCK_K=pow2(k, 16),
                                 LOG_BLOCK=block.bit_length() - 1,
                                 num_warps=num_warps or num_warps_for(rows.shape[0], x.device))
    return out
