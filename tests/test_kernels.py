"""The GPU kernels, checked on the CPU: Triton's interpreter runs the selected-block
kernel with numpy, and the segment-prefilter top-k is plain PyTorch.

Triton decides at import time whether it interprets, so the kernel tests run
in a child pytest process started with TRITON_INTERPRET=1 (the one test
``test_kernels_under_triton_interpreter`` below): this process, and every
other test in the suite, keeps the ordinary Triton.
"""
from __future__ import annotations

import math

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from sparse_attn import nsa
from sparse_attn.attention import dense_attention, topk_attention
from sparse_attn.kernels.topk_prefilter import prefilter_topk_attention

triton = pytest.importorskip("triton")
import sparse_attn.kernels.selected_block as sb_module  # noqa: E402 (after the Triton check)

from tests.triton_interpreter import INTERPRETED, run_kernel_tests  # noqa: E402


@pytest.fixture(scope="module")
def sb():
    return sb_module


if not INTERPRETED:

    def test_kernels_under_triton_interpreter():
        run_kernel_tests(__file__, min_passed=18)


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


def random_indices(B, Hs, Lq, S, n_blocks, empty=0.2):
    """Distinct block numbers per row, some slots -1."""
    idx = torch.rand(B, Hs, Lq, n_blocks).argsort(-1)[..., :S]
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
        idx = random_indices(B, H if per_head else Hkv, Lq, min(S, nb), nb)
        ref = reference(q, k, v, idx, bs, causal)
        out = sb.selected_block_attention_triton(q, k, v, idx, bs, causal=causal)
        assert out.shape == (B, H, Lq, Dv) and out.dtype == torch.float32
        assert not out.isnan().any()
        assert rel_err(out, ref) < 1e-4
        torch_path = nsa._selected_reference(q, k, v, idx, bs, causal=causal, scale=1 / math.sqrt(D))
        assert rel_err(out, torch_path.double()) < 1e-4


    def test_kernel_float16_and_scale(sb):
        # Half precision through the interpreter. (bfloat16 is checked on the GPU run in
        # docs/benchmarks.md: Triton 3.9's interpreter gets bfloat16 arithmetic wrong.)
        q, k, v = (torch.randn(1, h, 48, 32).half() for h in (4, 1, 1))
        idx = random_indices(1, 1, 48, 2, 3)
        ref = reference(q, k, v, idx, 16, True, scale=0.3)
        out = sb.selected_block_attention_triton(q, k, v, idx, 16, causal=True, scale=0.3)
        assert out.dtype == torch.float16
        assert rel_err(out, ref) < 1e-2

    @pytest.mark.parametrize("branch", [True, False])
    def test_kernel_empty_rows_give_zeros(sb, branch):
        # All slots empty, or only future blocks under causal: no allowed key, so zeros (not NaN).
        q, k, v = torch.randn(1, 2, 32, 16), torch.randn(1, 1, 32, 16), torch.randn(1, 1, 32, 16)
        idx = torch.full((1, 1, 32, 2), -1, dtype=torch.long)
        idx[0, 0, :16, 0] = 1  # block 1 starts at key 16: in the future of queries 0..15
        idx[0, 0, 16:, 0] = 0
        out = sb.selected_block_attention_triton(q, k, v, idx, 16, causal=True, branch=branch)
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
        with pytest.raises(TypeError, match="block_indices must be an int64"):
            sb.selected_block_attention_triton(q, k, v, idx.int(), 8)
        with pytest.raises(ValueError, match=r"block_indices must be \(B, Hkv, Lq, S\)"):
            sb.selected_block_attention_triton(q, k, v, idx[:, :, :4], 8)
        with pytest.raises(TypeError, match="float16, bfloat16 or float32"):
            sb.selected_block_attention_triton(q.double(), k.double(), v.double(), idx, 8)
        with pytest.raises(ValueError, match="block_size must be >= 1"):
            sb.selected_block_attention_triton(q, k, v, idx, 0)


