"""The sliding-window kernel (``sparse_attn.kernels.sliding_band``) against the float64 chunked-SDPA reference.

Triton decides at import time whether it interprets, so the kernel tests run in
a child pytest process started with TRITON_INTERPRET=1 (the one test
``test_sliding_kernel_under_triton_interpreter``); this process keeps the
ordinary Triton. Small tiles (rows 16, keys 16) give each program masked tiles
at both ends of its band and whole ones between. bfloat16 is checked on the GPU
(the interpreter gets its arithmetic wrong).
"""
from __future__ import annotations

import pytest
import torch

from sparse_attn.kernels.dispatch import reference_only
from sparse_attn.ops.sliding_window import sliding_window_attention

triton = pytest.importorskip("triton")
from sparse_attn.kernels import sliding_band  # noqa: E402 (after the Triton check)

from tests.triton_interpreter import INTERPRETED, run_kernel_tests  # noqa: E402


def rel_err(out, ref):
    return ((out.double() - ref).norm() / ref.norm().clamp(min=1e-30)).item()


if not INTERPRETED:

    def test_sliding_kernel_under_triton_interpreter():
        run_kernel_tests(__file__, min_passed=8)

    def test_dispatch_rule():
        q, k = torch.randn(1, 16, 8, 16), torch.randn(1, 2, 8, 16)
        assert not sliding_band.triton_supports(q, k, k)  # CPU tensors: the reference


if INTERPRETED:
    CASES = [
        # B, H, Hkv, Lq, Lk, D, Dv, window, causal
        (1, 4, 2, 70, 70, 16, 16, 20, True),      # masked tiles at both ends, whole ones between
        (2, 3, 1, 45, 60, 16, 32, 9, False),      # G=3 (padded), Dv != D, not causal, Lq < Lk
        (1, 4, 2, 80, 30, 24, 24, 8, True),       # Lq > Lk: queries past the keys' reach get zeros; D not a power of two
        (1, 2, 1, 40, 40, 16, 16, 100, False),    # window wider than the sequence: dense attention
        (1, 2, 2, 37, 37, 16, 16, 1, True),       # window 1: each query sees itself
        (1, 8, 1, 50, 50, 16, 16, 33, True),      # G=8: two positions per program at rows 16
    ]

    @pytest.mark.parametrize("case", CASES)
    def test_kernel_matches_float64(case):
        B, H, Hkv, Lq, Lk, D, Dv, W, causal = case
        q, k, v = torch.randn(B, H, Lq, D), torch.randn(B, Hkv, Lk, D), torch.randn(B, Hkv, Lk, Dv)
        with reference_only():
            ref = sliding_window_attention(q.double(), k.double(), v.double(), W, causal=causal, scale=0.3)
        out = sliding_band.sliding_band_triton(q, k, v, W, causal=causal, scale=0.3, rows=16, block_n=16)
        assert out.shape == (B, H, Lq, Dv) and not out.isnan().any()
        assert rel_err(out, ref) < 1e-5
        if causal and Lq > Lk + W:
            assert torch.equal(out[:, :, Lk + W - 1:], torch.zeros_like(out[:, :, Lk + W - 1:]))

    def test_kernel_float16_default_launch():
        q, k, v = (torch.randn(1, h, 90, 32).half() for h in (16, 1, 1))
        with reference_only():
            ref = sliding_window_attention(q.double(), k.double(), v.double(), 40, causal=True)
        out = sliding_band.sliding_band_triton(q, k, v, 40, causal=True, scale=32 ** -0.5)
        assert out.dtype == torch.float16 and rel_err(out, ref) < 1e-2

    def test_kernel_through_the_dispatch(monkeypatch):
        monkeypatch.setattr(sliding_band, "triton_supports", lambda *a: True)
        monkeypatch.setattr(torch.Tensor, "is_cuda", property(lambda self: True))
        calls = []
        real = sliding_band.sliding_band_triton
        monkeypatch.setattr(sliding_band, "sliding_band_triton", lambda *a, **kw: calls.append(1) or real(*a, **kw))
        q, k, v = torch.randn(1, 8, 40, 16), torch.randn(1, 1, 40, 16), torch.randn(1, 1, 40, 16)
        with torch.no_grad():
            out = sliding_window_attention(q, k, v, 12, causal=True)
        monkeypatch.undo()
        assert calls == [1]
        assert rel_err(out, sliding_window_attention(q.double(), k.double(), v.double(), 12, causal=True)) < 1e-5


if torch.cuda.is_available() and not INTERPRETED:

    @pytest.mark.parametrize("dtype,limit", [(torch.bfloat16, 1e-2), (torch.float16, 2e-3)])
    @pytest.mark.parametrize("causal", [True, False])
    def test_cuda_kernel_matches_float64(dtype, limit, causal):
        # NSA's group of 16 heads; 3000 is not a multiple of the 16 positions per program.
        q = torch.randn(1, 32, 3000, 128, device="cuda", dtype=dtype)
        k, v = (torch.randn(1, 2, 3000, 128, device="cuda", dtype=dtype) for _ in range(2))
        assert sliding_band.triton_supports(q, k, v)
        with torch.no_grad():
            out = torch.full_like(q, float("nan"))
            out.copy_(sliding_window_attention(q, k, v, 300, causal=causal))
        ref = sliding_window_attention(q.double(), k.double(), v.double(), 300, causal=causal)
        with reference_only():
            chunked = sliding_window_attention(q, k, v, 300, causal=causal)
        assert not out.isnan().any()
        assert rel_err(out, ref) < limit
        assert rel_err(out, ref) <= 1.5 * rel_err(chunked, ref) + 1e-6  # no less accurate than chunked SDPA
