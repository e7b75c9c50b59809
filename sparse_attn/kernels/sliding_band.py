"""The sliding window as one Triton kernel: a KV group's heads share each key tile of the band.

FlexAttention (``sliding_flex``) runs the window over 128 x 128 tiles of one
query head: with a window of 512, each tile of queries visits 5 key tiles
(640 keys for 512 useful), two of them cut by the mask, and every query head
reads its K/V tiles again. Here one program takes BLOCK_M consecutive
positions of one (batch, KV group) and stacks the group's G heads into one
(BLOCK_M * G, D) tile, as the compressed kernel does: each key tile is loaded
once for the whole group, and with 16 positions a program visits the band's
BLOCK_M + window - 1 keys rounded up to whole tiles (576 for 512 useful at
NSA's window). The tiles that every row of the program sees whole (all but
the first and the last at NSA's shapes) run without a mask.

Same contract as ``sparse_attn.ops.sliding_window_attention``: causal keys
i - window < j <= i, otherwise |i - j| < window; query i sits at position i;
grouped-query attention; a query with no key in reach gets zeros.
"""
from __future__ import annotations

import torch

from . import dispatch
from ._online import fold, load_kt
from ._triton import LOG2E, dot_precision, pow2, require_triton, tl, triton

__all__ = ["sliding_band_triton", "triton_supports", "DEFAULTS", "ENABLED"]

# Half types only (float32's IEEE dot products are slow: the window stays on chunked SDPA there).
_DTYPES = (torch.float16, torch.bfloat16)
# Launch settings: the compressed kernel's pass 1 (the same tile shapes); the fastest of four tried on an H200
# at L=16384 and 65536 (docs/benchmarks.md, run 23).
DEFAULTS = {"rows": 256, "block_n": 64, "num_warps": 8, "num_stages": 3}
# Groups of fewer heads put more positions in a program (rows / G), so each visits a wider band for the
# same useful work; only groups of 8 heads and more were measured against FlexAttention.
_MIN_GROUP = 8
# Off: the window goes to FlexAttention (a switch for timing the two in one process).
ENABLED = True


