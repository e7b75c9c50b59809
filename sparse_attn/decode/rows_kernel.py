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

Where the rows come from (one kernel, three row sources, fixed at compile time):

- a token list (``rows_attention_triton``): ``tokens`` int64 (B, Hkv, T, K)
  rows shared by a KV group's heads, or (B, H, T, K) one list per query head;
  -1 marks an empty slot, a row appears at most once per list;
- unit numbers (``units_attention``): Quest's pages or NSA's blocks,
  (B, Hs, T, S) int64, each standing for ``unit`` consecutive rows, cut at
  each query's causal limit. The caller skips the launches that would turn
  the picks into a token list (a multiply, an arange, three masks);
- a range (``range_attention``): each query's latest ``window`` rows,
  or NSA's compressed rows that have ended by the query (whose scores can be
  written out too, for the selection that ranks them).

q (B, H, T, D); k, v (B, Hkv, N, D / Dv), any strides. Returns (B, H, T, Dv)
in q's dtype; a query with no row gets zeros.
"""
from __future__ import annotations

import functools
from typing import NamedTuple

import torch

from ..kernels import dispatch
from ..kernels._triton import dot_precision, pow2, tl, triton

__all__ = ["rows_attention_triton", "units_attention", "range_attention", "combine", "merge_pieces", "supports",
           "num_splits", "BLOCK_ROWS", "Partials"]

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



# Row sources (the kernel's SOURCE): a token list, unit numbers, a range.
_TOKENS, _UNITS, _RANGE = 0, 1, 2


class Partials(NamedTuple):
    """One launch's split-K pieces: float32 sums ``po`` (pairs * splits * BLOCK_G * BLOCK_DV), maxima ``pm`` (log2
    units) and denominators ``pl`` (pairs * splits * BLOCK_G), for ``pairs`` (b, index head, t) rows."""

    po: torch.Tensor
    pm: torch.Tensor
    pl: torch.Tensor
    splits: int
    block_g: int
    block_dv: int


if triton is not None:

    @triton.jit
    def _rows_partial(
        Q, K, V, IDX, PO, PM, PL, SC,
        stride_qb, stride_qh, stride_qt, stride_qd,
        stride_kb, stride_kh, stride_kj, stride_kd,
        stride_vb, stride_vh, stride_vj, stride_vd,
        stride_ib, stride_ih, stride_it, stride_is,
        n_idx_heads, T, slots, per_split, scale,
        first, limit0, window, cmp_block, cmp_stride,
        G: tl.constexpr, IDX_PER_KV: tl.constexpr, HEAD_DIM: tl.constexpr, V_DIM: tl.constexpr,
        BLOCK_G: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_DV: tl.constexpr, BLOCK_N: tl.constexpr,
        SPLITS: tl.constexpr, PRECISION: tl.constexpr, SOURCE: tl.constexpr, UNIT: tl.constexpr,
        COMPRESSED: tl.constexpr, STORE_SCORES: tl.constexpr, ROUND: tl.constexpr,
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
        if ROUND:  # the PyTorch form scales the query first and rounds it to its dtype, so its scores round once
            q = (q.to(tl.float32) * scale).to(Q.dtype.element_ty)
        k_base = K + b * stride_kb + hk * stride_kh
        v_base = V + b * stride_vb + hk * stride_vh
        idx_base = IDX + b * stride_ib + hi * stride_ih + t * stride_it
        # The query's causal limit: rows < lim (its position + 1; for compressed rows, the blocks ended by then).
        lim = limit0 + t
        if COMPRESSED:
            lim = tl.where(lim >= cmp_block, (lim - cmp_block) // cmp_stride + 1, 0)

        m_i = tl.full([BLOCK_G], float("-inf"), tl.float32)
        l_i = tl.zeros([BLOCK_G], tl.float32)
        acc = tl.zeros([BLOCK_G, BLOCK_DV], tl.float32)
        start = split * per_split
        end = tl.minimum(start + per_split, slots)
        for s0 in range(start, end, BLOCK_N):
            slot = s0 + offs_n
            live = slot < end
            if SOURCE == 0:
                rows = tl.load(idx_base + slot * stride_is, mask=live, other=-1)
                ok = rows >= 0
            elif SOURCE == 1:
                unit = tl.load(idx_base + (slot // UNIT) * stride_is, mask=live, other=-1)
                rows = unit * UNIT + slot % UNIT
                ok = (unit >= 0) & (rows < lim)
            else:
                rows = first + slot
                ok = live & (rows < lim) & (rows >= lim - window)
            # Empty slots are masked, not skipped: masked loads fetch nothing, and the body keeps no branch.
            kt = tl.load(k_base + rows[None, :] * stride_kj + offs_d[:, None] * stride_kd,
                         mask=ok[None, :] & d_ok[:, None], other=0.0)
            scores = tl.dot(q, kt, input_precision=PRECISION)
            if ROUND:
                scores = scores.to(Q.dtype.element_ty).to(tl.float32)
            else:
                scores = scores * scale
            scores = tl.where(ok[None, :], scores, float("-inf"))
            if STORE_SCORES:  # (pairs, G, slots), in q's dtype (half scores were rounded to it: nothing is lost)
                tl.store(SC + (row * G + offs_g[:, None]).to(tl.int64) * slots + slot[None, :],
                         scores.to(SC.dtype.element_ty), mask=g_ok[:, None] & live[None, :])
            scores = scores * 1.4426950408889634  # log2(e): the softmax below runs in exp2
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
    def merge_pieces(PO, PM, PL, row, SPLITS: tl.constexpr, BLOCK_S: tl.constexpr, BLOCK_G: tl.constexpr,
                     BLOCK_DV: tl.constexpr):
        """A row's pieces rescaled to their common maximum and normalised: (BLOCK_G, BLOCK_DV), zeros for no row."""
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
        return out / tl.where(total > 0, total, 1.0)[:, None]

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
        offs_g = tl.arange(0, BLOCK_G)
        offs_dv = tl.arange(0, BLOCK_DV)
        out = merge_pieces(PO, PM, PL, row, SPLITS, BLOCK_S, BLOCK_G, BLOCK_DV)
        heads = hi * G + offs_g
        tl.store(O + b * stride_ob + heads[:, None] * stride_oh + t * stride_ot + offs_dv[None, :] * stride_od,
                 out.to(O.dtype.element_ty), mask=(offs_g < G)[:, None] & (offs_dv < V_DIM)[None, :])


