"""dense_attention and topk_attention against float64 references."""
import sys
import types

import pytest
import torch
import torch.nn.functional as F
from hypothesis import given, settings
from hypothesis import strategies as st

from sparse_attn.ops.dense import dense_attention
from sparse_attn.ops.topk import topk_attention


def rand_qkv(B=2, H=4, Hkv=2, Lq=33, Lk=47, D=16, Dv=8, dtype=torch.float64, seed=0):
    g = torch.Generator().manual_seed(seed)
    q = torch.randn(B, H, Lq, D, generator=g, dtype=dtype)
    k = torch.randn(B, Hkv, Lk, D, generator=g, dtype=dtype)
    v = torch.randn(B, Hkv, Lk, Dv, generator=g, dtype=dtype)
    return q, k, v


def naive_topk_reference(q, k, v, top_k, causal, scale=None):
    """Loop-per-row float64 reference: mask, pick the top_k allowed keys (ties: lower index), softmax over them."""
    B, H, Lq, D = q.shape
    Hkv, Lk = k.shape[1], k.shape[2]
    scale = D**-0.5 if scale is None else scale
    out = torch.zeros(B, H, Lq, v.shape[-1], dtype=torch.float64)
    for b in range(B):
        for h in range(H):
            hk = h // (H // Hkv)
            for i in range(Lq):
                allowed = torch.arange(Lk) if not causal else torch.arange(min(i + 1, Lk))
                if len(allowed) == 0:
                    continue
                s = (k[b, hk, allowed].double() @ q[b, h, i].double()) * scale
                top = torch.sort(s, descending=True, stable=True)  # the tie rule's reference
                n = min(top_k, len(allowed))
                w = torch.softmax(top.values[:n], -1)
                out[b, h, i] = w @ v[b, hk, allowed[top.indices[:n]]].double()
    return out


@pytest.mark.parametrize("causal", [False, True])
@pytest.mark.parametrize("gqa", [(4, 4), (4, 2), (6, 1)])
def test_dense_matches_sdpa(causal, gqa):
    H, Hkv = gqa
    q, k, v = rand_qkv(H=H, Hkv=Hkv, Lq=20, Lk=31)
    ref = F.scaled_dot_product_attention(q, k, v, is_causal=causal, enable_gqa=Hkv != H)
    torch.testing.assert_close(dense_attention(q, k, v, causal=causal), ref, rtol=1e-12, atol=1e-12)


def test_dense_scale_and_weights():
    q, k, v = rand_qkv(H=2, Hkv=2)
    out, w = dense_attention(q, k, v, scale=0.3, return_weights=True)
    ref = F.scaled_dot_product_attention(q, k, v, scale=0.3)
    torch.testing.assert_close(out, ref)
    torch.testing.assert_close(w.sum(-1), torch.ones_like(w[..., 0]))


@pytest.mark.parametrize("chunk_size", [None, 1, 5, 16, 64])
@pytest.mark.parametrize("causal", [False, True])
@pytest.mark.parametrize("top_k", [1, 3, 10])
def test_topk_matches_naive_reference(chunk_size, causal, top_k):
    q, k, v = rand_qkv(Lq=19, Lk=23)
    out = topk_attention(q, k, v, top_k, causal=causal, chunk_size=chunk_size, query_chunk_size=7)
    torch.testing.assert_close(out, naive_topk_reference(q, k, v, top_k, causal), rtol=1e-10, atol=1e-10)


@pytest.mark.parametrize("causal", [False, True])
@pytest.mark.parametrize("shape", [(33, 47), (47, 33), (1, 1), (1, 50), (50, 1)])
@pytest.mark.parametrize("chunk_size", [None, 4])
def test_k_at_least_length_is_dense(causal, shape, chunk_size):
    Lq, Lk = shape
    q, k, v = rand_qkv(Lq=Lq, Lk=Lk)
    ref = dense_attention(q, k, v, causal=causal)
    for top_k in (Lk, Lk + 1, 10 * Lk):
        out = topk_attention(q, k, v, top_k, causal=causal, chunk_size=chunk_size)
        assert (out - ref).abs().max() < 1e-10


