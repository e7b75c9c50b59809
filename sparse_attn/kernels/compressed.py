"""NSA's compressed branch and its selection-block importance as one Triton kernel.

The PyTorch path (``sparse_attn.ops.nsa.compressed_attention``) materialises
the (H, Lq, Nc) scores and softmax weights, then sums them over each KV group
and maps them onto selection blocks with a dense (Nc, Nsel) matrix: at long
lengths that is most of the forward's memory and time (see
docs/benchmarks.md). Here nothing of size Lq * Nc ever reaches memory.

One program handles one (block of BLOCK_M query positions, KV group). It
stacks the group's G query heads and its BLOCK_M positions into one
(BLOCK_M * G, D) tile, so each compressed K/V tile is loaded once for all of
them, and walks the compressed blocks twice:

1. flash-style online softmax: the branch output, and each row's max and sum;
2. the scores again, normalised with that max and sum into the exact softmax
   weights, summed over the group's heads, shared out onto selection blocks
   by overlap (the fraction of compressed block c's tokens that lie in
   selection block s), and added into the (B, Hkv, Lq, Nsel) importance.
   Where a power-of-two number of compressed blocks start in each selection
   block (NSA's stride 16 and block 64: 4), that is a reshape and a few
   weighted sums; otherwise a product with the overlap matrix's tile, built
   in registers.

Only this program writes its rows of the importance, in loop order, so the
adds are race-free and the result does not depend on scheduling. Causal: a
compressed block is visible to query i once it has ended (its last token
<= i); tiles past a query block's last visible compressed block are never
visited, and the tiles that every row of the program sees whole run without
any mask (most of them at long lengths). Programs run heaviest (latest) query
blocks first.

Pass 2 may also run as a second kernel (``split``, the default for half
types): pass 1 stores each row's max plus log2 of its sum, and the second
kernel walks the compressed blocks with its own tiles. Most of its time is the
scores' recomputation (docs/benchmarks.md). That kernel scores the transposed
tile, (compressed blocks, rows) (``transpose2``, the default where the reshape
map applies): in the matrix units' accumulator a group's heads then sit in one
thread's registers, so the group sum is adds in each thread instead of three
rounds of warp shuffles over every weight (2 ms of 17 at L=65536 on an H200).

Contract (as ``compressed_attention`` followed by the group sum and
``importance_to_selection_blocks(..., interpolate=False)`` in ``sparse_attn.ops.nsa``):
    q (B, H, Lq, D); k_cmp (B, Hkv, Nc, D); v_cmp (B, Hkv, Nc, Dv), compressed
    block c covering tokens [c * stride, c * stride + block_size). Returns out
    (B, H, Lq, Dv) in q's dtype (zeros for a query that sees no compressed
    block) and importance (B, Hkv, Lq, ceil(num_keys / selection_block_size))
    in float32, 0 where no visible compressed block overlaps.
"""
from __future__ import annotations

import math

import torch

from .._checks import check_int, check_qkv, resolve_scale
from . import dispatch
from ._online import fold, load_kt
from ._triton import LOG2E, check_dtype, dot_precision, pow2, require_triton, tl, triton

__all__ = ["compressed_attention_triton", "triton_supports", "DEFAULTS"]

# float32 launches (with DEFAULTS_FP32) and is exact to 3e-7, but its IEEE dot products run
# without the tensor cores' fast path: at L=16384 on an H200 the kernel alone took 78.8 ms,
# where the whole PyTorch-path NSA took 113 ms and the bfloat16 kernel 1.7 ms (docs/benchmarks.md).
# So nsa_attention keeps float32 on the PyTorch path; direct callers may still launch it.
_DISPATCH_DTYPES = (torch.float16, torch.bfloat16)

# Launch settings: the fastest of those tried on an H200 (see docs/benchmarks.md).
# rows = query positions x padded group heads per program; the *2 settings are the second pass's,
# which runs as a kernel of its own (split).
DEFAULTS = {"rows": 256, "block_n": 64, "num_warps": 8, "num_stages": 3, "sum_first": True,
            "split": True, "rows2": 256, "block_n2": 64, "num_warps2": 8, "num_stages2": 3, "reshape_map": True,
            "transpose2": True}
