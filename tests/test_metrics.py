"""Metrics on hand-made rows (exact values) and against independent references."""
import math

import pytest
import torch
import torch.nn.functional as F
from hypothesis import given, settings
from hypothesis import strategies as st

from sparse_attn.ops.dense import dense_attention
from sparse_attn.ops.topk import topk_attention
from sparse_attn.selection import Selection
from sparse_attn.metrics import (
    error_vs_uniform,
    keys_attended,
    kl_divergence,
    mass_kept,
    relative_error,
    summarize,
    topk_recall,
    total_variation,
    uniform_output,
)
from sparse_attn.sources.synthetic import synthetic_qkv

F64 = torch.float64
L = 8


def rows(*r):
    return torch.tensor([[[list(r)]]], dtype=F64)  # (1, 1, 1, L)


def sel(*idx, w=None):
    i = torch.tensor([[[list(idx)]]])
    w = torch.full(i.shape, 1.0 / len(idx), dtype=F64) if w is None else torch.tensor([[[list(w)]]], dtype=F64)
    return Selection(i, w)


ONE_HOT = rows(*([1.0] + [0.0] * (L - 1)))
UNIFORM = rows(*([1.0 / L] * L))


def test_one_hot_row():
    assert mass_kept(ONE_HOT, sel(0, 3)).item() == 1.0
    assert mass_kept(ONE_HOT, sel(2, 3)).item() == 0.0
    assert kl_divergence(ONE_HOT, sel(0)).item() == 0.0
    assert kl_divergence(ONE_HOT, UNIFORM).item() == pytest.approx(math.log(L), abs=1e-14)
    assert total_variation(ONE_HOT, UNIFORM).item() == pytest.approx(1 - 1 / L, abs=1e-15)
    assert topk_recall(ONE_HOT, sel(0), 1).item() == 1.0
    assert topk_recall(ONE_HOT, sel(5, 6), 1).item() == 0.0
    # Only one key has weight: recall@3 asks for that one key.
    assert topk_recall(ONE_HOT, sel(0), 3).item() == 1.0


def test_uniform_row():
    assert mass_kept(UNIFORM, sel(1, 2, 3)).item() == pytest.approx(3 / L, abs=1e-15)
    assert kl_divergence(UNIFORM, UNIFORM).item() == 0.0
    assert kl_divergence(UNIFORM, sel(0)).item() == math.inf  # the sparse row drops keys p weighs
    assert kl_divergence(sel(0, 1, 2, 3, 4, 5, 6, 7), UNIFORM).item() == pytest.approx(0.0, abs=1e-15)
    assert total_variation(UNIFORM, sel(0)).item() == pytest.approx(1 - 1 / L, abs=1e-15)
    # Every key ties: any 2 selected keys are a valid top-2.
    assert topk_recall(UNIFORM, sel(6, 7), 2).item() == 1.0
    assert topk_recall(UNIFORM, sel(6), 2).item() == 0.5


def test_k_equals_length_is_exact():
    q, k, v = (torch.randn(2, 3, 5, 4, dtype=F64) for _ in range(3))
    ref, p = dense_attention(q, k, v, return_weights=True)
    out, s = topk_attention(q, k, v, 5, return_selection=True)
    torch.testing.assert_close(mass_kept(p, s), torch.ones(2, 3, 5, dtype=F64), rtol=0, atol=1e-14)
    assert relative_error(out, ref).max() < 1e-14
    assert kl_divergence(p, s).abs().max() < 1e-14
    assert total_variation(p, s).max() < 1e-15
    assert (topk_recall(p, s, 5) == 1).all()


def test_relative_error_by_hand():
    out = torch.tensor([[[[3.0, 4.0], [0.0, 0.0], [1.0, 0.0]]]], dtype=F64)
    ref = torch.tensor([[[[0.0, 5.0], [0.0, 0.0], [0.0, 0.0]]]], dtype=F64)
    err = relative_error(out, ref)
    assert err[0, 0, 0].item() == pytest.approx(math.sqrt(10) / 5, abs=1e-15)
    assert err[0, 0, 1].item() == 0.0  # both zero
    assert err[0, 0, 2].item() == math.inf  # zero reference, non-zero output: never NaN