@settings(max_examples=40, deadline=None)
@given(
    B=st.integers(1, 2), Hkv=st.integers(1, 3), G=st.integers(1, 3), Lq=st.integers(1, 24),
    Lk=st.integers(1, 24), D=st.integers(1, 9), top_k=st.integers(1, 30), causal=st.booleans(),
    chunk=st.one_of(st.none(), st.integers(1, 30)), qchunk=st.one_of(st.none(), st.integers(1, 30)),
    seed=st.integers(0, 10_000),
)
def test_property_chunked_equals_unchunked(B, Hkv, G, Lq, Lk, D, top_k, causal, chunk, qchunk, seed):
    q, k, v = rand_qkv(B=B, H=Hkv * G, Hkv=Hkv, Lq=Lq, Lk=Lk, D=D, Dv=3, seed=seed)
    full, sel_full = topk_attention(q, k, v, top_k, causal=causal, return_selection=True)
    out, sel = topk_attention(q, k, v, top_k, causal=causal, chunk_size=chunk, query_chunk_size=qchunk,
                              return_selection=True)
    torch.testing.assert_close(out, full, rtol=1e-10, atol=1e-10)
    torch.testing.assert_close(out, naive_topk_reference(q, k, v, top_k, causal), rtol=1e-10, atol=1e-10)
    # The same keys with the same weights, whatever the chunking, in the same order.
    torch.testing.assert_close(sel.to_dense(Lk), sel_full.to_dense(Lk), rtol=1e-10, atol=1e-10)
    assert torch.equal(sel.indices, sel_full.indices)
    assert not out.isnan().any()


def test_selection_is_top_k_of_dense_weights():
    q, k, v = rand_qkv(H=4, Hkv=2, Lq=30, Lk=40)
    _, w = dense_attention(q, k, v, causal=True, return_weights=True)
    out, sel = topk_attention(q, k, v, 5, causal=True, chunk_size=8, return_selection=True)
    assert sel.indices.shape == (2, 4, 30, 5)
    # Each query's selected keys hold the 5 largest dense weights among its allowed keys.
    for i in (0, 3, 29):
        n = min(5, i + 1)
        expected = set(torch.topk(w[0, 1, i, : i + 1], n).indices.tolist())
        got = set(sel.indices[0, 1, i].tolist()) - {-1}
        assert got == expected
        assert (sel.indices[0, 1, i] == -1).sum() == 5 - n
    # Weights renormalise the selected dense weights.
    mask = sel.mask(40)
    renorm = torch.where(mask, w, 0) / torch.where(mask, w, 0).sum(-1, keepdim=True)
    torch.testing.assert_close(sel.to_dense(40), renorm)


@pytest.mark.parametrize("chunk_size", [None, 3])
def test_causality(chunk_size):
    q, k, v = rand_qkv(H=2, Hkv=1, Lq=20, Lk=20)
    t = 11
    out = topk_attention(q, k, v, 4, causal=True, chunk_size=chunk_size)
    k2, v2 = k.clone(), v.clone()
    k2[:, :, t + 1 :] = 100 * torch.randn_like(k2[:, :, t + 1 :])
    v2[:, :, t + 1 :] = torch.randn_like(v2[:, :, t + 1 :])
    out2 = topk_attention(q, k2, v2, 4, causal=True, chunk_size=chunk_size)
    torch.testing.assert_close(out[:, :, : t + 1], out2[:, :, : t + 1], rtol=0, atol=0)
    assert not torch.allclose(out[:, :, t + 1 :], out2[:, :, t + 1 :])


@pytest.mark.parametrize("chunk_size", [None, 4])
def test_gradcheck(chunk_size):
    q, k, v = rand_qkv(B=1, H=2, Hkv=1, Lq=6, Lk=9, D=4, Dv=3)
    q.requires_grad_(), k.requires_grad_(), v.requires_grad_()
    fn = lambda q, k, v: topk_attention(q, k, v, 3, causal=True, chunk_size=chunk_size)  # noqa: E731
    assert torch.autograd.gradcheck(fn, (q, k, v))


def test_gradients_only_through_selected_keys():
    q, k, v = rand_qkv(B=1, H=1, Hkv=1, Lq=1, Lk=10, D=4, Dv=3)
    k.requires_grad_(), v.requires_grad_()
    out, sel = topk_attention(q, k, v, 3, return_selection=True)
    out.sum().backward()
    picked = torch.zeros(10, dtype=torch.bool)
    picked[sel.indices[0, 0, 0]] = True
    assert (v.grad[0, 0].abs().sum(-1) > 0).eq(picked).all()
    assert (k.grad[0, 0, ~picked] == 0).all()


def test_low_precision_close_to_float64():
    q, k, v = rand_qkv(Lq=64, Lk=64, D=32)
    for dtype, tol in ((torch.float32, 1e-6), (torch.bfloat16, 2e-2), (torch.float16, 2e-3)):
        # Reference on the same rounded inputs, so only the arithmetic differs.
        ql, kl, vl = q.to(dtype), k.to(dtype), v.to(dtype)
        ref, sel_ref = topk_attention(ql.double(), kl.double(), vl.double(), 8, return_selection=True)
        out, sel = topk_attention(ql, kl, vl, 8, chunk_size=16, return_selection=True)
        assert out.dtype == dtype
        # Rounded scores may swap a near-tie at the k-th place; such rows differ by design.
        same = (sel.mask(64) == sel_ref.mask(64)).all(-1)
        assert same.float().mean() > 0.9
        err = (out.double() - ref).norm(dim=-1) / ref.norm(dim=-1)
        assert err[same].max() < tol


