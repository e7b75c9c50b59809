"""NSA's gated sum of its three branch outputs as one Triton pass.

``out = g[..., 0] * compressed + g[..., 1] * selected + g[..., 2] * sliding``
in PyTorch is a product and two fused multiply-adds, each a pass over
(B, H, Lq, Dv) with a broadcast gate column: at L=65536 (64 heads, Dv=128,
bf16) they took 4.3 ms on an H200, about the sliding branch's own time. One
kernel reads the three outputs and the gates once and writes the sum once:
the bytes a copy of four such tensors moves. The sum is taken in float32 and
rounded once (PyTorch's version rounds after each step), so the two agree to
the output dtype's rounding. Where the selected branch runs as its kernel,
``nsa_attention`` takes the sum in that kernel's store instead
(``selected_block``'s ``gated``); this pass serves the other cases.
"""
from __future__ import annotations

import torch

from . import dispatch
from ._triton import pow2, require_triton, tl, triton

__all__ = ["gate_combine_triton", "triton_supports"]


def triton_supports(out_cmp, out_sel, out_slide, gates) -> bool:
    """The dispatch rule for all four tensors, one shape for the outputs, and gates that broadcast as (B, H, Lq, 3)."""
    shape = out_cmp.shape
    return (dispatch.use_triton(out_cmp, out_sel, out_slide, gates)
            and out_cmp.dim() == 4 and out_sel.shape == shape and out_slide.shape == shape
            and out_cmp.dtype == out_sel.dtype == out_slide.dtype
            and tuple(gates.shape) == (*shape[:3], 3))


if triton is not None:

    @triton.jit
    def _combine_fwd(
        C, S, W, G, O,
        scb, sch, sci, scd, ssb, ssh, ssi, ssd, swb, swh, swi, swd,
        sgb, sgh, sgi, sgk, sob, soh, soi, sod,
        H, Lq, n_rows, Dv,
        BLOCK_R: tl.constexpr, BLOCK_D: tl.constexpr,
    ):
        r = tl.program_id(0).to(tl.int64) * BLOCK_R + tl.arange(0, BLOCK_R)
        d = tl.arange(0, BLOCK_D)
        r_ok = r < n_rows
        ok = r_ok[:, None] & (d < Dv)[None, :]
        i = r % Lq
        h = (r // Lq) % H
        b = r // (Lq * H)
        g_base = G + b * sgb + h * sgh + i * sgi
        gc = tl.load(g_base, mask=r_ok, other=0.0).to(tl.float32)
        gs = tl.load(g_base + sgk, mask=r_ok, other=0.0).to(tl.float32)
        gw = tl.load(g_base + 2 * sgk, mask=r_ok, other=0.0).to(tl.float32)
        c = tl.load(C + (b * scb + h * sch + i * sci)[:, None] + d[None, :] * scd, mask=ok, other=0.0)
        s = tl.load(S + (b * ssb + h * ssh + i * ssi)[:, None] + d[None, :] * ssd, mask=ok, other=0.0)
        w = tl.load(W + (b * swb + h * swh + i * swi)[:, None] + d[None, :] * swd, mask=ok, other=0.0)
        out = gc[:, None] * c.to(tl.float32) + gs[:, None] * s.to(tl.float32) + gw[:, None] * w.to(tl.float32)
        tl.store(O + (b * sob + h * soh + i * soi)[:, None] + d[None, :] * sod, out.to(O.dtype.element_ty), mask=ok)


def gate_combine_triton(out_cmp, out_sel, out_slide, gates, *, rows_per_program: int = 32, num_warps: int = 4):
    """``g0 * out_cmp + g1 * out_sel + g2 * out_slide`` in one pass; outputs (B, H, Lq, Dv), gates (B, H, Lq, 3).

    Any strides (an expanded gate tensor reads its one row of three). Returns a
    new contiguous (B, H, Lq, Dv) tensor in the outputs' dtype.
    """
    require_triton("gate_combine_triton")
    B, H, Lq, Dv = out_cmp.shape
    out = torch.empty(B, H, Lq, Dv, dtype=out_cmp.dtype, device=out_cmp.device)
    n_rows = B * H * Lq
    if out.numel() == 0:
        return out
    block_d = pow2(Dv, 16)
    block_r = max(1, min(rows_per_program, 8192 // block_d))
    block_r = pow2(block_r, 1)
    _combine_fwd[(triton.cdiv(n_rows, block_r),)](
        out_cmp, out_sel, out_slide, gates, out,
        *out_cmp.stride(), *out_sel.stride(), *out_slide.stride(), *gates.stride(), *out.stride(),
        H, Lq, n_rows, Dv, BLOCK_R=block_r, BLOCK_D=block_d, num_warps=num_warps,
    )
    return out
