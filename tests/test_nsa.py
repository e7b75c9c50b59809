"""NSA-style block-sparse attention: every branch against a reference built another way.

References here are float64 and deliberately naive (Python loops over queries,
explicit token sets, numpy interpolation), so they share no code with the
library beyond dense softmax arithmetic.
"""
from __future__ import annotations

import functools
import itertools
import math

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from sparse_attn.ops.dense import dense_attention
from sparse_attn.modules import BlockCompress, SparseAttention
from sparse_attn.ops.nsa import nsa_attention, selected_block_attention, sliding_window_attention
from sparse_attn.ops.nsa.selected import _selected_reference

F64 = torch.float64


def rand_qkv(B=1, H=4, Hkv=2, Lq=12, Lk=None, D=4, Dv=None, dtype=F64, requires_grad=False):
    Lk = Lq if Lk is None else Lk
    q = torch.randn(B, H, Lq, D, dtype=dtype)
    k = torch.randn(B, Hkv, Lk, D, dtype=dtype)
    v = torch.randn(B, Hkv, Lk, Dv or D, dtype=dtype)
    return [t.requires_grad_(requires_grad) for t in (q, k, v)]


def masked_attention(q, k, v, allowed, scale=None):
    """Dense float64 attention over an explicit (B, H, Lq, Lk) boolean mask; empty rows give 0."""
    H, Hkv = q.shape[1], k.shape[1]
    k = k.repeat_interleave(H // Hkv, dim=1)
    v = v.repeat_interleave(H // Hkv, dim=1)
    scale = 1 / math.sqrt(q.shape[-1]) if scale is None else scale
    s = (q @ k.transpose(-1, -2) * scale).masked_fill(~allowed, float("-inf"))
    w = torch.softmax(s, dim=-1).nan_to_num(0.0)
    return w @ v


def token_mask(block_indices, block_size, H, Lk, causal):
    """Explicit (B, H, Lq, Lk) token mask from blocks, by Python loops."""
    B, Hs, Lq, _ = block_indices.shape
    mask = torch.zeros(B, H, Lq, Lk, dtype=torch.bool)
    for b, h, i in itertools.product(range(B), range(H), range(Lq)):
        hs = h if Hs == H else h // (H // Hs)
        for blk in block_indices[b, hs, i].tolist():
            if blk < 0:
                continue
            for j in range(blk * block_size, min(Lk, (blk + 1) * block_size)):
                if not causal or j <= i:
                    mask[b, h, i, j] = True
    return mask


def random_block_indices(B, Hs, Lq, S, num_blocks, empty_p=0.3, gen=None):
    """Distinct block numbers per row, some slots -1."""
    out = torch.full((B, Hs, Lq, S), -1, dtype=torch.long)
    for b, h, i in itertools.product(range(B), range(Hs), range(Lq)):
        picks = torch.randperm(num_blocks, generator=gen)[:S]
        keep = torch.rand(len(picks), generator=gen) >= empty_p
        out[b, h, i, : len(picks)] = torch.where(keep, picks, -1)
    return out


# --------------------------------------------------------------------------- selected_block_attention


@settings(max_examples=40, deadline=None)
@given(
    seed=st.integers(0, 2**31 - 1),
    Lq=st.integers(1, 13),
    Lk=st.integers(1, 17),
    block_size=st.integers(1, 5),
    S=st.integers(0, 4),
    groups=st.sampled_from([(2, 2), (4, 2), (4, 1)]),
    per_head=st.booleans(),
    causal=st.booleans(),
)
def test_selected_block_attention_matches_masked_dense(seed, Lq, Lk, block_size, S, groups, per_head, causal):
    gen = torch.Generator().manual_seed(seed)
    H, Hkv = groups
    q = torch.randn(2, H, Lq, 3, dtype=F64, generator=gen)
    k = torch.randn(2, Hkv, Lk, 3, dtype=F64, generator=gen)
    v = torch.randn(2, Hkv, Lk, 5, dtype=F64, generator=gen)
    nb = math.ceil(Lk / block_size)  # the last block is partial unless block_size divides Lk
    idx = random_block_indices(2, H if per_head else Hkv, Lq, S, nb, gen=gen)
    out = selected_block_attention(q, k, v, idx, block_size, causal=causal, scale=0.7)
    ref = masked_attention(q, k, v, token_mask(idx, block_size, H, Lk, causal), scale=0.7)
    torch.testing.assert_close(out, ref, rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("per_head", [False, True])
def test_selected_reference_chunked_queries_and_all_blocks_is_dense(per_head):
    q, k, v = rand_qkv(B=2, H=4, Hkv=2, Lq=23, D=4)
    nb = math.ceil(23 / 4)
    idx = torch.arange(nb).flip(0).expand(2, 4 if per_head else 2, 23, nb).contiguous()
    for causal in (False, True):
        ref = dense_attention(q, k, v, causal=causal)
        for qc in (1, 5, None):
            out = _selected_reference(q, k, v, idx, 4, causal=causal, scale=0.5, query_chunk_size=qc)
            torch.testing.assert_close(out, dense_attention(q, k, v, causal=causal, scale=0.5), rtol=1e-12, atol=1e-12)
        torch.testing.assert_close(selected_block_attention(q, k, v, idx, 4, causal=causal), ref, rtol=1e-12, atol=1e-12)


def test_selected_block_attention_gradcheck_and_empty_rows():
    q, k, v = rand_qkv(B=1, H=2, Hkv=1, Lq=6, Lk=7, D=3, requires_grad=True)
    idx = torch.tensor([[[[1, -1], [0, 2], [-1, -1], [3, 0], [2, -1], [1, 3]]]])
    assert torch.autograd.gradcheck(lambda a, b, c: selected_block_attention(a, b, c, idx, 2, causal=True), (q, k, v))
    out = selected_block_attention(q, k, v, idx, 2, causal=True)
    out.sum().backward()
    assert torch.equal(out[0, :, 2], torch.zeros(2, 3, dtype=F64))  # a row of -1 slots
    assert torch.equal(out[0, :, 0], torch.zeros(2, 3, dtype=F64))  # block 1 is all future for query 0
    assert all(t.grad.isfinite().all() for t in (q, k, v))


def test_selected_block_attention_bad_input():
    q, k, v = rand_qkv(B=1, H=4, Hkv=2, Lq=5, Lk=9)
    ok = torch.zeros(1, 2, 5, 2, dtype=torch.long)
    ok[..., 1] = 1
    selected_block_attention(q, k, v, ok, 4)
    with pytest.raises(TypeError, match="block_indices must be int64"):
        selected_block_attention(q, k, v, ok.int(), 4)
    with pytest.raises(ValueError, match="block_indices must have shape"):
        selected_block_attention(q, k, v, torch.zeros(1, 3, 5, 2, dtype=torch.long), 4)
    with pytest.raises(ValueError, match=r"\[-1, 3\).*got values from 2 to 3"):
        selected_block_attention(q, k, v, ok + 2, 4)
    with pytest.raises(ValueError, match="got values from -2"):
        selected_block_attention(q, k, v, ok - 2, 4)
    with pytest.raises(ValueError, match="must not repeat"):
        selected_block_attention(q, k, v, torch.zeros(1, 2, 5, 2, dtype=torch.long), 4)
    selected_block_attention(q, k, v, torch.full((1, 2, 5, 2), -1, dtype=torch.long), 4)  # -1 may repeat
    with pytest.raises(ValueError, match="block_size must be >= 1"):
        selected_block_attention(q, k, v, ok, 0)


# --------------------------------------------------------------------------- sliding window


@pytest.mark.parametrize("causal", [False, True])
@pytest.mark.parametrize("Lq,Lk", [(13, 13), (9, 13), (13, 7)])
def test_sliding_window_matches_band_mask(causal, Lq, Lk):
    q, k, v = rand_qkv(B=2, H=4, Hkv=2, Lq=Lq, Lk=Lk)
    for w in (1, 3, 20):
        i = torch.arange(Lq).view(-1, 1)
        j = torch.arange(Lk)
        band = ((i - j).abs() < w) & ((j <= i) if causal else True)
        ref = masked_attention(q, k, v, band.expand(2, 4, Lq, Lk))
        for qc in (1, 4, None):
            out = sliding_window_attention(q, k, v, w, causal=causal, query_chunk_size=qc)
            torch.testing.assert_close(out, ref, rtol=1e-12, atol=1e-12)


# --------------------------------------------------------------------------- the whole of NSA against a naive one


def naive_nsa(q, k, v, gates, *, window, cbs, stride, sbs, nsel, causal, share, interp, forcing=(0, 0)):
    """NSA by loops over (batch, head, query); returns out, importance, and a function to check a selection.

    ``forcing`` = (initial, local) blocks every query takes whatever their importance (the NSA paper's 1 and 2).
    """
    B, H, L, D = q.shape
    Hkv = k.shape[1]
    G = H // Hkv
    scale = 1 / math.sqrt(D)
    Nc = 0 if L < cbs else (L - cbs) // stride + 1
    Ns = math.ceil(L / sbs)
    blocks = [list(range(c * stride, c * stride + cbs)) for c in range(Nc)]
    kc = torch.stack([k[:, :, b].mean(2) for b in blocks], 2) if Nc else k.new_zeros(B, Hkv, 0, D)
    vc = torch.stack([v[:, :, b].mean(2) for b in blocks], 2) if Nc else v.new_zeros(B, Hkv, 0, D)
    p = torch.zeros(B, H, L, Nc, dtype=F64)
    out_cmp = torch.zeros(B, H, L, v.shape[-1], dtype=F64)
    for b, h, i in itertools.product(range(B), range(H), range(L)):
        seen = [c for c in range(Nc) if not causal or blocks[c][-1] <= i]
        if seen:
            w = torch.softmax(torch.stack([q[b, h, i] @ kc[b, h // G, c] * scale for c in seen]), 0)
            p[b, h, i, seen] = w
            out_cmp[b, h, i] = sum(w[n] * vc[b, h // G, c] for n, c in enumerate(seen))
    imp = torch.zeros(B, H, L, Ns, dtype=F64)
    for b, h, i in itertools.product(range(B), range(H), range(L)):
        if Nc == 0:
            continue
        if interp:
            xs = [c * stride + (cbs - 1) / 2 for c in range(Nc)]
            ys = [s * sbs + (sbs - 1) / 2 for s in range(Ns)]
            imp[b, h, i] = torch.from_numpy(np.interp(ys, xs, p[b, h, i].numpy()))
        else:
            for s in range(Ns):
                sel = set(range(s * sbs, (s + 1) * sbs))
                imp[b, h, i, s] = sum(p[b, h, i, c] * len(sel & set(blocks[c])) / cbs for c in range(Nc))
    if share:
        imp = imp.view(B, Hkv, G, L, Ns).sum(2)
    win = torch.tensor([[abs(i - j) < window and (not causal or j <= i) for j in range(L)] for i in range(L)])
    out_win = masked_attention(q, k, v, win.expand(B, H, L, L))

    def check_selection(block_indices):
        """Assert the picks are the forced blocks, then a valid top set of the other eligible blocks.

        Returns the naive selected output.
        """
        S = min(nsel, Ns)
        assert block_indices.shape == (*imp.shape[:3], S)
        n_init, n_local = forcing
        for idx in itertools.product(*map(range, imp.shape[:3])):
            i = idx[2]
            own = i // sbs
            forced = sorted({s for s in range(min(n_init, Ns)) if not causal or s * sbs <= i}
                            | {s for s in range(own - n_local + 1, own + 1) if 0 <= s < Ns})
            elig = [s for s in range(Ns) if s not in forced and imp[idx][s] > 0 and (not causal or s * sbs <= i)]
            want = sorted((imp[idx][s].item() for s in elig), reverse=True)[: S - len(forced)]
            got = [s for s in block_indices[idx].tolist() if s >= 0]
            assert got[: len(forced)] == forced, (idx, got, forced)
            rest = got[len(forced):]
            assert len(set(got)) == len(got) and set(rest) <= set(elig), (idx, got, elig)
            np.testing.assert_allclose(sorted((imp[idx][s].item() for s in rest), reverse=True), want, rtol=1e-12)
        mask = token_mask(block_indices, sbs, H, L, causal)
        return masked_attention(q, k, v, mask)

    def combine(out_sel):
        g = gates.expand(B, H, L, 3)
        return g[..., :1] * out_cmp + g[..., 1:2] * out_sel + g[..., 2:] * out_win

    return imp, check_selection, combine


NAIVE_CASES = [
    # L, H, Hkv, window, cbs, stride, sbs, nsel
    (16, 4, 2, 3, 4, 4, 4, 2),
    (19, 4, 2, 2, 4, 2, 8, 2),
    (19, 2, 2, 5, 4, 3, 2, 3),
    (13, 4, 1, 1, 3, 1, 5, 1),
    (21, 4, 2, 2, 4, 2, 2, 5),  # two slots beyond the three forced blocks
    (3, 4, 2, 2, 4, 4, 2, 2),  # shorter than a block
]


@pytest.mark.parametrize("case", NAIVE_CASES)
@pytest.mark.parametrize("causal", [False, True])
@pytest.mark.parametrize("share", [True, False])
# Forcing does not depend on how importance is mapped: checked with the overlap mapping only.
@pytest.mark.parametrize("interp,forced", [(False, False), (True, False), (False, True)],
                         ids=["overlap", "interpolated", "overlap-forced"])
def test_nsa_matches_naive_reference(case, causal, share, interp, forced):
    L, H, Hkv, window, cbs, stride, sbs, nsel = case
    # As many of NSA's forced blocks (1 initial, 2 local) as nsel holds. Importance still fills slots: those
    # left when the forced blocks coincide (queries in the first blocks) and, with nsel > 3, the rest.
    n_init = min(1, nsel - 1)
    forcing = (n_init, min(2, nsel - n_init)) if forced else (0, 0)
    q, k, v = rand_qkv(B=2, H=H, Hkv=Hkv, Lq=L, D=4)
    gates = torch.rand(2, H, L, 3, dtype=F64)
    out, maps = nsa_attention(
        q, k, v, gates=gates, sliding_window_size=window, compress_block_size=cbs, compress_block_sliding_stride=stride,
        selection_block_size=sbs, num_selected_blocks=nsel, causal=causal, query_heads_share_selected_kv=share,
        interpolated_importance_score=interp, num_initial_blocks=forcing[0], num_local_blocks=forcing[1],
        return_maps=True,
    )
    imp, check_selection, combine = naive_nsa(q, k, v, gates, window=window, cbs=cbs, stride=stride, sbs=sbs,
                                              nsel=nsel, causal=causal, share=share, interp=interp, forcing=forcing)
    torch.testing.assert_close(maps.importance, imp, rtol=1e-12, atol=1e-14)
    ref = combine(check_selection(maps.block_indices))
    torch.testing.assert_close(out, ref, rtol=1e-11, atol=1e-12)
    # The maps are what the output is made of (mean pooling makes this exact).
    torch.testing.assert_close(maps.combined @ v.repeat_interleave(H // Hkv, 1), out, rtol=1e-11, atol=1e-12)
    sums = maps.selected.sum(-1)
    assert torch.all((sums - 1).abs().lt(1e-12) | sums.eq(0))
    if causal:
        future = torch.ones(L, L, dtype=torch.bool).triu(1)
        for m in (maps.compressed, maps.selected, maps.sliding):
            assert torch.all(m[..., future] == 0)


# --------------------------------------------------------------------------- exact limits


@pytest.mark.parametrize("causal", [False, True])
def test_window_covering_everything_is_dense(causal):
    q, k, v = rand_qkv(B=2, H=4, Hkv=2, Lq=17)
    out = nsa_attention(q, k, v, gates=(0.0, 0.0, 1.0), sliding_window_size=17, compress_block_size=4,
                        selection_block_size=4, num_selected_blocks=3, causal=causal)
    torch.testing.assert_close(out, dense_attention(q, k, v, causal=causal), rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("share", [True, False])
@pytest.mark.parametrize("interp", [False, True])
@pytest.mark.parametrize("sbs", [2, 4, 8])
def test_selection_covering_every_key_is_dense(share, interp, sbs):
    # L a multiple of the compress block: every selection block is scored, so all are eligible.
    q, k, v = rand_qkv(B=2, H=4, Hkv=2, Lq=24)
    out = nsa_attention(q, k, v, gates=(0.0, 1.0, 0.0), sliding_window_size=1, compress_block_size=4,
                        selection_block_size=sbs, num_selected_blocks=24 // sbs + 1,
                        query_heads_share_selected_kv=share, interpolated_importance_score=interp)
    torch.testing.assert_close(out, dense_attention(q, k, v), rtol=1e-12, atol=1e-12)


# --------------------------------------------------------------------------- causality


@pytest.mark.parametrize("gates", [(1.0, 0.0, 0.0), (0.0, 1.0, 0.0), (0.0, 0.0, 1.0), (0.3, 0.5, 0.9)],
                         ids=["compressed", "selected", "sliding", "sum"])
@pytest.mark.parametrize("interp", [False, True])
def test_causal_prefix_is_unchanged_by_the_future(gates, interp):
    L, t = 29, 13
    q, k, v = rand_qkv(B=2, H=4, Hkv=2, Lq=L)
    kw = dict(gates=gates, sliding_window_size=3, compress_block_size=4, compress_block_sliding_stride=2,
              selection_block_size=2, num_selected_blocks=3, causal=True, interpolated_importance_score=interp)
    out = nsa_attention(q, k, v, **kw)
    q2, k2, v2 = (x.clone() for x in (q, k, v))
    for x in (q2, k2, v2):
        x[:, :, t + 1 :] = torch.randn_like(x[:, :, t + 1 :]) * 5
    out2 = nsa_attention(q2, k2, v2, **kw)
    torch.testing.assert_close(out[:, :, : t + 1], out2[:, :, : t + 1], rtol=0, atol=0)
    assert not torch.allclose(out[:, :, t + 1 :], out2[:, :, t + 1 :])
    if gates[0] or gates[1]:
        # The branch is on and answers something before t: the test is not vacuous.
        assert out[:, :, t].abs().sum() > 0


# --------------------------------------------------------------------------- gradients


def test_module_gradients_reach_every_parameter():
    m = SparseAttention(32, 8, 4, kv_heads=2, causal=True, sliding_window_size=2, compress_block_size=4,
                        selection_block_size=4, num_selected_blocks=4, use_diff_topk=True)
    x = torch.randn(2, 20, 32, requires_grad=True)
    m(x).square().sum().backward()
    for name, p in itertools.chain(m.named_parameters(), [("x", x)]):
        assert p.grad is not None and p.grad.isfinite().all() and p.grad.abs().sum() > 0, name


@pytest.mark.parametrize("share", [True, False])
def test_diff_topk_sends_gradient_through_the_selection(share):
    torch.manual_seed(1)
    q, k, v = rand_qkv(B=1, H=4, Hkv=2, Lq=24, requires_grad=True)
    kc, vc = BlockCompress(4, 4).double(), BlockCompress(4, 4).double()
    grads = {}
    for diff in (False, True):
        for t in (q, k, v, *kc.parameters(), *vc.parameters()):
            t.grad = None
        # Only the selected branch counts: any gradient on the compressors came through the selection.
        out = nsa_attention(q, k, v, gates=(0.0, 1.0, 0.0), sliding_window_size=2, compress_block_size=4,
                            selection_block_size=4, num_selected_blocks=4, causal=True, use_diff_topk=diff,
                            query_heads_share_selected_kv=share, compress_fn=(kc, vc))
        out.square().sum().backward()
        grads[diff] = kc.proj.weight.grad
        if diff:
            assert vc.proj.weight.grad is None or vc.proj.weight.grad.abs().sum() == 0  # values never score blocks
    assert grads[False] is None or grads[False].abs().sum() == 0
    assert grads[True] is not None and grads[True].isfinite().all() and grads[True].abs().sum() > 0


def test_diff_topk_does_not_change_the_forward_pass():
    q, k, v = rand_qkv(B=2, H=4, Hkv=2, Lq=21)
    kw = dict(gates=(0.2, 0.7, 0.4), sliding_window_size=2, compress_block_size=4, selection_block_size=2,
              num_selected_blocks=3, causal=True)
    a = nsa_attention(q, k, v, **kw)
    b = nsa_attention(q.requires_grad_(), k.requires_grad_(), v, use_diff_topk=True, **kw)
    torch.testing.assert_close(a, b.detach(), rtol=1e-12, atol=1e-12)


# --------------------------------------------------------------------------- short inputs and bad input


@pytest.mark.parametrize("L", [1, 3])
def test_shorter_than_a_block_only_the_window_answers(L):
    # Forcing off: no compressed block has ended, so nothing is scored and nothing is selected.
    q, k, v = rand_qkv(B=2, H=4, Hkv=2, Lq=L)
    for causal in (False, True):
        out, maps = nsa_attention(q, k, v, gates=(0.5, 0.5, 0.5), sliding_window_size=2, compress_block_size=4,
                                  selection_block_size=2, num_selected_blocks=2, causal=causal, return_maps=True,
                                  num_initial_blocks=0, num_local_blocks=0)
        win = sliding_window_attention(q, k, v, 2, causal=causal)
        torch.testing.assert_close(out, 0.5 * win, rtol=1e-12, atol=1e-12)
        assert maps.compressed_weights.shape[-1] == 0 and torch.all(maps.block_indices == -1)


@pytest.mark.parametrize("L", [1, 3])
def test_shorter_than_a_block_the_forced_blocks_still_answer(L):
    # NSA's forced blocks need no importance: block 0 and the query's own block (2 tokens each here).
    q, k, v = rand_qkv(B=2, H=4, Hkv=2, Lq=L)
    for causal in (False, True):
        out, maps = nsa_attention(q, k, v, gates=(0.5, 0.5, 0.5), sliding_window_size=2, compress_block_size=4,
                                  selection_block_size=2, num_selected_blocks=3, causal=causal, return_maps=True)
        i = torch.arange(L).view(-1, 1)
        j = torch.arange(L)
        seen = (j // 2 <= i // 2) & ((j <= i) if causal else True)  # blocks 0 .. own: all forced at L <= 3
        sel = masked_attention(q, k, v, seen.expand(2, 4, L, L))
        win = sliding_window_attention(q, k, v, 2, causal=causal)
        torch.testing.assert_close(out, 0.5 * sel + 0.5 * win, rtol=1e-12, atol=1e-12)
        assert maps.compressed_weights.shape[-1] == 0 and maps.forced.sum(-1).gt(0).all()


def test_module_bad_input():
    kw = dict(sliding_window_size=2, compress_block_size=4, selection_block_size=4, num_selected_blocks=3)
    with pytest.raises(ValueError, match=r"heads \(8\) must be a multiple of kv_heads \(3\)"):
        SparseAttention(64, 8, 8, kv_heads=3, **kw)
    for name in ("sliding_window_size", "compress_block_size", "selection_block_size"):
        with pytest.raises(ValueError, match=f"{name} must be >= 1, got 0"):
            SparseAttention(64, 8, 8, **{**kw, name: 0})
    with pytest.raises(ValueError, match="num_selected_blocks must be >= 0, got -1"):
        SparseAttention(64, 8, 8, **{**kw, "num_selected_blocks": -1})
    with pytest.raises(ValueError, match=r"compress_block_sliding_stride must be between 1 and compress_block_size \(4\), got 5"):
        SparseAttention(64, 8, 8, compress_block_sliding_stride=5, **kw)
    with pytest.raises(ValueError, match="compress_block_sliding_stride must be >= 1"):
        SparseAttention(64, 8, 8, compress_block_sliding_stride=0, **kw)
    m = SparseAttention(64, 8, 8, **kw)
    with pytest.raises(ValueError, match="dim=64, got 32"):
        m(torch.randn(2, 5, 32))
    with pytest.raises(ValueError, match=r"x must be a \(B, L, dim\) tensor"):
        m(torch.randn(5, 64))


def test_functional_bad_input():
    q, k, v = rand_qkv(B=1, H=4, Hkv=2, Lq=8)
    kw = dict(gates=(1.0, 1.0, 1.0), sliding_window_size=2, compress_block_size=4, selection_block_size=4,
              num_selected_blocks=3)
    with pytest.raises(ValueError, match="multiple of k/v's heads"):
        nsa_attention(q, k[:, :0].repeat(1, 3, 1, 1), v[:, :0].repeat(1, 3, 1, 1), **kw)
    with pytest.raises(ValueError, match="compress_block_sliding_stride must be between 1"):
        nsa_attention(q, k, v, compress_block_sliding_stride=6, **kw)
    for name in ("sliding_window_size", "compress_block_size", "selection_block_size"):
        with pytest.raises(ValueError, match=f"{name} must be >= 1"):
            nsa_attention(q, k, v, **{**kw, name: -1})
    with pytest.raises(ValueError, match=r"gates must broadcast to \(B, H, Lq, 3\)"):
        nsa_attention(q, k, v, **{**kw, "gates": torch.ones(4, 2)})
    with pytest.raises(ValueError, match=r"gates must broadcast.*got shape \(3, 1, 1, 3\)"):
        nsa_attention(q, k, v, **{**kw, "gates": torch.ones(3, 1, 1, 3)})
    with pytest.raises(ValueError, match="compress_fn must map"):
        nsa_attention(q, k, v, compress_fn=lambda blocks: blocks.sum((-2, -1)), **kw)
    with pytest.raises(TypeError, match="compress_fn must be a callable"):
        nsa_attention(q, k, v, compress_fn=3, **kw)


# --------------------------------------------------------------------------- the seed's grid


@functools.lru_cache(maxsize=None)
def _seed_module(kv_heads, causal, sbs, nsel, diff, share, interp):
    torch.manual_seed(0)
    return SparseAttention(
        dim=512, dim_head=64, heads=8, kv_heads=kv_heads, causal=causal, sliding_window_size=2,
        compress_block_size=4, selection_block_size=sbs, num_selected_blocks=nsel, use_diff_topk=diff,
        query_heads_share_selected_kv=share, interpolated_importance_score=interp,
    ).eval()


@pytest.mark.parametrize("interpolated_importance_score", [False, True])
@pytest.mark.parametrize("query_heads_share_selected_kv", [False, True])
# 3, not the seed's 2: the smallest n that holds NSA's 1 initial and 2 local forced blocks.
@pytest.mark.parametrize("num_selected_blocks", [0, 3])
@pytest.mark.parametrize("selection_block_size", [8, 4, 2])
@pytest.mark.parametrize("kv_heads", [8, 4])
@pytest.mark.parametrize("seq_len", [1, 4, 31, 32, 120])
@pytest.mark.parametrize("causal", [False, True])
@pytest.mark.parametrize("use_diff_topk", [False, True])
def test_seed_grid(use_diff_topk, causal, seq_len, kv_heads, selection_block_size, num_selected_blocks,
                   query_heads_share_selected_kv, interpolated_importance_score):
    attn = _seed_module(kv_heads, causal, selection_block_size, num_selected_blocks, use_diff_topk,
                        query_heads_share_selected_kv, interpolated_importance_score)
    tokens = torch.randn(2, seq_len, 512)
    t = seq_len // 2
    if causal:
        # Row 1 is row 0 with a different future: one forward checks causality too.
        tokens[1, : t + 1] = tokens[0, : t + 1]
    with torch.no_grad():
        out = attn(tokens)
    assert out.shape == (2, seq_len, 512) and out.isfinite().all()
    if causal:
        torch.testing.assert_close(out[1, : t + 1], out[0, : t + 1], rtol=1e-5, atol=1e-6)
