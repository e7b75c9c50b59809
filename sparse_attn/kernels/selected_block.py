"""NSA's selected-block branch as one Triton kernel, shared across a KV group.

Each query attends to the union of a few key blocks picked for it (plus the
causal mask). With grouped-query attention the query heads of one KV group
share their selected blocks, so one program handles one (query position, KV
group): it stacks the group's G query heads into a (G, D) tile, and loads each
selected K/V block once for all of them. The scores are then a (G, block)
matrix product instead of G vector products, and K/V traffic drops by G.

The grid is (query position, batch x index head) with the head on the slow
axis, so the programs in flight together read one head's K/V prefix, which
stays in L2 for long sequences.

Empty slots and blocks wholly in the future are masked, not skipped: masked
loads fetch nothing, and a body without a branch lets Triton software-pipeline
the loads, which is faster (see docs/benchmarks.md).

Contract (same as ``sparse_attn.ops.nsa.selected_block_attention``):
    q (B, H, Lq, D), k (B, Hkv, Lk, D), v (B, Hkv, Lk, Dv);
    block_indices int64 (B, Hkv, Lq, S) shared by a group, or (B, H, Lq, S)
    per query head; entries are block numbers in [0, ceil(Lk / block_size)),
    -1 for an empty slot, distinct per row. One softmax over the union of the
    selected blocks' keys (the last block may be partial); causal=True also
    masks keys j > i; a row with no allowed key gives zeros.
"""
from __future__ import annotations

import torch

from .._checks import check_block_indices, check_int, check_qkv, resolve_scale
from . import dispatch
from ._triton import LOG2E, check_dtype, dot_precision, pow2, require_triton, tl, triton

__all__ = ["selected_block_attention_triton", "triton_supports"]


def triton_supports(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, block_indices: torch.Tensor) -> bool:
    """True when the kernel may replace ``selected_block_attention`` for these inputs.

    The generic rule (``dispatch.use_triton``), and the kernel's own: int64
    block indices on q's device.
    """
    return (
        dispatch.use_triton(q, k, v)
        and block_indices.dtype == torch.int64
        and block_indices.device == q.device
    )


if triton is not None:

    @triton.jit
    def _selected_block_fwd(
        Q, K, V, IDX, O,
        stride_qb, stride_qh, stride_qi, stride_qd,
        stride_kb, stride_kh, stride_kj, stride_kd,
        stride_vb, stride_vh, stride_vj, stride_vd,
        stride_ib, stride_ih, stride_ii, stride_is,
        stride_ob, stride_oh, stride_oi, stride_od,
        n_idx_heads, Lk, S, block_size, qk_scale,
        G: tl.constexpr,              # query heads that share one index row
        IDX_PER_KV: tl.constexpr,     # index heads per KV head (1 when shared by the group)
        HEAD_DIM: tl.constexpr, V_DIM: tl.constexpr,
        BLOCK_G: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_DV: tl.constexpr, BLOCK_N: tl.constexpr,
        CAUSAL: tl.constexpr, PRECISION: tl.constexpr,
    ):
        i = tl.program_id(0)
        pid = tl.program_id(1)
        b = pid // n_idx_heads
        hi = pid % n_idx_heads
        hk = hi // IDX_PER_KV

        offs_g = tl.arange(0, BLOCK_G)
        offs_d = tl.arange(0, BLOCK_D)
        offs_dv = tl.arange(0, BLOCK_DV)
        offs_n = tl.arange(0, BLOCK_N)
        heads = hi * G + offs_g
        g_ok = offs_g < G
        d_ok = offs_d < HEAD_DIM
        dv_ok = offs_dv < V_DIM

        q = tl.load(Q + b * stride_qb + heads[:, None] * stride_qh + i * stride_qi + offs_d[None, :] * stride_qd,
                    mask=g_ok[:, None] & d_ok[None, :], other=0.0)
        k_base = K + b * stride_kb + hk * stride_kh
        v_base = V + b * stride_vb + hk * stride_vh
        idx_row = IDX + b * stride_ib + hi * stride_ih + i * stride_ii

        m_i = tl.full([BLOCK_G], float("-inf"), tl.float32)
        l_i = tl.zeros([BLOCK_G], tl.float32)
        acc = tl.zeros([BLOCK_G, BLOCK_DV], tl.float32)
        for s in range(S):
            blk = tl.load(idx_row + s * stride_is)
            cols = blk * block_size + offs_n
            # An empty slot (-1) has every cols < 0, and under causal a block wholly
            # in the future has no cols <= i: the mask drops both, so the loop
            # needs no branch (see the module docstring).
            ok = (offs_n < block_size) & (cols >= 0) & (cols < Lk)
            if CAUSAL:
                ok = ok & (cols <= i)
            kt = tl.load(k_base + cols[None, :] * stride_kj + offs_d[:, None] * stride_kd,
                         mask=ok[None, :] & d_ok[:, None], other=0.0)
            scores = tl.dot(q, kt, input_precision=PRECISION) * qk_scale
            scores = tl.where(ok[None, :], scores, float("-inf"))
            m_new = tl.maximum(m_i, tl.max(scores, 1))
            # A row that has seen no allowed key keeps m = -inf; shift by 0
            # there so exp2 gives 0 rather than NaN (-inf - -inf).
            m_safe = tl.where(m_new == float("-inf"), 0.0, m_new)
            alpha = tl.exp2(m_i - m_safe)
            p = tl.exp2(scores - m_safe[:, None])
            l_i = l_i * alpha + tl.sum(p, 1)
            vt = tl.load(v_base + cols[:, None] * stride_vj + offs_dv[None, :] * stride_vd,
                         mask=ok[:, None] & dv_ok[None, :], other=0.0)
            acc = acc * alpha[:, None] + tl.dot(p.to(vt.dtype), vt, input_precision=PRECISION)
            m_i = m_new
        out = acc / tl.where(l_i > 0, l_i, 1.0)[:, None]  # no allowed key: acc is 0, so is the row
        tl.store(O + b * stride_ob + heads[:, None] * stride_oh + i * stride_oi + offs_dv[None, :] * stride_od,
                 out.to(O.dtype.element_ty), mask=g_ok[:, None] & dv_ok[None, :])