# float32 tiles are twice the bytes: at DEFAULTS (16 query heads per group, head
# dim 128) they need more shared memory than an H200 has (263168 bytes against
# 232448) and the launch fails. float32 gets its own, smaller tiles: the fastest
# of ten launches tried at L=16384 (docs/benchmarks.md).
DEFAULTS_FP32 = {"rows": 128, "block_n": 32, "num_warps": 8, "num_stages": 2, "sum_first": True}


# The transposed pass 2 (transpose2) at most at this many rows per program. With 512 (32 positions x 16
# heads) its importance came out wrong on an H200 (0.12 of the largest element off; Triton 3.6), where the
# same launch untransposed, and the transposed one at 256 and 128 rows, match the reference
# (docs/benchmarks.md, run 23). Cause not established; the interpreter gives the right result.
_TRANS_MAX_ROWS = 256


def triton_supports(q: torch.Tensor, k_cmp: torch.Tensor, v_cmp: torch.Tensor) -> bool:
    """True when nsa_attention should use the kernel for these inputs.

    The generic rule (``dispatch.use_triton``), for float16 / bfloat16 only
    (see ``_DISPATCH_DTYPES``), and one dtype for the three tensors.
    """
    return (
        dispatch.use_triton(q, k_cmp, v_cmp, dtypes=_DISPATCH_DTYPES)
        and k_cmp.dtype == q.dtype == v_cmp.dtype
    )


