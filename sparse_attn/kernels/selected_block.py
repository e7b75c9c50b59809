"""NSA's selected-block branch as one Triton kernel, shared across a KV group and a tile of queries.

Each query attends to the union of a few key blocks picked for it (plus the
causal mask). With grouped-query attention the query heads of one KV group
share their selected blocks, so a (G, D) tile of the group's heads loads each
selected K/V block once for all of them, and K/V traffic drops by G.

Its time goes into that traffic: each block is read from L2 once per query,
about 7.9 TB/s on an H200 (docs/benchmarks.md). To read the blocks neighbours
share only once, one program takes BLOCK_Q consecutive queries of one
(batch, index head) and splits their slots in two:

1. the leading slots in which every query of the tile holds the same block.
   NSA puts its forced blocks first (the initial block and the local ones, in
   ascending order), so queries inside one selection block share them; each is
   loaded once for the tile, as one (BLOCK_Q * G, D) x (D, block) product;
2. the rest, each query its own blocks, as a batched (BLOCK_Q, G, D) x
   (BLOCK_Q, D, BLOCK_NB) product over key steps of BLOCK_NB (unrolling the
   tile's queries into one-query loops measured 1.7x slower: docs/benchmarks.md).

With BLOCK_Q = 1 every slot is "shared" and the kernel is the one-query form.
The batched product is slower per block than the one-query one, so tiles pay
only where queries share blocks: on NSA's selection (the forced blocks, 3 of
16 slots) they measured 2% faster, on random indices 9% slower.
The grid is (query tile, batch x index head) with the head on the slow axis,
so the programs in flight together read one head's K/V prefix, which stays in
L2 for long sequences.

NSA's gated sum of its three branches can be taken in the store (``gated``):
the kernel reads the other two outputs and the gates and writes the sum, so
the selected output never makes a round trip through memory for a separate
pass (0.2-0.4 ms of 18 at L=65536: docs/benchmarks.md).

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

__all__ = ["selected_block_attention_triton", "triton_supports", "DEFAULTS"]


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
    def _gated(out, OC, OW, GT, b, head, pos, d, ok, row_ok,
               stride_cb, stride_ch, stride_ci, stride_cd, stride_wb, stride_wh, stride_wi, stride_wd,
               stride_gb, stride_gh, stride_gi, stride_gk):
        """NSA's gated sum in the store: g0 * compressed + g1 * out + g2 * sliding, in float32 (one rounding)."""
        g_ptr = GT + b * stride_gb + head * stride_gh + pos * stride_gi
        g0 = tl.load(g_ptr, mask=row_ok, other=0.0).to(tl.float32)
        g1 = tl.load(g_ptr + stride_gk, mask=row_ok, other=0.0).to(tl.float32)
        g2 = tl.load(g_ptr + 2 * stride_gk, mask=row_ok, other=0.0).to(tl.float32)
        c = tl.load(OC + b * stride_cb + head * stride_ch + pos * stride_ci + d * stride_cd, mask=ok, other=0.0)
        w = tl.load(OW + b * stride_wb + head * stride_wh + pos * stride_wi + d * stride_wd, mask=ok, other=0.0)
        return g0 * c.to(tl.float32) + g1 * out + g2 * w.to(tl.float32)

    @triton.jit
    def _selected_block_fwd(
        Q, K, V, IDX, O, OC, OW, GT,
        stride_qb, stride_qh, stride_qi, stride_qd,
        stride_kb, stride_kh, stride_kj, stride_kd,
        stride_vb, stride_vh, stride_vj, stride_vd,
        stride_ib, stride_ih, stride_ii, stride_is,
        stride_ob, stride_oh, stride_oi, stride_od,
        stride_cb, stride_ch, stride_ci, stride_cd,
        stride_wb, stride_wh, stride_wi, stride_wd,
        stride_gb, stride_gh, stride_gi, stride_gk,
        n_idx_heads, Lq, Lk, S, block_size, qk_scale,
        G: tl.constexpr,              # query heads that share one index row
        IDX_PER_KV: tl.constexpr,     # index heads per KV head (1 when shared by the group)
        HEAD_DIM: tl.constexpr, V_DIM: tl.constexpr,
        BLOCK_Q: tl.constexpr,        # consecutive queries per program
        BLOCK_G: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_DV: tl.constexpr,
        BLOCK_N: tl.constexpr,        # one selected block (padded to a power of two)
        BLOCK_NB: tl.constexpr,       # keys per step in the per-query loop (BLOCK_N / BLOCK_NB steps a block)
        BLOCK_S: tl.constexpr,        # slots, padded
        CAUSAL: tl.constexpr, PRECISION: tl.constexpr,
        GATED: tl.constexpr,          # write GT[..., 0] * OC + GT[..., 1] * out + GT[..., 2] * OW instead of out
    ):
        ROWS: tl.constexpr = BLOCK_Q * BLOCK_G
        STEPS: tl.constexpr = BLOCK_N // BLOCK_NB
        i0 = tl.program_id(0) * BLOCK_Q
        pid = tl.program_id(1)
        b = pid // n_idx_heads
        hi = pid % n_idx_heads
        hk = hi // IDX_PER_KV

        offs_j = tl.arange(0, BLOCK_Q)
        offs_g = tl.arange(0, BLOCK_G)
        offs_d = tl.arange(0, BLOCK_D)
        offs_dv = tl.arange(0, BLOCK_DV)
        offs_n = tl.arange(0, BLOCK_N)
        offs_s = tl.arange(0, BLOCK_S)
        pos_j = i0 + offs_j
        j_ok = pos_j < Lq
        g_ok = offs_g < G
        d_ok = offs_d < HEAD_DIM
        dv_ok = offs_dv < V_DIM
        k_base = K + b * stride_kb + hk * stride_kh
        v_base = V + b * stride_vb + hk * stride_vh
        idx_base = IDX + b * stride_ib + hi * stride_ih

        # Leading slots in which every query of the tile holds the same block: NSA's forced
        # blocks (the initial one and the local ones) come first in ascending order, so a tile
        # inside one selection block shares them. Those are loaded once for all BLOCK_Q queries.
        idx2 = tl.load(idx_base + pos_j[:, None] * stride_ii + offs_s[None, :] * stride_is,
                       mask=j_ok[:, None] & (offs_s < S)[None, :], other=-1)
        first = tl.sum(tl.where(offs_j[:, None] == 0, idx2, 0), 0)
        differs = tl.max(((idx2 != first[None, :]) & j_ok[:, None]).to(tl.int32), 0)
        n_shared = tl.min(tl.where((differs > 0) | (offs_s >= S), offs_s, BLOCK_S), 0)
        n_shared = tl.minimum(n_shared, S)

        # Shared slots: the tile's queries and heads as one (BLOCK_Q * BLOCK_G, D) tile.
        # Row r is (query r // BLOCK_G, head r % BLOCK_G), so the tile reshapes to (BLOCK_Q, BLOCK_G, ...).
        r = tl.arange(0, ROWS)
        pos_r = i0 + r // BLOCK_G
        g_r = r % BLOCK_G
        heads_r = hi * G + g_r
        rows_ok = (pos_r < Lq) & (g_r < G)
        q2 = tl.load(Q + b * stride_qb + heads_r[:, None] * stride_qh + pos_r[:, None] * stride_qi
                     + offs_d[None, :] * stride_qd, mask=rows_ok[:, None] & d_ok[None, :], other=0.0)
        m_i = tl.full([ROWS], float("-inf"), tl.float32)
        l_i = tl.zeros([ROWS], tl.float32)
        acc = tl.zeros([ROWS, BLOCK_DV], tl.float32)
        for s in range(0, n_shared):
            blk = tl.load(idx_base + i0 * stride_ii + s * stride_is)
            cols = blk * block_size + offs_n
            # An empty slot (-1) has every cols < 0, and under causal a block wholly in the future has
            # no cols <= i: the mask drops both, so the loop needs no branch (see the module docstring).
            ok = (offs_n < block_size) & (cols >= 0) & (cols < Lk)
            kt = tl.load(k_base + cols[None, :] * stride_kj + offs_d[:, None] * stride_kd,
                         mask=ok[None, :] & d_ok[:, None], other=0.0)
            scores = tl.dot(q2, kt, input_precision=PRECISION) * qk_scale
            ok2 = ok[None, :]
            if CAUSAL:
                ok2 = ok2 & (cols[None, :] <= pos_r[:, None])
            scores = tl.where(ok2, scores, float("-inf"))
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

        if BLOCK_Q == 1:
            out = acc / tl.where(l_i > 0, l_i, 1.0)[:, None]  # no allowed key: acc is 0, so is the row
            if GATED:
                out = _gated(out, OC, OW, GT, b, heads_r[:, None], pos_r[:, None], offs_dv[None, :],
                             rows_ok[:, None] & dv_ok[None, :], rows_ok[:, None],
                             stride_cb, stride_ch, stride_ci, stride_cd, stride_wb, stride_wh, stride_wi, stride_wd,
                             stride_gb, stride_gh, stride_gi, stride_gk)
            tl.store(O + b * stride_ob + heads_r[:, None] * stride_oh + pos_r[:, None] * stride_oi
                     + offs_dv[None, :] * stride_od, out.to(O.dtype.element_ty),
                     mask=rows_ok[:, None] & dv_ok[None, :])
        else:
            # The rest: each query its own blocks, as a batched (BLOCK_Q, BLOCK_G, .) product.
            m3 = tl.reshape(m_i, (BLOCK_Q, BLOCK_G))
            l3 = tl.reshape(l_i, (BLOCK_Q, BLOCK_G))
            acc3 = tl.reshape(acc, (BLOCK_Q, BLOCK_G, BLOCK_DV))
            heads3 = hi * G + offs_g
            q3 = tl.load(Q + b * stride_qb + heads3[None, :, None] * stride_qh + pos_j[:, None, None] * stride_qi
                         + offs_d[None, None, :] * stride_qd,
                         mask=j_ok[:, None, None] & g_ok[None, :, None] & d_ok[None, None, :], other=0.0)
            offs_nb = tl.arange(0, BLOCK_NB)
            for t in range(0, (S - n_shared) * STEPS):
                s = n_shared + t // STEPS
                part = (t % STEPS) * BLOCK_NB
                blk = tl.load(idx_base + pos_j * stride_ii + s * stride_is, mask=j_ok, other=-1)  # (BLOCK_Q,)
                within = part + offs_nb
                cols = blk[:, None] * block_size + within[None, :]  # (BLOCK_Q, BLOCK_NB)
                ok = (within < block_size)[None, :] & (blk >= 0)[:, None] & (cols < Lk)
                if CAUSAL:
                    ok = ok & (cols <= pos_j[:, None])
                kt = tl.load(k_base + cols[:, None, :] * stride_kj + offs_d[None, :, None] * stride_kd,
                             mask=ok[:, None, :] & d_ok[None, :, None], other=0.0)
                scores = tl.dot(q3, kt, input_precision=PRECISION) * qk_scale  # (BLOCK_Q, BLOCK_G, BLOCK_NB)
                scores = tl.where(ok[:, None, :], scores, float("-inf"))
                m_new = tl.maximum(m3, tl.max(scores, 2))
                m_safe = tl.where(m_new == float("-inf"), 0.0, m_new)
                alpha = tl.exp2(m3 - m_safe)
                p = tl.exp2(scores - m_safe[:, :, None])
                l3 = l3 * alpha + tl.sum(p, 2)
                vt = tl.load(v_base + cols[:, :, None] * stride_vj + offs_dv[None, None, :] * stride_vd,
                             mask=ok[:, :, None] & dv_ok[None, None, :], other=0.0)
                acc3 = acc3 * alpha[:, :, None] + tl.dot(p.to(vt.dtype), vt, input_precision=PRECISION)
                m3 = m_new
            out = acc3 / tl.where(l3 > 0, l3, 1.0)[:, :, None]  # no allowed key: acc is 0, so is the row
            if GATED:
                out = _gated(out, OC, OW, GT, b, heads3[None, :, None], pos_j[:, None, None],
                             offs_dv[None, None, :], j_ok[:, None, None] & g_ok[None, :, None] & dv_ok[None, None, :],
                             j_ok[:, None, None] & g_ok[None, :, None],
                             stride_cb, stride_ch, stride_ci, stride_cd, stride_wb, stride_wh, stride_wi, stride_wd,
                             stride_gb, stride_gh, stride_gi, stride_gk)
            tl.store(O + b * stride_ob + heads3[None, :, None] * stride_oh + pos_j[:, None, None] * stride_oi
                     + offs_dv[None, None, :] * stride_od, out.to(O.dtype.element_ty),
                     mask=j_ok[:, None, None] & g_ok[None, :, None] & dv_ok[None, None, :])


