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
    keys_attended,
    kl_divergence,
    mass_kept,
    relative_error,
    summarize,
    topk_recall,
    total_variation,
)

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
    table = summarize(out, ref, p, s, causal=causal)
    assert list(table.columns) == ["head", "keys_per_query", "sparsity", "mass_kept", "relative_error", "total_variation"]
    assert list(table["head"]) == [0, 1, 2]
    kept = mass_kept(p, s, reduce="head")
    torch.testing.assert_close(torch.tensor(table["mass_kept"].to_numpy()), kept)
    torch.testing.assert_close(torch.tensor(table["relative_error"].to_numpy()), relative_error(out, ref, reduce="head"))
    attended = sum(min(i + 1, 4) for i in range(10)) if causal else 40
    allowed = 55 if causal else 100
    assert table["keys_per_query"].tolist() == pytest.approx([attended / 10] * 3)
    assert table["sparsity"].tolist() == pytest.approx([1 - attended / allowed] * 3)
    # Dense attention as a selection: nothing dropped.
    _, s_all = topk_attention(q, k, v, 10, causal=causal, return_selection=True)
    full = summarize(ref, ref, p, s_all, causal=causal)
    assert full["sparsity"].tolist() == pytest.approx([0.0] * 3, abs=1e-15)
    assert full["mass_kept"].tolist() == pytest.approx([1.0] * 3)
