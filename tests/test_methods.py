"""The method registry: uniform results that agree with the dense reference, and the app's memory budget."""

import pytest
import torch
from hypothesis import given, settings, strategies as st

from sparse_attn.ops.dense import causal_mask, dense_attention
from sparse_attn.methods import METHODS, Config, SettingError, choices, shape_of
from sparse_attn.ops.dense import allowed_pairs
from sparse_attn.ui.memory import BudgetError, check_budget, default_budget_bytes


def _qkv(B=1, H=4, Hkv=2, L=40, D=16, dtype=torch.float64, seed=0):
    g = torch.Generator().manual_seed(seed)
    q = torch.randn(B, H, L, D, generator=g, dtype=dtype)
    k = torch.randn(B, Hkv, L, D, generator=g, dtype=dtype)
    v = torch.randn(B, Hkv, L, D, generator=g, dtype=dtype)
    return q, k, v


def _expand(v, H):
    return v.repeat_interleave(H // v.shape[1], dim=1)


CFG = Config(top_k=6, num_samples=8, chunk_size=7, compress_block_size=4, selection_block_size=4,
             num_selected_blocks=2, sliding_window_size=5)


@pytest.mark.parametrize("key", sorted(k for k, m in METHODS.items() if m.run is not None))
@pytest.mark.parametrize("causal", [False, True])
def test_uniform_result_is_consistent(key, causal):
    q, k, v = _qkv(seed=hash((key, causal)) % 1000)
    cfg = Config(**{**CFG.__dict__, "causal": causal})
    r = METHODS[key].run(q, k, v, cfg)
    B, H, L, D = q.shape
    assert r.output.shape == (B, H, L, D)
    assert r.weights.shape == r.mask.shape == (B, H, L, L) and r.mask.dtype == torch.bool
    assert torch.isfinite(r.output).all() and torch.isfinite(r.weights).all()
    # The effective weights are the method: weights @ v reproduces its output.
    torch.testing.assert_close(r.weights @ _expand(v, H), r.output, rtol=1e-9, atol=1e-9)
    assert not (r.weights.ne(0) & ~r.mask).any()  # no weight outside the mask
    if causal:
        assert not (r.mask & ~causal_mask(L, L)).any()  # nothing from the future
    c = r.cost
    assert c.flops > 0 and c.memory_bytes > 0 and 0 < c.keys_attended <= c.keys_scored + 1e-9 or key == "nsa"
    # forward (what gets timed) gives the same output as run.
    torch.testing.assert_close(METHODS[key].forward(q, k, v, cfg), r.output, rtol=1e-9, atol=1e-9)


@pytest.mark.parametrize("causal", [False, True])
def test_dense_entry_matches_reference(causal):
    q, k, v = _qkv()
    ref = dense_attention(q, k, v, causal=causal)
    torch.testing.assert_close(METHODS["dense"].run(q, k, v, Config(causal=causal)).output, ref)
    torch.testing.assert_close(METHODS["dense"].forward(q, k, v, Config(causal=causal)), ref)


@pytest.mark.parametrize("key", ["topk", "topk_full", "hybrid"])
def test_budget_at_least_length_is_dense(key):
    q, k, v = _qkv(L=23)
    ref = dense_attention(q, k, v, causal=True)
    out = METHODS[key].run(q, k, v, Config(top_k=23, num_samples=5, chunk_size=4, causal=True)).output
    torch.testing.assert_close(out, ref)


def test_topk_keys_attended_and_mask_agree():
    q, k, v = _qkv(L=50)
    for causal in (False, True):
        r = METHODS["topk"].run(q, k, v, Config(top_k=9, chunk_size=8, causal=causal))
        assert r.cost.keys_attended == pytest.approx(r.mask.sum(-1).double().mean().item())
        assert r.cost.keys_scored >= r.cost.keys_attended


def test_streaming_and_full_topk_select_the_same_keys():
    q, k, v = _qkv(L=64, dtype=torch.float64)
    a = METHODS["topk"].run(q, k, v, Config(top_k=5, chunk_size=9, causal=True))
    b = METHODS["topk_full"].run(q, k, v, Config(top_k=5, causal=True))
    assert torch.equal(a.mask, b.mask)
    # The streaming estimate holds one tile, the full-score one the whole matrix.
    assert a.cost.memory_bytes < b.cost.memory_bytes
    # Pictures may take the faster path: same keys, same weights, the streaming method's own costs.
    cfg = Config(top_k=5, chunk_size=9, causal=True)
    p = METHODS["topk"].run_for_picture(q, k, v, cfg)
    assert torch.equal(p.mask, a.mask)
    torch.testing.assert_close(p.weights, a.weights)
    assert p.cost == a.cost
    with pytest.raises(SettingError):
        METHODS["topk"].run_for_picture(q, k, v, Config(top_k=0))


@given(Lq=st.integers(0, 70), Lk=st.integers(0, 70), causal=st.booleans())
@settings(max_examples=60, deadline=None)
def test_allowed_pairs_counts_the_mask(Lq, Lk, causal):
    want = causal_mask(Lq, Lk).sum().item() if causal else Lq * Lk
    assert allowed_pairs(Lq, Lk, causal) == want


@pytest.mark.parametrize("key, cfg, code", [
    ("topk", Config(top_k=0), "k_too_small"),
    ("topk", Config(top_k=-3), "k_too_small"),
    ("sampling", Config(num_samples=0), "must_be_positive"),
    ("nsa", Config(sliding_window_size=0), "must_be_positive"),
])
def test_bad_settings_raise_translatable_errors(key, cfg, code):
    q, k, v = _qkv(L=8)
    with pytest.raises(SettingError) as info:
        METHODS[key].run(q, k, v, cfg)
    assert info.value.code == code and isinstance(info.value, ValueError)


def test_budget_refuses_and_names_the_setting():
    s = shape_of(*_qkv(L=8))._replace(Lq=8192, Lk=8192)
    with pytest.raises(BudgetError) as info:
        check_budget("topk", s, Config(), 4, budget_bytes=2 * 2**30)
    assert info.value.params["setting"] == "seq_len" and info.value.params["need_mb"] > 2048
    # The same settings fit once the named setting is lowered far enough.
    assert check_budget("topk", s._replace(Lq=1024, Lk=1024), Config(), 4, budget_bytes=2 * 2**30) < 2 * 2**30


def test_sampling_budget_beyond_length_costs_no_more_than_all_keys():
    s = shape_of(*_qkv(L=8))._replace(Lq=512, Lk=512)
    huge = METHODS["sampling"].cost(s, Config(num_samples=10**6), 4)
    full = METHODS["sampling"].cost(s, Config(num_samples=512), 4)
    assert huge.memory_bytes == full.memory_bytes
    assert check_budget("sampling", s, Config(num_samples=10**6), 4, budget_bytes=2**30) < 2**30


def test_nsa_pictures_count_their_branch_maps():
    s = shape_of(*_qkv(L=8))._replace(Lq=2048, Lk=2048)
    with_maps = check_budget("nsa", s, Config(), 4, budget_bytes=2**40)
    without = check_budget("nsa", s, Config(), 4, budget_bytes=2**40, with_view=False)
    assert with_maps - without >= 6 * s.B * s.H * 2048 * 2048 * 4


def test_dense_estimate_covers_the_real_weights():
    q, k, v = _qkv(L=64, dtype=torch.float32)
    cost = METHODS["dense"].cost(shape_of(q, k, v), Config(), 4)
    assert cost.memory_bytes >= q.shape[0] * q.shape[1] * 64 * 64 * 4


def test_budget_from_environment(monkeypatch):
    monkeypatch.setenv("SPARSE_ATTN_MEMORY_BUDGET_MB", "100")
    assert default_budget_bytes() == 100 * 2**20
    monkeypatch.setenv("SPARSE_ATTN_MEMORY_BUDGET_MB", "lots")
    with pytest.raises(ValueError, match="SPARSE_ATTN_MEMORY_BUDGET_MB"):
        default_budget_bytes()
    monkeypatch.delenv("SPARSE_ATTN_MEMORY_BUDGET_MB")
    assert default_budget_bytes() == 2 * 2**30


def test_registry_roles():
    assert "topk" in choices("method") and "dense" not in choices("method")
    assert choices("reference") == ["dense"] and "topk_full" in choices("timing")
    with pytest.raises(ValueError, match="method"):
        check_budget("nope", shape_of(*_qkv(L=4)), Config())
