"""The fused block-selection kernel, checked on the CPU through Triton's interpreter, against ``select_blocks``.

The reference is ``select_blocks``' own stable sort (the PyTorch path, which
is what runs on the CPU): the kernel must give the very same int64 answer,
slot for slot, including the order of forced blocks, ties (many equal
importances, drawn from a few values) and the -1 of unfilled slots. Triton
decides at import time whether it interprets, so the kernel tests run in a
child pytest started with TRITON_INTERPRET=1 (the one test
``test_select_kernel_under_triton_interpreter``). bfloat16 importance is
checked on the GPU (the interpreter gets bfloat16 wrong; see
tests/test_kernels_compressed.py); on a CUDA machine the ``cuda`` tests below
compare the compiled kernel with the sort on the same device.
"""
from __future__ import annotations

import pytest
import torch

from sparse_attn.kernels.dispatch import reference_only
from sparse_attn.ops import nsa

triton = pytest.importorskip("triton")
from sparse_attn.kernels import block_select  # noqa: E402 (after the Triton check)

from tests.triton_interpreter import INTERPRETED, run_kernel_tests  # noqa: E402


def tied_importance(*shape, levels=4, zeros=0.3, dtype=torch.float32, seed=0):
    """Importance drawn from a few values (ties in every row), with a share of zeros (not eligible)."""
    g = torch.Generator().manual_seed(seed)
    x = torch.randint(1, levels + 1, shape, generator=g).to(dtype) / levels
    return x.masked_fill(torch.rand(shape, generator=g) < zeros, 0.0)


def sort_reference(imp, S, bs, causal, ni=1, nl=2):
    with reference_only():
        return nsa.select_blocks(imp, S, bs, causal=causal, num_initial_blocks=ni, num_local_blocks=nl)