if INTERPRETED:
    from sparse_attn.kernels import topk_fused

    FUSED_CASES = [
        # B, H, Hkv, Lq, Lk, top_k, causal, capacity, select
        (1, 4, 2, 40, 70, 5, False, None, "torch"),   # partial last segment, GQA
        (2, 2, 1, 50, 50, 4, True, None, "torch"),    # causal: early rows overflow and are redone
        (1, 2, 2, 33, 80, 4, False, 4, "torch"),      # capacity = top_k: most rows overflow, all exact
        (1, 2, 1, 20, 20, 64, True, None, "torch"),   # top_k > Lk: dense attention
        (1, 2, 1, 16, 70, 3, False, 16, "triton"),    # sorts in registers pick the threshold and the k
        (1, 1, 1, 16, 64, 2, True, 16, "triton"),
    ]
    # (append, fused gather) for each case above; the defaults are ("bits", "triton").
    FUSED_OPTS = [("atomic", "triton"), ("mask", "torch"), ("scan", "torch"), ("bits", "triton"),
                  ("mask", "triton"), ("bits", "triton")]

    @pytest.mark.parametrize("case,opts", list(zip(FUSED_CASES, FUSED_OPTS)))
    def test_kernel_fused_topk_matches_topk_attention(case, opts):
        B, H, Hkv, Lq, Lk, K, causal, C, select = case
        q, k, v = torch.randn(B, H, Lq, 16), torch.randn(B, Hkv, Lk, 16), torch.randn(B, Hkv, Lk, 8)
        out = topk_fused.fused_topk_attention(q, k, v, K, causal=causal, capacity=C, block_m=16, block_n=16,
                                              query_chunk_size=7, select=select, append=opts[0], gather=opts[1])
        ref = topk_attention(q.double(), k.double(), v.double(), K, causal=causal)
        assert out.shape == (B, H, Lq, 8) and not out.isnan().any()
        assert rel_err(out, ref) < 1e-5
        if C == K:
            assert topk_fused.last_overflow_rows > 0  # the exact redo path really ran

    @pytest.mark.parametrize("append,block_n,causal", [("bits", 64, False), ("bits", 16, True), ("scan", 32, False),
                                                       ("mask", 64, False), ("mask", 16, True)])
    def test_kernel_fused_topk_select_matches_torch_topk(append, block_n, causal):
        # block_n=64 puts a passing key on bit 63 of the row mask (the sign bit).
        q, k = torch.randn(1, 2, 16, 16), torch.randn(1, 1, 200, 16)
        vals, idx = topk_fused.fused_topk_select(q, k, 5, causal=causal, block_m=16, block_n=block_n,
                                                 append=append, capacity=64)
        s = (q @ k.transpose(-1, -2))[0]
        if causal:
            s = s.masked_fill(torch.ones(16, 200, dtype=torch.bool).triu(1), float("-inf"))
        ref = s.topk(5, dim=-1)
        ok = ~torch.isneginf(ref.values)  # causal rows 0..3 have fewer than 5 keys
        got = idx.masked_fill(torch.isneginf(vals), -1).sort(-1).values
        want = ref.indices.masked_fill(~ok, -1).sort(-1).values
        assert torch.equal(got, want)
        assert torch.allclose(vals.sort(-1).values, ref.values.sort(-1).values, rtol=1e-5, atol=1e-5)

    def test_kernel_fused_topk_ties():
        # Every key and value appears 4 times: the k-th score is tied, so which copy wins
        # is free, and the output is the same whichever copies are picked.
        q = torch.randn(1, 2, 16, 16)
        k = torch.randn(1, 1, 16, 16).repeat_interleave(4, dim=2)
        v = torch.randn(1, 1, 16, 8).repeat_interleave(4, dim=2)
        out = topk_fused.fused_topk_attention(q, k, v, 6, capacity=32, block_m=16, block_n=16)
        ref = topk_attention(q.double(), k.double(), v.double(), 6)
        assert rel_err(out, ref) < 1e-5

    def test_kernel_fused_topk_rejects_bad_input():
        q = torch.randn(1, 2, 8, 16)
        with pytest.raises(ValueError, match="block_n must be a power of two"):
            topk_fused.fused_topk_attention(q, q, q, 2, block_n=24)
        with pytest.raises(ValueError, match="capacity must be >= 4"):
            topk_fused.fused_topk_attention(q, q, q, 4, capacity=2)
        with pytest.raises(TypeError, match="float16, bfloat16 or float32"):
            topk_fused.fused_topk_attention(q.double(), q.double(), q.double(), 2)
        with pytest.raises(ValueError, match="gather must be 'triton' or 'torch'"):
            topk_fused.fused_topk_attention(q, q, q, 2, gather="numpy")
        with pytest.raises(ValueError, match="append must be one of"):
            topk_fused.fused_topk_attention(q, q, q, 2, append="sort")


def test_dispatch_stays_on_torch_for_cpu(monkeypatch):
    def boom(*args, **kwargs):
        raise AssertionError("the Triton kernel must not run for CPU tensors")

    monkeypatch.setattr(sb_module, "selected_block_attention_triton", boom)
    q, k, v = torch.randn(1, 4, 20, 16), torch.randn(1, 2, 20, 16), torch.randn(1, 2, 20, 16)
    idx = random_indices(1, 2, 20, 2, 3)
    assert not sb_module.triton_supports(q, idx)
    out = nsa.selected_block_attention(q, k, v, idx, 8, causal=True)
    assert rel_err(out, reference(q, k, v, idx, 8, True)) < 1e-4


# --------------------------------------------------------------------------- segment-prefilter top-k