if triton is not None:

    @triton.jit
    def _seen(pos, Nc, cmp_stride, cmp_block, CAUSAL: tl.constexpr):
        """Compressed blocks query ``pos`` sees (all Nc unless causal)."""
        if CAUSAL:
            # (Triton's // truncates towards zero: keep the numerator >= 0.)
            n = tl.where(pos + 1 >= cmp_block, (tl.maximum(pos + 1 - cmp_block, 0)) // cmp_stride + 1, 0)
            return tl.minimum(n, Nc)
        else:
            return Nc

    @triton.jit
    def _pass1_tile(
        q, k_base, v_base, c0, n_vis, pos, m_i, l_i, acc, stride_kn, stride_kd, stride_vn, stride_vd,
        cmp_stride, cmp_block, qk_scale,
        BLOCK_N: tl.constexpr, HEAD_DIM: tl.constexpr, V_DIM: tl.constexpr, BLOCK_D: tl.constexpr,
        BLOCK_DV: tl.constexpr, CAUSAL: tl.constexpr, PRECISION: tl.constexpr, MASK: tl.constexpr,
    ):
        """One tile of pass 1 (online softmax). MASK=False: every row sees the whole tile, so no mask at all."""
        cols = c0 + tl.arange(0, BLOCK_N)
        c_ok = cols < n_vis
        s = tl.dot(q, load_kt(k_base, cols, c_ok, stride_kn, stride_kd, HEAD_DIM, BLOCK_D, MASK),
                   input_precision=PRECISION) * qk_scale
        if MASK:
            ok = c_ok[None, :]
            if CAUSAL:
                ok = ok & (cols[None, :] * cmp_stride + cmp_block - 1 <= pos[:, None])
            s = tl.where(ok, s, float("-inf"))
        return fold(s, m_i, l_i, acc, v_base, cols, c_ok, stride_vn, stride_vd, V_DIM, BLOCK_DV, PRECISION, MASK)

    @triton.jit
    def _pass2_tile(
        q, bias, k_base, imp_rows, pos, pos_m, c0, n_vis, stride_kn, stride_kd, stride_is,
        Lq, n_sel, cmp_stride, cmp_block, sel_block, qk_scale,
        BLOCK_G: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_S: tl.constexpr,
        HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr,
        CAUSAL: tl.constexpr, PRECISION: tl.constexpr, SUM_FIRST: tl.constexpr, MASK: tl.constexpr,
        MAP_R: tl.constexpr, MAP_U: tl.constexpr,
    ):
        """One tile of pass 2: the exact softmax weights, exp2(s - row max - log2(row sum)), mapped onto
        selection blocks, summed over the group, added into this program's rows. MASK as in _pass1_tile."""
        cols = c0 + tl.arange(0, BLOCK_N)
        offs_d = tl.arange(0, BLOCK_D)
        offs_s = tl.arange(0, BLOCK_S)
        c_ok = cols < n_vis
        if MASK:
            kt = tl.load(k_base + cols[None, :] * stride_kn + offs_d[:, None] * stride_kd,
                         mask=c_ok[None, :] & (offs_d < HEAD_DIM)[:, None], other=0.0)
        else:
            kt = tl.load(k_base + cols[None, :] * stride_kn + offs_d[:, None] * stride_kd,
                         mask=(offs_d < HEAD_DIM)[:, None], other=0.0)
        # bias is +inf on rows that carry no weight (padded heads, rows past Lq, rows that see nothing).
        p = tl.exp2(tl.dot(q, kt, input_precision=PRECISION) * qk_scale - bias[:, None])
        if MASK:
            ok = c_ok[None, :]
            if CAUSAL:
                ok = ok & (cols[None, :] * cmp_stride + cmp_block - 1 <= pos[:, None])
            p = tl.where(ok, p, 0.0)
        s_first = (c0 * cmp_stride) // sel_block
        if MAP_R > 0:
            # MAP_R compressed blocks start in each selection block, so the tile's weights reshape to
            # (BLOCK_M, selection blocks, MAP_R), and the j-th compressed block of every selection block
            # gives the same share w_u[j] to the selection block u further on: MAP_U weighted sums in
            # float32 instead of the mapping product (no tf32 rounding, no operand layouts for a dot).
            pg = tl.sum(tl.reshape(p, (BLOCK_M, BLOCK_G, BLOCK_N)), axis=1)
            pg3 = tl.reshape(pg, (BLOCK_M, BLOCK_N // MAP_R, MAP_R))
            j_tok = tl.arange(0, MAP_R) * cmp_stride  # start of compressed block j in its selection block
            sel0 = s_first + tl.arange(0, BLOCK_N // MAP_R)
            for u in tl.static_range(MAP_U):
                hi = tl.minimum(j_tok + cmp_block, (u + 1) * sel_block)
                lo = tl.maximum(j_tok, u * sel_block)
                w_u = tl.maximum(hi - lo, 0).to(tl.float32) / cmp_block
                part = tl.sum(pg3 * w_u[None, None, :], axis=2)  # (BLOCK_M, BLOCK_N // MAP_R)
                tl.atomic_add(imp_rows + (sel0 + u)[None, :] * stride_is, part,
                              mask=(pos_m < Lq)[:, None] & (sel0 + u < n_sel)[None, :], sem="relaxed")
        else:
            # Overlap of compressed block c (tokens [c*stride, c*stride + block)) with
            # selection block s, over the compressed block size: the mapping matrix's tile.
            sel = s_first + offs_s
            tok = cols * cmp_stride
            hi = tl.minimum(tok[:, None] + cmp_block, (sel[None, :] + 1) * sel_block)
            lo = tl.maximum(tok[:, None], sel[None, :] * sel_block)
            w = tl.where(c_ok[:, None], tl.maximum(hi - lo, 0).to(tl.float32) / cmp_block, 0.0)
            if SUM_FIRST:
                # The map is linear: summing the group's heads first gives the same value with
                # BLOCK_G times fewer multiplies in the mapping product.
                pg = tl.sum(tl.reshape(p, (BLOCK_M, BLOCK_G, BLOCK_N)), axis=1)
                part = tl.dot(pg, w, input_precision=PRECISION)  # (BLOCK_M, BLOCK_S)
            else:  # fewer than 16 query positions per program: tl.dot needs 16 rows
                part = tl.dot(p, w, input_precision=PRECISION)  # (ROWS, BLOCK_S)
                part = tl.sum(tl.reshape(part, (BLOCK_M, BLOCK_G, BLOCK_S)), axis=1)
            tl.atomic_add(imp_rows + sel[None, :] * stride_is, part,
                          mask=(pos_m < Lq)[:, None] & (sel < n_sel)[None, :], sem="relaxed")

    @triton.jit
    def _pass2_tile_t(
        q_t, bias, k_base, imp_base, pos, pos_m, c0, n_vis, stride_kn, stride_kd, stride_ii, stride_is,
        Lq, n_sel, cmp_stride, cmp_block, sel_block, qk_scale,
        BLOCK_G: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
        HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr,
        CAUSAL: tl.constexpr, PRECISION: tl.constexpr, MASK: tl.constexpr, MAP_R: tl.constexpr, MAP_U: tl.constexpr,
    ):
        """Pass 2's tile with the scores transposed, (compressed blocks, rows): the same weights as _pass2_tile.

        In the matrix units' accumulator a thread holds one score column's values for many rows along the
        rows axis, as registers. Rows are laid out (position // 8, head, position % 8), so a group's heads
        sit in one thread's registers and the group sum is adds inside each thread; in the other orientation
        it took three rounds of warp shuffles over every weight (docs/benchmarks.md).
        """
        cols = c0 + tl.arange(0, BLOCK_N)
        offs_d = tl.arange(0, BLOCK_D)
        c_ok = cols < n_vis
        if MASK:
            kc = tl.load(k_base + cols[:, None] * stride_kn + offs_d[None, :] * stride_kd,
                         mask=c_ok[:, None] & (offs_d < HEAD_DIM)[None, :], other=0.0)
        else:
            kc = tl.load(k_base + cols[:, None] * stride_kn + offs_d[None, :] * stride_kd,
                         mask=(offs_d < HEAD_DIM)[None, :], other=0.0)
        p = tl.exp2(tl.dot(kc, q_t, input_precision=PRECISION) * qk_scale - bias[None, :])  # (BLOCK_N, ROWS)
        if MASK:
            ok = c_ok[:, None]
            if CAUSAL:
                ok = ok & (cols[:, None] * cmp_stride + cmp_block - 1 <= pos[None, :])
            p = tl.where(ok, p, 0.0)
        pg = tl.sum(tl.reshape(p, (BLOCK_N, BLOCK_M // 8, BLOCK_G, 8)), axis=2)
        pg = tl.reshape(pg, (BLOCK_N, BLOCK_M))  # column m is position pid_m * BLOCK_M + m
        pg3 = tl.reshape(pg, (BLOCK_N // MAP_R, MAP_R, BLOCK_M))
        j_tok = tl.arange(0, MAP_R) * cmp_stride
        sel0 = (c0 * cmp_stride) // sel_block + tl.arange(0, BLOCK_N // MAP_R)
        for u in tl.static_range(MAP_U):
            hi = tl.minimum(j_tok + cmp_block, (u + 1) * sel_block)
            lo = tl.maximum(j_tok, u * sel_block)
            w_u = tl.maximum(hi - lo, 0).to(tl.float32) / cmp_block
            part = tl.sum(pg3 * w_u[None, :, None], axis=1)  # (selection blocks, BLOCK_M)
            tl.atomic_add(imp_base + pos_m[None, :] * stride_ii + (sel0 + u)[:, None] * stride_is, part,
                          mask=(pos_m < Lq)[None, :] & (sel0 + u < n_sel)[:, None], sem="relaxed")

    @triton.jit
    def _importance_pass(
        q, bias, pos, pid_m, k_base, imp_base, stride_kn, stride_kd, stride_ii, stride_is,
        Lq, n_full, n_vis, n_sel, cmp_stride, cmp_block, sel_block, qk_scale,
        BLOCK_G: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_S: tl.constexpr,
        HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr,
        CAUSAL: tl.constexpr, PRECISION: tl.constexpr, SUM_FIRST: tl.constexpr,
        MAP_R: tl.constexpr, MAP_U: tl.constexpr,
    ):
        """Pass 2 over the tiles every row sees whole (no masks), then the rest."""
        pos_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
        imp_rows = imp_base + pos_m[:, None] * stride_ii
        for c0 in range(0, n_full, BLOCK_N):
            _pass2_tile(q, bias, k_base, imp_rows, pos, pos_m, c0, n_vis, stride_kn, stride_kd, stride_is,
                        Lq, n_sel, cmp_stride, cmp_block, sel_block, qk_scale, BLOCK_G, BLOCK_M, BLOCK_N, BLOCK_S,
                        HEAD_DIM, BLOCK_D, CAUSAL, PRECISION, SUM_FIRST, False, MAP_R, MAP_U)
        for c0 in range(n_full, n_vis, BLOCK_N):
            _pass2_tile(q, bias, k_base, imp_rows, pos, pos_m, c0, n_vis, stride_kn, stride_kd, stride_is,
                        Lq, n_sel, cmp_stride, cmp_block, sel_block, qk_scale, BLOCK_G, BLOCK_M, BLOCK_N, BLOCK_S,
                        HEAD_DIM, BLOCK_D, CAUSAL, PRECISION, SUM_FIRST, True, MAP_R, MAP_U)

    @triton.jit
    def _compressed_fwd(
        Q, KC, VC, O, IMP, ML,
        stride_qb, stride_qh, stride_qi, stride_qd,
        stride_kb, stride_kh, stride_kn, stride_kd,
        stride_vb, stride_vh, stride_vn, stride_vd,
        stride_ob, stride_oh, stride_oi, stride_od,
        stride_ib, stride_ih, stride_ii, stride_is,
        Hkv, Lq, Nc, n_sel, cmp_stride, cmp_block, sel_block, qk_scale,
        G: tl.constexpr, BLOCK_G: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
        BLOCK_S: tl.constexpr, HEAD_DIM: tl.constexpr, V_DIM: tl.constexpr,
        BLOCK_D: tl.constexpr, BLOCK_DV: tl.constexpr,
        CAUSAL: tl.constexpr, IMPORTANCE: tl.constexpr, PRECISION: tl.constexpr, SUM_FIRST: tl.constexpr,
        STATS: tl.constexpr, MAP_R: tl.constexpr, MAP_U: tl.constexpr,
    ):
        ROWS: tl.constexpr = BLOCK_M * BLOCK_G
        # Latest query blocks see the most compressed blocks: start them first.
        pid_m = tl.num_programs(0) - 1 - tl.program_id(0)
        pid_bh = tl.program_id(1)
        b = pid_bh // Hkv
        hk = pid_bh % Hkv

        # Row r is (query position r // BLOCK_G, head r % BLOCK_G of the group), so
        # the group sum below is a reshape and a sum over the middle axis.
        r = tl.arange(0, ROWS)
        pos = pid_m * BLOCK_M + r // BLOCK_G
        g = r % BLOCK_G
        row_ok = (g < G) & (pos < Lq)
        offs_d = tl.arange(0, BLOCK_D)
        offs_dv = tl.arange(0, BLOCK_DV)
        dv_ok = offs_dv < V_DIM

        q = tl.load(Q + b * stride_qb + (hk * G + g)[:, None] * stride_qh + pos[:, None] * stride_qi
                    + offs_d[None, :] * stride_qd, mask=row_ok[:, None] & (offs_d < HEAD_DIM)[None, :], other=0.0)
        k_base = KC + b * stride_kb + hk * stride_kh
        v_base = VC + b * stride_vb + hk * stride_vh
        # Blocks some row sees, and the whole tiles that every row sees (those need no mask).
        n_vis = _seen(tl.minimum(pid_m * BLOCK_M + BLOCK_M - 1, Lq - 1), Nc, cmp_stride, cmp_block, CAUSAL)
        n_full = (_seen(pid_m * BLOCK_M, Nc, cmp_stride, cmp_block, CAUSAL) // BLOCK_N) * BLOCK_N

        # pass 1: output, row max and row sum
        m_i = tl.full([ROWS], float("-inf"), tl.float32)
        l_i = tl.zeros([ROWS], tl.float32)
        acc = tl.zeros([ROWS, BLOCK_DV], tl.float32)
        for c0 in range(0, n_full, BLOCK_N):
            m_i, l_i, acc = _pass1_tile(q, k_base, v_base, c0, n_vis, pos, m_i, l_i, acc, stride_kn, stride_kd,
                                        stride_vn, stride_vd, cmp_stride, cmp_block, qk_scale, BLOCK_N, HEAD_DIM,
                                        V_DIM, BLOCK_D, BLOCK_DV, CAUSAL, PRECISION, False)
        for c0 in range(n_full, n_vis, BLOCK_N):
            m_i, l_i, acc = _pass1_tile(q, k_base, v_base, c0, n_vis, pos, m_i, l_i, acc, stride_kn, stride_kd,
                                        stride_vn, stride_vd, cmp_stride, cmp_block, qk_scale, BLOCK_N, HEAD_DIM,
                                        V_DIM, BLOCK_D, BLOCK_DV, CAUSAL, PRECISION, True)
        out = acc / tl.where(l_i > 0, l_i, 1.0)[:, None]  # no visible block: acc is 0, so is the row
        tl.store(O + b * stride_ob + (hk * G + g)[:, None] * stride_oh + pos[:, None] * stride_oi
                 + offs_dv[None, :] * stride_od, out.to(O.dtype.element_ty), mask=row_ok[:, None] & dv_ok[None, :])

        # Pass 2's weights are exp2(s - bias); +inf gives weight 0 to padded heads, rows past Lq and
        # rows that see no block, so they add nothing to the group sum.
        bias = tl.where(row_ok & (l_i > 0), m_i + tl.log2(tl.where(l_i > 0, l_i, 1.0)), float("inf"))
        if STATS:
            # For a second kernel that does pass 2 with its own tiles: (B * Hkv, Lq, BLOCK_G).
            tl.store(ML + (pid_bh * Lq + pos) * BLOCK_G + g, bias, mask=pos < Lq)
        if IMPORTANCE:
            _importance_pass(q, bias, pos, pid_m, k_base, IMP + b * stride_ib + hk * stride_ih,
                             stride_kn, stride_kd, stride_ii, stride_is,
                             Lq, n_full, n_vis, n_sel, cmp_stride, cmp_block, sel_block, qk_scale,
                             BLOCK_G, BLOCK_M, BLOCK_N, BLOCK_S, HEAD_DIM, BLOCK_D, CAUSAL, PRECISION, SUM_FIRST,
                             MAP_R, MAP_U)

    @triton.jit
    def _compressed_imp(
        Q, KC, IMP, ML,
        stride_qb, stride_qh, stride_qi, stride_qd,
        stride_kb, stride_kh, stride_kn, stride_kd,
        stride_ib, stride_ih, stride_ii, stride_is,
        Hkv, Lq, Nc, n_sel, cmp_stride, cmp_block, sel_block, qk_scale,
        G: tl.constexpr, BLOCK_G: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
        BLOCK_S: tl.constexpr, HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr,
        CAUSAL: tl.constexpr, PRECISION: tl.constexpr, SUM_FIRST: tl.constexpr,
        MAP_R: tl.constexpr, MAP_U: tl.constexpr, TRANS: tl.constexpr,
    ):
        """Pass 2 alone, from the per-row bias that _compressed_fwd stored (STATS). TRANS: the transposed
        tiles of _pass2_tile_t (needs MAP_R > 0 and BLOCK_M a multiple of 8)."""
        ROWS: tl.constexpr = BLOCK_M * BLOCK_G
        pid_m = tl.num_programs(0) - 1 - tl.program_id(0)
        pid_bh = tl.program_id(1)
        b = pid_bh // Hkv
        hk = pid_bh % Hkv
        r = tl.arange(0, ROWS)
        if TRANS:  # row r is (position // 8, head, position % 8): see _pass2_tile_t
            pos = pid_m * BLOCK_M + (r // (8 * BLOCK_G)) * 8 + r % 8
            g = (r // 8) % BLOCK_G
        else:
            pos = pid_m * BLOCK_M + r // BLOCK_G
            g = r % BLOCK_G
        row_ok = (g < G) & (pos < Lq)
        offs_d = tl.arange(0, BLOCK_D)
        q = tl.load(Q + b * stride_qb + (hk * G + g)[:, None] * stride_qh + pos[:, None] * stride_qi
                    + offs_d[None, :] * stride_qd, mask=row_ok[:, None] & (offs_d < HEAD_DIM)[None, :], other=0.0)
        bias = tl.load(ML + (pid_bh * Lq + pos) * BLOCK_G + g, mask=pos < Lq, other=float("inf"))
        n_vis = _seen(tl.minimum(pid_m * BLOCK_M + BLOCK_M - 1, Lq - 1), Nc, cmp_stride, cmp_block, CAUSAL)
        n_full = (_seen(pid_m * BLOCK_M, Nc, cmp_stride, cmp_block, CAUSAL) // BLOCK_N) * BLOCK_N
        k_base = KC + b * stride_kb + hk * stride_kh
        imp_base = IMP + b * stride_ib + hk * stride_ih
        if TRANS:
            q_t = tl.trans(q)
            pos_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
            for c0 in range(0, n_full, BLOCK_N):
                _pass2_tile_t(q_t, bias, k_base, imp_base, pos, pos_m, c0, n_vis, stride_kn, stride_kd, stride_ii,
                              stride_is, Lq, n_sel, cmp_stride, cmp_block, sel_block, qk_scale, BLOCK_G, BLOCK_M,
                              BLOCK_N, HEAD_DIM, BLOCK_D, CAUSAL, PRECISION, False, MAP_R, MAP_U)
            for c0 in range(n_full, n_vis, BLOCK_N):
                _pass2_tile_t(q_t, bias, k_base, imp_base, pos, pos_m, c0, n_vis, stride_kn, stride_kd, stride_ii,
                              stride_is, Lq, n_sel, cmp_stride, cmp_block, sel_block, qk_scale, BLOCK_G, BLOCK_M,
                              BLOCK_N, HEAD_DIM, BLOCK_D, CAUSAL, PRECISION, True, MAP_R, MAP_U)
        else:
            _importance_pass(q, bias, pos, pid_m, k_base, imp_base, stride_kn, stride_kd, stride_ii, stride_is,
                             Lq, n_full, n_vis, n_sel, cmp_stride, cmp_block, sel_block, qk_scale,
                             BLOCK_G, BLOCK_M, BLOCK_N, BLOCK_S, HEAD_DIM, BLOCK_D, CAUSAL, PRECISION, SUM_FIRST,
                             MAP_R, MAP_U)


def compressed_attention_triton(q, k_cmp, v_cmp, block_size, stride, *, causal=False, scale=None,
                                selection_block_size=None, num_keys=None, rows=None, block_n=None,
                                num_warps=None, num_stages=None, sum_first=None, split=None, rows2=None,
                                block_n2=None, num_warps2=None, num_stages2=None, reshape_map=None,
                                transpose2=None):
    """Queries attend to compressed keys, and (optionally) the group-summed selection-block importance.

    Args:
        q: (B, H, Lq, D); k_cmp: (B, Hkv, Nc, D); v_cmp: (B, Hkv, Nc, Dv): tensors of one
            dtype (float16 / bfloat16 / float32) on one device, H a multiple of Hkv.
        block_size, stride: compressed block c covers tokens [c * stride, c * stride + block_size).
        causal: query i sees compressed block c only once it has ended (c * stride + block_size - 1 <= i).
        scale: default 1/sqrt(D).
        selection_block_size, num_keys: when given, also return the importance of the
            ceil(num_keys / selection_block_size) selection blocks: the softmax weights summed over
            each KV group's query heads, shared out by overlap (``importance_to_selection_blocks``).
        rows, block_n, num_warps, num_stages, sum_first: launch tuning (``DEFAULTS``, ``DEFAULTS_FP32``
            for float32); sum_first sums the group's weights before mapping them onto selection blocks
            (when a program holds at least 16 query positions).
        split, rows2, block_n2, num_warps2, num_stages2: split=True runs the second pass (the importance)
            as a kernel of its own with these launch settings, from each row's max and sum stored by
            the first.
        reshape_map: map the weights onto selection blocks by weighted sums over a reshape where
            stride divides the selection block a power-of-two number of times (default), else by the
            mapping product. transpose2: the second kernel scores (compressed blocks, rows) instead of
            (rows, compressed blocks), where the reshape map applies and a program holds a multiple of 8
            query positions and at most 256 rows, so the group sum stays inside each thread. Results
            do not depend on any of these beyond rounding.

    Returns:
        out (B, H, Lq, Dv) in q's dtype, and importance (B, Hkv, Lq, Nsel) float32 (or None).
        A query that sees no compressed block gets a zero row in both.
    """
    require_triton("compressed_attention_triton")
    # k_cmp and v_cmp have the shapes of SDPA's k and v, with Nc compressed blocks for keys.
    B, H, Hkv, Lq, Nc, D, Dv = check_qkv(q, k_cmp, v_cmp)
    check_dtype(q.dtype, dispatch.KERNEL_DTYPES, "q, k_cmp, v_cmp")
    check_int(block_size, "block_size", minimum=1)
    check_int(stride, "stride", minimum=1)
    scale = resolve_scale(scale, D)
    want_imp = selection_block_size is not None
    if want_imp:
        check_int(selection_block_size, "selection_block_size", minimum=1)
        check_int(num_keys, "num_keys", minimum=0)
    base = DEFAULTS_FP32 if q.dtype == torch.float32 else DEFAULTS
    given = dict(rows=rows, block_n=block_n, num_warps=num_warps, num_stages=num_stages, sum_first=sum_first,
                 split=split, rows2=rows2, block_n2=block_n2, num_warps2=num_warps2, num_stages2=num_stages2,
                 reshape_map=reshape_map, transpose2=transpose2)
    cfg = {**base, **{k: v for k, v in given.items() if v is not None}}
    G = H // Hkv
    block_g = pow2(G, 1)

    def tiles(rows_, block_n_):
        block_m = max(1, rows_ // block_g)
        if block_m * block_g < 16:  # tl.dot needs at least 16 rows
            block_m = 16 // block_g
        block_n_ = max(16, block_n_)
        # Selection blocks one tile of block_n compressed blocks can touch (its tokens may straddle two more).
        block_s = pow2(((block_n_ - 1) * stride + block_size - 1) // selection_block_size + 2, 16) if want_imp else 16
        return block_m, block_n_, block_s

    block_m, block_n, block_s = tiles(cfg["rows"], cfg["block_n"])

    def map_shape(block_n_):
        """(MAP_R, MAP_U): compressed blocks starting in each selection block (a power of two, at most a
        tile's) and selection blocks one of them can reach; (0, 1) for the mapping product instead."""
        if not (want_imp and cfg.get("reshape_map", True) and selection_block_size % stride == 0):
            return 0, 1
        r = selection_block_size // stride
        if r & (r - 1) or r > block_n_:
            return 0, 1
        return r, -(-((r - 1) * stride + block_size) // selection_block_size)

    n_sel = math.ceil(num_keys / selection_block_size) if want_imp else 0

    out = torch.empty(B, H, Lq, Dv, dtype=q.dtype, device=q.device)
    imp = torch.zeros(B, Hkv, Lq, n_sel, dtype=torch.float32, device=q.device) if want_imp else None
    if out.numel() == 0 and (imp is None or imp.numel() == 0):
        return out, imp
    if Nc == 0:  # no whole block yet: nothing to see
        return out.zero_(), imp
    has_imp = bool(want_imp and n_sel > 0)
    split = has_imp and bool(cfg.get("split"))
    imp_arg = imp if has_imp else out  # a valid pointer the kernel never writes
    imp_strides = imp.stride() if has_imp else (0, 0, 0, 0)
    ml = torch.empty(B * Hkv, Lq, block_g, dtype=torch.float32, device=q.device) if split else out
    common = (Hkv, Lq, Nc, n_sel, stride, block_size, selection_block_size or 1, scale * LOG2E)
    _compressed_fwd[(triton.cdiv(Lq, block_m), B * Hkv)](
        q, k_cmp, v_cmp, out, imp_arg, ml,
        *q.stride(), *k_cmp.stride(), *v_cmp.stride(), *out.stride(), *imp_strides, *common,
        G=G, BLOCK_G=block_g, BLOCK_M=block_m, BLOCK_N=block_n, BLOCK_S=block_s,
        HEAD_DIM=D, V_DIM=Dv, BLOCK_D=pow2(D, 16), BLOCK_DV=pow2(Dv, 16),
        CAUSAL=bool(causal), IMPORTANCE=has_imp and not split, PRECISION=dot_precision(q.dtype),
        SUM_FIRST=bool(cfg["sum_first"]) and block_m >= 16, STATS=split,
        MAP_R=map_shape(block_n)[0], MAP_U=map_shape(block_n)[1],
        num_warps=cfg["num_warps"], num_stages=cfg["num_stages"],
    )
    if split:
        block_m2, block_n2, block_s2 = tiles(cfg.get("rows2") or cfg["rows"], cfg.get("block_n2") or cfg["block_n"])
        _compressed_imp[(triton.cdiv(Lq, block_m2), B * Hkv)](
            q, k_cmp, imp, ml, *q.stride(), *k_cmp.stride(), *imp.stride(), *common,
            G=G, BLOCK_G=block_g, BLOCK_M=block_m2, BLOCK_N=block_n2, BLOCK_S=block_s2,
            HEAD_DIM=D, BLOCK_D=pow2(D, 16), CAUSAL=bool(causal), PRECISION=dot_precision(q.dtype),
            SUM_FIRST=bool(cfg["sum_first"]) and block_m2 >= 16,
            MAP_R=map_shape(block_n2)[0], MAP_U=map_shape(block_n2)[1],
            TRANS=bool(cfg.get("transpose2")) and map_shape(block_n2)[0] > 0 and block_m2 % 8 == 0
            and block_m2 * block_g <= _TRANS_MAX_ROWS,
            num_warps=cfg.get("num_warps2") or cfg["num_warps"], num_stages=cfg.get("num_stages2") or cfg["num_stages"],
        )
    return out, imp