def test_empty_and_nan():
    q, k, v = rand_qkv(Lq=0, Lk=5)
    assert topk_attention(q, k, v, 3).shape == (2, 4, 0, 8)
    q, k, v = rand_qkv(Lq=4, Lk=0)
    out = topk_attention(q, k, v, 3, causal=True, chunk_size=2)
    assert out.shape == (2, 4, 4, 8) and bool((out == 0).all())
    q, k, v = rand_qkv(Lq=4, Lk=6)
    q[0, 0, 1, 0] = float("nan")
    out = topk_attention(q, k, v, 2, chunk_size=4)
    assert out[0, 0, 1].isnan().all() and not out[1].isnan().any()


@pytest.mark.parametrize(
    "change, exc, match",
    [
        (dict(top_k=0), ValueError, "top_k must be >= 1"),
        (dict(top_k=-3), ValueError, "top_k must be >= 1"),
        (dict(top_k=2.5), TypeError, "top_k must be an int"),
        (dict(chunk_size=0), ValueError, "chunk_size must be >= 1"),
        (dict(query_chunk_size=-1), ValueError, "query_chunk_size must be >= 1"),
        (dict(scale=float("nan")), ValueError, "scale must be finite"),
    ],
)
def test_bad_arguments(change, exc, match):
    q, k, v = rand_qkv()
    kwargs = dict(top_k=3) | change
    with pytest.raises(exc, match=match):
        topk_attention(q, k, v, **kwargs)


@pytest.mark.parametrize(
    "shapes, exc, match",
    [
        (((2, 4, 5, 8), (2, 3, 5, 8), (2, 3, 5, 8)), ValueError, "multiple of k/v's heads"),
        (((2, 4, 5, 8), (1, 2, 5, 8), (1, 2, 5, 8)), ValueError, "batch sizes differ"),
        (((2, 4, 5, 8), (2, 2, 5, 8), (2, 2, 6, 8)), ValueError, "same length"),
        (((2, 4, 5, 8), (2, 2, 5, 7), (2, 2, 5, 8)), ValueError, "same head dim"),
        (((2, 4, 5, 8), (2, 2, 5, 8), (2, 1, 5, 8)), ValueError, "same number of heads"),
        (((4, 5, 8), (2, 2, 5, 8), (2, 2, 5, 8)), ValueError, "must be 4-d"),
    ],
)
@pytest.mark.parametrize("fn", [dense_attention, lambda q, k, v: topk_attention(q, k, v, 2)])
def test_bad_shapes(shapes, exc, match, fn):
    q, k, v = (torch.randn(s) for s in shapes)
    with pytest.raises(exc, match=match):
        fn(q, k, v)


def test_bad_dtypes_and_devices():
    q, k, v = rand_qkv()
    with pytest.raises(TypeError, match="share a dtype"):
        topk_attention(q.float(), k, v, 2)
    with pytest.raises(TypeError, match="floating dtype"):
        dense_attention(q.long(), k.long(), v.long())
    with pytest.raises(TypeError, match="must be a torch.Tensor"):
        dense_attention(q.numpy(), k, v)
    with pytest.raises(ValueError, match="one device"):
        topk_attention(q, k.to("meta"), v, 2)


@pytest.mark.parametrize("chunk_size", [None, 4])
def test_negative_scale_ranks_lowest_dot_products(chunk_size):
    q, k, v = rand_qkv(Lq=9, Lk=13)
    for causal in (False, True):
        out = topk_attention(q, k, v, 3, causal=causal, scale=-0.4, chunk_size=chunk_size)
        torch.testing.assert_close(out, naive_topk_reference(q, k, v, 3, causal, scale=-0.4), rtol=1e-10, atol=1e-10)


def test_fused_kernels_take_only_a_positive_scale(monkeypatch):
    # The fused kernels rank raw dot products, so a scale <= 0 must stay on the reference path.
    calls = []
    fake = types.SimpleNamespace(triton_supports=lambda *a: True,
                                 fused_topk_attention=lambda *a, **kw: calls.append(kw["scale"]) or torch.zeros(()))
    monkeypatch.setitem(sys.modules, "sparse_attn.kernels.topk_fused", fake)
    monkeypatch.setattr("sparse_attn.ops.topk.dispatch.use_triton", lambda *tensors: True)
    q, k, v = rand_qkv(Lq=6, Lk=10)
    topk_attention(q, k, v, 3, chunk_size=4, scale=0.5)
    assert calls == [0.5]  # the fake kernel really is what a positive scale reaches
    for scale in (-0.5, 0.0):
        out = topk_attention(q, k, v, 3, chunk_size=4, scale=scale)
        torch.testing.assert_close(out, naive_topk_reference(q, k, v, 3, False, scale=scale), rtol=1e-10, atol=1e-10)
    assert calls == [0.5]
