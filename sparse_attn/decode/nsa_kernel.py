"""An NSA decode step in five Triton launches: compressed attention, selection, selected blocks, window, gating.

The PyTorch step (``nsa._compressed`` and the rest) spends most of its time
outside the bytes it must read: at B=32, 64k it runs about 60 kernels, of
which the elementwise passes over the (B, Hkv, G, Nc) compressed scores
(softmax, casts, the mask, the group sum) and the selection's dozen small
launches cost more than the two products that read the compressed cache.
Here:

1. the compressed rows go through the rows kernel's range source (split-K,
   online softmax), which also writes the scores (in q's dtype, as the
   PyTorch form rounds them) for step 2;
2. ``_nsa_select``, one program per (sequence, KV head, query): the heads'
   softmax maximum and denominator from the pieces of step 1, the group sum
   of the normalised weights per compressed block, the importance of each
   selection block by token overlap, the forced and eligible blocks, and
   the ranking (``topk_kernel``'s keys and threshold search, in registers);
3. and 4. the picked blocks (the rows kernel's unit source, no token list)
   and the window (its range source);
5. ``_nsa_combine``: the three branches' pieces merged and gated in one pass.

The per-head compressed weights (B, H, T, Nc), which only a picture needs,
are made from the stored scores when first read (``DecodeResult.extras``).
"""
from __future__ import annotations

import torch
from einops import rearrange

from ..kernels._triton import LOG2E, pow2, tl, triton
from .rows_kernel import Partials, merge_pieces, range_attention, units_attention
from .topk_kernel import MAX_K, MAX_ROW, num_warps_for, rank_keys, store_top

__all__ = ["nsa_step_triton", "MAX_BLOCKS", "MAX_SELECTED"]

MAX_BLOCKS = MAX_ROW  # selection blocks one program ranks
MAX_SELECTED = MAX_K
_CHUNK = 256  # compressed blocks per step of the selection's group sum