def test_empty_rows_are_not_nan():
    p = torch.zeros(1, 1, 2, 4, dtype=F64)
    mask = torch.zeros(1, 1, 2, 4, dtype=torch.bool)
    for val in (mass_kept(p, mask), kl_divergence(p, p), total_variation(p, p), topk_recall(p, mask, 2)):
        assert not torch.isnan(val).any()
    assert (topk_recall(p, mask, 2) == 1).all()  # nothing to recall


@settings(max_examples=40, deadline=None)
@given(L=st.integers(2, 12), kk=st.integers(1, 12), seed=st.integers(0, 2**16))
def test_against_references(L, kk, seed):
    g = torch.Generator().manual_seed(seed)
    p = torch.softmax(torch.randn(2, 3, 4, L, generator=g, dtype=F64) * 2, -1)
    q = torch.softmax(torch.randn(2, 3, 4, L, generator=g, dtype=F64), -1)
    torch.testing.assert_close(kl_divergence(p, q), F.kl_div(q.log(), p, reduction="none").sum(-1), rtol=0, atol=1e-12)
    torch.testing.assert_close(total_variation(p, q), (p - q).abs().sum(-1) / 2, rtol=0, atol=1e-15)
    # Top-k reweights p on the kept keys, so TV = 1 - mass kept.
    qq = torch.randn(2, 3, 4, 5, generator=g, dtype=F64)
    k, v = (torch.randn(2, 3, L, 5, generator=g, dtype=F64) for _ in range(2))
    _, dense_p = dense_attention(qq, k, v, return_weights=True)
    _, s = topk_attention(qq, k, v, kk, return_selection=True)
    torch.testing.assert_close(total_variation(dense_p, s), 1 - mass_kept(dense_p, s), rtol=0, atol=1e-12)
    # Recall against the set definition with torch.topk (random weights: no ties).
    want = torch.topk(dense_p, min(kk, L), -1).indices
    hits = s.mask(L).gather(-1, want).sum(-1).to(F64) / min(kk, L)
    torch.testing.assert_close(topk_recall(dense_p, s, kk), hits)
    # A random subset of keys as a mask.
    m = torch.rand(2, 3, 4, L, generator=g) < 0.5
    torch.testing.assert_close(mass_kept(dense_p, m), (dense_p * m).sum(-1))
    torch.testing.assert_close(keys_attended(m, L), m.sum(-1).to(torch.get_default_dtype()))


def test_duplicates_count_once_for_mass_but_add_for_weights():
    s = Selection(torch.tensor([[[[2, 2, 5]]]]), torch.tensor([[[[0.25, 0.25, 0.5]]]], dtype=F64))
    assert mass_kept(UNIFORM, s).item() == pytest.approx(2 / L)
    assert keys_attended(s, L).item() == 2
    want = 0.5 * ((0.5 - 1 / L) * 2 + (L - 2) / L)
    assert total_variation(UNIFORM, s).item() == pytest.approx(want, abs=1e-15)


def test_reduce_head():
    x = torch.rand(3, 4, 5, 6, dtype=F64)
    y = torch.rand(3, 4, 5, 6, dtype=F64)
    torch.testing.assert_close(relative_error(x, y, reduce="head"), relative_error(x, y).mean(dim=(0, 2)))
    assert relative_error(x, y, reduce="head").shape == (4,)
    with pytest.raises(ValueError, match="reduce"):
        relative_error(x, y, reduce="rows")


def test_bad_input():
    with pytest.raises(ValueError, match="same shape"):
        relative_error(torch.zeros(1, 1, 2, 3), torch.zeros(1, 1, 2, 4))
    with pytest.raises(TypeError, match="selection"):
        mass_kept(UNIFORM, torch.ones(1, 1, 1, L))  # float, not a boolean mask
    with pytest.raises(ValueError, match="k must be >= 1"):
        topk_recall(UNIFORM, sel(0), 0)
    with pytest.raises(TypeError, match="out"):
        relative_error([1.0], torch.zeros(1))