@settings(max_examples=30, deadline=None)
@given(
    hkv=st.integers(1, 2), g=st.integers(1, 3), lq=st.integers(1, 40), lk=st.integers(1, 60),
    top_k=st.integers(1, 70), segment=st.integers(1, 9), qc=st.integers(1, 50), causal=st.booleans(),
    seed=st.integers(0, 2**31 - 1),
)
def test_prefilter_topk_matches_full_topk(hkv, g, lq, lk, top_k, segment, qc, causal, seed):
    gen = torch.Generator().manual_seed(seed)
    q = torch.randn(1, hkv * g, lq, 8, generator=gen, dtype=torch.float64)
    k = torch.randn(1, hkv, lk, 8, generator=gen, dtype=torch.float64)
    v = torch.randn(1, hkv, lk, 4, generator=gen, dtype=torch.float64)
    out, sel = prefilter_topk_attention(q, k, v, top_k, causal=causal, segment=segment, query_chunk_size=qc,
                                        return_selection=True)
    ref, ref_sel = topk_attention(q, k, v, top_k, causal=causal, return_selection=True)
    # Random float64 scores have no ties, so the chosen key sets are identical.
    assert torch.equal(sel.indices.sort(-1).values, ref_sel.indices.sort(-1).values)
    assert torch.allclose(out, ref, rtol=1e-10, atol=1e-12)


def test_prefilter_topk_all_keys_is_dense_and_adversarial_rows():
    q, k, v = torch.randn(2, 4, 33, 16), torch.randn(2, 2, 33, 16), torch.randn(2, 2, 33, 16)
    out = prefilter_topk_attention(q.double(), k.double(), v.double(), 40, causal=True, segment=4, query_chunk_size=8)
    assert torch.allclose(out, dense_attention(q.double(), k.double(), v.double(), causal=True), atol=1e-12)
    # One key far above the rest, in the last (partial) segment: it must win every row.
    q = q.abs() + 1
    k[:, :, 32] = 100.0
    _, sel = prefilter_topk_attention(q, k, v, 1, segment=5, return_selection=True)
    assert (sel.indices == 32).all()
    assert torch.equal(sel.weights, torch.ones_like(sel.weights))


def test_prefilter_topk_bfloat16_matches_bfloat16_topk():
    q, k, v = (torch.randn(1, h, 64, 32).bfloat16() for h in (4, 2, 2))
    out, sel = prefilter_topk_attention(q, k, v, 8, causal=True, segment=8, return_selection=True)
    ref, ref_sel = topk_attention(q, k, v, 8, causal=True, return_selection=True)
    assert out.dtype == torch.bfloat16
    # Same bf16 scores, so the same keys (ties aside); the softmax here runs in float32.
    same = (sel.indices.sort(-1).values == ref_sel.indices.sort(-1).values).all(-1)
    assert same.float().mean() > 0.97
    assert rel_err(out[same], ref[same].double()) < 1e-2


def test_prefilter_topk_rejects_bad_input():
    q = torch.randn(1, 2, 4, 8)
    with pytest.raises(ValueError, match="segment must be >= 1"):
        prefilter_topk_attention(q, q, q, 2, segment=0)
    with pytest.raises(TypeError, match="top_k must be an int"):
        prefilter_topk_attention(q, q, q, 2.0)


# --------------------------------------------------------------------------- benchmark sweeps


def test_sweep_notes_cases_it_cannot_run_and_goes_on():
    from sparse_attn import bench

    cases = bench.sweep_cases(["bogus", "fused_topk", "sdpa"], [64, 1 << 40], devices=["cpu"])
    assert len(cases) == 6
    if not torch.cuda.is_available():
        cases += bench.sweep_cases(["sdpa"], [64], devices=["cuda"])
    seen = []
    runnable = lambda c: c.method == "sdpa" and c.length == 64 and c.device == "cpu"  # noqa: E731
    rows = bench.run_sweep([c for c in cases if not runnable(c)], progress=False,
                           on_row=seen.append)
    notes = [r["note"] for r in rows]
    assert seen == rows and all(notes)
    assert any("unknown method 'bogus'" in n for n in notes)
    assert any("fused_topk runs on CUDA only" in n for n in notes)
    assert any(n.startswith("skipped: needs about") for n in notes)  # a length no machine holds
    if not torch.cuda.is_available():
        assert "CUDA is not available" in notes[-1]


def test_speedup_and_report_from_rows():
    pytest.importorskip("plotly")
    from sparse_attn import bench

    rows = []
    for n, t_sdpa, t_sel in ((1024, 2e-3, 4e-3), (4096, 3e-2, 1e-2)):
        for m, t in (("sdpa", t_sdpa), ("nsa_selected", t_sel)):
            rows.append({**bench.asdict(bench.Case(method=m, length=n)), "median_s": t, "iqr_s": t / 10,
                         "runs": 5, "peak_extra_bytes": n * 1024})
    rows.append({**bench.asdict(bench.Case(method="nsa", length=4096)), "note": "skipped: out of memory"})
    bench._add_speedup(rows)
    assert rows[1]["speedup_vs_sdpa"] == pytest.approx(0.5) and rows[3]["speedup_vs_sdpa"] == pytest.approx(3.0)
    figs = bench.sweep_figures(rows)
    assert [f.layout.xaxis.type for f in figs] == ["log"] * 3
    speed = {t.name: list(t.y) for t in figs[2].data}
    assert speed["nsa_selected"] == pytest.approx([0.5, 3.0])
    page = bench.report_html(rows, {"torch": torch.__version__})
    assert page.count("<tr>") == len(rows) + 1 and "skipped: out of memory" in page and "plotly" in page
