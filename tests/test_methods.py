"""The method registry: uniform results that agree with the dense reference, and the app's memory budget."""

import math
from dataclasses import replace

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
             num_selected_blocks=4, sliding_window_size=5, num_sink_tokens=2, token_budget=6, page_size=4)


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
    ("nsa", Config(num_local_blocks=-1), "must_be_non_negative"),
    ("nsa", Config(num_selected_blocks=2), "forced_blocks"),  # the default forces 1 + 2 blocks
    ("streaming_llm", Config(num_sink_tokens=-1), "must_be_non_negative"),
    ("streaming_llm", Config(sliding_window_size=-4), "must_be_non_negative"),
    ("streaming_llm", Config(num_sink_tokens=0, sliding_window_size=0), "no_keys"),
    ("quest", Config(token_budget=0), "must_be_positive"),
    ("quest", Config(page_size=0), "must_be_positive"),
    ("quest", Config(page_size=9), "page_too_large"),  # 8 keys
])
def test_bad_settings_raise_translatable_errors(key, cfg, code):
    from sparse_attn.i18n import LANGS, t

    q, k, v = _qkv(L=8)
    for call in (METHODS[key].run, METHODS[key].forward):
        with pytest.raises(SettingError) as info:
            call(q, k, v, cfg)
        assert info.value.code == code and isinstance(info.value, ValueError)
    # Both catalogs can say it (the app names the setting by its label there).
    if code != "k_too_small":
        assert "setting" in info.value.params
    for lang in LANGS:
        assert t(f"err.{code}", lang, **info.value.params)


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


# ---- the baselines from the literature: StreamingLLM and Quest ------------------------------------

@pytest.mark.parametrize("causal", [False, True])
@pytest.mark.parametrize("Hkv", [1, 4])
def test_streaming_llm_cost_counts_exactly_the_keys_it_reads(causal, Hkv):
    q, k, v = _qkv(H=4, Hkv=Hkv, L=37)
    for sinks, window in ((4, 6), (0, 3), (5, 0), (3, 40)):
        cfg = Config(num_sink_tokens=sinks, sliding_window_size=window, causal=causal)
        r = METHODS["streaming_llm"].run(q, k, v, cfg)
        keys = r.mask.sum(-1).double().mean().item()
        assert r.cost.keys_attended == pytest.approx(keys) and r.cost.keys_scored == r.cost.keys_attended
        assert r.cost == METHODS["streaming_llm"].cost(shape_of(q, k, v), cfg, 8)


