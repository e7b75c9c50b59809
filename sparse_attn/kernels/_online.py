"""The online softmax's two halves for one key tile, shared by the kernels that stream over keys.

A tile function loads K transposed (``load_kt``), scores it and masks what its rows may not see (each
kernel's own rule: compressed blocks that end after the query, keys outside the window), then folds the
tile into the running max, sum and output (``fold``). With ``MASK`` False, every row sees every key of
the tile: no bounds check on the loads and no shift guard, the fast path for whole tiles. Triton inlines
these calls, so a kernel compiles as if they were written out in it.
"""
from __future__ import annotations

from ._triton import tl, triton

__all__ = ["fold", "load_kt"]

if triton is not None:

    @triton.jit
    def load_kt(k_base, cols, c_ok, stride_kn, stride_kd,
                HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr, MASK: tl.constexpr):
        """K's tile transposed, (BLOCK_D, BLOCK_N); columns outside ``c_ok`` read as 0 when MASK."""
        offs_d = tl.arange(0, BLOCK_D)
        if MASK:
            return tl.load(k_base + cols[None, :] * stride_kn + offs_d[:, None] * stride_kd,
                           mask=c_ok[None, :] & (offs_d < HEAD_DIM)[:, None], other=0.0)
        return tl.load(k_base + cols[None, :] * stride_kn + offs_d[:, None] * stride_kd,
                       mask=(offs_d < HEAD_DIM)[:, None], other=0.0)

    @triton.jit
    def fold(s, m_i, l_i, acc, v_base, cols, c_ok, stride_vn, stride_vd,
             V_DIM: tl.constexpr, BLOCK_DV: tl.constexpr, PRECISION: tl.constexpr, MASK: tl.constexpr):
        """(m, l, acc) after one tile of log2-scaled scores ``s`` (masked entries -inf) and its V rows."""
        offs_dv = tl.arange(0, BLOCK_DV)
        m_new = tl.maximum(m_i, tl.max(s, 1))
        if MASK:
            # A row that has seen no key yet keeps m = -inf: shift by 0 there (no -inf - -inf).
            m_safe = tl.where(m_new == float("-inf"), 0.0, m_new)
        else:
            m_safe = m_new  # every score of the tile is finite
        alpha = tl.exp2(m_i - m_safe)
        p = tl.exp2(s - m_safe[:, None])
        l_i = l_i * alpha + tl.sum(p, 1)
        if MASK:
            vt = tl.load(v_base + cols[:, None] * stride_vn + offs_dv[None, :] * stride_vd,
                         mask=c_ok[:, None] & (offs_dv < V_DIM)[None, :], other=0.0)
        else:
            vt = tl.load(v_base + cols[:, None] * stride_vn + offs_dv[None, :] * stride_vd,
                         mask=(offs_dv < V_DIM)[None, :], other=0.0)
        acc = acc * alpha[:, None] + tl.dot(p.to(vt.dtype), vt, input_precision=PRECISION)
        return m_new, l_i, acc