def _partials(q, k, v, idx, scale: float, *, slots: int, source: int, unit: int = 1, first: int = 0,
              limit0: int = 0, window: int = 0, compressed: tuple[int, int] | None = None,
              scores: torch.Tensor | None = None, round_scores: bool = False, splits: int | None = None,
              num_warps: int = 4, num_stages: int = 2) -> Partials:
    """Launch the partial kernel over (b, index head, t) rows and their splits; the pieces for a combine."""
    B, H, T, D = q.shape
    Hkv, Dv = k.shape[1], v.shape[-1]
    n_idx = Hkv if idx is None else idx.shape[1]
    G = H // n_idx
    pairs = B * n_idx * T
    n_split = num_splits(pairs, slots, q.device) if splits is None else max(1, int(splits))
    per_split = triton.cdiv(triton.cdiv(max(slots, 1), n_split), BLOCK_ROWS) * BLOCK_ROWS
    n_split = triton.cdiv(max(slots, 1), per_split)  # rounding each piece up to whole steps may leave one over
    block_g, block_dv = pow2(G, 16), pow2(Dv, 16)
    # float32 partials: the pieces are summed after rescaling, which must not round in the input dtype.
    po = torch.empty(pairs * n_split * block_g * block_dv, dtype=torch.float32, device=q.device)
    pm = torch.empty(pairs * n_split * block_g, dtype=torch.float32, device=q.device)
    pl = torch.empty_like(pm)
    idx_arg = q if idx is None else idx  # a range reads no index: any tensor stands in for the pointer
    idx_strides = (0, 0, 0, 0) if idx is None else idx.stride()
    cmp_block, cmp_stride = compressed or (1, 1)
    _rows_partial[(pairs, n_split)](
        q, k, v, idx_arg, po, pm, pl, po if scores is None else scores,
        *q.stride(), *k.stride(), *v.stride(), *idx_strides,
        n_idx, T, slots, per_split, scale, first, limit0, window, cmp_block, cmp_stride,
        G=G, IDX_PER_KV=n_idx // Hkv, HEAD_DIM=D, V_DIM=Dv,
        BLOCK_G=block_g, BLOCK_D=pow2(D, 16), BLOCK_DV=block_dv, BLOCK_N=BLOCK_ROWS, SPLITS=n_split,
        PRECISION=dot_precision(q.dtype), SOURCE=source, UNIT=unit, COMPRESSED=compressed is not None,
        STORE_SCORES=scores is not None, ROUND=bool(round_scores), num_warps=num_warps, num_stages=num_stages,
    )
    return Partials(po, pm, pl, n_split, block_g, block_dv)


