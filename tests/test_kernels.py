"""The selected-block and fused top-k kernels, checked on the CPU: Triton's interpreter runs them with numpy.

Triton decides at import time whether it interprets, so the kernel tests run
in a child pytest process started with TRITON_INTERPRET=1 (the one test
``test_kernels_under_triton_interpreter`` below): this process, and every
other test in the suite, keeps the ordinary Triton.
"""
from __future__ import annotations

import math

import pytest
import torch

from sparse_attn.kernels.dispatch import reference_only
from sparse_attn.ops import nsa
from sparse_attn.ops.dense import dense_attention
from sparse_attn.ops.topk import topk_attention

triton = pytest.importorskip("triton")
import sparse_attn.kernels.selected_block as sb_module  # noqa: E402 (after the Triton check)

from tests.triton_interpreter import INTERPRETED, run_kernel_tests  # noqa: E402


@pytest.fixture(scope="module")
def sb():
    return sb_module


if not INTERPRETED:

    def test_kernels_under_triton_interpreter():
        run_kernel_tests(__file__, min_passed=40)


def reference(q, k, v, idx, block_size, causal, scale=None):
    """float64 dense attention restricted to the selected blocks' keys (O(Lq * Lk): small inputs only)."""
    B, H, Lq, D = q.shape
    Lk = k.shape[2]
    scale = 1 / math.sqrt(D) if scale is None else scale
    nb = math.ceil(Lk / block_size)
    hit = torch.zeros(*idx.shape[:3], nb + 1, dtype=torch.bool)
    hit.scatter_(-1, torch.where(idx < 0, nb, idx), True)  # -1 lands in a spare column
    keys = hit[..., :nb].repeat_interleave(block_size, -1)[..., :Lk].repeat_interleave(H // idx.shape[1], 1)
    if causal:
        keys &= torch.arange(Lk) <= torch.arange(Lq)[:, None]
    G = H // k.shape[1]
    s = q.double() @ k.double().repeat_interleave(G, 1).transpose(-1, -2) * scale
    w = torch.softmax(s.masked_fill(~keys, float("-inf")), -1).nan_to_num(0.0)
    return w @ v.double().repeat_interleave(G, 1)


def random_indices(B, Hs, Lq, Lk, S, block_size, empty=0.2):
    """Distinct block numbers per row, future blocks included (causal kernels must mask them), some slots -1."""
    idx = nsa.random_block_indices(B, Hs, Lq, Lk, S, block_size, causal=False)
    return idx.masked_fill(torch.rand(idx.shape) < empty, -1)


def rel_err(out, ref):
    return ((out.double() - ref).norm() / ref.norm().clamp(min=1e-30)).item()


if INTERPRETED:
    CASES = [
        # B, H, Hkv, Lq, Lk, D, Dv, block, S, causal, per_head
        (1, 4, 2, 40, 40, 16, 16, 16, 2, True, False),     # group of 2 shares a selection
        (2, 3, 1, 21, 37, 16, 32, 8, 3, False, False),     # G=3 (padded), Dv != D, partial last block
        (1, 2, 2, 33, 33, 24, 8, 12, 2, True, False),      # block and D not powers of two
        (1, 4, 2, 30, 30, 16, 16, 16, 2, True, True),      # one selection per query head
        (1, 2, 1, 9, 70, 16, 16, 32, 3, True, False),      # Lq < Lk, causal top-left
    ]


    @pytest.mark.parametrize("case", CASES)
    def test_kernel_matches_float64_and_torch_reference(sb, case):
        B, H, Hkv, Lq, Lk, D, Dv, bs, S, causal, per_head = case
        q, k = torch.randn(B, H, Lq, D), torch.randn(B, Hkv, Lk, D)
        v = torch.randn(B, Hkv, Lk, Dv)
        nb = math.ceil(Lk / bs)
        idx = random_indices(B, H if per_head else Hkv, Lq, Lk, min(S, nb), bs)
        ref = reference(q, k, v, idx, bs, causal)
        out = sb.selected_block_attention_triton(q, k, v, idx, bs, causal=causal)
        assert out.shape == (B, H, Lq, Dv) and out.dtype == torch.float32
        assert not out.isnan().any()
        assert rel_err(out, ref) < 1e-4
        with reference_only():
            torch_path = nsa.selected_block_attention(q, k, v, idx, bs, causal=causal)
        assert rel_err(out, torch_path.double()) < 1e-4


    @pytest.mark.parametrize("case", CASES)
    @pytest.mark.parametrize("queries,block_nb", [(2, 16), (4, 16), (8, 32)])
    def test_kernel_query_tiles_match_float64(sb, case, queries, block_nb):
        # Several queries per program: shared leading slots once, the rest per query in key steps.
        B, H, Hkv, Lq, Lk, D, Dv, bs, S, causal, per_head = case
        q, k = torch.randn(B, H, Lq, D), torch.randn(B, Hkv, Lk, D)
        v = torch.randn(B, Hkv, Lk, Dv)
        idx = random_indices(B, H if per_head else Hkv, Lq, Lk, min(S, math.ceil(Lk / bs)), bs)
        out = sb.selected_block_attention_triton(q, k, v, idx, bs, causal=causal, queries=queries,
                                                 block_nb=block_nb)
        assert not out.isnan().any()
        assert rel_err(out, reference(q, k, v, idx, bs, causal)) < 1e-4

    @pytest.mark.parametrize("queries", [1, 4, 16])
    def test_kernel_nsa_selection_shares_forced_blocks(sb, queries):
        # NSA's own selection (forced initial and local blocks first): tiles inside one block share
        # their leading slots, tiles across a block boundary share fewer; both must give the reference.
        B, H, Hkv, L, D, bs, S = 1, 4, 2, 100, 16, 16, 4
        q, k, v = torch.randn(B, H, L, D), torch.randn(B, Hkv, L, D), torch.randn(B, Hkv, L, D)
        idx = nsa.select_blocks(torch.rand(B, Hkv, L, math.ceil(L / bs)), S, bs, causal=True)
        assert (idx[:, :, 32:48, :3] == idx[:, :, 32:33, :3]).all()  # the shared prefix the kernel uses
        out = sb.selected_block_attention_triton(q, k, v, idx, bs, causal=True, queries=queries)
        assert rel_err(out, reference(q, k, v, idx, bs, True)) < 1e-4

    @pytest.mark.parametrize("queries,per_head,per_row_gates", [(1, False, False), (4, False, True), (4, True, True)])
    def test_kernel_gated_sum_in_the_store(sb, queries, per_head, per_row_gates):
        # NSA's gated sum taken inside the kernel's store: per-row gates or broadcast ones (stride 0), the
        # other two branches' outputs read once (any strides); against the float64 sum of the float64 branch.
        B, H, Hkv, L, D, bs, S = 1, 4, 2, 20, 16, 8, 2
        q, k, v = torch.randn(B, H, L, D), torch.randn(B, Hkv, L, D), torch.randn(B, Hkv, L, D)
        idx = random_indices(B, H if per_head else Hkv, L, L, S, bs)
        out_cmp = torch.randn(B, H, L, D)
        out_slide = torch.randn(B, L, H, D).transpose(1, 2)
        gates = torch.rand(B, H, L, 3) if per_row_gates else torch.tensor([0.2, 0.5, 0.3]).expand(B, H, L, 3)
        got = sb.selected_block_attention_triton(q, k, v, idx, bs, causal=True, queries=queries,
                                                 gated=(out_cmp, out_slide, gates))
        g = gates.double()
        want = (g[..., 0:1] * out_cmp.double() + g[..., 1:2] * reference(q, k, v, idx, bs, True)
                + g[..., 2:3] * out_slide.double())
        assert got.shape == (B, H, L, D) and not got.isnan().any()
        assert rel_err(got, want) < 1e-5
        with pytest.raises(ValueError, match="gated: out_slide must be"):
            sb.selected_block_attention_triton(q, k, v, idx, bs, gated=(out_cmp, out_slide[:, :1], gates))

    def test_kernel_rejects_bad_launch(sb):
        q, k, v = torch.randn(1, 4, 8, 16), torch.randn(1, 2, 8, 16), torch.randn(1, 2, 8, 16)
        idx = torch.zeros(1, 2, 8, 1, dtype=torch.long)
        with pytest.raises(ValueError, match="queries must be a power of two, got 3"):
            sb.selected_block_attention_triton(q, k, v, idx, 8, queries=3)

    def test_kernel_float16_and_scale(sb):
        # Half precision through the interpreter. (bfloat16 is checked on the GPU run in
        # docs/benchmarks.md: Triton 3.9's interpreter gets bfloat16 arithmetic wrong.)
        q, k, v = (torch.randn(1, h, 48, 32).half() for h in (4, 1, 1))
        idx = random_indices(1, 1, 48, 48, 2, 16)
        ref = reference(q, k, v, idx, 16, True, scale=0.3)
        out = sb.selected_block_attention_triton(q, k, v, idx, 16, causal=True, scale=0.3)
        assert out.dtype == torch.float16
        assert rel_err(out, ref) < 1e-2

    def test_kernel_empty_rows_give_zeros(sb):
        # All slots empty, or only future blocks under causal: no allowed key, so zeros (not NaN).
        q, k, v = torch.randn(1, 2, 32, 16), torch.randn(1, 1, 32, 16), torch.randn(1, 1, 32, 16)
        idx = torch.full((1, 1, 32, 2), -1, dtype=torch.long)
        idx[0, 0, :16, 0] = 1  # block 1 starts at key 16: in the future of queries 0..15
        idx[0, 0, 16:, 0] = 0
        out = sb.selected_block_attention_triton(q, k, v, idx, 16, causal=True)
        assert torch.equal(out[:, :, :16], torch.zeros(1, 2, 16, 16))
        assert rel_err(out, reference(q, k, v, idx, 16, True)) < 1e-4


    def test_kernel_all_blocks_is_dense_attention(sb):
        q, k, v = torch.randn(1, 4, 24, 16), torch.randn(1, 2, 24, 16), torch.randn(1, 2, 24, 16)
        idx = torch.arange(3).expand(1, 2, 24, 3).flip(-1).contiguous()  # every block, in any order
        out = sb.selected_block_attention_triton(q, k, v, idx, 8, causal=True)
        assert rel_err(out, dense_attention(q.double(), k.double(), v.double(), causal=True)) < 1e-4


    def test_kernel_rejects_bad_input(sb):
        q, k, v = torch.randn(1, 4, 8, 16), torch.randn(1, 2, 8, 16), torch.randn(1, 2, 8, 16)
        idx = torch.zeros(1, 2, 8, 1, dtype=torch.long)
        with pytest.raises(TypeError, match="block_indices must be int64"):
            sb.selected_block_attention_triton(q, k, v, idx.int(), 8)
        with pytest.raises(ValueError, match=r"block_indices must have shape \(B, Hkv, Lq, S\)"):
            sb.selected_block_attention_triton(q, k, v, idx[:, :, :4], 8)
        with pytest.raises(TypeError, match="float16, bfloat16 or float32"):
            sb.selected_block_attention_triton(q.double(), k.double(), v.double(), idx, 8)
        with pytest.raises(ValueError, match="block_size must be >= 1"):
            sb.selected_block_attention_triton(q, k, v, idx, 0)


if INTERPRETED:
    from sparse_attn.kernels import topk_fused

    FUSED_CASES = [
        # B, H, Hkv, Lq, Lk, top_k, causal, capacity, sort: "triton" in registers, "torch" by torch.topk
        (1, 4, 2, 40, 70, 5, False, None, "torch"),   # partial last segment, GQA
        (2, 2, 1, 50, 50, 4, True, None, "torch"),    # causal: early rows overflow and are redone
        (1, 2, 2, 33, 80, 4, False, 4, "torch"),      # capacity = top_k: most rows overflow, all exact
        (1, 2, 1, 20, 20, 64, True, None, "torch"),   # top_k > Lk: dense attention
        (1, 2, 1, 16, 70, 3, False, 16, "triton"),    # sorts in registers pick the threshold and the k
        (1, 1, 1, 16, 64, 2, True, 16, "triton"),
    ]

    @pytest.mark.parametrize("case", FUSED_CASES)
    def test_kernel_fused_topk_matches_topk_attention(case, monkeypatch):
        B, H, Hkv, Lq, Lk, K, causal, C, sort = case
        if sort == "torch":  # rows longer than a sort in registers takes go to torch.topk: make every row one
            monkeypatch.setattr(topk_fused, "_SORT_MAX", 0)
        picks = []  # what fused_topk_attention's own selection returned
        select = topk_fused.fused_topk_select

        def spy(*args, **kwargs):
            picks.append(select(*args, **kwargs))
            return picks[-1]

        monkeypatch.setattr(topk_fused, "fused_topk_select", spy)
        q, k, v = torch.randn(B, H, Lq, 16), torch.randn(B, Hkv, Lk, 16), torch.randn(B, Hkv, Lk, 8)
        out = topk_fused.fused_topk_attention(q, k, v, K, causal=causal, capacity=C, block_m=16, block_n=16)
        ref = topk_attention(q.double(), k.double(), v.double(), K, causal=causal)
        assert out.shape == (B, H, Lq, 8) and not out.isnan().any()
        assert rel_err(out, ref) < 1e-5
        if C == K:
            assert picks[0].overflow_rows > 0  # the exact redo path really ran

    @pytest.mark.parametrize("block_n,causal", [(64, False), (16, True), (32, False)])
    def test_kernel_fused_topk_select_matches_torch_topk(block_n, causal):
        # block_n=64 puts a passing key on bit 63 of the row mask (the sign bit).
        q, k = torch.randn(1, 2, 16, 16), torch.randn(1, 1, 200, 16)
        vals, idx, _ = topk_fused.fused_topk_select(q, k, 5, causal=causal, block_m=16, block_n=block_n,
                                                    capacity=64)
        s = (q @ k.transpose(-1, -2))[0]
        if causal:
            s = s.masked_fill(torch.ones(16, 200, dtype=torch.bool).triu(1), float("-inf"))
        ref = s.topk(5, dim=-1)
        ok = ~torch.isneginf(ref.values)  # causal rows 0..3 have fewer than 5 keys
        got = idx.masked_fill(torch.isneginf(vals), -1).sort(-1).values
        want = ref.indices.masked_fill(~ok, -1).sort(-1).values
        assert torch.equal(got, want)
        assert torch.allclose(vals.sort(-1).values, ref.values.sort(-1).values, rtol=1e-5, atol=1e-5)

    def test_kernel_fused_topk_select_wide_segments_append_in_the_tile():
        # Segments wider than 64 keys get no int64 mask: not causal either, pass 2 appends in the tile.
        q, k = torch.randn(1, 2, 16, 16), torch.randn(1, 1, 700, 16)
        vals, idx, overflow_rows = topk_fused.fused_topk_select(q, k, 5, block_m=16, block_n=128, capacity=64)
        ref = (q @ k.transpose(-1, -2))[0].topk(5, dim=-1)
        assert overflow_rows == 0  # the kernels' candidates made the pick, not the exact redo
        assert torch.equal(idx.sort(-1).values, ref.indices.sort(-1).values)
        assert torch.allclose(vals.sort(-1).values, ref.values.sort(-1).values, rtol=1e-5, atol=1e-5)

    def test_kernel_fused_topk_ties(monkeypatch):
        # Every key appears 4 times in a row: the k-th score is tied, and the tie rule keeps
        # the lowest-index copies (tests/test_tie_rule.py checks the rule on every path).
        picks = []
        select = topk_fused.fused_topk_select
        spy = lambda *a, **kw: picks.append(select(*a, **kw)) or picks[-1]  # noqa: E731
        monkeypatch.setattr(topk_fused, "fused_topk_select", spy)
        q = torch.randn(1, 2, 16, 16)
        k = torch.randn(1, 1, 16, 16).repeat_interleave(4, dim=2)
        v = torch.randn(1, 1, 64, 8)  # distinct values: picking another copy would change the output
        out = topk_fused.fused_topk_attention(q, k, v, 6, capacity=32, block_m=16, block_n=16)
        ref, sel = topk_attention(q.double(), k.double(), v.double(), 6, return_selection=True)
        assert rel_err(out, ref) < 1e-5
        # 4 segments < top_k: all 64 keys are candidates, over capacity, so every row is redone exactly.
        idx = picks[0].indices
        assert torch.equal(idx.view(2, 16, 6), sel.indices[0].sort(-1).values)  # ascending key index

    def test_kernel_fused_topk_through_topk_attention_dispatch(monkeypatch):
        # Let the dispatch take CPU tensors (the interpreter runs them): topk_attention's streaming
        # form must hand over to the fused kernels and give the float64 reference's result.
        monkeypatch.setattr(torch.Tensor, "is_cuda", property(lambda self: True))
        # The default capacity's sort in registers takes the interpreter seconds: torch.topk picks here.
        monkeypatch.setattr(topk_fused, "_SORT_MAX", 0)
        calls = []
        real = topk_fused.fused_topk_attention
        monkeypatch.setattr(topk_fused, "fused_topk_attention", lambda *a, **kw: calls.append(1) or real(*a, **kw))
        q, k, v = torch.randn(1, 2, 16, 16), torch.randn(1, 1, 40, 16), torch.randn(1, 1, 40, 8)
        with torch.no_grad():
            out = topk_attention(q, k, v, 3, chunk_size=16)
        monkeypatch.undo()
        ref = topk_attention(q.double(), k.double(), v.double(), 3)
        assert calls == [1]
        assert rel_err(out, ref) < 1e-5

    def test_kernel_fused_topk_rejects_bad_input():
        q = torch.randn(1, 2, 8, 16)
        with pytest.raises(ValueError, match="block_n must be a power of two"):
            topk_fused.fused_topk_attention(q, q, q, 2, block_n=24)
        with pytest.raises(ValueError, match="capacity must be >= 4"):
            topk_fused.fused_topk_attention(q, q, q, 4, capacity=2)
        with pytest.raises(TypeError, match="float16, bfloat16 or float32"):
            topk_fused.fused_topk_attention(q.double(), q.double(), q.double(), 2)
        with pytest.raises(ValueError, match="scale must be a finite number > 0"):  # it ranks raw q.k
            topk_fused.fused_topk_attention(q, q, q, 2, scale=-0.5)


def test_dispatch_stays_on_torch_for_cpu(monkeypatch):
    def boom(*args, **kwargs):
        raise AssertionError("the Triton kernel must not run for CPU tensors")

    monkeypatch.setattr(sb_module, "selected_block_attention_triton", boom)
    q, k, v = torch.randn(1, 4, 20, 16), torch.randn(1, 2, 20, 16), torch.randn(1, 2, 20, 16)
    idx = random_indices(1, 2, 20, 20, 2, 8)
    assert not sb_module.triton_supports(q, k, v, idx)
    out = nsa.selected_block_attention(q, k, v, idx, 8, causal=True)
    assert rel_err(out, reference(q, k, v, idx, 8, True)) < 1e-4