@pytest.mark.parametrize("causal", [False, True])
def test_summarize(causal):
    g = torch.Generator().manual_seed(0)
    q, k, v = (torch.randn(2, 3, 10, 4, generator=g, dtype=F64) for _ in range(3))
    ref, p = dense_attention(q, k, v, causal=causal, return_weights=True)
    out, s = topk_attention(q, k, v, 4, causal=causal, return_selection=True)
    table = summarize(out, ref, p, s, v=v, causal=causal)
    assert list(table.columns) == ["head", "keys_per_query", "sparsity", "mass_kept", "relative_error",
                                   "error_vs_uniform", "total_variation", "kl_finite", "kl_divergence"]
    assert list(table["head"]) == [0, 1, 2]
    kept = mass_kept(p, s, reduce="head")
    torch.testing.assert_close(torch.tensor(table["mass_kept"].to_numpy()), kept)
    torch.testing.assert_close(torch.tensor(table["relative_error"].to_numpy()), relative_error(out, ref, reduce="head"))
    torch.testing.assert_close(torch.tensor(table["error_vs_uniform"].to_numpy()),
                               error_vs_uniform(out, ref, v, causal=causal, reduce="head"))
    # Top-4 of 10 keys drops weight on every row (causal rows 0..3 see at most 4 keys, so they keep all of it).
    assert table["kl_finite"].tolist() == pytest.approx([0.4 if causal else 0.0] * 3)
    if causal:
        assert table["kl_divergence"].tolist() == pytest.approx([0.0] * 3, abs=1e-14)
    else:
        assert table["kl_divergence"].isna().all()  # no finite row: no value, rather than inf
    attended = sum(min(i + 1, 4) for i in range(10)) if causal else 40
    allowed = 55 if causal else 100
    assert table["keys_per_query"].tolist() == pytest.approx([attended / 10] * 3)
    assert table["sparsity"].tolist() == pytest.approx([1 - attended / allowed] * 3)
    # Dense attention as a selection: nothing dropped.
    _, s_all = topk_attention(q, k, v, 10, causal=causal, return_selection=True)
    full = summarize(ref, ref, p, s_all, v=v, causal=causal)
    assert full["sparsity"].tolist() == pytest.approx([0.0] * 3, abs=1e-15)
    assert full["mass_kept"].tolist() == pytest.approx([1.0] * 3)
    assert full["kl_finite"].tolist() == [1.0] * 3 and full["error_vs_uniform"].tolist() == [0.0] * 3


def test_summarize_kl_counts_finite_rows_and_averages_only_those():
    g = torch.Generator().manual_seed(3)
    B, H, Lq, Lk = 2, 2, 6, 5
    p = torch.softmax(torch.randn(B, H, Lq, Lk, generator=g, dtype=F64), -1)
    # Even rows: a mixture with the uniform row (every key kept, finite KL); odd rows drop key 0 (infinite KL).
    mix = 0.5 * p + 0.5 / Lk
    drop = torch.cat([torch.zeros_like(p[..., :1]), p[..., 1:]], -1)
    drop = drop / drop.sum(-1, keepdim=True)
    even = (torch.arange(Lq) % 2 == 0).view(1, 1, Lq, 1)
    w = torch.where(even, mix, drop)
    out = ref = torch.zeros(B, H, Lq, 3, dtype=F64)
    table = summarize(out, ref, p, w > 0, v=torch.randn(B, 1, Lk, 3, generator=g, dtype=F64), weights=w)
    by_hand = [sum(
        sum(p[b, h, i, j].item() * math.log(p[b, h, i, j].item() / mix[b, h, i, j].item()) for j in range(Lk))
        for b in range(B) for i in range(0, Lq, 2)) / (B * Lq / 2) for h in range(H)]
    assert table["kl_finite"].tolist() == [0.5, 0.5]
    assert table["kl_divergence"].tolist() == pytest.approx(by_hand, rel=1e-12)
    assert (kl_divergence(p, w)[..., 1::2] == math.inf).all()