def combine(parts: Partials, q: torch.Tensor, n_idx: int, Dv: int) -> torch.Tensor:
    """The pieces merged into (B, H, T, Dv) in q's dtype."""
    B, H, T = q.shape[:3]
    out = torch.empty(B, H, T, Dv, dtype=q.dtype, device=q.device)
    _rows_combine[(B * n_idx * T,)](
        parts.po, parts.pm, parts.pl, out, *out.stride(), n_idx, T,
        G=H // n_idx, V_DIM=Dv, BLOCK_G=parts.block_g, BLOCK_DV=parts.block_dv, SPLITS=parts.splits,
        BLOCK_S=pow2(parts.splits, 2), num_warps=4,
    )
    return out


def _check_index(q, k, idx, what: str) -> int:
    B, H, T = q.shape[:3]
    Hkv = k.shape[1]
    n_idx = idx.shape[1]
    if n_idx not in (Hkv, H) or tuple(idx.shape[:3]) != (B, n_idx, T):
        raise ValueError(f"{what} must be (B, Hkv, T, K) or (B, H, T, K) = ({B}, {Hkv} or {H}, {T}, K), "
                         f"got {tuple(idx.shape)}")
    return n_idx


def rows_attention_triton(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, tokens: torch.Tensor, scale: float,
                          *, splits: int | None = None, num_warps: int = 4, num_stages: int = 2) -> torch.Tensor:
    """Softmax attention of q (B, H, T, D) over rows ``tokens`` of k and v (the module's contract); (B, H, T, Dv).

    ``splits``: pieces each row list is cut into (default ``num_splits``); the
    result does not depend on it beyond float rounding. Shapes are the
    caller's to check (``gather.shared_gather_attention`` takes them checked).
    """
    if triton is None:
        raise RuntimeError("rows_attention_triton needs Triton, which is not installed")
    n_idx = _check_index(q, k, tokens, "tokens")
    if q.numel() == 0 or v.shape[-1] == 0:
        return q.new_empty(*q.shape[:3], v.shape[-1])
    parts = _partials(q, k, v, tokens, scale, slots=tokens.shape[-1], source=_TOKENS, splits=splits,
                      num_warps=num_warps, num_stages=num_stages)
    return combine(parts, q, n_idx, v.shape[-1])


def units_attention(q, k, v, units, unit: int, length: int, scale: float, *, splits: int | None = None,
                    partials: bool = False, num_warps: int = 4, num_stages: int = 2):
    """Attention of q (B, H, T, D) over the rows of picked units, each query up to its position.

    Unit u stands for rows u * unit .. u * unit + unit - 1; ``units`` is
    (B, Hkv or H, T, S) int64, -1 an empty pick, a list's units distinct.
    Query t sits at position length - T + t and reads its units' rows up to
    itself. Returns (B, H, T, Dv), or the ``Partials`` with ``partials=True``
    (for a caller that merges branches itself).
    """
    if triton is None:
        raise RuntimeError("units_attention needs Triton, which is not installed")
    n_idx = _check_index(q, k, units, "units")
    T = q.shape[2]
    parts = _partials(q, k, v, units, scale, slots=units.shape[-1] * unit, source=_UNITS, unit=unit,
                      limit0=length - T + 1, splits=splits, num_warps=num_warps, num_stages=num_stages)
    return parts if partials else combine(parts, q, n_idx, v.shape[-1])


def range_attention(q, k, v, length: int, scale: float, *, window: int | None, first: int = 0, slots: int | None = None,
                    compressed: tuple[int, int] | None = None, scores: torch.Tensor | None = None,
                    round_scores: bool = False, splits: int | None = None, partials: bool = False,
                    num_warps: int = 4, num_stages: int = 2):
    """Attention of q (B, H, T, D) over a range of rows, each KV group reading it once.

    Query t sits at position length - T + t. Plain: it reads rows
    ``first + s`` (s < ``slots``) with position - window < row <= position.
    ``compressed=(block, stride)``: the rows are NSA's compressed blocks, and
    query t reads those that have ended by its position. ``window=None``: no lower limit.
    ``scores``: a (B, Hkv, T, G, slots) tensor that receives the scaled scores
    (-inf where not read). ``round_scores``: scale the query in float32, round
    it and the scores to q's dtype (the PyTorch form's half rounding).
    """
    if triton is None:
        raise RuntimeError("range_attention needs Triton, which is not installed")
    T = q.shape[2]
    if slots is None:
        slots = k.shape[2] - first
    parts = _partials(q, k, v, None, scale, slots=slots, source=_RANGE, first=first, limit0=length - T + 1,
                      window=2**30 if window is None else window, compressed=compressed, scores=scores,
                      round_scores=round_scores, splits=splits, num_warps=num_warps, num_stages=num_stages)
    return parts if partials else combine(parts, q, k.shape[1], v.shape[-1])