def selected_block_attention_triton(q, k, v, block_indices, block_size, *, causal=False, scale=None,
                                    num_warps: int = 4, num_stages: int = 2):
    """The selected-block branch on the GPU; same contract and result as the PyTorch reference.

    Args:
        q (B, H, Lq, D), k (B, Hkv, Lk, D), v (B, Hkv, Lk, Dv): CUDA tensors of one
            dtype, float16 / bfloat16 / float32 (float32 dots run in full IEEE precision).
        block_indices: int64 (B, Hkv, Lq, S) shared by each KV group (the fast
            path: a block is loaded once for the G = H / Hkv heads), or
            (B, H, Lq, S) per query head. -1 marks an empty slot.
        block_size: keys per block (>= 1); any size works, powers of two >= 16 waste nothing.
        causal: SDPA's is_causal (query i sees keys 0..i).
        scale: default 1/sqrt(D).
        num_warps, num_stages: launch tuning; results do not depend on them. The
            defaults were the fastest settings tried on an H200 (see docs/benchmarks.md).

    Returns:
        (B, H, Lq, Dv) in q's dtype. Rows with no allowed key are zeros.
    """
    require_triton("selected_block_attention_triton")
    B, H, Hkv, Lq, Lk, D, Dv = check_qkv(q, k, v)
    check_int(block_size, "block_size", minimum=1)
    scale = resolve_scale(scale, D)
    check_dtype(q.dtype, dispatch.KERNEL_DTYPES)
    check_block_indices(block_indices, B, H, Hkv, Lq, device=q.device)  # values: the caller's contract
    n_idx = block_indices.shape[1]
    S = block_indices.shape[3]
    out = torch.empty(B, H, Lq, Dv, dtype=q.dtype, device=q.device)
    if out.numel() == 0:
        return out
    G = H // n_idx
    grid = (Lq, B * n_idx)
    _selected_block_fwd[grid](
        q, k, v, block_indices, out,
        *q.stride(), *k.stride(), *v.stride(), *block_indices.stride(), *out.stride(),
        n_idx, Lk, S, block_size, scale * LOG2E,
        G=G, IDX_PER_KV=n_idx // Hkv, HEAD_DIM=D, V_DIM=Dv,
        BLOCK_G=pow2(G, 16), BLOCK_D=pow2(D, 16), BLOCK_DV=pow2(Dv, 16), BLOCK_N=pow2(block_size, 16),
        CAUSAL=bool(causal), PRECISION=dot_precision(q.dtype),
        num_warps=num_warps, num_stages=num_stages,
    )
    return out
