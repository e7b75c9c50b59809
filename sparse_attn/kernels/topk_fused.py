"""Exact top-k attention on the GPU in two fused passes, without a score matrix.

A full-row ``torch.topk`` costs many times the QK^T matmul that makes the
scores (see docs/benchmarks.md). Here the scores never leave the chip:

1. ``_segment_max``: one program per (block of queries, head) walks the keys
   tile by tile (``BLOCK_N`` keys, a *segment*) and writes only each row's
   maximum per segment: Lk / BLOCK_N numbers per query.
2. The k-th largest segment maximum is a threshold t with at least k keys at or
   above it (one per segment), so every top-k key scores >= t.
3. The same walk again finds the keys scoring >= t, in one of two ways:
   - not causal: ``_collect_mask`` stores only one 64-bit mask per row and
     segment, a row reduction like pass 1's maximum and much cheaper than
     storing per key (see docs/benchmarks.md); ``_compact_mask`` turns the set
     bits into a short per-row candidate list and ``_rescore`` computes those
     keys' scores again;
   - causal (and segments wider than 64 keys): ``_collect`` appends each
     passing key and its tile score to the row's list, slots from a prefix sum
     over the tile.
4. A sort in registers (``stable_topk`` for rows too long for one) over the
   candidates (``capacity`` per row) picks the k keys. Candidates sit in
   ascending key order, and among scores equal to the k-th the earliest slots
   win: the library's tie rule, the lower key index wins.
5. ``_softmax_gather``: the softmax of the k scores and the sum of their values.

On random data only a little more than k keys pass the threshold (see
docs/benchmarks.md), well under the default ``capacity``. A row that overflows
(many equal scores, or an early causal row whose threshold is -inf) is redone
exactly in PyTorch (``stable_topk``, the same tie rule), so the result is
exact for every input; ``fused_topk_select`` returns how many rows were.
Scores are float32 dot products of the inputs (IEEE for float32 inputs). Not
causal, the final pick uses the re-computed scores, which round differently
from the tile's, so keys tied to rounding at the k-th place may swap (see
docs/benchmarks.md).
"""
from __future__ import annotations

import os
from typing import NamedTuple

import torch

from .._checks import check_int, check_number, check_qkv, resolve_scale
from ..topk import stable_topk
from . import dispatch
from ._triton import check_dtype, dot_precision, libdevice, pow2, require_triton, tl, triton

__all__ = ["FusedSelection", "fused_topk_attention", "fused_topk_select", "triton_supports"]

# Triton's CPU interpreter has no popc: _popc64 counts bits with integer tricks there.
_HW_POPC = libdevice is not None and os.environ.get("TRITON_INTERPRET") != "1"
# Longest row (segment maxima, candidates) a sort in registers takes; longer rows use torch.topk.
_SORT_MAX = 4096


class FusedSelection(NamedTuple):
    """What ``fused_topk_select`` picked.

    ``values`` and ``indices`` are (B * H, Lq, min(top_k, Lk)): the float32
    unscaled scores q.k of each row's picked keys and their key indices
    (int64), in ascending key index; among scores equal to the k-th the lower
    key index wins. Slots with no allowed key come last and hold -inf (their
    index is arbitrary). ``overflow_rows`` counts the rows whose
    candidates overflowed ``capacity`` and were redone exactly in PyTorch.
    """

    values: torch.Tensor
    indices: torch.Tensor
    overflow_rows: int


