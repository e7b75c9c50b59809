"""The sliding window through FlexAttention, against the float64 chunked-SDPA reference.

On the CPU FlexAttention runs eagerly (``compiled=False``: it materialises the
scores, so the inputs are small): that checks the mask function, GQA, scale,
Lq != Lk and rows with no key in reach. The eager path applies the mask
everywhere, so the block mask's tiles (which the compiled kernel skips or
trusts) are checked against the elementwise mask separately. On a CUDA machine the compiled kernel
and ``sliding_window_attention``'s dispatch are checked too (those tests exist
only where CUDA does).
"""
from __future__ import annotations

import pytest
import torch

from sparse_attn.kernels import sliding_flex
from sparse_attn.kernels.dispatch import reference_only
from sparse_attn.ops.sliding_window import sliding_window_attention

pytestmark = pytest.mark.skipif(not sliding_flex.flex_available(), reason="this torch has no FlexAttention")


def rel_err(out, ref):
    return ((out.double() - ref).norm() / ref.norm().clamp(min=1e-30)).item()


CASES = [
    # B, H, Hkv, Lq, Lk, D, window, causal
    (1, 4, 2, 40, 40, 16, 8, True),      # GQA, several mask tiles of 16
    (2, 2, 2, 33, 50, 32, 5, False),     # not causal, Lq < Lk, window not a tile multiple
    (1, 4, 1, 70, 30, 16, 8, True),      # Lq > Lk: queries past the keys' reach get zeros
    (1, 2, 1, 24, 24, 16, 100, True),    # window wider than the sequence: causal dense attention
]


@pytest.mark.parametrize("case", CASES)
def test_eager_flex_matches_float64_reference(case, monkeypatch):
    B, H, Hkv, Lq, Lk, D, W, causal = case
    monkeypatch.setattr(sliding_flex, "_BLOCK", 16)  # several tiles at these small lengths
    sliding_flex._block_mask.cache_clear()
    q, k, v = (torch.randn(B, h, n, D, dtype=torch.float64) for h, n in ((H, Lq), (Hkv, Lk), (Hkv, Lk)))
    ref = sliding_window_attention(q, k, v, W, causal=causal, scale=0.3)
    out = sliding_flex.sliding_window_flex(q, k, v, W, causal=causal, scale=0.3, compiled=False)
    sliding_flex._block_mask.cache_clear()
    assert out.shape == ref.shape and not out.isnan().any()
    assert rel_err(out, ref) < 1e-12
    if Lq > Lk + W:  # no key in reach
        assert torch.equal(out[:, :, Lk + W:], torch.zeros_like(out[:, :, Lk + W:]))


@pytest.mark.parametrize("causal", [True, False])
@pytest.mark.parametrize("Lq,Lk,W", [(70, 70, 20), (33, 50, 5), (70, 30, 8), (24, 24, 100), (300, 300, 128),
                                     (257, 129, 1), (64, 64, 16), (48, 96, 33), (96, 96, 31), (80, 80, 18),
                                     (64, 100, 47), (100, 64, 17)])
def test_block_mask_tiles_agree_with_the_mask(Lq, Lk, W, causal):
    # FlexAttention's eager path ignores the tiles (it applies mask_mod everywhere), so check them here:
    # a tile left out must hold no allowed pair, a full tile only allowed pairs, as the elementwise mask says.
    block = 16
    partial, full = sliding_flex._window_tiles(Lq, Lk, W, causal, block, "cpu")
    i, j = torch.arange(Lq)[:, None], torch.arange(Lk)
    allowed = sliding_flex._window_mod(W, causal)(0, 0, i, j)
    pad = torch.zeros(partial.shape[0] * block, partial.shape[1] * block, dtype=torch.bool)
    pad[:Lq, :Lk] = allowed
    tiles = pad.view(partial.shape[0], block, partial.shape[1], block).transpose(1, 2)
    any_allowed, all_allowed = tiles.flatten(2).any(-1), tiles.flatten(2).all(-1)
    assert not (any_allowed & ~(partial | full)).any()  # no allowed pair is skipped
    assert not (full & ~all_allowed).any()               # no mask is skipped where it would drop a pair
    assert not (partial & full).any()
    mask = sliding_flex._block_mask(Lq, Lk, W, causal, "cpu")
    assert mask.seq_lengths == (Lq, Lk)


def test_cpu_stays_on_the_reference(monkeypatch):
    def boom(*a, **k):
        raise AssertionError("FlexAttention called on the CPU")

    monkeypatch.setattr(sliding_flex, "sliding_window_flex", boom)
    q = torch.randn(1, 2, 16, 16)
    assert sliding_window_attention(q, q[:, :1], q[:, :1], 4, causal=True).shape == (1, 2, 16, 16)


if torch.cuda.is_available():

    def test_cuda_float32_stays_on_chunked_sdpa():
        q = torch.randn(1, 4, 256, 64, device="cuda")
        assert not sliding_flex.triton_supports(q, q[:, :2], q[:, :2])

    @pytest.mark.parametrize("dtype,limit", [(torch.bfloat16, 1e-2), (torch.float16, 2e-3)])
    @pytest.mark.parametrize("causal", [True, False])
    def test_cuda_dispatch_matches_float64(dtype, limit, causal):
        calls = []
        real = sliding_flex.sliding_window_flex
        try:
            sliding_flex.sliding_window_flex = lambda *a, **k: calls.append(1) or real(*a, **k)
            q = torch.randn(1, 8, 3000, 64, device="cuda", dtype=dtype)
            k, v = (torch.randn(1, 2, 3000, 64, device="cuda", dtype=dtype) for _ in range(2))
            with torch.no_grad():
                out = sliding_window_attention(q, k, v, 300, causal=causal)
        finally:
            sliding_flex.sliding_window_flex = real
        ref = sliding_window_attention(q.double(), k.double(), v.double(), 300, causal=causal)
        with reference_only():
            chunked = sliding_window_attention(q, k, v, 300, causal=causal)
        assert calls == [1] and out.dtype == dtype and not out.isnan().any()
        assert rel_err(out, ref) < limit
        assert rel_err(out, ref) <= 1.5 * rel_err(chunked, ref) + 1e-6  # no less accurate than chunked SDPA