def triton_supports(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> bool:
    """True when ``sliding_window_attention`` should run this kernel for these inputs.

    The generic rule (``dispatch.use_triton``) for float16 / bfloat16, groups of at least
    ``_MIN_GROUP`` query heads per KV head, head dims up to 128 (shared memory), non-empty inputs.
    """
    return (ENABLED and dispatch.use_triton(q, k, v, dtypes=_DTYPES)
            and q.shape[1] // k.shape[1] >= _MIN_GROUP and max(q.shape[-1], v.shape[-1]) <= 128
            and q.shape[2] > 0 and k.shape[2] > 0)


if triton is not None:

    @triton.jit
    def _band_tile(
        q, k_base, v_base, n0, pos, m_i, l_i, acc, Lk, window, stride_kn, stride_kd, stride_vn, stride_vd, qk_scale,
        BLOCK_N: tl.constexpr, HEAD_DIM: tl.constexpr, V_DIM: tl.constexpr, BLOCK_D: tl.constexpr,
        BLOCK_DV: tl.constexpr, CAUSAL: tl.constexpr, PRECISION: tl.constexpr, MASK: tl.constexpr,
    ):
        """One key tile of the online softmax. MASK=False: every row sees every key of the tile."""
        cols = n0 + tl.arange(0, BLOCK_N)
        c_ok = (cols >= 0) & (cols < Lk)
        s = tl.dot(q, load_kt(k_base, cols, c_ok, stride_kn, stride_kd, HEAD_DIM, BLOCK_D, MASK),
                   input_precision=PRECISION) * qk_scale
        if MASK:
            ok = c_ok[None, :] & (cols[None, :] > pos[:, None] - window)
            if CAUSAL:
                ok = ok & (cols[None, :] <= pos[:, None])
            else:
                ok = ok & (cols[None, :] < pos[:, None] + window)
            s = tl.where(ok, s, float("-inf"))
        return fold(s, m_i, l_i, acc, v_base, cols, c_ok, stride_vn, stride_vd, V_DIM, BLOCK_DV, PRECISION, MASK)

    @triton.jit
    def _band_fwd(
        Q, K, V, O,
        stride_qb, stride_qh, stride_qi, stride_qd,
        stride_kb, stride_kh, stride_kn, stride_kd,
        stride_vb, stride_vh, stride_vn, stride_vd,
        stride_ob, stride_oh, stride_oi, stride_od,
        Hkv, Lq, Lk, window, qk_scale,
        G: tl.constexpr, BLOCK_G: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
        HEAD_DIM: tl.constexpr, V_DIM: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_DV: tl.constexpr,
        CAUSAL: tl.constexpr, PRECISION: tl.constexpr,
    ):
        ROWS: tl.constexpr = BLOCK_M * BLOCK_G
        pid_m = tl.program_id(0)
        pid_bh = tl.program_id(1)
        b = pid_bh // Hkv
        hk = pid_bh % Hkv
        # Row r is (position r // BLOCK_G, head r % BLOCK_G of the group).
        r = tl.arange(0, ROWS)
        pos = pid_m * BLOCK_M + r // BLOCK_G
        g = r % BLOCK_G
        row_ok = (g < G) & (pos < Lq)
        offs_d = tl.arange(0, BLOCK_D)
        offs_dv = tl.arange(0, BLOCK_DV)
        q = tl.load(Q + b * stride_qb + (hk * G + g)[:, None] * stride_qh + pos[:, None] * stride_qi
                    + offs_d[None, :] * stride_qd, mask=row_ok[:, None] & (offs_d < HEAD_DIM)[None, :], other=0.0)
        k_base = K + b * stride_kb + hk * stride_kh
        v_base = V + b * stride_vb + hk * stride_vh

        # The program's band: keys some row sees [lo, hi), and those every row sees [full_lo, full_hi).
        p_first = pid_m * BLOCK_M
        p_last = tl.minimum(p_first + BLOCK_M, Lq) - 1
        lo = tl.maximum(p_first - window + 1, 0)
        full_lo = tl.maximum(p_last - window + 1, 0)
        if CAUSAL:
            hi = tl.minimum(p_last + 1, Lk)
            full_hi = tl.minimum(p_first + 1, Lk)
        else:
            hi = tl.minimum(p_last + window, Lk)
            full_hi = tl.minimum(p_first + window, Lk)
        # Tiles from lo: the masked ones before the first whole tile, the whole ones, the masked rest.
        n_tiles = tl.cdiv(tl.maximum(hi - lo, 0), BLOCK_N)
        t_front = tl.minimum(tl.cdiv(full_lo - lo, BLOCK_N), n_tiles)
        t_back = tl.maximum(t_front, tl.minimum((full_hi - lo) // BLOCK_N, n_tiles))

        m_i = tl.full([ROWS], float("-inf"), tl.float32)
        l_i = tl.zeros([ROWS], tl.float32)
        acc = tl.zeros([ROWS, BLOCK_DV], tl.float32)
        for t in range(0, t_front):
            m_i, l_i, acc = _band_tile(q, k_base, v_base, lo + t * BLOCK_N, pos, m_i, l_i, acc, Lk, window,
                                       stride_kn, stride_kd, stride_vn, stride_vd, qk_scale, BLOCK_N, HEAD_DIM,
                                       V_DIM, BLOCK_D, BLOCK_DV, CAUSAL, PRECISION, True)
        for t in range(t_front, t_back):
            m_i, l_i, acc = _band_tile(q, k_base, v_base, lo + t * BLOCK_N, pos, m_i, l_i, acc, Lk, window,
                                       stride_kn, stride_kd, stride_vn, stride_vd, qk_scale, BLOCK_N, HEAD_DIM,
                                       V_DIM, BLOCK_D, BLOCK_DV, CAUSAL, PRECISION, False)
        for t in range(t_back, n_tiles):
            m_i, l_i, acc = _band_tile(q, k_base, v_base, lo + t * BLOCK_N, pos, m_i, l_i, acc, Lk, window,
                                       stride_kn, stride_kd, stride_vn, stride_vd, qk_scale, BLOCK_N, HEAD_DIM,
                                       V_DIM, BLOCK_D, BLOCK_DV, CAUSAL, PRECISION, True)
        out = acc / tl.where(l_i > 0, l_i, 1.0)[:, None]  # no key in reach: acc is 0, so is the row
        tl.store(O + b * stride_ob + (hk * G + g)[:, None] * stride_oh + pos[:, None] * stride_oi
                 + offs_dv[None, :] * stride_od, out.to(O.dtype.element_ty),
                 mask=row_ok[:, None] & (offs_dv < V_DIM)[None, :])


def sliding_band_triton(q, k, v, sliding_window_size: int, *, causal: bool, scale: float, rows=None, block_n=None,
                        num_warps=None, num_stages=None):
    """Sliding-window attention in one kernel; the same result as the chunked-SDPA reference.

    q (B, H, Lq, D), k (B, Hkv, Lk, D), v (B, Hkv, Lk, Dv): checked by the caller
    (``sliding_window_attention``), one dtype on one CUDA device (float16 / bfloat16 / float32).
    rows, block_n, num_warps, num_stages: launch tuning (``DEFAULTS``): rows = positions x padded
    group heads per program, keys per tile. Returns (B, H, Lq, Dv) in q's dtype.
    """
    require_triton("sliding_band_triton")
    B, H, Lq, D = q.shape
    Hkv, Lk, Dv = k.shape[1], k.shape[2], v.shape[-1]
    cfg = {**DEFAULTS, **{key: val for key, val in (("rows", rows), ("block_n", block_n), ("num_warps", num_warps),
                                                     ("num_stages", num_stages)) if val is not None}}
    out = torch.empty(B, H, Lq, Dv, dtype=q.dtype, device=q.device)
    if out.numel() == 0:
        return out
    G = H // Hkv
    block_g = pow2(G, 1)
    block_m = max(1, cfg["rows"] // block_g)
    if block_m * block_g < 16:  # tl.dot needs at least 16 rows
        block_m = 16 // block_g
    _band_fwd[(triton.cdiv(Lq, block_m), B * Hkv)](
        q, k, v, out, *q.stride(), *k.stride(), *v.stride(), *out.stride(),
        Hkv, Lq, Lk, int(sliding_window_size), scale * LOG2E,
        G=G, BLOCK_G=block_g, BLOCK_M=block_m, BLOCK_N=max(16, cfg["block_n"]),
        HEAD_DIM=D, V_DIM=Dv, BLOCK_D=pow2(D, 16), BLOCK_DV=pow2(Dv, 16),
        CAUSAL=bool(causal), PRECISION=dot_precision(q.dtype),
        num_warps=cfg["num_warps"], num_stages=cfg["num_stages"],
    )
    return out