def test_reduce_all_is_the_mean_of_every_row():
    x, y = torch.rand(2, 3, 4, 5, dtype=F64), torch.rand(2, 3, 4, 5, dtype=F64)
    torch.testing.assert_close(relative_error(x, y, reduce="all"), relative_error(x, y).mean())
    assert relative_error(x, y, reduce="all").shape == ()


# ---- the error against uniform attention -------------------------------------------------------

@pytest.mark.parametrize("causal", [False, True])
@pytest.mark.parametrize("Lq", [1, 5, 9])  # 9 > Lk: causal rows past the last key see every key
def test_uniform_output_is_attention_with_equal_scores(causal, Lq):
    g = torch.Generator().manual_seed(Lq)
    B, H, Hkv, Lk, Dv = 2, 4, 2, 7, 3
    v = torch.randn(B, Hkv, Lk, Dv, generator=g, dtype=F64)
    uni = uniform_output(v, Lq, causal=causal, num_heads=H)
    # Equal scores make softmax uniform over the allowed keys: dense attention with zero q and k.
    want = dense_attention(torch.zeros(B, H, Lq, 2, dtype=F64), torch.zeros(B, Hkv, Lk, 2, dtype=F64), v, causal=causal)
    torch.testing.assert_close(uni, want, rtol=0, atol=1e-14)
    # And by hand: query head h reads kv head h // (H // Hkv); causal query i the first min(i + 1, Lk) keys.
    for b in range(B):
        for h in range(H):
            for i in range(Lq):
                n = min(i + 1, Lk) if causal else Lk
                torch.testing.assert_close(uni[b, h, i], v[b, h // 2, :n].sum(0) / n, rtol=0, atol=1e-14)


def test_uniform_output_without_keys_is_zero():
    uni = uniform_output(torch.zeros(1, 2, 0, 3, dtype=F64), 4, causal=True)
    assert uni.shape == (1, 2, 4, 3) and (uni == 0).all()


def _by_hand(out, ref, v, causal):
    """error_vs_uniform row by row with plain Python floats (the uniform answer as a sum over the visible keys)."""
    B, H, Lq, Dv = ref.shape
    g = H // v.shape[1]
    res = torch.empty(B, H, Lq, dtype=F64)
    for b in range(B):
        for h in range(H):
            for i in range(Lq):
                n = min(i + 1, v.shape[2]) if causal else v.shape[2]
                uni = [sum(v[b, h // g, j, d].item() for j in range(n)) / n for d in range(Dv)]
                num = math.sqrt(sum((out[b, h, i, d].item() - ref[b, h, i, d].item()) ** 2 for d in range(Dv)))
                den = math.sqrt(sum((uni[d] - ref[b, h, i, d].item()) ** 2 for d in range(Dv)))
                res[b, h, i] = num / den if den > 0 else (math.inf if num > 0 else 0.0)
    return res


@pytest.mark.parametrize("causal", [False, True])
def test_error_vs_uniform_by_hand_with_grouped_heads(causal):
    g = torch.Generator().manual_seed(11)
    B, H, Hkv, L, D = 2, 6, 2, 5, 4
    q = torch.randn(B, H, L, D, generator=g, dtype=F64)
    k = torch.randn(B, Hkv, L, D, generator=g, dtype=F64)
    v = torch.randn(B, Hkv, L, 3, generator=g, dtype=F64)
    ref = dense_attention(q, k, v, causal=causal)
    out = topk_attention(q, k, v, 2, causal=causal)
    err = error_vs_uniform(out, ref, v, causal=causal)
    want = _by_hand(out, ref, v, causal)
    torch.testing.assert_close(err, want, rtol=1e-12, atol=0)
    # Reduce: the causal first row (one key: the uniform answer is exact) carries no comparison.
    rows = err[..., 1:] if causal else err
    torch.testing.assert_close(error_vs_uniform(out, ref, v, causal=causal, reduce="head"), rows.mean(dim=(0, 2)))
    torch.testing.assert_close(error_vs_uniform(out, ref, v, causal=causal, reduce="all"), rows.mean())


def test_error_vs_uniform_with_heads_mapped_wrongly_differs():
    # Two kv heads whose values differ: a metric that paired query head h with kv head h % Hkv would be off.
    g = torch.Generator().manual_seed(5)
    v = torch.randn(1, 2, 6, 3, generator=g, dtype=F64)
    v[:, 1] += 5.0
    q, k = torch.randn(1, 4, 6, 4, generator=g, dtype=F64), torch.randn(1, 2, 6, 4, generator=g, dtype=F64)
    ref, out = dense_attention(q, k, v), topk_attention(q, k, v, 2)
    err = error_vs_uniform(out, ref, v)
    torch.testing.assert_close(err, _by_hand(out, ref, v, False), rtol=1e-12, atol=0)
    swapped = v[:, [1, 0]]  # query heads 0, 1 would read kv head 1, and heads 2, 3 kv head 0
    assert not torch.allclose(err, _by_hand(out, ref, swapped, False), rtol=1e-3)


def test_error_vs_uniform_below_one_when_relative_error_is_above():
    # One query, three keys with scores 1e-3, 0, -40 (scale 1): the first two keys share the weight and
    # their values nearly cancel, so the dense output is short; the third value is far away, so the
    # uniform answer is far off. Top-1 keeps the right key: worse than zeros, better than uniform.
    q = torch.tensor([[[[1.0]]]], dtype=F64)
    k = torch.tensor([[[[1e-3], [0.0], [-40.0]]]], dtype=F64)
    v = torch.tensor([[[[1.0, 0.0], [-1.0, 0.2], [10.0, 10.0]]]], dtype=F64)
    ref = dense_attention(q, k, v, scale=1.0)
    out = topk_attention(q, k, v, 1, scale=1.0)
    e = [math.exp(s) for s in (1e-3, 0.0, -40.0)]
    p = [x / sum(e) for x in e]
    o_ref = [sum(p[j] * v[0, 0, j, d].item() for j in range(3)) for d in range(2)]
    o_uni = [sum(v[0, 0, j, d].item() for j in range(3)) / 3 for d in range(2)]
    num = math.dist([1.0, 0.0], o_ref)  # top-1 returns v_0
    rel, vs_uni = num / math.hypot(*o_ref), num / math.dist(o_uni, o_ref)
    assert relative_error(out, ref).item() == pytest.approx(rel, rel=1e-12)
    assert error_vs_uniform(out, ref, v).item() == pytest.approx(vs_uni, rel=1e-12)
    assert rel > 9 and vs_uni < 0.25


def test_error_vs_uniform_edges_are_not_nan():
    g = torch.Generator().manual_seed(2)
    # L = 1: the one key is the uniform answer and the dense one; an exact output scores 0, any other inf.
    v = torch.randn(1, 1, 1, 3, generator=g, dtype=F64)
    q, k = torch.randn(1, 2, 1, 4, generator=g, dtype=F64), torch.randn(1, 1, 1, 4, generator=g, dtype=F64)
    ref = dense_attention(q, k, v)
    assert (error_vs_uniform(ref, ref, v) == 0).all()
    assert (error_vs_uniform(ref + 1e-3, ref, v) == math.inf).all()
    # Every row is such a row: the means fall back to all rows (0 or inf), never NaN.
    assert error_vs_uniform(ref, ref, v, reduce="head").tolist() == [0.0, 0.0]
    assert error_vs_uniform(ref + 1e-3, ref, v, reduce="all").item() == math.inf
    # Zero rows: zero values give a zero dense and uniform output; an exact output scores 0.
    z = torch.zeros(1, 1, 4, 3, dtype=F64)
    assert (error_vs_uniform(z, z, z, causal=True) == 0).all()
    # No key at all (Lk = 0): dense and uniform answers are zeros.
    v0 = torch.zeros(1, 1, 0, 3, dtype=F64)
    ref0 = dense_attention(torch.randn(1, 1, 2, 4, dtype=F64), torch.zeros(1, 1, 0, 4, dtype=F64), v0)
    assert error_vs_uniform(ref0, ref0, v0).tolist() == [[[0.0, 0.0]]]
    # The causal first row of a longer input: its ratio is 0 or inf as above, and the means leave it out.
    q, k = torch.randn(1, 1, 4, 4, generator=g, dtype=F64), torch.randn(1, 1, 4, 4, generator=g, dtype=F64)
    v = torch.randn(1, 1, 4, 3, generator=g, dtype=F64)
    ref = dense_attention(q, k, v, causal=True)
    out = ref.clone()
    out[..., 0, :] += 1.0  # wrong on the first row only
    out[..., 1:, :] = topk_attention(q, k, v, 1, causal=True)[..., 1:, :]
    err = error_vs_uniform(out, ref, v, causal=True)
    assert err[0, 0, 0] == math.inf and torch.isfinite(err[..., 1:]).all()
    assert error_vs_uniform(out, ref, v, causal=True, reduce="all").item() == pytest.approx(err[..., 1:].mean().item())


@pytest.mark.parametrize("pattern, heads", [("flat", 2), ("local", 2)])
def test_flat_pattern_cancels_and_uniform_attention_is_close_there(pattern, heads):
    # Measured (docs/app.md, L = 256, 4 heads, 5 seeds): flat: |o_ref| 0.53 against |v| 7.97, top-32 relative
    # error 2.35 (2.30..2.48) and error vs uniform 10.0 (9.94..10.1); local: both near 0.003.
    q, k, v = (x.double() for x in synthetic_qkv(pattern, heads=heads, length=256, head_dim=64, seed=7))
    ref, out = dense_attention(q, k, v), topk_attention(q, k, v, 32)
    uni = dense_attention(torch.zeros_like(q), torch.zeros_like(k), v)  # the uniform answer, independently
    rel, vs_uni = relative_error(out, ref), error_vs_uniform(out, ref, v)
    # Both errors share the numerator: their ratio is |o_ref| / |o_uni - o_ref| on every row.
    torch.testing.assert_close(vs_uni * (uni - ref).norm(dim=-1), rel * ref.norm(dim=-1), rtol=1e-10, atol=0)
    if pattern == "flat":
        assert ref.norm(dim=-1).mean() < 0.1 * v.norm(dim=-1).mean()  # near-uniform weights average v away
        assert 2.0 < rel.mean() < 3.0  # worse than returning zeros ...
        assert 8.0 < vs_uni.mean() < 12.0  # ... and much worse than attending to every key equally
    else:
        assert rel.mean() < 0.01 and vs_uni.mean() < 0.01


def test_error_vs_uniform_bad_input():
    v = torch.zeros(1, 2, 5, 3)
    x = torch.zeros(1, 4, 5, 3)
    with pytest.raises(ValueError, match="v must be"):
        error_vs_uniform(x, x, torch.zeros(1, 2, 5, 4))
    with pytest.raises(ValueError, match="multiple of v's heads"):
        error_vs_uniform(torch.zeros(1, 3, 5, 3), torch.zeros(1, 3, 5, 3), v)
    with pytest.raises(ValueError, match="same shape"):
        error_vs_uniform(x, torch.zeros(1, 4, 6, 3), v)
    with pytest.raises(ValueError, match="4-d"):
        error_vs_uniform(x, x, torch.zeros(2, 5, 3))
    with pytest.raises(TypeError, match="out must be a torch.Tensor"):
        error_vs_uniform([0.0], x, v)
    with pytest.raises(ValueError, match="reduce must be one of"):
        error_vs_uniform(x, x, v, reduce="rows")
    with pytest.raises(ValueError, match="num_queries must be >= 0"):
        uniform_output(v, -1)
    with pytest.raises(ValueError, match="num_heads"):
        uniform_output(v, 2, num_heads=3)
    with pytest.raises(TypeError, match="v must have a floating dtype"):
        uniform_output(torch.zeros(1, 1, 2, 2, dtype=torch.int64), 2)