# Launch settings: the fastest over L=16384 and 65536 of those tried on an H200, on NSA's own selection
# (docs/benchmarks.md). float32 and head dims over 128 keep the one-query form (queries=1): their wider
# tiles were not measured, and four queries' tiles of them need more shared memory than an H200 has.
DEFAULTS = {"queries": 4, "block_nb": 32, "num_warps": 4, "num_stages": 2}


def selected_block_attention_triton(q, k, v, block_indices, block_size, *, causal=False, scale=None,
                                    queries=None, block_nb=None, num_warps=None, num_stages=None, gated=None):
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
        queries, block_nb, num_warps, num_stages: launch tuning (``DEFAULTS``): queries per
            program (a power of two), keys per step of the per-query loop; results do not
            depend on them.
        gated: None, or (out_cmp, out_slide, gates): NSA's other two branch outputs (B, H, Lq, Dv) in
            q's dtype and the gates (B, H, Lq, 3), any strides. The kernel then returns
            ``gates[..., 0] * out_cmp + gates[..., 1] * selected + gates[..., 2] * out_slide``, summed in
            float32 and rounded once, instead of the selected branch: the branch output never goes to
            memory and back for a separate pass.

    Returns:
        (B, H, Lq, Dv) in q's dtype. Rows with no allowed key are zeros (before the gated sum).
    """
    require_triton("selected_block_attention_triton")
    B, H, Hkv, Lq, Lk, D, Dv = check_qkv(q, k, v)
    check_int(block_size, "block_size", minimum=1)
    scale = resolve_scale(scale, D)
    check_dtype(q.dtype, dispatch.KERNEL_DTYPES)
    check_block_indices(block_indices, B, H, Hkv, Lq, device=q.device)  # values: the caller's contract
    base = dict(DEFAULTS)
    if q.dtype == torch.float32 or max(D, Dv) > 128:
        base["queries"] = 1
    cfg = {**base, **{key: val for key, val in (("queries", queries), ("block_nb", block_nb),
                                                 ("num_warps", num_warps), ("num_stages", num_stages))
                      if val is not None}}
    check_int(cfg["queries"], "queries", minimum=1)
    if cfg["queries"] & (cfg["queries"] - 1):
        raise ValueError(f"queries must be a power of two, got {cfg['queries']}")
    n_idx = block_indices.shape[1]
    S = block_indices.shape[3]
    out = torch.empty(B, H, Lq, Dv, dtype=q.dtype, device=q.device)
    if gated is not None:
        out_cmp, out_slide, gates = gated
        for name, t in (("out_cmp", out_cmp), ("out_slide", out_slide)):
            if tuple(t.shape) != (B, H, Lq, Dv) or t.dtype != q.dtype or t.device != q.device:
                raise ValueError(f"gated: {name} must be ({B}, {H}, {Lq}, {Dv}) {q.dtype} on {q.device}, "
                                 f"got {tuple(t.shape)} {t.dtype} on {t.device}")
        if tuple(gates.shape) != (B, H, Lq, 3) or gates.device != q.device:
            raise ValueError(f"gated: gates must be ({B}, {H}, {Lq}, 3) on {q.device}, got {tuple(gates.shape)}")
        gate_args = (out_cmp, out_slide, gates, *out_cmp.stride(), *out_slide.stride(), *gates.stride())
    else:
        gate_args = (out, out, out) + (0,) * 12  # valid pointers the kernel never reads
    if out.numel() == 0:
        return out
    G = H // n_idx
    block_q = min(cfg["queries"], pow2(Lq, 1))
    block_n = pow2(block_size, 16)
    block_nb = min(block_n, pow2(cfg["block_nb"], 16))
    grid = (triton.cdiv(Lq, block_q), B * n_idx)
    _selected_block_fwd[grid](
        q, k, v, block_indices, out, *gate_args[:3],
        *q.stride(), *k.stride(), *v.stride(), *block_indices.stride(), *out.stride(), *gate_args[3:],
        n_idx, Lq, Lk, S, block_size, scale * LOG2E,
        G=G, IDX_PER_KV=n_idx // Hkv, HEAD_DIM=D, V_DIM=Dv, BLOCK_Q=block_q,
        BLOCK_G=pow2(G, 16), BLOCK_D=pow2(D, 16), BLOCK_DV=pow2(Dv, 16), BLOCK_N=block_n, BLOCK_NB=block_nb,
        BLOCK_S=pow2(S, 1), CAUSAL=bool(causal), PRECISION=dot_precision(q.dtype), GATED=gated is not None,
        num_warps=cfg["num_warps"], num_stages=cfg["num_stages"],
    )
    return out