def triton_supports(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> bool:
    """True when ``fused_topk_attention`` may replace ``topk_attention`` for these inputs.

    Only the generic rule (``dispatch.use_triton``): the kernels take any shape.
    """
    return dispatch.use_triton(q, k, v)


if triton is not None:

    @triton.jit
    def _popc64(x, HW_POPC: tl.constexpr):
        """Set bits of each int64 in x, as int32. The CPU interpreter has no popc: bit tricks there."""
        if HW_POPC:
            return libdevice.popc(x)
        x = x - ((x >> 1) & 0x5555555555555555)
        x = (x & 0x3333333333333333) + ((x >> 2) & 0x3333333333333333)
        x = (x + (x >> 4)) & 0x0F0F0F0F0F0F0F0F
        return ((x * 0x0101010101010101) >> 56).to(tl.int32)

    @triton.jit
    def _score_tile(q, k_base, stride_kj, stride_kd, rows, t, Lk,
                    HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_N: tl.constexpr,
                    CAUSAL: tl.constexpr, PRECISION: tl.constexpr):
        """(BLOCK_M, BLOCK_N) float32 scores of key tile t; -inf where a key is not allowed.

        Both passes call this, so both see bit-identical scores.
        """
        offs_d = tl.arange(0, BLOCK_D)
        cols = t * BLOCK_N + tl.arange(0, BLOCK_N)
        kt = tl.load(k_base + cols[None, :] * stride_kj + offs_d[:, None] * stride_kd,
                     mask=(cols[None, :] < Lk) & (offs_d[:, None] < HEAD_DIM), other=0.0)
        s = tl.dot(q, kt, input_precision=PRECISION)
        ok = cols[None, :] < Lk
        if CAUSAL:
            ok = ok & (cols[None, :] <= rows[:, None])
        return tl.where(ok, s, float("-inf")), cols

    @triton.jit
    def _load_q(Q, b, h, rows, stride_qb, stride_qh, stride_qi, stride_qd, Lq,
                HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr):
        offs_d = tl.arange(0, BLOCK_D)
        return tl.load(Q + b * stride_qb + h * stride_qh + rows[:, None] * stride_qi + offs_d[None, :] * stride_qd,
                       mask=(rows[:, None] < Lq) & (offs_d[None, :] < HEAD_DIM), other=0.0)

    @triton.jit
    def _n_tiles(pid_m, Lq, Lk, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, CAUSAL: tl.constexpr):
        n = tl.cdiv(Lk, BLOCK_N)
        if CAUSAL:  # tiles that start after the block's last query hold no allowed key
            last = tl.minimum(pid_m * BLOCK_M + BLOCK_M, Lq) - 1
            n = tl.minimum(n, last // BLOCK_N + 1)
        return n

    @triton.jit
    def _segment_max(Q, K, SM,
                     stride_qb, stride_qh, stride_qi, stride_qd,
                     stride_kb, stride_kh, stride_kj, stride_kd,
                     H, G, Lq, Lk, n_seg,
                     HEAD_DIM: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
                     BLOCK_D: tl.constexpr, CAUSAL: tl.constexpr, PRECISION: tl.constexpr):
        pid_m = tl.program_id(0)
        bh = tl.program_id(1)
        b = bh // H
        h = bh % H
        rows = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
        q = _load_q(Q, b, h, rows, stride_qb, stride_qh, stride_qi, stride_qd, Lq, HEAD_DIM, BLOCK_D)
        k_base = K + b * stride_kb + (h // G) * stride_kh
        sm_row = SM + (bh * Lq + rows) * n_seg
        for t in range(0, _n_tiles(pid_m, Lq, Lk, BLOCK_M, BLOCK_N, CAUSAL)):
            s, _ = _score_tile(q, k_base, stride_kj, stride_kd, rows, t, Lk,
                               HEAD_DIM, BLOCK_D, BLOCK_N, CAUSAL, PRECISION)
            tl.store(sm_row + t, tl.max(s, 1), mask=rows < Lq)

    @triton.jit
    def _collect(Q, K, TAU, CV, CI, CNT,
                 stride_qb, stride_qh, stride_qi, stride_qd,
                 stride_kb, stride_kh, stride_kj, stride_kd,
                 H, G, Lq, Lk, capacity,
                 HEAD_DIM: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
                 BLOCK_D: tl.constexpr, CAUSAL: tl.constexpr, PRECISION: tl.constexpr):
        """Pass 2 appending in the tile: each passing key's score and index go to its row's next slot.

        A key's slot is its row's count so far plus a prefix sum over the tile;
        slots past ``capacity`` are not stored, but CNT still counts them.
        """
        pid_m = tl.program_id(0)
        bh = tl.program_id(1)
        b = bh // H
        h = bh % H
        rows = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
        row_ok = rows < Lq
        q = _load_q(Q, b, h, rows, stride_qb, stride_qh, stride_qi, stride_qd, Lq, HEAD_DIM, BLOCK_D)
        k_base = K + b * stride_kb + (h // G) * stride_kh
        flat = bh * Lq + rows
        tau = tl.load(TAU + flat, mask=row_ok, other=float("inf"))
        count = tl.zeros([BLOCK_M], tl.int32)
        for t in range(0, _n_tiles(pid_m, Lq, Lk, BLOCK_M, BLOCK_N, CAUSAL)):
            s, cols = _score_tile(q, k_base, stride_kj, stride_kd, rows, t, Lk,
                                  HEAD_DIM, BLOCK_D, BLOCK_N, CAUSAL, PRECISION)
            # s > -inf: with tau = -inf (fewer than k segments) masked keys must still stay out.
            keep = (s >= tau[:, None]) & (s > float("-inf")) & row_ok[:, None]
            slot = count[:, None] + tl.cumsum(keep.to(tl.int32), 1) - 1
            count += tl.sum(keep.to(tl.int32), 1)
            dst = flat[:, None] * capacity + slot
            store = keep & (slot < capacity)
            tl.store(CV + dst, s, mask=store)
            tl.store(CI + dst, cols[None, :] + tl.zeros_like(slot), mask=store)
        tl.store(CNT + flat, count, mask=row_ok)


    @triton.jit
    def _collect_mask(Q, K, TAU, MASK,
                      stride_qb, stride_qh, stride_qi, stride_qd,
                      stride_kb, stride_kh, stride_kj, stride_kd,
                      H, G, Lq, Lk, n_seg,
                      HEAD_DIM: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
                      BLOCK_D: tl.constexpr, CAUSAL: tl.constexpr, PRECISION: tl.constexpr):
        """Pass 2 with no per-key stores: MASK[row, t] = bit j set where key t * BLOCK_N + j passes.

        Per tile and row this is one reduction and one store, the cost of pass 1;
        ``_compact_mask`` turns the bits into key indices afterwards.
        """
        pid_m = tl.program_id(0)
        bh = tl.program_id(1)
        b = bh // H
        h = bh % H
        rows = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
        row_ok = rows < Lq
        q = _load_q(Q, b, h, rows, stride_qb, stride_qh, stride_qi, stride_qd, Lq, HEAD_DIM, BLOCK_D)
        k_base = K + b * stride_kb + (h // G) * stride_kh
        tau = tl.load(TAU + bh * Lq + rows, mask=row_ok, other=float("inf"))
        mask_row = MASK + (bh * Lq + rows).to(tl.int64) * n_seg
        bit = tl.full([BLOCK_N], 1, tl.int64) << tl.arange(0, BLOCK_N).to(tl.int64)
        for t in range(0, _n_tiles(pid_m, Lq, Lk, BLOCK_M, BLOCK_N, CAUSAL)):
            s, _ = _score_tile(q, k_base, stride_kj, stride_kd, rows, t, Lk,
                               HEAD_DIM, BLOCK_D, BLOCK_N, CAUSAL, PRECISION)
            keep = (s >= tau[:, None]) & (s > float("-inf"))
            tl.store(mask_row + t, tl.sum(tl.where(keep, bit[None, :], 0), 1), mask=row_ok)

    @triton.jit
    def _compact_mask(MASK, CI, CNT, n_rows, n_seg, C,
                      BLOCK_N: tl.constexpr, BLOCK_R: tl.constexpr, BLOCK_S: tl.constexpr,
                      HW_POPC: tl.constexpr):
        """CI[row, :count] = the keys whose bits are set in MASK[row, :], in key order; CNT[row] = count.

        A row's slots start at the popcount of the segments before it; each round
        takes the lowest set bit of every segment, so rounds = most bits in one segment.
        """
        rows = tl.program_id(0) * BLOCK_R + tl.arange(0, BLOCK_R)
        segs = tl.arange(0, BLOCK_S)
        ok = (rows[:, None] < n_rows) & (segs[None, :] < n_seg)
        bits = tl.load(MASK + rows[:, None].to(tl.int64) * n_seg + segs[None, :], mask=ok, other=0)
        pc = _popc64(bits, HW_POPC)
        slot = tl.cumsum(pc, 1) - pc
        tl.store(CNT + rows, tl.sum(pc, 1), mask=rows < n_rows)
        dst = CI + rows[:, None].to(tl.int64) * C
        for _ in range(0, tl.max(tl.max(pc, 1), 0)):
            has = bits != 0
            pos = _popc64((bits & -bits) - 1, HW_POPC)  # index of the lowest set bit
            tl.store(dst + slot, segs[None, :] * BLOCK_N + pos, mask=has & (slot < C))
            slot += has.to(tl.int32)
            bits = bits & (bits - 1)

    @triton.jit
    def _rescore(Q, K, CI, CV, CNT, n_rows, Lq, H, G, C,
                 stride_qb, stride_qh, stride_qi, stride_qd,
                 stride_kb, stride_kh, stride_kj, stride_kd,
                 HEAD_DIM: tl.constexpr, BLOCK_R: tl.constexpr, BLOCK_D: tl.constexpr):
        """CV[row, c] = float32 q . k of candidate CI[row, c] (slots past the row's count stay as they are)."""
        rows = tl.program_id(0) * BLOCK_R + tl.arange(0, BLOCK_R)
        row_ok = rows < n_rows
        offs_d = tl.arange(0, BLOCK_D)
        d_ok = offs_d[None, :] < HEAD_DIM
        bh = rows // Lq
        i = rows % Lq
        b = bh // H
        h = bh % H
        q = tl.load(Q + b[:, None] * stride_qb + h[:, None] * stride_qh + i[:, None] * stride_qi
                    + offs_d[None, :] * stride_qd, mask=row_ok[:, None] & d_ok, other=0.0).to(tl.float32)
        k_row = K + b * stride_kb + (h // G) * stride_kh
        cnt = tl.minimum(tl.load(CNT + rows, mask=row_ok, other=0), C)
        base = rows.to(tl.int64) * C
        for c in range(0, tl.max(cnt, 0)):
            live = c < cnt
            key = tl.load(CI + base + c, mask=live, other=0)
            kk = tl.load(k_row[:, None] + key[:, None] * stride_kj + offs_d[None, :] * stride_kd,
                         mask=live[:, None] & d_ok, other=0.0).to(tl.float32)
            tl.store(CV + base + c, tl.sum(q * kk, 1), mask=live)

    @triton.jit
    def _kth_largest(X, OUT, n_rows, n_cols, K,
                     BLOCK_R: tl.constexpr, BLOCK_C: tl.constexpr):
        """OUT[r] = the K-th largest of X[r, :n_cols] (-inf when n_cols < K): a sort in registers."""
        rows = tl.program_id(0) * BLOCK_R + tl.arange(0, BLOCK_R)
        cols = tl.arange(0, BLOCK_C)
        x = tl.load(X + rows[:, None] * n_cols + cols[None, :],
                    mask=(rows[:, None] < n_rows) & (cols[None, :] < n_cols), other=float("-inf"))
        srt = tl.sort(x, 1, descending=True)
        kth = tl.sum(tl.where(cols[None, :] == K - 1, srt, 0.0), 1)
        kth = tl.where(K <= n_cols, kth, float("-inf"))
        tl.store(OUT + rows, kth, mask=rows < n_rows)

    @triton.jit
    def _pick_k(CV, CI, VALS, IDX, n_rows, C, K,
                BLOCK_R: tl.constexpr, BLOCK_C: tl.constexpr):
        """The K largest of each row's candidates, in slot order (not sorted), with their key indices.

        Among candidates equal to the K-th largest the earliest slots are kept,
        which is the lowest key index: slots are filled in key order.
        """
        rows = tl.program_id(0) * BLOCK_R + tl.arange(0, BLOCK_R)
        cols = tl.arange(0, BLOCK_C)
        m = (rows[:, None] < n_rows) & (cols[None, :] < C)
        v = tl.load(CV + rows[:, None] * C + cols[None, :], mask=m, other=float("-inf"))
        ix = tl.load(CI + rows[:, None] * C + cols[None, :], mask=m, other=-1)
        srt = tl.sort(v, 1, descending=True)
        kth = tl.sum(tl.where(cols[None, :] == K - 1, srt, 0.0), 1)
        above = v > kth[:, None]
        tie = v == kth[:, None]
        room = K - tl.sum(above.to(tl.int32), 1)  # slots left for keys equal to the k-th: the first ones win
        keep = above | (tie & (tl.cumsum(tie.to(tl.int32), 1) <= room[:, None]))
        keep = keep & m
        slot = tl.cumsum(keep.to(tl.int32), 1) - 1
        dst = rows[:, None] * K + slot
        tl.store(VALS + dst, v, mask=keep)
        tl.store(IDX + dst, ix, mask=keep)


    @triton.jit
    def _softmax_gather(VALS, IDX, V, O, n_rows, Lq, H, G, K, scale,
                        stride_vb, stride_vh, stride_vj, stride_vd,
                        stride_ob, stride_oh, stride_oi, stride_od,
                        V_DIM: tl.constexpr, BLOCK_R: tl.constexpr, BLOCK_K: tl.constexpr,
                        BLOCK_DV: tl.constexpr):
        """O[row] = softmax(VALS[row] * scale) @ V[IDX[row]]: the k picked values, gathered once each."""
        rows = tl.program_id(0) * BLOCK_R + tl.arange(0, BLOCK_R)
        row_ok = rows < n_rows
        offs_k = tl.arange(0, BLOCK_K)
        offs_dv = tl.arange(0, BLOCK_DV)
        vals = tl.load(VALS + rows[:, None] * K + offs_k[None, :],
                       mask=row_ok[:, None] & (offs_k[None, :] < K), other=float("-inf"))
        m = tl.max(vals, 1)
        m = tl.where(m == float("-inf"), 0.0, m)  # a row with no key: every weight 0
        denom = tl.sum(tl.exp((vals - m[:, None]) * scale), 1)
        denom = tl.where(denom > 0, denom, 1.0)
        bh = rows // Lq
        i = rows % Lq
        b = bh // H
        hk = (bh % H) // G
        v_row = V + b * stride_vb + hk * stride_vh
        acc = tl.zeros([BLOCK_R, BLOCK_DV], tl.float32)
        for s in range(K):
            val = tl.load(VALS + rows * K + s, mask=row_ok, other=float("-inf"))
            key = tl.load(IDX + rows * K + s, mask=row_ok, other=-1)
            w = tl.exp((val - m) * scale) / denom
            vv = tl.load(v_row[:, None] + key[:, None] * stride_vj + offs_dv[None, :] * stride_vd,
                         mask=(key[:, None] >= 0) & (offs_dv[None, :] < V_DIM), other=0.0)
            acc += w[:, None] * vv.to(tl.float32)
        tl.store(O + b[:, None] * stride_ob + (bh % H)[:, None] * stride_oh + i[:, None] * stride_oi
                 + offs_dv[None, :] * stride_od, acc.to(O.dtype.element_ty),
                 mask=row_ok[:, None] & (offs_dv[None, :] < V_DIM))


def fused_topk_attention(q, k, v, top_k: int, *, causal: bool = False, scale: float | None = None,
                         capacity: int | None = None, block_m: int = 64, block_n: int | None = None,
                         num_warps: int = 4, num_stages: int = 2):
    """Each query attends to its ``top_k`` highest-scoring allowed keys; same result as ``topk_attention``.

    The same tie rule too: among equal scores the lower key index wins.

    Args:
        q (B, H, Lq, D), k (B, Hkv, Lk, D), v (B, Hkv, Lk, Dv): CUDA tensors of one
            dtype (float16 / bfloat16 / float32); H a multiple of Hkv.
        top_k: keys per query, >= 1; at least the number of allowed keys gives dense attention.
        causal: SDPA's ``is_causal``.
        scale: > 0, default 1/sqrt(D). The kernels rank raw scores q.k, which
            only a positive scale leaves in the same order.
        capacity: candidate slots per query (default max(2 * top_k, 128)); rows
            with more candidates are redone exactly in PyTorch.
        block_m, block_n: queries per program and keys per segment (powers of two >= 16).
            Default block_n: as large as 64 while leaving >= 4 * top_k segments, so
            the threshold stays tight (with only top_k segments every key passes).
        num_warps, num_stages: launch tuning of the two passes; results do not depend on them.

    Returns:
        (B, H, Lq, Dv) in q's dtype; rows with no allowed key are zeros. Not differentiable.
        Extra memory: Lq * (2 * Lk / block_n + 3 * capacity) numbers per head.
    """
    require_triton("fused_topk_attention")
    B, H, Hkv, Lq, Lk, D, Dv = check_qkv(q, k, v)
    check_int(top_k, "top_k", minimum=1)
    scale = check_number(resolve_scale(scale, D), "scale", positive=True)
    check_dtype(q.dtype, dispatch.KERNEL_DTYPES)
    if Lq == 0 or Lk == 0:
        return q.new_zeros(B, H, Lq, Dv)
    vals, idx, _ = fused_topk_select(q, k, top_k, causal=causal, capacity=capacity, block_m=block_m,
                                     block_n=block_n, num_warps=num_warps, num_stages=num_stages)
    K = vals.shape[-1]
    n_rows = B * H * Lq
    idx = idx.masked_fill(torch.isneginf(vals), -1)
    out = torch.empty(B, H, Lq, Dv, dtype=q.dtype, device=q.device)
    br = 32
    _softmax_gather[(triton.cdiv(n_rows, br),)](
        vals.contiguous(), idx.contiguous(), v, out, n_rows, Lq, H, H // Hkv, K, scale, *v.stride(),
        *out.stride(), V_DIM=Dv, BLOCK_R=br, BLOCK_K=pow2(K, 1), BLOCK_DV=pow2(Dv, 16), num_warps=4)
    return out


def _check_block(value: object, name: str) -> int:
    # tl.arange tiles need powers of two, and tl.dot needs at least 16 per dimension.
    if check_int(value, name, minimum=16) & (value - 1):
        raise ValueError(f"{name} must be a power of two >= 16, got {value}")
    return value


def fused_topk_select(q, k, top_k: int, *, causal: bool = False, capacity: int | None = None,
                      block_m: int = 64, block_n: int | None = None, num_warps: int = 4,
                      num_stages: int = 2) -> FusedSelection:
    """The selection step of ``fused_topk_attention`` alone (same arguments).

    Returns a ``FusedSelection(values, indices, overflow_rows)``: values and
    indices (B * H, Lq, min(top_k, Lk)) of each row's picked keys (ascending
    key index; among scores equal to the k-th the lower key index wins), and
    how many rows overflowed ``capacity`` and were redone exactly.
    """
    require_triton("fused_topk_select")
    B, H, Hkv, Lq, Lk, D, _ = check_qkv(q, k, k)
    check_int(top_k, "top_k", minimum=1)
    check_dtype(q.dtype, dispatch.KERNEL_DTYPES)
    if block_n is None:
        block_n = 64
        while block_n > 16 and Lk < 4 * top_k * block_n:
            block_n //= 2
    _check_block(block_m, "block_m")
    _check_block(block_n, "block_n")
    # Causal inputs append in the tile: the mask's re-scored near-ties moved a causal
    # float32 output more than the tile scores did (see docs/benchmarks.md). The mask
    # holds one int64 per row and segment, so wider segments append in the tile too.
    use_mask = not causal and block_n <= 64
    K = min(top_k, Lk)
    C = capacity if capacity is not None else max(2 * K, 128)
    check_int(C, "capacity", minimum=max(K, 1))
    n_seg = triton.cdiv(Lk, block_n)
    dev = q.device
    common = dict(HEAD_DIM=D, BLOCK_M=block_m, BLOCK_N=block_n, BLOCK_D=pow2(D, 16), CAUSAL=bool(causal),
                  PRECISION=dot_precision(q.dtype), num_warps=num_warps, num_stages=num_stages)
    grid = (triton.cdiv(Lq, block_m), B * H)
    strides = (*q.stride(), *k.stride())

    seg_max = torch.full((B * H, Lq, n_seg), float("-inf"), device=dev)
    _segment_max[grid](q, k, seg_max, *strides, H, H // Hkv, Lq, Lk, n_seg, **common)
    n_rows = B * H * Lq
    if n_seg < K:  # fewer segments than k: every allowed key is a candidate
        tau = torch.full((B * H, Lq), float("-inf"), device=dev)
    elif n_seg <= _SORT_MAX:
        tau = torch.empty((B * H, Lq), device=dev)
        br = max(1, min(16, 4096 // pow2(n_seg, 16)))
        _kth_largest[(triton.cdiv(n_rows, br),)](seg_max, tau, n_rows, n_seg, K, BLOCK_R=br,
                                                  BLOCK_C=pow2(n_seg, 16), num_warps=4)
    else:
        tau = seg_max.topk(K, dim=-1, sorted=False).values.amin(dim=-1).contiguous()
    del seg_max

    cand_v = torch.full((B * H, Lq, C), float("-inf"), device=dev)
    cand_i = torch.full((B * H, Lq, C), -1, dtype=torch.int32, device=dev)
    count = torch.zeros((B * H, Lq), dtype=torch.int32, device=dev)
    if use_mask:
        # Not causal, every tile is visited, so every mask entry is written.
        mask = torch.empty((B * H, Lq, n_seg), dtype=torch.int64, device=dev)
        _collect_mask[grid](q, k, tau, mask, *strides, H, H // Hkv, Lq, Lk, n_seg, **common)
        br = max(1, min(16, 4096 // pow2(n_seg, 16)))
        _compact_mask[(triton.cdiv(n_rows, br),)](mask, cand_i, count, n_rows, n_seg, C, BLOCK_N=block_n,
                                                   BLOCK_R=br, BLOCK_S=pow2(n_seg, 16), HW_POPC=_HW_POPC,
                                                   num_warps=4)
        del mask
        _rescore[(triton.cdiv(n_rows, 32),)](q, k, cand_i, cand_v, count, n_rows, Lq, H, H // Hkv, C,
                                             *strides, HEAD_DIM=D, BLOCK_R=32, BLOCK_D=pow2(D, 16), num_warps=4)
    else:
        _collect[grid](q, k, tau, cand_v, cand_i, count, *strides, H, H // Hkv, Lq, Lk, C, **common)
    if C <= _SORT_MAX:
        vals = torch.full((B * H, Lq, K), float("-inf"), device=dev)
        idx32 = torch.full((B * H, Lq, K), -1, dtype=torch.int32, device=dev)
        br = max(1, min(16, 4096 // pow2(C, 16)))
        _pick_k[(triton.cdiv(n_rows, br),)](cand_v, cand_i, vals, idx32, n_rows, C, K, BLOCK_R=br,
                                             BLOCK_C=pow2(C, 16), num_warps=4)
        idx = idx32.long()
    else:
        # Slots are in key order (padding last), so the lower slot is the lower key: the tie rule.
        vals, pos = stable_topk(cand_v, K, sorted=False)
        idx = cand_i.gather(-1, pos).long()
    del cand_v, cand_i

    over = (count > C).nonzero()
    if over.shape[0]:
        _redo_rows(q, k, over, vals, idx, K, causal, H // Hkv)
    return FusedSelection(vals, idx, over.shape[0])


def _redo_rows(q, k, over, vals, idx, K, causal, G):
    """Exact top-K for the (flat head, row) pairs in ``over``, in float32 like the kernels; ties to the lower index."""
    H = q.shape[1]
    for bh in over[:, 0].unique().tolist():
        rows = over[over[:, 0] == bh, 1]
        b, h = divmod(bh, H)
        kh = k[b, h // G].float()
        for r0 in range(0, rows.numel(), 4096):
            r = rows[r0 : r0 + 4096]
            s = q[b, h, r].float() @ kh.T
            if causal:
                s = s.masked_fill(torch.arange(kh.shape[0], device=q.device) > r[:, None], float("-inf"))
            tv, ti = stable_topk(s, K, sorted=False)
            vals[bh, r] = tv
            idx[bh, r] = ti
