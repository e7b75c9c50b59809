"""Decode attention over picked cache rows as one split-K Triton kernel: the rows are read once, in place.

A decode step's few queries attend to a few thousand rows that a selection
picked (NSA's blocks, Quest's pages, StreamingLLM's sinks and window). The
PyTorch form gathers those rows into a new tensor, reads it back for the
scores, builds the weights and reads the gathered values again: four passes
over the picked rows and a dozen launches. This kernel loads each picked row
of K and V once, straight from the cache's storage, and keeps the softmax
online (flash-decoding): one launch for the partial sums, one to combine them.

The slots of a row are cut into ``splits`` contiguous pieces so that a batch
of a few dozen sequences still fills the GPU: with B x Hkv = 128 (sequence,
KV head) pairs and one program each, most of an H200's 132 multiprocessors
would wait on one program's loads. Each program keeps (m, l, acc) for the
group's G query heads; the combine rescales the pieces by their maxima.

Contract (``gather.shared_gather_attention``'s): q (B, H, T, D); k, v
(B, Hkv, N, D / Dv), any strides; ``tokens`` int64 (B, Hkv, T, K) rows shared
by a KV group's heads, or (B, H, T, K) one list per query head; -1 marks an
empty slot, a row appears at most once per list. Returns (B, H, T, Dv) in q's
dtype; a query with no row gets zeros.
"""
from __future__ import annotations

import functools

import torch

from ..kernels import dispatch
from ..kernels._triton import LOG2E, dot_precision, pow2, tl, triton

__all__ = ["rows_attention_triton", "supports", "num_splits", "BLOCK_ROWS"]

BLOCK_ROWS = 64  # rows per step: a (16, 128) x (128, 64) product, 32 KiB of K and V in flight per program
_PROGRAMS_PER_SM = 8  # enough programs in flight to cover the row loads' latency


def supports(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, tokens: torch.Tensor) -> bool:
    """True when the kernel may replace the PyTorch gather for these inputs (``dispatch.use_triton`` and its own)."""
    return (dispatch.use_triton(q, k, v) and tokens.dtype == torch.int64 and tokens.device == q.device
            and max(q.shape[-1], v.shape[-1]) <= 256)


@functools.lru_cache(maxsize=8)
def _multiprocessors(device: torch.device) -> int:
    if device.type == "cuda":
        return torch.cuda.get_device_properties(device).multi_processor_count
    return 4  # the interpreter on the CPU: a few splits, so that the tests cover the combine


def num_splits(pairs: int, slots: int, device: torch.device) -> int:
    """Pieces per row list: enough programs for every multiprocessor, never a piece under one step of rows."""
    steps = max(1, triton.cdiv(slots, BLOCK_ROWS))
    want = triton.cdiv(_PROGRAMS_PER_SM * _multiprocessors(device), max(pairs, 1))
    return max(1, min(want, steps))


