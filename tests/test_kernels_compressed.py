"""The fused compressed-branch kernel, checked on the CPU through Triton's interpreter.

Triton decides at import time whether it interprets, so the kernel tests run
in a child pytest process started with TRITON_INTERPRET=1 (the one test
``test_compressed_kernel_under_triton_interpreter``); this process keeps the
ordinary Triton. References are float64: ``compressed_attention`` on upcast
inputs, the group sum, and ``importance_to_selection_blocks``. The
interpreter gets bfloat16 arithmetic wrong, so bfloat16 is checked on the GPU
(docs/benchmarks.md).
"""
from __future__ import annotations

import math

import pytest
import torch
from einops import reduce

from sparse_attn.ops import nsa

triton = pytest.importorskip("triton")
from sparse_attn.kernels import compressed as cmp  # noqa: E402 (after the Triton check)

from tests.triton_interpreter import INTERPRETED, run_kernel_tests  # noqa: E402


if not INTERPRETED:

    def test_compressed_kernel_under_triton_interpreter():
        run_kernel_tests(__file__, min_passed=30)

    def test_dispatch_stays_on_pytorch_off_cuda(monkeypatch):
        # On the CPU the kernel is never called: poison it and nsa_attention must still work.
        def boom(*a, **k):
            raise AssertionError("kernel called on the CPU")

        monkeypatch.setattr(cmp, "compressed_attention_triton", boom)
        q, k, v = torch.randn(1, 4, 64, 16), torch.randn(1, 2, 64, 16), torch.randn(1, 2, 64, 16)
        out = nsa.nsa_attention(q, k, v, gates=(0.3, 0.4, 0.3), sliding_window_size=8, compress_block_size=8,
                                compress_block_sliding_stride=4, selection_block_size=16, num_selected_blocks=3,
                                causal=True)
        assert out.shape == (1, 4, 64, 16) and not out.isnan().any()


if torch.cuda.is_available() and not INTERPRETED:

    @pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
    def test_cuda_split_second_pass_matches_fused(dtype):
        # The same pass 2 from the stored row max and sum: the output bit for bit, the importance to the
        # rounding of the tf32 mapping product (other tiles of compressed blocks sum in another order).
        q = torch.randn(1, 16, 3000, 64, device="cuda", dtype=dtype)
        k, v = (torch.randn(1, 1, 3000, 64, device="cuda", dtype=dtype) for _ in range(2))
        kc, vc = nsa.compress_kv(k, 32, 16), nsa.compress_kv(v, 32, 16)
        kw = dict(causal=True, selection_block_size=64, num_keys=3000)
        out, imp = cmp.compressed_attention_triton(q, kc, vc, 32, 16, split=False, **kw)
        out2, imp2 = cmp.compressed_attention_triton(q, kc, vc, 32, 16, split=True, rows2=128, block_n2=32, **kw)
        assert torch.equal(out, out2) and not imp2.isnan().any()
        assert ((imp2 - imp).abs().max() / imp.abs().max()).item() < 1e-3
        assert torch.equal(imp > 0, imp2 > 0)
        _, ref_imp = reference(q.cpu(), k.cpu(), v.cpu(), 32, 16, 64, True)
        assert rel_err(imp2.cpu(), ref_imp) < 1e-2


def reference(q, k, v, cbs, stride, sbs, causal, scale=None):
    """float64 compressed output (B, H, Lq, Dv) and group-summed importance (B, Hkv, Lq, Nsel)."""
    scale = 1 / math.sqrt(q.shape[-1]) if scale is None else scale
    kc, vc = nsa.compress_kv(k.double(), cbs, stride), nsa.compress_kv(v.double(), cbs, stride)
    out, p = nsa.compressed_attention(q.double(), kc, vc, cbs, stride, causal=causal, scale=scale)
    M = nsa.importance_to_selection_blocks(kc.shape[2], cbs, stride, sbs, k.shape[2], dtype=torch.float64)
    return out, reduce(p, "b (hk g) i n -> b hk i n", "sum", hk=k.shape[1]) @ M


def rel_err(out, ref):
    return ((out.double() - ref).norm() / ref.norm().clamp(min=1e-30)).item()