if triton is not None:

    @triton.jit
    def _nsa_select(
        SC, PM, PL, PG, IMP, BLK, SCR,
        T, Nc, nb, S, limit0, cmp_block, cmp_stride, sel, n_initial, n_local,
        G: tl.constexpr, BLOCK_G: tl.constexpr, SPLITS: tl.constexpr, BLOCK_S: tl.constexpr,
        BLOCK_C: tl.constexpr, BLOCK_B: tl.constexpr, WIDTH: tl.constexpr, BLOCK_K: tl.constexpr,
        LOG_B: tl.constexpr,
    ):
        row = tl.program_id(0)  # (b, KV head, t), t fastest
        row64 = row.to(tl.int64)
        t = row % T
        pos = limit0 - 1 + t
        offs_g = tl.arange(0, BLOCK_G)
        offs_s = tl.arange(0, BLOCK_S)
        g_ok = offs_g < G
        # Each head's softmax maximum (log2 units) and denominator, from the compressed pieces.
        piece = (row * SPLITS + offs_s[:, None]) * BLOCK_G + offs_g[None, :]
        s_ok = offs_s < SPLITS
        m = tl.load(PM + piece, mask=s_ok[:, None], other=float("-inf"))
        l = tl.load(PL + piece, mask=s_ok[:, None], other=0.0)
        m_max = tl.max(m, 0)
        m_safe = tl.where(m_max == float("-inf"), 0.0, m_max)
        total = tl.sum(tl.exp2(m - m_safe[None, :]) * l, 0)
        inv = tl.where(g_ok & (total > 0), 1.0 / tl.where(total > 0, total, 1.0), 0.0)

        # The group's summed weights per compressed block, into a row of scratch (read back, gathered, below).
        for c0 in range(0, Nc, BLOCK_C):
            offs_c = c0 + tl.arange(0, BLOCK_C)
            c_ok = offs_c < Nc
            s = tl.load(SC + (row64 * G + offs_g[:, None]) * Nc + offs_c[None, :],
                        mask=g_ok[:, None] & c_ok[None, :], other=float("-inf")).to(tl.float32)
            p = tl.exp2(s * 1.4426950408889634 - m_safe[:, None]) * inv[:, None]
            tl.store(PG + row64 * Nc + offs_c, tl.sum(p, 0), mask=c_ok)
        tl.debug_barrier()  # the whole row is written before any thread gathers from it

        # Importance of selection block b: the compressed blocks it overlaps, weighted by overlap / block size
        # (selection_importance's map, computed here rather than read).
        offs_b = tl.arange(0, BLOCK_B)
        offs_w = tl.arange(0, WIDTH)
        b_ok = offs_b < nb
        num = offs_b * sel - cmp_block
        c_lo = tl.where(num >= 0, num // cmp_stride + 1, 0)
        c_hi = tl.minimum(((offs_b + 1) * sel - 1) // cmp_stride, Nc - 1)
        c = c_lo[:, None] + offs_w[None, :]
        start = c * cmp_stride
        overlap = (tl.minimum(start + cmp_block, (offs_b[:, None] + 1) * sel)
                   - tl.maximum(start, offs_b[:, None] * sel))
        # overlap / block size in float64, then float32: the parallel map's entries exactly.
        w = (tl.maximum(overlap, 0).to(tl.float64) / cmp_block).to(tl.float32)
        w = tl.where(c > c_hi[:, None], 0.0, w)
        pg = tl.load(PG + row64 * Nc + tl.minimum(c, Nc - 1), mask=b_ok[:, None], other=0.0)
        imp = tl.sum(pg * w, 1)
        tl.store(IMP + row64 * nb + offs_b, imp, mask=b_ok)

        # select_blocks' rule: forced blocks first, then eligible ones by importance, the lower block on ties.
        starts_before = offs_b * sel <= pos
        own = pos // sel
        forced = ((offs_b < n_initial) & starts_before) | ((offs_b <= own) & (offs_b > own - n_local))
        key = tl.where((imp > 0) & starts_before, imp, float("-inf"))
        key = tl.where(forced, float("inf"), key)
        store_top(rank_keys(key, offs_b, nb, b_ok), nb, S, SCR + row64 * S, BLK + row64 * S, BLOCK_K, LOG_B, True)

    @triton.jit
    def _nsa_combine(
        POC, PMC, PLC, POS, PMS, PLS, POW, PMW, PLW, GATES, O,
        stride_gb, stride_gh, stride_gt, stride_gk,
        stride_ob, stride_oh, stride_ot, stride_od,
        Hkv, T,
        G: tl.constexpr, V_DIM: tl.constexpr, BLOCK_G: tl.constexpr, BLOCK_DV: tl.constexpr,
        SPLITS_C: tl.constexpr, BLOCK_SC: tl.constexpr, SPLITS_S: tl.constexpr, BLOCK_SS: tl.constexpr,
        SPLITS_W: tl.constexpr, BLOCK_SW: tl.constexpr,
    ):
        row = tl.program_id(0)
        t = row % T
        hk = (row // T) % Hkv
        b = row // (T * Hkv)
        offs_g = tl.arange(0, BLOCK_G)
        offs_dv = tl.arange(0, BLOCK_DV)
        g_ok = offs_g < G
        heads = hk * G + offs_g
        dt = O.dtype.element_ty
        # Each branch rounded to the output dtype before gating, as the PyTorch form's branches are.
        cmp = merge_pieces(POC, PMC, PLC, row, SPLITS_C, BLOCK_SC, BLOCK_G, BLOCK_DV).to(dt).to(tl.float32)
        sel = merge_pieces(POS, PMS, PLS, row, SPLITS_S, BLOCK_SS, BLOCK_G, BLOCK_DV).to(dt).to(tl.float32)
        win = merge_pieces(POW, PMW, PLW, row, SPLITS_W, BLOCK_SW, BLOCK_G, BLOCK_DV).to(dt).to(tl.float32)
        gate = GATES + b * stride_gb + heads * stride_gh + t * stride_gt
        g0 = tl.load(gate, mask=g_ok, other=0.0).to(tl.float32)
        g1 = tl.load(gate + stride_gk, mask=g_ok, other=0.0).to(tl.float32)
        g2 = tl.load(gate + 2 * stride_gk, mask=g_ok, other=0.0).to(tl.float32)
        out = g0[:, None] * cmp + g1[:, None] * sel + g2[:, None] * win
        tl.store(O + b * stride_ob + heads[:, None] * stride_oh + t * stride_ot + offs_dv[None, :] * stride_od,
                 out.to(dt), mask=g_ok[:, None] & (offs_dv < V_DIM)[None, :])


def _head_stats(parts: Partials, rows: int, G: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(max in log2 units, denominator) per (row, head) from the pieces: what the combine computes."""
    m = parts.pm.view(rows, parts.splits, parts.block_g)[..., :G]
    l = parts.pl.view(rows, parts.splits, parts.block_g)[..., :G]
    m_max = m.amax(1)
    m_safe = torch.where(torch.isneginf(m_max), torch.zeros_like(m_max), m_max)
    total = (torch.exp2(m - m_safe.unsqueeze(1)) * l).sum(1)
    return m_safe, total


def nsa_step_triton(q, cache, g, *, scale: float, window: int, sel: int, num_selected: int, num_initial: int,
                    num_local: int, select_warps: int | None = None):
    """(out (B, H, T, Dv), blocks (B, Hkv, T, S), importance (B, Hkv, T, nb), a call for the compressed weights).

    ``g``: gates (B, H, T, 3), any strides. The caller has checked the
    options and that the cache holds at least one compressed block.
    """
    B, H, T, D = q.shape
    Hkv, L, Dv = cache.num_kv_heads, cache.length, cache.value_dim
    G = H // Hkv
    Nc, bs, stride = cache.num_compressed, cache.compress_block_size, cache.compress_block_sliding_stride
    half = q.dtype in (torch.float16, torch.bfloat16)
    rows = B * Hkv * T

    scores = torch.empty(B, Hkv, T, G, Nc, dtype=q.dtype, device=q.device)
    cmp = range_attention(q, cache._ck, cache._cv, L, scale, window=None, slots=Nc, compressed=(bs, stride),
                          scores=scores, round_scores=half, partials=True)

    nb = -(-L // sel)
    S = min(num_selected, nb)
    pg = torch.empty(rows, Nc, dtype=torch.float32, device=q.device)
    importance = torch.empty(B, Hkv, T, nb, dtype=torch.float32, device=q.device)
    blocks = torch.empty(B, Hkv, T, S, dtype=torch.int64, device=q.device)
    scratch = torch.empty(rows, S, dtype=torch.int64, device=q.device)
    block_b = pow2(nb, 16)
    _nsa_select[(rows,)](
        scores, cmp.pm, cmp.pl, pg, importance, blocks, scratch,
        T, Nc, nb, S, L - T + 1, bs, stride, sel, num_initial, num_local,
        G=G, BLOCK_G=cmp.block_g, SPLITS=cmp.splits, BLOCK_S=pow2(cmp.splits, 2), BLOCK_C=_CHUNK,
        BLOCK_B=block_b, WIDTH=pow2((sel + bs) // stride + 2, 1), BLOCK_K=pow2(S, 16), LOG_B=block_b.bit_length() - 1,
        num_warps=select_warps or num_warps_for(rows, q.device),
    )

    picked = units_attention(q, cache.k, cache.v, blocks, sel, L, scale, partials=True)
    lo = max(0, L - T - window + 1)
    slide = range_attention(q, cache.k, cache.v, L, scale, window=window, first=lo, slots=L - lo, partials=True)

    out = torch.empty(B, H, T, Dv, dtype=q.dtype, device=q.device)
    _nsa_combine[(rows,)](
        cmp.po, cmp.pm, cmp.pl, picked.po, picked.pm, picked.pl, slide.po, slide.pm, slide.pl, g, out,
        *g.stride(), *out.stride(), Hkv, T,
        G=G, V_DIM=Dv, BLOCK_G=cmp.block_g, BLOCK_DV=cmp.block_dv,
        SPLITS_C=cmp.splits, BLOCK_SC=pow2(cmp.splits, 2), SPLITS_S=picked.splits, BLOCK_SS=pow2(picked.splits, 2),
        SPLITS_W=slide.splits, BLOCK_SW=pow2(slide.splits, 2), num_warps=4,
    )

    def compressed_weights() -> torch.Tensor:
        m, total = _head_stats(cmp, rows, G)  # (rows, G)
        m = m.view(B, Hkv, T, G, 1)
        inv = torch.where(total > 0, 1.0 / torch.where(total > 0, total, torch.ones_like(total)),
                          torch.zeros_like(total)).view(B, Hkv, T, G, 1)
        p = torch.exp2(scores.float() * LOG2E - m) * inv
        return rearrange(p, "b hk t g n -> b (hk g) t n")

    return out, blocks, importance, compressed_weights