@pytest.mark.parametrize("causal", [False, True])
def test_quest_cost_bounds_the_keys_and_counts_two_bounds_per_page(causal):
    q, k, v = _qkv(H=4, Hkv=2, L=40)
    for budget, page in ((8, 4), (9, 4), (6, 5), (40, 8)):
        cfg = Config(token_budget=budget, page_size=page, causal=causal)
        r = METHODS["quest"].run(q, k, v, cfg)
        plan = METHODS["quest"].cost(shape_of(q, k, v), cfg, 8)
        keys = r.mask.sum(-1).double().mean().item()
        assert r.cost.keys_attended == pytest.approx(keys) and keys <= plan.keys_attended + 1e-9
        pages = -(-40 // page)
        eligible = [min(pages, i // page + 1) for i in range(40)] if causal else [pages] * 40
        assert plan.keys_scored - plan.keys_attended == pytest.approx(2 * sum(eligible) / 40)
        if not causal and 40 % page == 0:  # whole pages only: the estimate is the count
            assert plan.keys_attended == keys == min(-(-budget // page), pages) * page
    long = shape_of(*_qkv(L=8))._replace(Lq=4096, Lk=4096)
    quest = METHODS["quest"].cost(long, Config(token_budget=64, page_size=16, causal=causal), 4)
    dense = METHODS["dense"].cost(long, Config(causal=causal), 4)
    assert quest.keys_scored < dense.keys_scored / 4 and quest.flops < dense.flops / 4


def test_at_budget_sets_what_each_baseline_reads():
    sl, quest = METHODS["streaming_llm"], METHODS["quest"]
    assert sl.at_budget(Config(num_sink_tokens=4, causal=True), 10) == Config(num_sink_tokens=4, sliding_window_size=6,
                                                                              causal=True)
    assert sl.at_budget(Config(num_sink_tokens=4), 4) is None and sl.at_budget(Config(num_sink_tokens=0), 1) is not None
    assert quest.at_budget(Config(), 48) == Config(token_budget=48)
    q, k, v = _qkv(L=40)
    for causal in (False, True):
        for budget in (5, 8, 11):
            r = sl.run(q, k, v, sl.at_budget(Config(num_sink_tokens=4, causal=causal), budget))
            keys = r.mask.sum(-1)
            # Both windows hold at most the budget with the sinks, and exactly it once far from the edges.
            assert keys.max() <= budget and (keys[..., 20] == budget - (not causal and budget % 2 == 0)).all()
            r = quest.run(q, k, v, quest.at_budget(Config(page_size=4, causal=causal), budget))
            assert r.mask.sum(-1).max() <= -(-budget // 4) * 4


@pytest.mark.parametrize("causal", [False, True])
def test_nsa_at_budget_fills_the_budget_with_blocks_after_the_forced_ones(causal):
    nsa = METHODS["nsa"]
    base = Config(compress_block_size=16, selection_block_size=16, sliding_window_size=32, causal=causal)
    L = 256
    compressed = math.ceil(((L - 16) // 16 + 1) * (0.5 if causal else 1.0))
    window_keys = lambda w: w if causal else 2 * w - 1  # noqa: E731
    for budget in (compressed + 49, compressed + 60, compressed + 100, compressed + 256):
        cfg = nsa.at_budget(base, budget, num_keys=L)
        nsa.validate(cfg)
        used = compressed + cfg.num_selected_blocks * 16 + window_keys(cfg.sliding_window_size)
        assert used <= budget and cfg.num_selected_blocks >= 3
        if cfg.sliding_window_size < 32:  # shrunk only when the forced blocks leave too little
            assert cfg.num_selected_blocks == 3 and budget - used <= 1
        else:
            assert budget - used < 16  # no room left for another block
    assert nsa.at_budget(base, compressed + 48, num_keys=L) is None  # the forced blocks alone fill it
    assert nsa.at_budget(base, 48) is None and nsa.at_budget(base, 49) is not None  # compressed keys not counted
    off = nsa.at_budget(replace(base, num_initial_blocks=0, num_local_blocks=0), 17)
    assert off.num_selected_blocks == 1  # the registry's selected branch keeps one block
    assert nsa.at_budget(base, compressed + 200, num_keys=L).sliding_window_size == 32


def test_every_sweepable_method_takes_the_key_length():
    from sparse_attn.sweep import sweepable

    assert {"streaming_llm", "quest", "nsa"} <= set(sweepable())
    for key in sweepable():
        for budget in (1, 64):
            cfg = METHODS[key].at_budget(Config(), budget, num_keys=128)
            assert cfg is None or isinstance(cfg, Config)


def test_nsa_forced_blocks_reach_the_op():
    from sparse_attn.ops.nsa import nsa_attention

    q, k, v = _qkv(L=64, seed=3)
    for initial, local in ((1, 2), (0, 0), (2, 1)):
        cfg = Config(compress_block_size=8, selection_block_size=8, num_selected_blocks=3, sliding_window_size=4,
                     num_initial_blocks=initial, num_local_blocks=local, causal=True)
        ref = nsa_attention(q, k, v, gates=(1 / 3, 1 / 3, 1 / 3), sliding_window_size=4, compress_block_size=8,
                            selection_block_size=8, num_selected_blocks=3, num_initial_blocks=initial,
                            num_local_blocks=local, causal=True)
        torch.testing.assert_close(METHODS["nsa"].run(q, k, v, cfg).output, ref, rtol=0, atol=0)
    with_forced = METHODS["nsa"].run(q, k, v, replace(cfg, num_initial_blocks=1, num_local_blocks=2)).mask
    without = METHODS["nsa"].run(q, k, v, replace(cfg, num_initial_blocks=0, num_local_blocks=0)).mask
    assert not torch.equal(with_forced, without)