if not INTERPRETED:

    def test_select_kernel_under_triton_interpreter():
        run_kernel_tests(__file__, min_passed=15)

    def test_causal_row_bands_cover_every_row_with_its_eligible_blocks():
        for Lq, n_sel, bs in ((65536, 1024, 64), (300, 75, 4), (100, 20, 4), (30, 1, 32), (5, 3, 64), (16384, 256, 64)):
            bands = block_select._row_bands(Lq, n_sel, bs, causal=True)
            assert bands[0][0] == 0 and bands[-1][1] == Lq
            assert all(a[1] == b[0] for a, b in zip(bands, bands[1:]))  # contiguous, no overlap
            for row0, end, width in bands:  # the last row of a band may pick every block it needs
                assert min(n_sel, (end - 1) // bs + 1) <= width
        assert block_select._row_bands(65536, 1024, 64, causal=True)[0] == (0, 1024, 16)
        assert block_select._row_bands(16384, 256, 64, causal=True) == [(0, 16384, 256)]  # narrower: one launch
        assert block_select._row_bands(17, 40, 16, causal=False) == [(0, 17, 64)]

    def test_select_blocks_stays_on_the_sort_off_cuda(monkeypatch):
        def boom(*a, **k):
            raise AssertionError("kernel called on the CPU")

        monkeypatch.setattr(block_select, "select_blocks_triton", boom)
        imp = tied_importance(1, 2, 40, 5)
        assert nsa.select_blocks(imp, 3, 8, causal=True).shape == (1, 2, 40, 3)


if INTERPRETED:
    CASES = [
        # shape (..., Lq, Nsel), S, block, causal, initial, local, levels
        ((1, 2, 64, 8), 4, 8, True, 1, 2, 3),       # the paper's forcing, queries = keys
        ((2, 3, 50, 7), 5, 8, False, 1, 2, 2),      # not causal: every block eligible if scored
        ((1, 1, 70, 9), 9, 8, True, 2, 1, 4),       # S = Nsel: every slot, -1 where nothing is eligible
        ((1, 2, 40, 5), 3, 8, True, 0, 0, 1),       # no forcing, every importance equal: lowest index wins
        ((2, 33, 20), 6, 4, True, 3, 3, 3),         # 3-d importance, forcing fills every slot
        ((1, 1, 100, 20), 4, 4, True, 1, 2, 5),     # queries beyond the keys (Lq > Nsel * block)
        ((1, 2, 17, 40), 16, 16, False, 1, 2, 6),   # few queries, more blocks than keys
        ((1, 1, 30, 1), 1, 32, True, 1, 0, 2),      # one block
    ]

    @pytest.mark.parametrize("case", CASES)
    def test_kernel_equals_select_blocks(case):
        shape, S, bs, causal, ni, nl, levels = case
        imp = tied_importance(*shape, levels=levels)
        want = sort_reference(imp, S, bs, causal, ni, nl)
        got = block_select.select_blocks_triton(imp, S, bs, causal=causal, num_initial_blocks=ni,
                                                num_local_blocks=nl)
        assert got.dtype == torch.int64 and got.shape == want.shape
        assert torch.equal(got, want)

    @pytest.mark.parametrize("causal", [True, False])
    def test_kernel_in_causal_row_bands_equals_select_blocks(monkeypatch, causal):
        # Bands from 16 columns on: causal rows in four launches of 16, 32, 64 and 128 columns.
        monkeypatch.setattr(block_select, "BAND_FROM", 16)
        assert len(block_select._row_bands(300, 75, 4, causal=True)) == 4
        imp = tied_importance(1, 2, 300, 75, levels=3)
        got = block_select.select_blocks_triton(imp, 6, 4, causal=causal)
        assert torch.equal(got, sort_reference(imp, 6, 4, causal))

    def test_kernel_float16_and_non_contiguous():
        imp = tied_importance(1, 40, 2, 9, levels=3).to(torch.float16).transpose(1, 2)  # (1, 2, 40, 9), a view
        want = sort_reference(imp, 5, 8, True)
        assert torch.equal(block_select.select_blocks_triton(imp, 5, 8, causal=True), want)

    def test_kernel_ranks_in_float32():
        # Values 1 ulp of float32 apart: the kernel must not round them together.
        base = torch.full((1, 1, 8, 6), 0.5)
        imp = base + torch.arange(6) * torch.finfo(torch.float32).eps * 0.5
        want = sort_reference(imp, 4, 1000, False, 0, 0)
        got = block_select.select_blocks_triton(imp, 4, 1000, causal=False, num_initial_blocks=0, num_local_blocks=0)
        assert torch.equal(got, want) and torch.equal(got[0, 0, 0], torch.tensor([5, 4, 3, 2]))

    @pytest.mark.parametrize("elements,num_warps", [(16, 1), (64, 2), (4096, 4)])
    def test_kernel_launch_settings_do_not_change_results(elements, num_warps):
        imp = tied_importance(1, 2, 45, 12, levels=3)
        want = sort_reference(imp, 6, 4, True)
        got = block_select.select_blocks_triton(imp, 6, 4, causal=True, elements=elements, num_warps=num_warps)
        assert torch.equal(got, want)

    def test_kernel_through_select_blocks_dispatch(monkeypatch):
        # Let the dispatch take CPU tensors (the interpreter runs them): select_blocks must call the kernel.
        calls = []
        real = block_select.select_blocks_triton
        monkeypatch.setattr(block_select, "select_blocks_triton", lambda *a, **k: calls.append(1) or real(*a, **k))
        monkeypatch.setattr(torch.Tensor, "is_cuda", property(lambda self: True))
        imp = tied_importance(1, 2, 64, 8, levels=3)
        got = nsa.select_blocks(imp, 5, 8, causal=True)
        monkeypatch.undo()
        assert calls == [1] and torch.equal(got, sort_reference(imp, 5, 8, True))

    def test_kernel_nan_and_empty():
        # NaN importance is not eligible (as for the sort); S = 0 and zero rows give empty answers.
        imp = tied_importance(1, 1, 24, 6)
        imp[0, 0, ::3, 2] = float("nan")
        assert torch.equal(block_select.select_blocks_triton(imp, 4, 4, causal=True), sort_reference(imp, 4, 4, True))
        assert block_select.select_blocks_triton(imp, 0, 4, causal=True).shape == (1, 1, 24, 0)
        assert block_select.select_blocks_triton(imp[:, :, :0], 3, 4, causal=True).shape == (1, 1, 0, 3)


if torch.cuda.is_available() and not INTERPRETED:

    @pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
    @pytest.mark.parametrize("causal", [True, False])
    def test_cuda_kernel_equals_the_sort(dtype, causal):
        # The compiled kernel against select_blocks' sort on the same GPU, the benchmark's shape, with ties.
        imp = tied_importance(1, 4, 4096, 64, levels=8, dtype=dtype).cuda()
        want = sort_reference(imp, 16, 64, causal)
        got = nsa.select_blocks(imp, 16, 64, causal=causal)
        assert torch.equal(got, want)
        cont = torch.rand(1, 4, 4096, 64, device="cuda").to(dtype)  # continuous values too
        assert torch.equal(nsa.select_blocks(cont, 16, 64, causal=causal), sort_reference(cont, 16, 64, causal))
