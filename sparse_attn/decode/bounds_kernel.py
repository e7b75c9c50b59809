"""Quest's page upper bounds for a decode step as one Triton kernel: page min and max read once, in one pass.

The PyTorch form is two products (positive query parts with the page maxima,
negative parts with the minima), an add and, when a KV group shares its
pages, a sum over the group's heads: at 64k tokens, 256 MiB of bounds read
by two kernels and four more passes over the (B, H, N) result. Here each
program loads a tile of pages' min and max once, makes both products for
the group's G heads and writes either every head's bound or the group's sum.

Rounding follows the PyTorch form in half precision (each product and the
sum rounded to the input dtype, the group's sum accumulated in float32), so
that the two paths rank pages alike; near-ties may still order differently,
as any two products with different accumulation orders may.

Contract: qs (B, H, T, D), the queries already scaled (or raw queries and
``scale``: the kernel then scales them in float32 and rounds to their dtype,
as the PyTorch form does, which saves a step three launches); page_max,
page_min (B, Hkv, N, D). Returns (B, H, T, N), or (B, Hkv, T, N) with ``group_sum``,
in qs's dtype.
"""
from __future__ import annotations

import torch

from ..kernels import dispatch
from ..kernels._triton import dot_precision, pow2, tl, triton

__all__ = ["page_bounds_triton", "supports", "BLOCK_PAGES"]

BLOCK_PAGES = 64  # pages per program: a (16, 128) x (128, 64) product against each of min and max


def supports(qs: torch.Tensor, page_max: torch.Tensor, page_min: torch.Tensor) -> bool:
    """True when the kernel may replace the two products (``dispatch.use_triton``, head dims up to 256)."""
    return dispatch.use_triton(qs, page_max, page_min) and qs.shape[-1] <= 256


if triton is not None:

    @triton.jit
    def _page_bounds(
        Q, PMAX, PMIN, OUT,
        stride_qb, stride_qh, stride_qt, stride_qd,
        stride_xb, stride_xh, stride_xn, stride_xd,
        stride_nb, stride_nh, stride_nn, stride_nd,
        stride_ob, stride_oh, stride_ot, stride_on,
        Hkv, T, N, scale,
        G: tl.constexpr, HEAD_DIM: tl.constexpr, BLOCK_G: tl.constexpr, BLOCK_D: tl.constexpr,
        BLOCK_P: tl.constexpr, GROUP_SUM: tl.constexpr, ROUND: tl.constexpr, PRECISION: tl.constexpr,
        PRESCALE: tl.constexpr,
    ):
        row = tl.program_id(0)  # (b, KV head, t), t fastest
        t = row % T
        hk = ((row // T) % Hkv).to(tl.int64)
        b = (row // (T * Hkv)).to(tl.int64)
        offs_g = tl.arange(0, BLOCK_G)
        offs_d = tl.arange(0, BLOCK_D)
        offs_p = tl.program_id(1) * BLOCK_P + tl.arange(0, BLOCK_P)
        g_ok = offs_g < G
        d_ok = offs_d < HEAD_DIM
        p_ok = offs_p < N
        heads = hk * G + offs_g
        q = tl.load(Q + b * stride_qb + heads[:, None] * stride_qh + t * stride_qt + offs_d[None, :] * stride_qd,
                    mask=g_ok[:, None] & d_ok[None, :], other=0.0)
        if PRESCALE:
            q = (q.to(tl.float32) * scale).to(Q.dtype.element_ty)
        hi = tl.load(PMAX + b * stride_xb + hk * stride_xh + offs_p[None, :] * stride_xn + offs_d[:, None] * stride_xd,
                     mask=p_ok[None, :] & d_ok[:, None], other=0.0)
        lo = tl.load(PMIN + b * stride_nb + hk * stride_nh + offs_p[None, :] * stride_nn + offs_d[:, None] * stride_nd,
                     mask=p_ok[None, :] & d_ok[:, None], other=0.0)
        up = tl.dot(tl.maximum(q, 0.0).to(hi.dtype), hi, input_precision=PRECISION)
        down = tl.dot(tl.minimum(q, 0.0).to(lo.dtype), lo, input_precision=PRECISION)
        if ROUND:  # the PyTorch form rounds each product, then their sum, to the input dtype
            bound = (up.to(q.dtype).to(tl.float32) + down.to(q.dtype).to(tl.float32)).to(q.dtype).to(tl.float32)
        else:
            bound = up + down
        if GROUP_SUM:
            total = tl.sum(tl.where(g_ok[:, None], bound, 0.0), 0)
            tl.store(OUT + b * stride_ob + hk * stride_oh + t * stride_ot + offs_p * stride_on,
                     total.to(OUT.dtype.element_ty), mask=p_ok)
        else:
            tl.store(OUT + b * stride_ob + heads[:, None] * stride_oh + t * stride_ot + offs_p[None, :] * stride_on,
                     bound.to(OUT.dtype.element_ty), mask=g_ok[:, None] & p_ok[None, :])


def page_bounds_triton(qs: torch.Tensor, page_max: torch.Tensor, page_min: torch.Tensor, *,
                       group_sum: bool = False, scale: float | None = None) -> torch.Tensor:
    """Upper bounds of q . k over each page, per query head (B, H, T, N) or summed per KV group (B, Hkv, T, N)."""
    if triton is None:
        raise RuntimeError("page_bounds_triton needs Triton, which is not installed")
    B, H, T, D = qs.shape
    Hkv, N = page_max.shape[1], page_max.shape[2]
    G = H // Hkv
    out = torch.empty(B, Hkv if group_sum else H, T, N, dtype=qs.dtype, device=qs.device)
    if out.numel() == 0:
        return out
    _page_bounds[(B * Hkv * T, triton.cdiv(N, BLOCK_PAGES))](
        qs, page_max, page_min, out,
        *qs.stride(), *page_max.stride(), *page_min.stride(), *out.stride(),
        Hkv, T, N, 1.0 if scale is None else float(scale),
        G=G, HEAD_DIM=D, BLOCK_G=pow2(G, 16), BLOCK_D=pow2(D, 16), BLOCK_P=BLOCK_PAGES, GROUP_SUM=bool(group_sum),
        ROUND=qs.dtype in (torch.float16, torch.bfloat16), PRECISION=dot_precision(qs.dtype),
        PRESCALE=scale is not None, num_warps=4,
    )
    return out