def run_kernel(q, k, v, cbs, stride, sbs, causal, dtype=torch.float32, **kw):
    kc, vc = nsa.compress_kv(k, cbs, stride), nsa.compress_kv(v, cbs, stride)
    return cmp.compressed_attention_triton(q.to(dtype), kc.to(dtype), vc.to(dtype), cbs, stride, causal=causal,
                                           selection_block_size=sbs, num_keys=k.shape[2], **kw)


if INTERPRETED:
    CASES = [
        # B, H, Hkv, Lq, Lk, D, Dv, cbs, stride, sbs, causal, block_n
        (1, 4, 2, 40, 40, 16, 16, 8, 4, 16, True, 16),     # overlapping blocks, several tiles
        (2, 3, 1, 37, 50, 16, 32, 6, 3, 10, False, 16),    # G=3 (padded), Dv != D, odd sizes, Lq < Lk
        (1, 8, 2, 70, 70, 32, 16, 4, 2, 8, True, 32),      # G=4, one tile spans many selection blocks
        (1, 2, 2, 33, 33, 24, 24, 5, 5, 7, True, 16),      # G=1, no overlap, D not a power of two
        (1, 2, 1, 9, 70, 16, 16, 4, 4, 64, True, 16),      # one selection block holds every compressed one
        (1, 2, 1, 1, 20, 16, 16, 4, 2, 8, False, 16),      # one query
    ]

    @pytest.mark.parametrize("case", CASES)
    def test_kernel_matches_float64(case):
        B, H, Hkv, Lq, Lk, D, Dv, cbs, st, sbs, causal, bn = case
        q, k, v = torch.randn(B, H, Lq, D), torch.randn(B, Hkv, Lk, D), torch.randn(B, Hkv, Lk, Dv)
        ref_out, ref_imp = reference(q, k, v, cbs, st, sbs, causal)
        out, imp = run_kernel(q, k, v, cbs, st, sbs, causal, block_n=bn, rows=16)
        assert out.shape == (B, H, Lq, Dv) and out.dtype == torch.float32
        assert imp.shape == (B, Hkv, Lq, math.ceil(Lk / sbs)) and imp.dtype == torch.float32
        assert not out.isnan().any() and not imp.isnan().any()
        assert rel_err(out, ref_out) < 1e-5
        assert rel_err(imp, ref_imp) < 1e-5
        # Zero exactly where no visible compressed block overlaps: select_blocks reads 0 as "not eligible".
        assert torch.equal(imp > 0, ref_imp > 0)

    @pytest.mark.parametrize("rows,block_n,causal", [(32, 16, True), (64, 32, True), (256, 64, True),
                                                     (64, 16, False)])
    def test_kernel_launch_settings_do_not_change_results(rows, block_n, causal):
        # 59 compressed blocks: later programs see whole tiles, which run without masks.
        q, k, v = torch.randn(1, 4, 120, 16), torch.randn(1, 2, 120, 16), torch.randn(1, 2, 120, 16)
        ref_out, ref_imp = reference(q, k, v, 4, 2, 8, causal)
        out, imp = run_kernel(q, k, v, 4, 2, 8, causal, rows=rows, block_n=block_n)
        assert rel_err(out, ref_out) < 1e-5 and rel_err(imp, ref_imp) < 1e-5
        assert torch.equal(imp > 0, ref_imp > 0)

    @pytest.mark.parametrize("case", CASES[:4])
    @pytest.mark.parametrize("sum_first,split,reshape_map,transpose2", [
        (True, False, False, False), (False, True, False, False), (True, True, True, False), (True, True, True, True)])
    def test_kernel_group_sum_split_and_map(case, sum_first, split, reshape_map, transpose2):
        # rows=128 puts at least 16 query positions in a program, so sum_first really sums the group's
        # weights before the mapping product (the other order is the one for narrower programs). split runs
        # pass 2 as its own kernel, here with other tiles than pass 1 (from the stored row max and sum).
        # reshape_map=False keeps the mapping product where the reshape would apply (CASES 0 and 2);
        # transpose2 scores pass 2 as (compressed blocks, rows) there, with the group sum inside each thread.
        B, H, Hkv, Lq, Lk, D, Dv, cbs, st, sbs, causal, bn = case
        q, k, v = torch.randn(B, H, Lq, D), torch.randn(B, Hkv, Lk, D), torch.randn(B, Hkv, Lk, Dv)
        ref_out, ref_imp = reference(q, k, v, cbs, st, sbs, causal)
        out, imp = run_kernel(q, k, v, cbs, st, sbs, causal, block_n=bn, rows=128, sum_first=sum_first,
                              split=split, rows2=64, block_n2=2 * bn, reshape_map=reshape_map, transpose2=transpose2)
        assert rel_err(out, ref_out) < 1e-5 and rel_err(imp, ref_imp) < 1e-5
        assert torch.equal(imp > 0, ref_imp > 0)

    def test_kernel_float16_and_scale():
        q, k, v = (torch.randn(1, h, 48, 32) for h in (4, 2, 2))
        ref_out, ref_imp = reference(q.half(), k.half(), v.half(), 8, 4, 16, True, scale=0.3)
        out, imp = run_kernel(q.half(), k.half(), v.half(), 8, 4, 16, True, dtype=torch.float16, scale=0.3)
        assert out.dtype == torch.float16
        assert rel_err(out, ref_out) < 1e-2 and rel_err(imp, ref_imp) < 1e-2

    def test_kernel_early_queries_see_nothing_and_get_zeros():
        # Causal, block 8: queries 0..6 see no ended block. Zeros, not NaN, in both outputs.
        q, k, v = torch.randn(1, 2, 20, 16) * 30, torch.randn(1, 1, 20, 16), torch.randn(1, 1, 20, 16)
        out, imp = run_kernel(q, k, v, 8, 4, 16, True)
        assert torch.equal(out[:, :, :7], torch.zeros(1, 2, 7, 16))
        assert torch.equal(imp[:, :, :7], torch.zeros(1, 1, 7, 2))
        assert (imp[:, :, 7:].sum(-1) - 2).abs().max() < 1e-5  # each row's weights sum to 1 per head, 2 heads

    def test_kernel_shorter_than_one_block():
        q, k, v = torch.randn(1, 2, 5, 16), torch.randn(1, 1, 5, 16), torch.randn(1, 1, 5, 16)
        out, imp = run_kernel(q, k, v, 8, 4, 16, False)
        assert torch.equal(out, torch.zeros(1, 2, 5, 16)) and torch.equal(imp, torch.zeros(1, 1, 5, 1))

    def test_kernel_output_only():
        q, k, v = torch.randn(1, 4, 30, 16), torch.randn(1, 2, 30, 16), torch.randn(1, 2, 30, 16)
        kc, vc = nsa.compress_kv(k, 8, 4), nsa.compress_kv(v, 8, 4)
        out, imp = cmp.compressed_attention_triton(q, kc, vc, 8, 4, causal=True)
        assert imp is None and rel_err(out, reference(q, k, v, 8, 4, 16, True)[0]) < 1e-5

    def test_kernel_through_nsa_dispatch(monkeypatch):
        # Let the dispatch take CPU tensors (the interpreter runs them): nsa_attention must give the
        # float64 PyTorch path's result. Gates picked so that the compressed branch counts.
        monkeypatch.setattr(cmp, "triton_supports", lambda *a: True)
        monkeypatch.setattr(torch.Tensor, "is_cuda", property(lambda self: True))
        calls = []
        real = cmp.compressed_attention_triton
        monkeypatch.setattr(cmp, "compressed_attention_triton", lambda *a, **k: calls.append(1) or real(*a, **k))
        q, k, v = torch.randn(1, 4, 64, 16), torch.randn(1, 2, 64, 16), torch.randn(1, 2, 64, 16)
        kw = dict(gates=(0.5, 0.3, 0.2), sliding_window_size=8, compress_block_size=8,
                  compress_block_sliding_stride=4, selection_block_size=16, num_selected_blocks=3, causal=True)
        with torch.no_grad():
            out = nsa.nsa_attention(q, k, v, **kw)
        monkeypatch.undo()
        ref = nsa.nsa_attention(q.double(), k.double(), v.double(), **kw)
        assert calls == [1]
        assert rel_err(out, ref) < 1e-5

    def test_kernel_path_ranks_float32_importance_with_forced_blocks(monkeypatch):
        # The fused path hands the kernel's importance to select_blocks: float32, with the forcing asked for
        # (not the defaults). Its picks are the float64 reference's wherever float32 cannot reorder blocks.
        from sparse_attn.kernels import selected_block
        from sparse_attn.ops.nsa import attention

        monkeypatch.setattr(cmp, "triton_supports", lambda *a: True)
        monkeypatch.setattr(selected_block, "triton_supports", lambda *a: False)  # interpreted, it is slow here
        monkeypatch.setattr(torch.Tensor, "is_cuda", property(lambda self: True))
        calls, seen = [], []
        real_kernel, real_select = cmp.compressed_attention_triton, attention.select_blocks
        monkeypatch.setattr(cmp, "compressed_attention_triton", lambda *a, **k: calls.append(1) or real_kernel(*a, **k))

        def select(imp, *a, **k):
            seen.append((imp, k, real_select(imp, *a, **k)))
            return seen[-1][2]

        monkeypatch.setattr(attention, "select_blocks", select)
        q, k, v = torch.randn(1, 4, 70, 16), torch.randn(1, 2, 70, 16), torch.randn(1, 2, 70, 16)
        ni, nl = 2, 1
        kw = dict(gates=(0.5, 0.3, 0.2), sliding_window_size=8, compress_block_size=8,
                  compress_block_sliding_stride=4, selection_block_size=8, num_selected_blocks=5, causal=True,
                  num_initial_blocks=ni, num_local_blocks=nl)
        with torch.no_grad():
            nsa.nsa_attention(q, k, v, **kw)
        monkeypatch.undo()
        assert calls == [1] and len(seen) == 1
        imp, opts, got = seen[0]
        assert imp.dtype == torch.float32
        assert opts == {"causal": True, "num_initial_blocks": ni, "num_local_blocks": nl}
        _, ref = reference(q, k, v, 8, 4, 8, True)
        want = nsa.select_blocks(ref, 5, 8, causal=True, num_initial_blocks=ni, num_local_blocks=nl)
        forced = nsa.forced_blocks(70, 9, 8, causal=True, num_initial_blocks=ni, num_local_blocks=nl)
        for i in range(70):  # forced blocks first, ascending, in every row
            n = int(forced[i].sum())
            assert torch.equal(got[0, :, i, :n], forced[i].nonzero().flatten().expand(2, n))
        # Every row picks blocks of the reference's importance (to float32 rounding) ...
        picked = lambda idx: ref.gather(-1, idx.clamp(min=0)).masked_fill(idx < 0, -1).sort(-1).values  # noqa: E731
        torch.testing.assert_close(picked(got), picked(want), rtol=0, atol=1e-5)
        # ... and the very same blocks where the float64 importance leaves a margin between any two.
        vals = ref.sort(dim=-1, descending=True).values
        clear = (vals[..., :-1] - vals[..., 1:]).where(vals[..., 1:] > 0, 1.0).min(-1).values > 1e-4
        assert clear.float().mean() > 0.5 and torch.equal(got[clear], want[clear])

    def test_kernel_rejects_bad_input():
        q, kc = torch.randn(1, 4, 8, 16), torch.randn(1, 2, 3, 16)
        with pytest.raises(TypeError, match="share one dtype"):
            cmp.compressed_attention_triton(q.double(), kc.double(), kc.double(), 4, 2)
        with pytest.raises(ValueError, match=r"q's heads \(4\) must be a multiple of k/v's heads \(3\)"):
            cmp.compressed_attention_triton(q, torch.randn(1, 3, 3, 16), torch.randn(1, 3, 3, 16), 4, 2)
        with pytest.raises(ValueError, match="stride must be >= 1"):
            cmp.compressed_attention_triton(q, kc, kc, 4, 0)
        with pytest.raises(ValueError, match="q must be 4-d"):
            cmp.compressed_attention_triton(q[0], kc, kc, 4, 2)