if triton is not None:

    @triton.jit
    def _rows_partial(
        Q, K, V, IDX, PO, PM, PL,
        stride_qb, stride_qh, stride_qt, stride_qd,
        stride_kb, stride_kh, stride_kj, stride_kd,
        stride_vb, stride_vh, stride_vj, stride_vd,
        stride_ib, stride_ih, stride_it, stride_is,
        n_idx_heads, T, slots, per_split, qk_scale,
        G: tl.constexpr, IDX_PER_KV: tl.constexpr, HEAD_DIM: tl.constexpr, V_DIM: tl.constexpr,
        BLOCK_G: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_DV: tl.constexpr, BLOCK_N: tl.constexpr,
        SPLITS: tl.constexpr, PRECISION: tl.constexpr,
    ):
        row = tl.program_id(0)  # (b, index head, t) flattened, t fastest
        split = tl.program_id(1)
        t = row % T
        hi = (row // T) % n_idx_heads
        b = (row // (T * n_idx_heads)).to(tl.int64)  # b * stride_kb passes 2**31 elements for a large cache
        hk = (hi // IDX_PER_KV).to(tl.int64)

        offs_g = tl.arange(0, BLOCK_G)
        offs_d = tl.arange(0, BLOCK_D)
        offs_dv = tl.arange(0, BLOCK_DV)
        offs_n = tl.arange(0, BLOCK_N)
        g_ok = offs_g < G
        d_ok = offs_d < HEAD_DIM
        dv_ok = offs_dv < V_DIM
        heads = hi * G + offs_g
        q = tl.load(Q + b * stride_qb + heads[:, None] * stride_qh + t * stride_qt + offs_d[None, :] * stride_qd,
                    mask=g_ok[:, None] & d_ok[None, :], other=0.0)
        k_base = K + b * stride_kb + hk * stride_kh
        v_base = V + b * stride_vb + hk * stride_vh
        idx_base = IDX + b * stride_ib + hi * stride_ih + t * stride_it

        m_i = tl.full([BLOCK_G], float("-inf"), tl.float32)
        l_i = tl.zeros([BLOCK_G], tl.float32)
        acc = tl.zeros([BLOCK_G, BLOCK_DV], tl.float32)
        start = split * per_split
        end = tl.minimum(start + per_split, slots)
        for s0 in range(start, end, BLOCK_N):
            slot = s0 + offs_n
            rows = tl.load(idx_base + slot * stride_is, mask=slot < end, other=-1)
            ok = rows >= 0
            # Empty slots are masked, not skipped: masked loads fetch nothing, and the body keeps no branch.
            kt = tl.load(k_base + rows[None, :] * stride_kj + offs_d[:, None] * stride_kd,
                         mask=ok[None, :] & d_ok[:, None], other=0.0)
            scores = tl.dot(q, kt, input_precision=PRECISION) * qk_scale
            scores = tl.where(ok[None, :], scores, float("-inf"))
            m_new = tl.maximum(m_i, tl.max(scores, 1))
            m_safe = tl.where(m_new == float("-inf"), 0.0, m_new)  # no row yet: exp2 gives 0, not NaN
            alpha = tl.exp2(m_i - m_safe)
            p = tl.exp2(scores - m_safe[:, None])
            l_i = l_i * alpha + tl.sum(p, 1)
            vt = tl.load(v_base + rows[:, None] * stride_vj + offs_dv[None, :] * stride_vd,
                         mask=ok[:, None] & dv_ok[None, :], other=0.0)
            acc = acc * alpha[:, None] + tl.dot(p.to(vt.dtype), vt, input_precision=PRECISION)
            m_i = m_new

        piece = (row * SPLITS + split) * BLOCK_G
        tl.store(PM + piece + offs_g, m_i)
        tl.store(PL + piece + offs_g, l_i)
        tl.store(PO + (piece + offs_g[:, None]) * BLOCK_DV + offs_dv[None, :], acc)

    @triton.jit
    def _rows_combine(
        PO, PM, PL, O,
        stride_ob, stride_oh, stride_ot, stride_od,
        n_idx_heads, T,
        G: tl.constexpr, V_DIM: tl.constexpr, BLOCK_G: tl.constexpr, BLOCK_DV: tl.constexpr,
        SPLITS: tl.constexpr, BLOCK_S: tl.constexpr,
    ):
        row = tl.program_id(0)
        t = row % T
        hi = (row // T) % n_idx_heads
        b = row // (T * n_idx_heads)
        offs_s = tl.arange(0, BLOCK_S)
        offs_g = tl.arange(0, BLOCK_G)
        offs_dv = tl.arange(0, BLOCK_DV)
        s_ok = offs_s < SPLITS
        piece = (row * SPLITS + offs_s[:, None]) * BLOCK_G + offs_g[None, :]  # (BLOCK_S, BLOCK_G)
        m = tl.load(PM + piece, mask=s_ok[:, None], other=float("-inf"))
        l = tl.load(PL + piece, mask=s_ok[:, None], other=0.0)
        m_max = tl.max(m, 0)
        m_safe = tl.where(m_max == float("-inf"), 0.0, m_max)
        w = tl.exp2(m - m_safe[None, :])  # a piece that saw no row has m = -inf: weight 0
        total = tl.sum(w * l, 0)
        # One piece at a time: the (splits, G, Dv) block of partial sums at once would not fit in registers.
        out = tl.zeros([BLOCK_G, BLOCK_DV], tl.float32)
        for s in range(0, SPLITS):
            m_s = tl.load(PM + (row * SPLITS + s) * BLOCK_G + offs_g)
            acc = tl.load(PO + ((row * SPLITS + s) * BLOCK_G + offs_g[:, None]) * BLOCK_DV + offs_dv[None, :])
            out += tl.exp2(m_s - m_safe)[:, None] * acc
        out = out / tl.where(total > 0, total, 1.0)[:, None]  # no row: zeros
        heads = hi * G + offs_g
        tl.store(O + b * stride_ob + heads[:, None] * stride_oh + t * stride_ot + offs_dv[None, :] * stride_od,
                 out.to(O.dtype.element_ty), mask=(offs_g < G)[:, None] & (offs_dv < V_DIM)[None, :])


def rows_attention_triton(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, tokens: torch.Tensor, scale: float,
                          *, splits: int | None = None, num_warps: int = 4, num_stages: int = 2) -> torch.Tensor:
    """Softmax attention of q (B, H, T, D) over rows ``tokens`` of k and v (the module's contract); (B, H, T, Dv).

    ``splits``: pieces each row list is cut into (default ``num_splits``); the
    result does not depend on it beyond float rounding. Shapes are the
    caller's to check (``gather.shared_gather_attention`` takes them checked).
    """
    if triton is None:
        raise RuntimeError("rows_attention_triton needs Triton, which is not installed")
    B, H, T, D = q.shape
    Hkv, Dv = k.shape[1], v.shape[-1]
    n_idx, slots = tokens.shape[1], tokens.shape[-1]
    if n_idx not in (Hkv, H) or tuple(tokens.shape[:3]) != (B, n_idx, T):
        raise ValueError(f"tokens must be (B, Hkv, T, K) or (B, H, T, K) = ({B}, {Hkv} or {H}, {T}, K), "
                         f"got {tuple(tokens.shape)}")
    G = H // n_idx
    out = torch.empty(B, H, T, Dv, dtype=q.dtype, device=q.device)
    if out.numel() == 0:
        return out
    pairs = B * n_idx * T
    n_split = num_splits(pairs, slots, q.device) if splits is None else max(1, int(splits))
    per_split = triton.cdiv(triton.cdiv(max(slots, 1), n_split), BLOCK_ROWS) * BLOCK_ROWS
    n_split = triton.cdiv(max(slots, 1), per_split)  # rounding each piece up to whole steps may leave one over
    block_g, block_dv = pow2(G, 16), pow2(Dv, 16)
    # float32 partials: the pieces are summed after rescaling, which must not round in the input dtype.
    po = torch.empty(pairs * n_split * block_g * block_dv, dtype=torch.float32, device=q.device)
    pm = torch.empty(pairs * n_split * block_g, dtype=torch.float32, device=q.device)
    pl = torch.empty_like(pm)
    _rows_partial[(pairs, n_split)](
        q, k, v, tokens, po, pm, pl,
        *q.stride(), *k.stride(), *v.stride(), *tokens.stride(),
        n_idx, T, slots, per_split, scale * LOG2E,
        G=G, IDX_PER_KV=n_idx // Hkv, HEAD_DIM=D, V_DIM=Dv,
        BLOCK_G=block_g, BLOCK_D=pow2(D, 16), BLOCK_DV=block_dv, BLOCK_N=BLOCK_ROWS, SPLITS=n_split,
        PRECISION=dot_precision(q.dtype), num_warps=num_warps, num_stages=num_stages,
    )
    _rows_combine[(pairs,)](
        po, pm, pl, out, *out.stride(), n_idx, T,
        G=G, V_DIM=Dv, BLOCK_G=block_g, BLOCK_DV=block_dv, SPLITS=n_split, BLOCK_S=pow2(n_split, 2),
        num_warps=4,
    )
    return out
