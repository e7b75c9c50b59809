"""SparseAttentionWithImportanceSampling: the seed's class and its own test cases, fixed."""
import pytest
import torch
from einops import rearrange

from sparse_attn.ops.dense import dense_attention
from sparse_attn.modules import SparseAttentionWithImportanceSampling


@pytest.mark.parametrize("seq_len", [1, 4, 31, 32, 120])
def test_seed_cases(seq_len):
    # The seed's test: dim 512, 8 heads, k=32, (2, seq_len, 512) tokens; the
    # seed crashed on every one of these.
    attn = SparseAttentionWithImportanceSampling(dim=512, num_heads=8, k=32)
    tokens = torch.randn(2, seq_len, 512)
    attended = attn(tokens, tokens, tokens)
    assert attended.shape == tokens.shape and attended.isfinite().all()
    torch.testing.assert_close(attn(tokens), attended)  # self-attention form


def _manual(attn, q, k, v, causal):
    h, hkv = attn.num_heads, attn.kv_heads
    heads = lambda t, n: rearrange(t, "b l (h d) -> b h l d", h=n)  # noqa: E731
    out = dense_attention(heads(attn.wq(q), h), heads(attn.wk(k), hkv), heads(attn.wv(v), hkv), causal=causal)
    return attn.wo(rearrange(out, "b h l d -> b l (h d)"))


@pytest.mark.parametrize("kv_heads", [None, 2])
@pytest.mark.parametrize("causal", [False, True])
@pytest.mark.parametrize("chunk_size", [None, 5])
def test_k_beyond_length_is_dense_module(kv_heads, causal, chunk_size):
    attn = SparseAttentionWithImportanceSampling(32, 4, k=50, kv_heads=kv_heads, causal=causal,
                                                 chunk_size=chunk_size).double()
    q, kv = torch.randn(2, 17, 32, dtype=torch.float64), torch.randn(2, 23, 32, dtype=torch.float64)
    torch.testing.assert_close(attn(q, kv, kv), _manual(attn, q, kv, kv, causal), rtol=1e-10, atol=1e-10)


def test_sparse_differs_from_dense_and_trains():
    attn = SparseAttentionWithImportanceSampling(32, 4, k=2, kv_heads=2, chunk_size=4).double()
    x = torch.randn(2, 20, 32, dtype=torch.float64)
    out = attn(x)
    assert not torch.allclose(out, _manual(attn, x, x, x, False))
    out.square().sum().backward()
    for name, p in attn.named_parameters():
        assert p.grad is not None and p.grad.abs().sum() > 0, name


@pytest.mark.parametrize(
    "kwargs, exc, match",
    [
        (dict(dim=30, num_heads=4), ValueError, "divisible by num_heads"),
        (dict(dim=32, num_heads=4, kv_heads=3), ValueError, "multiple of kv_heads"),
        (dict(dim=32, num_heads=4, k=0), ValueError, "k must be >= 1"),
        (dict(dim=32, num_heads=0), ValueError, "num_heads must be >= 1"),
        (dict(dim=32, num_heads=4, chunk_size=0), ValueError, "chunk_size must be >= 1"),
    ],
)
def test_bad_construction(kwargs, exc, match):
    with pytest.raises(exc, match=match):
        SparseAttentionWithImportanceSampling(**kwargs)


def test_bad_forward_inputs():
    attn = SparseAttentionWithImportanceSampling(32, 4)
    with pytest.raises(ValueError, match="last dimension must be dim=32"):
        attn(torch.randn(2, 5, 31))
    with pytest.raises(ValueError, match=r"must be a \(B, L, dim\) tensor"):
        attn(torch.randn(5, 32))
    with pytest.raises(ValueError, match="batch/length mismatch"):
        attn(torch.randn(2, 5, 32), torch.randn(2, 6, 32), torch.randn(2, 7, 32))
