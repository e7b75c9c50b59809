"""Decoding against a growing KV cache: step by step equals the parallel causal forward, row by row (float64).

The parallel ops are the reference: each decoder must give the last rows of
its method's ``causal=True`` forward on the tokens the cache holds, pick the
same keys, and count the bytes it read as a brute-force count of its
selection does.
"""
from __future__ import annotations

import math
from dataclasses import replace

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_leaves

from sparse_attn.decode import (DECODERS, EQUAL_GATES, KVCache, bytes_per_step, decode, dense_decode, nsa_decode,
                                quest_decode, sdpa_decode, streaming_llm_decode, topk_decode)
from sparse_attn.decode.gather import shared_gather_attention
from sparse_attn.decode.nsa import selection_importance
from sparse_attn.methods import Config, SettingError
from sparse_attn.ops.dense import dense_attention
from sparse_attn.ops.nsa import importance_to_selection_blocks, nsa_attention, selected_token_mask, sliding_window_mask
from sparse_attn.ops.quest import quest_attention
from sparse_attn.ops.streaming_llm import streaming_llm_attention
from sparse_attn.ops.topk import topk_attention

F64 = torch.float64
TOL = dict(rtol=1e-10, atol=1e-10)
METHODS = tuple(DECODERS)

# Small blocks so that a few dozen tokens hold many: overlapping compression (stride < block), selection blocks
# of another size, a partial last page, forced blocks, sinks inside the window's reach.
CFG = Config(top_k=5, compress_block_size=4, compress_block_sliding_stride=2, selection_block_size=6,
             num_selected_blocks=4, num_initial_blocks=1, num_local_blocks=2, sliding_window_size=5,
             num_sink_tokens=2, token_budget=7, page_size=3)


def qkv(B=2, H=4, Hkv=2, L=37, D=8, Dv=6, seed=0, dtype=F64):
    g = torch.Generator().manual_seed(seed)
    return (torch.randn(B, H, L, D, generator=g, dtype=dtype), torch.randn(B, Hkv, L, D, generator=g, dtype=dtype),
            torch.randn(B, Hkv, L, Dv, generator=g, dtype=dtype))


def nsa_kwargs(cfg):
    return dict(sliding_window_size=cfg.sliding_window_size, compress_block_size=cfg.compress_block_size,
                compress_block_sliding_stride=cfg.compress_block_sliding_stride,
                selection_block_size=cfg.selection_block_size, num_selected_blocks=cfg.num_selected_blocks,
                num_initial_blocks=cfg.num_initial_blocks, num_local_blocks=cfg.num_local_blocks, scale=cfg.scale)


def parallel(method, q, k, v, cfg):
    """(out, (B, Hs, L, L) mask of keys read in full) of the parallel causal method."""
    L = k.shape[2]
    if method == "dense":
        out = dense_attention(q, k, v, causal=True, scale=cfg.scale)
        return out, torch.ones(L, L, dtype=torch.bool).tril()[None, None]
    if method == "topk":
        out, sel = topk_attention(q, k, v, cfg.top_k, causal=True, scale=cfg.scale, return_selection=True)
    elif method == "quest":
        out, sel = quest_attention(q, k, v, cfg.token_budget, cfg.page_size, causal=True, scale=cfg.scale,
                                   return_selection=True)
    elif method == "streaming_llm":
        out, sel = streaming_llm_attention(q, k, v, cfg.num_sink_tokens, cfg.sliding_window_size, causal=True,
                                           scale=cfg.scale, return_selection=True)
    else:
        out, maps = nsa_attention(q, k, v, gates=EQUAL_GATES, causal=True, return_maps=True, **nsa_kwargs(cfg))
        mask = selected_token_mask(maps.block_indices, cfg.selection_block_size, L, causal=True)
        mask = mask | sliding_window_mask(L, L, cfg.sliding_window_size, causal=True)
        return out, mask, maps.block_indices
    return out, sel.mask(L), sel.indices


def run_steps(method, q, k, v, cfg, chunks, **cache_options):
    """Append the tokens in ``chunks`` (sizes summing to L), decoding each chunk's queries: (outputs, results)."""
    B, Hkv, L, D = k.shape
    cache = KVCache.for_config(cfg, B, Hkv, cache_options.pop("capacity", L), D, value_dim=v.shape[-1],
                               dtype=k.dtype, **cache_options)
    outs, results, t0 = [], [], 0
    for n in chunks:
        cache.append(k[:, :, t0 : t0 + n], v[:, :, t0 : t0 + n])
        r = decode(method, q[:, :, t0 : t0 + n], cache, cfg)
        outs.append(r.output)
        results.append((t0, n, r))
        t0 += n
    return torch.cat(outs, dim=2), results, cache


def check_equal_to_parallel(method, q, k, v, cfg, chunks):
    ref = parallel(method, q, k, v, cfg)
    out, results, _ = run_steps(method, q, k, v, cfg, chunks)
    torch.testing.assert_close(out, ref[0], **TOL)
    for t0, n, r in results:
        Lc = t0 + n
        want = ref[1][:, :, t0:Lc, :Lc]
        got = r.selection.token_mask()
        if got.shape[1] != want.shape[1] and 1 not in (got.shape[1], want.shape[1]):
            want = want.repeat_interleave(got.shape[1] // want.shape[1], dim=1)  # NSA's per-group picks
        assert torch.equal(*torch.broadcast_tensors(got, want)), (method, t0, n)
        if method in ("topk", "nsa"):  # the same keys / blocks in the same order, the parallel's spare slots empty
            idx = ref[2][:, :, t0:Lc]
            S = r.selection.indices.shape[-1]
            assert torch.equal(r.selection.indices, idx[..., :S]), (method, t0, n)
            assert (idx[..., S:] == -1).all()


def chunks_of(L, sizes):
    out, t = [], 0
    for s in sizes:
        if t >= L:
            break
        out.append(min(s, L - t))
        t += out[-1]
    while t < L:
        out.append(1)
        t += 1
    return out


# ---- step by step equals parallel ----------------------------------------------------------------

@pytest.mark.parametrize("method", METHODS)
def test_one_token_at_a_time_equals_the_parallel_causal_forward(method):
    q, k, v = qkv()
    check_equal_to_parallel(method, q, k, v, CFG, [1] * k.shape[2])


@pytest.mark.parametrize("method", METHODS)
def test_a_few_queries_at_once_equal_the_parallel_rows(method):
    q, k, v = qkv(seed=1)
    check_equal_to_parallel(method, q, k, v, CFG, chunks_of(k.shape[2], [3, 1, 4, 2, 5, 1, 6, 2, 7]))


@pytest.mark.parametrize("method", METHODS)
@pytest.mark.parametrize("H, Hkv", [(4, 1), (3, 3), (6, 2)])
def test_grouped_heads(method, H, Hkv):
    q, k, v = qkv(H=H, Hkv=Hkv, L=25, seed=2)
    check_equal_to_parallel(method, q, k, v, CFG, chunks_of(25, [1, 2, 3]))


@pytest.mark.parametrize("method", METHODS)
def test_equal_blocks_strides_and_pages_as_the_registry_defaults(method):
    cfg = replace(Config(), top_k=9, token_budget=20, num_selected_blocks=3, sliding_window_size=10,
                  scale=0.3)  # the registry's block sizes (16), a scale that is not 1/sqrt(D)
    q, k, v = qkv(B=1, L=70, seed=3)
    check_equal_to_parallel(method, q, k, v, cfg, chunks_of(70, [1, 5, 16, 2]))


@pytest.mark.parametrize("method", METHODS)
def test_a_cache_of_one_token(method):
    cfg = replace(CFG, page_size=1, compress_block_size=1, compress_block_sliding_stride=1)
    q, k, v = qkv(L=1, seed=4)
    check_equal_to_parallel(method, q, k, v, cfg, [1])
    out, _, _ = run_steps(method, q, k, v, cfg, [1])
    torch.testing.assert_close(out, v.repeat_interleave(2, dim=1), **TOL)  # one key: its value, for every head


def test_forced_blocks_off_and_no_selected_branch():
    q, k, v = qkv(L=30, seed=5)
    for cfg in (replace(CFG, num_initial_blocks=0, num_local_blocks=0), replace(CFG, num_selected_blocks=0,
                                                                                 num_initial_blocks=0,
                                                                                 num_local_blocks=0)):
        ref = nsa_attention(q, k, v, gates=EQUAL_GATES, causal=True, **nsa_kwargs(cfg))
        cache = KVCache.for_config(cfg, 2, 2, 30, 8, value_dim=6, dtype=F64)
        outs = []
        for t in range(30):
            cache.append(k[:, :, t : t + 1], v[:, :, t : t + 1])
            outs.append(nsa_decode(q[:, :, t : t + 1], cache, gates=EQUAL_GATES, **nsa_kwargs(cfg)).output)
        torch.testing.assert_close(torch.cat(outs, 2), ref, **TOL)


def test_per_query_gates_reach_the_right_rows():
    q, k, v = qkv(L=20, seed=6)
    gates = torch.rand(2, 4, 20, 3, generator=torch.Generator().manual_seed(0), dtype=F64)
    ref = nsa_attention(q, k, v, gates=gates, causal=True, **nsa_kwargs(CFG))
    cache = KVCache.for_config(CFG, 2, 2, 20, 8, value_dim=6, dtype=F64)
    outs, t0 = [], 0
    for n in (1, 3, 2, 4, 10):
        cache.append(k[:, :, t0 : t0 + n], v[:, :, t0 : t0 + n])
        outs.append(nsa_decode(q[:, :, t0 : t0 + n], cache, gates=gates[:, :, t0 : t0 + n], **nsa_kwargs(CFG)).output)
        t0 += n
    torch.testing.assert_close(torch.cat(outs, 2), ref, **TOL)


@st.composite
def decode_cases(draw):
    Hkv = draw(st.integers(1, 2))
    G = draw(st.integers(1, 3))
    L = draw(st.integers(1, 30))
    bs = draw(st.integers(1, 6))
    n_sel = draw(st.integers(1, 5))  # the registry refuses 0 (the op alone allows it: tested above)
    forced = draw(st.integers(0, min(n_sel, 3)))
    cfg = Config(
        top_k=draw(st.integers(1, 12)), compress_block_size=bs, compress_block_sliding_stride=draw(st.integers(1, bs)),
        selection_block_size=draw(st.integers(1, 7)), num_selected_blocks=n_sel,
        num_initial_blocks=min(forced, 1), num_local_blocks=forced - min(forced, 1),
        sliding_window_size=draw(st.integers(1, 8)), num_sink_tokens=draw(st.integers(0, 4)),
        token_budget=draw(st.integers(1, 12)), page_size=draw(st.integers(1, L)),
    )
    chunks = chunks_of(L, draw(st.lists(st.integers(1, 4), min_size=1, max_size=12)))
    shape = dict(B=draw(st.integers(1, 2)), H=Hkv * G, Hkv=Hkv, L=L, D=draw(st.integers(1, 6)),
                 Dv=draw(st.integers(1, 5)), seed=draw(st.integers(0, 2**16)))
    return cfg, chunks, shape


@pytest.mark.parametrize("method", METHODS)
@settings(max_examples=15, deadline=None)
@given(case=decode_cases())
def test_property_step_by_step_equals_parallel(method, case):
    cfg, chunks, shape = case
    q, k, v = qkv(**shape)
    check_equal_to_parallel(method, q, k, v, cfg, chunks)


# ---- exact limits ------------------------------------------------------------------------------------

def test_topk_and_quest_with_a_budget_of_every_key_are_dense():
    q, k, v = qkv(L=20, seed=7)
    for method, cfg in (("topk", replace(CFG, top_k=20)), ("topk", replace(CFG, top_k=500)),
                        ("quest", replace(CFG, token_budget=21)), ("streaming_llm", replace(CFG, sliding_window_size=20))):
        out, _, _ = run_steps(method, q, k, v, cfg, chunks_of(20, [1, 3]))
        dense, _, _ = run_steps("dense", q, k, v, cfg, chunks_of(20, [1, 3]))
        torch.testing.assert_close(out, dense, **TOL)


def test_dense_decode_and_sdpa_decode_agree():
    q, k, v = qkv(L=40, seed=8)
    cache = KVCache.from_tensors(k, v)
    for T in (1, 4):
        a, b = dense_decode(q[:, :, -T:], cache, scale=0.7), sdpa_decode(q[:, :, -T:], cache, scale=0.7)
        torch.testing.assert_close(a.output, b.output, **TOL)
        torch.testing.assert_close(a.output, dense_attention(q, k, v, causal=True, scale=0.7)[:, :, -T:], **TOL)


def test_importance_by_overlap_equals_the_parallel_map():
    g = torch.Generator().manual_seed(9)
    for bs, stride, sel, L in [(4, 2, 6, 37), (16, 16, 16, 100), (32, 16, 64, 300), (5, 3, 2, 41), (1, 1, 7, 20)]:
        Nc = (L - bs) // stride + 1
        p = torch.rand(3, 5, Nc, generator=g, dtype=F64)
        M = importance_to_selection_blocks(Nc, bs, stride, sel, L, dtype=F64)
        torch.testing.assert_close(selection_importance(p, bs, stride, sel, M.shape[1]), p @ M, rtol=1e-14, atol=0)


# ---- the cache ---------------------------------------------------------------------------------------

def test_the_cache_keeps_the_parallel_compression_and_page_bounds_as_it_grows():
    from sparse_attn.ops.nsa import compress_kv
    from sparse_attn.ops.quest import page_min_max

    _, k, v = qkv(L=29, seed=10)
    cache = KVCache.for_config(CFG, 2, 2, 29, 8, value_dim=6, dtype=F64)
    t0 = 0
    for n in chunks_of(29, [1, 4, 2, 7, 1]):
        cache.append(k[:, :, t0 : t0 + n], v[:, :, t0 : t0 + n])
        t0 += n
        assert torch.equal(cache.compressed_keys, compress_kv(k[:, :, :t0], 4, 2))
        assert torch.equal(cache.compressed_values, compress_kv(v[:, :, :t0], 4, 2))
        lo, hi = page_min_max(k[:, :, :t0], 3)
        assert torch.equal(cache.page_min, lo) and torch.equal(cache.page_max, hi)
        assert torch.equal(cache.keys, k[:, :, :t0]) and torch.equal(cache.values, v[:, :, :t0])


@pytest.mark.parametrize("method", METHODS)
def test_a_prefix_view_decodes_as_a_cache_filled_to_that_length(method):
    q, k, v = qkv(L=40, seed=11)
    full = KVCache.from_tensors(k, v, page_size=3, compress_block_size=4, compress_block_sliding_stride=2)
    for length in (1, 7, 23, 40):
        short = KVCache.from_tensors(k[:, :, :length], v[:, :, :length], page_size=3, compress_block_size=4,
                                     compress_block_sliding_stride=2)
        qs = q[:, :, length - 1 : length]
        torch.testing.assert_close(decode(method, qs, full.prefix(length), CFG).output,
                                   decode(method, qs, short, CFG).output, rtol=0, atol=0)
    assert torch.equal(full.page_max, KVCache.from_tensors(k, v, page_size=3).page_max)  # views copy, never write
    with pytest.raises(ValueError, match="read-only"):
        full.prefix(5).append(k[:, :, :1], v[:, :, :1])


def test_a_cache_that_reaches_capacity():
    q, k, v = qkv(L=12, seed=12)
    out, results, cache = run_steps("nsa", q, k, v, CFG, [5, 7], capacity=12)
    assert cache.length == cache.capacity == 12
    torch.testing.assert_close(out, parallel("nsa", q, k, v, CFG)[0], **TOL)
    with pytest.raises(ValueError, match="capacity"):
        cache.append(k[:, :, :1], v[:, :, :1])
    assert cache.length == 12  # a refused append writes nothing
    big = KVCache(2, 2, 5, 8, value_dim=6, dtype=F64)
    with pytest.raises(ValueError, match="capacity"):
        big.append(k[:, :, :6], v[:, :, :6])


def test_the_cache_on_another_dtype_and_half_precision_runs():
    q, k, v = qkv(L=64, seed=13, dtype=torch.float32)
    ref = dense_attention(q.double(), k.double(), v.double(), causal=True)[:, :, -1:]
    for dtype, tol in ((torch.float32, 1e-5), (torch.bfloat16, 3e-2)):
        cache = KVCache.for_config(replace(CFG, page_size=8), 2, 2, 64, 8, value_dim=6, dtype=dtype)
        cache.append(k.to(dtype), v.to(dtype))
        for method in METHODS:
            r = decode(method, q[:, :, -1:].to(dtype), cache, replace(CFG, top_k=64, token_budget=64, page_size=8,
                                                                         sliding_window_size=64))
            assert r.output.dtype == dtype and r.output.isfinite().all()
            if method != "nsa":  # these read every key at this budget: dense up to rounding
                torch.testing.assert_close(r.output.double(), ref, rtol=tol, atol=tol)
        assert cache.compressed_keys.dtype == dtype


# ---- bytes read ----------------------------------------------------------------------------------------

def brute_force_bytes(method, r, cache, cfg):
    """Rows counted from the selection with Python sets, per (sequence, KV head)."""
    B, Hkv, L, D, Dv, isz = (cache.batch_size, cache.num_kv_heads, cache.length, cache.head_dim, cache.value_dim,
                             cache.itemsize)
    sel, pos = r.selection, r.selection.positions.tolist()
    keys = values = summaries = 0
    for b in range(B):
        for h in range(Hkv):
            if method == "dense":
                k_rows = v_rows = set(range(L))
            else:
                idx = sel.indices
                heads = range(idx.shape[1]) if idx.shape[1] == 1 else [
                    x for x in range(idx.shape[1]) if x * Hkv // idx.shape[1] == h]
                picked = set()
                for x in heads:
                    for t, p in enumerate(pos):
                        for u in idx[min(b, idx.shape[0] - 1), x, t].tolist():
                            if u >= 0:
                                picked |= {j for j in range(u * sel.unit, (u + 1) * sel.unit) if j <= p and j < L}
                if method == "topk":
                    k_rows, v_rows = set(range(L)), picked
                elif method == "nsa":
                    window = {j for p in pos for j in range(max(0, p - cfg.sliding_window_size + 1), p + 1)}
                    k_rows = v_rows = None
                    keys += (len(picked) + len(window)) * D * isz
                    values += (len(picked) + len(window)) * Dv * isz
                    summaries += cache.num_compressed * (D + Dv) * isz
                elif method == "quest":
                    P = cfg.page_size
                    bound = {j for t, p in enumerate(pos[:-1]) if (p + 1) % P for j in range(p // P * P, p + 1)}
                    k_rows, v_rows = picked | bound, picked
                    summaries += 2 * cache.num_pages * D * isz
                else:
                    k_rows = v_rows = picked
            if k_rows is not None:
                keys += len(k_rows) * D * isz
                values += len(v_rows) * Dv * isz
    return keys, values, summaries


@pytest.mark.parametrize("method", METHODS)
def test_bytes_read_match_a_count_of_the_selection(method):
    q, k, v = qkv(H=6, Hkv=2, L=31, seed=14)
    for chunks in ([1] * 31, chunks_of(31, [4, 3, 5])):
        _, results, cache = run_steps(method, q, k, v, CFG, chunks)
        for t0, n, r in results:
            view = cache.prefix(t0 + n)
            assert tuple(r.bytes_read) == brute_force_bytes(method, r, view, CFG), (method, t0, n)


@pytest.mark.parametrize("method", METHODS)
def test_bytes_per_step_bounds_what_a_step_reads(method):
    cfg = replace(Config(), top_k=40, token_budget=40, num_selected_blocks=4, sliding_window_size=24,
                  compress_block_size=8, compress_block_sliding_stride=4, selection_block_size=16, page_size=8)
    for L in (1, 9, 64, 200):
        q, k, v = qkv(B=2, H=4, Hkv=2, L=L, D=8, Dv=8, seed=L)
        cache = KVCache.for_config(cfg, 2, 2, L, 8, dtype=F64).append(k, v)
        got = decode(method, q[:, :, -1:], cache, cfg).bytes_read.total
        model = bytes_per_step(method, L, cfg, batch_size=2, num_heads=4, num_kv_heads=2, head_dim=8, itemsize=8)
        if method in ("dense", "streaming_llm") or (method == "nsa" and L % 16 == 0 and L >= 64):
            assert got == model, (method, L)
        else:
            assert got <= model, (method, L)


def test_the_bytes_of_the_sparse_methods_at_64k_are_what_the_issue_expects():
    # The benchmark's settings (NSA paper's blocks, Quest's pages of 16): NSA and Quest read at most 1/8 of dense.
    cfg = Config(compress_block_size=32, compress_block_sliding_stride=16, selection_block_size=64,
                 num_selected_blocks=16, sliding_window_size=512, token_budget=2048, page_size=16)
    sizes = dict(num_heads=64, num_kv_heads=4, head_dim=128, itemsize=2)
    dense = bytes_per_step("dense", 65536, cfg, **sizes)
    assert bytes_per_step("nsa", 65536, cfg, **sizes) <= dense / 8
    # Quest's bound counts every head's pages as distinct: per KV group that is 16 x 2048 tokens, half the cache.
    assert bytes_per_step("quest", 65536, cfg, **sizes) > dense / 8
    assert bytes_per_step("quest", 65536, cfg, **{**sizes, "num_heads": 4}) <= dense / 8


# ---- bad input ------------------------------------------------------------------------------------

def test_bad_input_names_the_argument():
    q, k, v = qkv(L=10)
    cache = KVCache.for_config(CFG, 2, 2, 10, 8, value_dim=6, dtype=F64).append(k, v)
    with pytest.raises(ValueError, match="head dim"):
        dense_decode(q[:, :, -1:, :4], cache)
    with pytest.raises(ValueError, match="device"):
        topk_decode(q[:, :, -1:].to("meta"), cache, 3)
    with pytest.raises(ValueError, match="device"):
        cache.append(k[:, :, :0].to("meta"), v[:, :, :0])
    with pytest.raises(TypeError, match="dtype"):
        dense_decode(q[:, :, -1:].float(), cache)
    with pytest.raises(ValueError, match="T must be"):
        dense_decode(torch.cat([q, q[:, :, :1]], 2), cache)
    with pytest.raises(ValueError, match="multiple"):
        dense_decode(q[:, :3, -1:], cache)
    with pytest.raises(ValueError, match="page_size"):
        KVCache(2, 2, 10, 8, page_size=0)
    with pytest.raises(ValueError, match="page_size"):
        quest_decode(q[:, :, -1:], cache, 4, page_size=0)
    with pytest.raises(ValueError, match="page_size"):
        quest_decode(q[:, :, -1:], cache, 4, page_size=5)  # not the cache's
    with pytest.raises(ValueError, match="page_size"):
        quest_decode(q[:, :, -1:], KVCache.from_tensors(k, v), 4)  # a cache without page bounds
    with pytest.raises(ValueError, match="compress_block_size"):
        nsa_decode(q[:, :, -1:], KVCache.from_tensors(k, v), gates=EQUAL_GATES, sliding_window_size=2,
                   selection_block_size=2, num_selected_blocks=3)
    with pytest.raises(ValueError, match="compress_block_sliding_stride"):
        KVCache(2, 2, 10, 8, compress_block_size=4, compress_block_sliding_stride=5)
    with pytest.raises(ValueError, match="top_k"):
        topk_decode(q[:, :, -1:], cache, 0)
    with pytest.raises(ValueError, match="num_sink_tokens"):
        streaming_llm_decode(q[:, :, -1:], cache, 0, 0)
    with pytest.raises(ValueError, match="gates"):
        nsa_decode(q[:, :, -1:], cache, gates=(1, 1), **nsa_kwargs(CFG))
    with pytest.raises(SettingError):  # the registry's coded errors, as the parallel methods raise them
        decode("nsa", q[:, :, -1:], cache, replace(CFG, num_selected_blocks=1))
    with pytest.raises(ValueError, match="method must be one of"):
        decode("sampling", q[:, :, -1:], cache, CFG)
    with pytest.raises(TypeError, match="cache"):
        dense_decode(q[:, :, -1:], k)


def test_selection_kinds_and_shapes():
    q, k, v = qkv(H=4, Hkv=2, L=30, seed=15)
    cache = KVCache.for_config(CFG, 2, 2, 30, 8, value_dim=6, dtype=F64).append(k, v)
    want = {"dense": ("all", None), "topk": ("keys", (2, 4, 2, 5)), "quest": ("pages", (2, 4, 2, 3)),
            "nsa": ("blocks", (2, 2, 2, 4)), "streaming_llm": ("keys", (1, 1, 2, 7))}
    for method, (kind, shape) in want.items():
        sel = decode(method, q[:, :, -2:], cache, CFG).selection
        assert sel.kind == kind and (sel.indices is None if shape is None else tuple(sel.indices.shape) == shape)
        assert sel.positions.tolist() == [28, 29] and sel.length == 30
        assert sel.token_mask()[..., 0, 29].logical_not().all()  # the earlier query never reads the newest key
    assert math.isclose(float(decode("topk", q[:, :, -1:], cache, CFG).selection.weights.sum(-1).mean()), 1.0)


# ---- reading only what is picked -------------------------------------------------------------------------

class LargestNewTensor(TorchDispatchMode):
    """The largest tensor any op creates, leaving out views of the cache's own storage."""

    def __init__(self, shared):
        super().__init__()
        self.shared, self.largest = {t.untyped_storage().data_ptr() for t in shared}, 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        for t in tree_leaves(out):
            if isinstance(t, torch.Tensor) and t.untyped_storage().data_ptr() not in self.shared:
                self.largest = max(self.largest, t.untyped_storage().nbytes())
        return out


@pytest.mark.parametrize("method", ["quest", "nsa", "streaming_llm"])
def test_sparse_steps_never_copy_the_cache(method):
    """A cache filled below its capacity (keys is a strided view): no tensor of the step is near the size of K."""
    cfg = Config(compress_block_size=32, compress_block_sliding_stride=16, selection_block_size=64,
                 num_selected_blocks=4, sliding_window_size=64, token_budget=128, page_size=16)
    q, k, v = qkv(B=1, H=8, Hkv=2, L=4096, D=64, Dv=64, dtype=torch.float32)
    cache = KVCache.for_config(cfg, 1, 2, 8192, 64).append(k, v)
    with LargestNewTensor([cache.k, cache.v, cache._pmin, cache._pmax, cache._ck, cache._cv, q]) as seen:
        decode(method, q[:, :, -1:], cache, cfg)
    # Quest's largest is its per-head gather: 4 heads x 8 pages x 16 tokens of 4096 keys per KV head (1/8 of K).
    assert seen.largest <= cache.keys.numel() * 4 / 8, (method, seen.largest)
    with LargestNewTensor([cache.k, cache.v]) as seen:  # the check itself sees a planted copy
        cache.keys.contiguous()
    assert seen.largest == cache.keys.numel() * 4


# ---- the benchmark and its figure ----------------------------------------------------------------------

@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
def test_the_decode_benchmark_runs_on_the_cpu(tmp_path, dtype):
    """The same functions as ``--device cuda`` runs, on the CPU: every method, bytes and floors written."""
    import json

    from benchmarks.decode import METHODS_TIMED, main

    out = tmp_path / "run"
    args = ["--device", "cpu", "--dtype", dtype, "--lengths", "128", "256", "--batch", "1", "2", "--heads", "4",
            "--kv-heads", "2", "--head-dim", "16", "--top-k", "32", "--token-budget", "32", "--page-size", "8",
            "--compress-block-size", "8", "--compress-block-sliding-stride", "4", "--selection-block-size", "16",
            "--num-selected-blocks", "3", "--sliding-window-size", "16", "--streaming-window-size", "28",
            "--min-run-time", "0.01", "--copy-bytes", "1000000", "--peak-gbs", "10", "--out", str(out)]
    assert main(args) == 0
    res = json.loads(out.with_suffix(".json").read_text())
    rows = res["rows"]
    assert [r.get("note") for r in rows] == [None] * len(rows)
    assert {(r["method"], r["batch"], r["length"]) for r in rows} == {
        (m, b, L) for m in METHODS_TIMED for b in (1, 2) for L in (128, 256)}
    for r in rows:
        assert r["median_s"] > 0 and r["q1_s"] <= r["median_s"] <= r["q3_s"]
        assert r["roofline_s"] == pytest.approx(r["bytes_step"] / (res["meta"]["copy_gbs"] * 1e9))
        assert r["bytes_per_token"] * r["batch"] == r["bytes_step"]
        if r["method"] in ("sdpa", "dense"):
            assert r["bytes_step"] == r["batch"] * 2 * r["length"] * 2 * 16 * (2 if dtype == "bfloat16" else 4)
        if r["method"] == "dense":
            assert r["max_abs_diff_vs_sdpa"] < (2e-2 if dtype == "bfloat16" else 1e-5)
        if r["method"] in ("nsa", "streaming_llm") and r["length"] == 256:
            assert r["bytes_vs_dense"] < 0.7
    assert "| 2 | 256 | nsa |" in out.with_suffix(".md").read_text()
    assert out.with_suffix(".html").stat().st_size > 10_000


def test_the_decode_figure_in_both_languages():
    from sparse_attn.i18n import t
    from sparse_attn.viz_decode import decode_figure

    rows = [dict(method=m, batch=b, length=L, bytes_per_token=L * f * 2**20, median_s=L * f * 1e-6,
                 q1_s=L * f * 0.9e-6, q3_s=L * f * 1.1e-6, roofline_s=L * f * 0.5e-6)
            for m, f in (("sdpa", 1.0), ("nsa", 0.1)) for b in (1, 4) for L in (1024, 4096)]
    for lang in ("en", "zh"):
        fig = decode_figure(rows, lang, copy_gbs=100.0, device="cpu", dtype="float32")
        assert fig.layout.title.text == t("decode.fig.title", lang, batch=4, device="cpu", dtype="float32")
        names = [tr.name for tr in fig.data]
        assert t("decode.method.sdpa", lang) in names and t("method.nsa", lang) in names
        assert t("decode.roofline", lang, method=t("method.nsa", lang)) in names
        assert t("decode.roofline_legend", lang) in names
        nsa_time = [tr for tr in fig.data if tr.name == t("method.nsa", lang) and tr.xaxis == "x2"][0]
        assert list(nsa_time.y) == pytest.approx([1024 * 0.1e-3, 4096 * 0.1e-3])  # ms
    with pytest.raises(ValueError, match="batch"):
        decode_figure(rows, batch=3)


# ---- Quest with one pick per KV group (not the paper's rule: the bandwidth a GQA model needs) ------------

def test_quest_with_shared_pages_reads_the_group_bound_top_pages():
    from sparse_attn.ops.indexed import indexed_attention
    from sparse_attn.ops.quest import page_min_max, page_upper_bounds

    q, k, v = qkv(H=6, Hkv=2, L=50, seed=16)
    cache = KVCache.from_tensors(k, v, page_size=4)
    qs = q[:, :, -1:] * 0.5
    r = quest_decode(q[:, :, -1:], cache, 10, scale=0.5, query_heads_share_pages=True)
    bounds = page_upper_bounds(qs, *page_min_max(k, 4)).view(2, 2, 3, 1, -1).sum(2)  # (B, Hkv, 1, N)
    pages = bounds.topk(3).indices
    assert torch.equal(r.selection.indices.sort(-1).values, pages.sort(-1).values)
    tokens = (pages.unsqueeze(-1) * 4 + torch.arange(4)).flatten(-2)
    torch.testing.assert_close(r.output, indexed_attention(qs / 0.5, k, v, tokens, 0.5), **TOL)
    per_head = quest_decode(q[:, :, -1:], cache, 10, scale=0.5)
    assert r.bytes_read.total <= per_head.bytes_read.total
    assert tuple(r.bytes_read) == brute_force_bytes("quest", r, cache, replace(CFG, page_size=4))
    # One query head per KV head: sharing changes nothing.
    q1, k1, v1 = qkv(H=2, Hkv=2, L=50, seed=17)
    c1 = KVCache.from_tensors(k1, v1, page_size=4)
    for T in (1, 3):
        a = quest_decode(q1[:, :, -T:], c1, 10, query_heads_share_pages=True)
        b = quest_decode(q1[:, :, -T:], c1, 10)
        torch.testing.assert_close(a.output, b.output, **TOL)
        assert torch.equal(a.selection.indices, b.selection.indices)


def test_a_device_named_without_its_index_takes_tensors_on_it():
    # "cuda" and "cuda:0" name one device, as "cpu:0" and "cpu" do; the cache keeps the name its tensors report.
    cache = KVCache(1, 2, 8, 4, device="cpu:0", page_size=2)
    assert cache.device == torch.device("cpu")
    cache.append(torch.randn(1, 2, 3, 4), torch.randn(1, 2, 3, 4))
    out = dense_decode(torch.randn(1, 4, 1, 4), cache)
    assert out.output.shape == (1, 4, 1, 4)


# ---- the GPU path: sync-free ranking, no data-dependent ops, the decode kernels (interpreted on the CPU) ----------

def test_ranked_topk_is_the_stable_rule_slot_for_slot():
    """One topk over distinct int64 keys gives stable_topk's values and indices: ties, -0.0, +-inf, half dtypes."""
    from sparse_attn.decode.ranking import ranked_topk
    from sparse_attn.topk import stable_topk

    g = torch.Generator().manual_seed(3)
    for dtype in (torch.float32, torch.bfloat16, torch.float16, F64):
        for n, k in ((1024, 16), (300, 128), (7, 7), (50, 1), (1, 1)):
            x = (torch.randint(-3, 4, (24, n), generator=g).float() / 2).to(dtype)  # few values: ties everywhere
            x[0, :5] = -0.0
            x[1, ::2] = float("-inf")
            x[2, min(3, n - 1)] = float("inf")
            x[3] = 0.0
            got, want = ranked_topk(x, k), stable_topk(x, k)
            assert torch.equal(got.indices, want.indices), (dtype, n, k)
            assert torch.equal(got.values, want.values), (dtype, n, k)
    # Values one float32 ulp apart stay apart (the keys carry every bit of the value).
    x = 0.5 + torch.arange(6) * torch.finfo(torch.float32).eps * 0.5
    assert ranked_topk(x.flip(0)[None], 3).indices.tolist() == [[0, 1, 2]]


class OpsSeen(TorchDispatchMode):
    """Every aten op a call runs, with whether it indexed by a boolean mask."""

    def __init__(self):
        super().__init__()
        self.ops = set()

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        name = func.overloadpacket.__name__
        if name == "index" and any(isinstance(t, torch.Tensor) and t.dtype == torch.bool for t in tree_leaves(args)):
            name = "index by a boolean mask"
        self.ops.add(name)
        return func(*args, **(kwargs or {}))


# Ops whose output shape depends on the data, or that read a value back to the host: each makes the host wait
# for the GPU, and none can be captured in a CUDA graph.
HOST_SYNCS = {"nonzero", "_local_scalar_dense", "masked_select", "_unique2", "unique_dim", "unique_consecutive",
              "index by a boolean mask", "repeat_interleave", "item", "equal", "is_nonzero"}


@pytest.mark.parametrize("method", ["nsa", "quest", "quest_grouped", "streaming_llm", "dense"])
@pytest.mark.parametrize("T", [1, 3])
def test_sparse_steps_have_no_host_sync_and_no_data_dependent_shape(method, T):
    """What torch.cuda.set_sync_debug_mode('error') checks on the GPU (benchmarks/decode.py), op by op on the CPU."""
    cfg = replace(CFG, top_k=8)
    q, k, v = qkv(B=2, H=8, Hkv=2, L=61, D=16, Dv=16, dtype=torch.float32)
    cache = KVCache.for_config(cfg, 2, 2, 64, 16, value_dim=16).append(k, v)
    with OpsSeen() as seen:
        if method == "quest_grouped":
            quest_decode(q[:, :, -T:], cache, cfg.token_budget, query_heads_share_pages=True)
        else:
            decode(method, q[:, :, -T:], cache, cfg)
    assert not seen.ops & HOST_SYNCS, (method, seen.ops & HOST_SYNCS)
    assert {"topk", "bmm"} <= seen.ops or method in ("streaming_llm", "dense")  # the check sees the step's ops


def test_the_check_for_host_syncs_catches_one():
    """The op check above fails on a step that syncs: top-k decoding's tie repair uses nonzero."""
    q, k, v = qkv(L=300, D=8, Dv=8, dtype=torch.float32)
    k[..., :] = 1.0  # every score ties: the repair runs
    cache = KVCache.from_tensors(k, v)
    with OpsSeen() as seen:
        topk_decode(q[:, :, -1:], cache, 100)
    assert "nonzero" in seen.ops


def test_compressed_rows_are_stored_padded_and_the_padding_never_counts():
    """Storage rows are a multiple of COMPRESSED_ROW_ALIGN; garbage in the padding changes no output."""
    from sparse_attn.decode.cache import COMPRESSED_ROW_ALIGN

    q, k, v = qkv(L=37)
    cache = KVCache.for_config(CFG, 2, 2, 37, 8, value_dim=6, dtype=F64).append(k, v)
    assert cache._ck.shape[2] % COMPRESSED_ROW_ALIGN == 0 and cache._ck.shape[2] >= cache.num_compressed
    assert cache.compressed_keys.shape[2] == cache.num_compressed == 17
    want = decode("nsa", q[:, :, -3:], cache, CFG)
    cache._ck[:, :, cache.num_compressed:] = 1e6  # a large key there would take every weight if it were read
    cache._cv[:, :, cache.num_compressed:] = 1e6
    got = decode("nsa", q[:, :, -3:], cache, CFG)
    torch.testing.assert_close(got.output, want.output, **TOL)
    assert torch.equal(got.selection.indices, want.selection.indices)
    assert got.extras["compressed_weights"].shape == (2, 4, 3, 17)


def test_the_decode_benchmark_table_shows_graphs_syncs_and_the_pytorch_path():
    from benchmarks.decode import format_table, main

    base = dict(batch=2, length=8, iqr_s=1e-5, bytes_step=2**20, bytes_per_token=2**19, achieved_gbs=1.0,
                roofline_s=1e-4)
    rows = [dict(base, method="sdpa", median_s=1e-3, speedup_vs_sdpa=1.0, graph_median_s=8e-4, graph_achieved_gbs=1.3,
                 graph_speedup_vs_sdpa=1.0, host_sync=None, kernels_per_step=2, gpu_busy_s=7e-4),
            dict(base, method="topk", median_s=2e-3, host_sync="called a synchronizing CUDA operation",
                 graph_note="not captured: the step syncs the host"),
            dict(base, method="nsa", median_s=1e-3, graph_median_s=2e-4, graph_achieved_gbs=5.0,
                 graph_speedup_vs_sdpa=4.0, host_sync=None, reference_graph_median_s=6e-4,
                 max_abs_diff_vs_reference=1e-3, graph_equals_eager=False),
            dict(method="quest", batch=2, length=8, note="out of memory")]
    lines = format_table(rows).splitlines()
    assert len({line.count("|") for line in lines}) == 1  # every row has every column
    assert "| graph ms |" in lines[0] and "| host syncs |" in lines[0] and "| kernels / step |" in lines[0]
    assert "| 2 | 8 | sdpa | 1.000 |" in lines[2] and "| 0.800 | 1.3 | 1.00 | none |" in lines[2]
    assert "called a synchronizing CUDA operation" in lines[3] and "not captured" in lines[3]
    assert "| 0.600 | 1.00e-03 |" in lines[4] and "graph output differs from eager" in lines[4]
    assert lines[5].endswith("| out of memory |")
    cpu_row = {k: v for k, v in rows[0].items() if k in base or k in ("method", "median_s", "speedup_vs_sdpa")}
    plain = format_table([cpu_row])
    assert "graph" not in plain and "host syncs" not in plain  # a CPU run's table keeps its old columns
    for flag in ("--cuda-graphs", "--profile", "--compare-reference", "--sync-check"):
        assert main(["--device", "cpu", flag, "--lengths", "16"]) == 2  # CUDA-only options refuse the CPU


def test_the_benchmarks_float64_check_is_zero_on_a_float64_step():
    """benchmarks.decode.float64_error rebuilds each method's one-query attention over its picks: a float64 step
    (the PyTorch path) must agree with it to rounding, a perturbed output must not."""
    from benchmarks.decode import float64_error

    q, k, v = qkv(L=37)
    cache = KVCache.for_config(CFG, 2, 2, 37, 8, value_dim=6, dtype=F64).append(k, v)
    q1 = q[:, :, -1:]
    steps = {"sdpa": sdpa_decode(q1, cache), "dense": dense_decode(q1, cache), "nsa": decode("nsa", q1, cache, CFG),
             "quest": decode("quest", q1, cache, CFG),
             "quest_grouped": quest_decode(q1, cache, CFG.token_budget, query_heads_share_pages=True)}
    for m, r in steps.items():
        assert float64_error(m, q1, cache, r, CFG) < 1e-12, m
        r.output.add_(1e-3)
        assert float64_error(m, q1, cache, r, CFG) > 1e-5, m


def test_lazy_extras_are_made_once_when_read():
    from sparse_attn.decode.result import Lazy, LazyExtras

    made = []
    extras = LazyExtras(plain=1, lazy=Lazy(lambda: made.append(1) or torch.ones(2)))
    assert made == [] and "lazy" in extras and len(extras) == 2
    assert torch.equal(extras["lazy"], torch.ones(2)) and extras.get("lazy") is extras["lazy"]
    assert dict(extras.items())["plain"] == 1 and made == [1]  # made on the first read only
    assert extras.get("missing", 3) == 3


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the refusal without a CUDA device")
def test_the_launch_benchmark_refuses_a_machine_without_cuda():
    from benchmarks.decode_launch import main

    assert main([]) == 2


# Collected only where there is a GPU (as in test_kernels_compressed.py): on the CPU the interpreter tests
# below check the same kernels, and a skipped test fails CI.
if torch.cuda.is_available():

    @pytest.mark.parametrize("method", ["nsa", "quest", "quest_grouped"])
    def test_cuda_fused_steps_are_within_bf16_rounding_of_float64(method):
        """On the GPU: the fused steps (kernels taken) against float64 over their picks, and against the PyTorch path."""
        from benchmarks.decode import _step, float64_error
        from sparse_attn.decode import nsa, quest
        from sparse_attn.kernels.dispatch import reference_only

        cfg = Config(top_k=512, token_budget=512, page_size=16, compress_block_size=32, compress_block_sliding_stride=16,
                     selection_block_size=64, num_selected_blocks=8, sliding_window_size=256, num_initial_blocks=1,
                     num_local_blocks=2, num_sink_tokens=4)
        g = torch.Generator(device="cuda").manual_seed(0)
        B, H, Hkv, L, D = 3, 32, 2, 5000, 128  # L a multiple of neither pages nor blocks
        cache = KVCache.for_config(cfg, B, Hkv, L, D, dtype=torch.bfloat16, device="cuda")
        cache.append(torch.randn(B, Hkv, L, D, generator=g, device="cuda").bfloat16(),
                     torch.randn(B, Hkv, L, D, generator=g, device="cuda").bfloat16())
        q = torch.randn(B, H, 1, D, generator=g, device="cuda").bfloat16()
        if method == "nsa":
            assert nsa._use_nsa_kernels(q, cache, cfg.num_selected_blocks, cfg.sliding_window_size,
                                        cfg.selection_block_size)
        else:
            assert quest._use_step_kernels(q, cache, cache.num_pages, cfg.token_budget // cfg.page_size)
        step = _step(method, cfg, 2044)
        fast = step(q, cache)
        with reference_only():
            ref = step(q, cache)
        err, ref_err = float64_error(method, q, cache, fast, cfg), float64_error(method, q, cache, ref, cfg)
        assert err < 1e-2 and err < 2 * ref_err + 1e-3, (err, ref_err)
        assert (fast.selection.indices == ref.selection.indices).float().mean() >= 0.98
        assert fast.bytes_read.total <= ref.bytes_read.total * 1.02
        if method == "nsa":
            torch.testing.assert_close(fast.extras["importance"], ref.extras["importance"], rtol=1e-3, atol=1e-6)
            torch.testing.assert_close(fast.extras["compressed_weights"], ref.extras["compressed_weights"], rtol=1e-3,
                                       atol=1e-6)


    def test_cuda_topk_kernel_is_the_stable_rule_on_long_rows():
        from sparse_attn.decode.ranking import ranked_topk
        from sparse_attn.decode.topk_kernel import topk_indices_triton

        g = torch.Generator(device="cuda").manual_seed(1)
        for n, k in ((4096, 128), (1024, 16), (8192, 64), (300, 300), (5000, 512)):
            x = (torch.randn(64, n, generator=g, device="cuda") * 4).round().bfloat16()  # many ties
            x[0, :100] = float("-inf")
            assert torch.equal(topk_indices_triton(x, k), ranked_topk(x, k).indices), (n, k)
            y = torch.randn(64, n, generator=g, device="cuda")
            assert torch.equal(topk_indices_triton(y, k), ranked_topk(y, k).indices), (n, k)


from tests.triton_interpreter import INTERPRETED, run_kernel_tests  # noqa: E402

if not INTERPRETED:

    def test_decode_kernels_under_triton_interpreter():
        pytest.importorskip("triton")
        run_kernel_tests(__file__, min_passed=17, selector="decode_kernel_")


if INTERPRETED:

    def rows_reference(q, k, v, tokens, scale):
        from sparse_attn.ops.indexed import indexed_attention

        if tokens.shape[1] == k.shape[1]:
            return shared_gather_attention(q.double(), k.double(), v.double(), tokens, scale)
        return indexed_attention(q.double(), k.double(), v.double(), tokens, scale)

    def random_rows(shape, N, K, g, empty=0.25):
        rows = torch.stack([torch.randperm(N, generator=g)[:K] for _ in range(math.prod(shape))]).view(*shape, K)
        return rows.masked_fill(torch.rand(rows.shape, generator=g) < empty, -1)

    @pytest.mark.parametrize("shared", [True, False])
    @pytest.mark.parametrize("splits", [None, 1, 3, 50])
    def test_decode_kernel_rows_equal_the_float64_gather(shared, splits):
        from sparse_attn.decode.rows_kernel import rows_attention_triton

        g = torch.Generator().manual_seed(5)
        B, H, Hkv, T, N, D, Dv, K = 2, 6, 2, 2, 300, 24, 20, 150  # head dims not powers of two: masked lanes
        q, k, v = torch.randn(B, H, T, D, generator=g), torch.randn(B, Hkv, N, D, generator=g), torch.randn(
            B, Hkv, N, Dv, generator=g)
        tokens = random_rows((B, Hkv if shared else H, T), N, K, g)
        tokens[0, 0, 0] = -1  # a query (shared: a group) with no row gets zeros
        out = rows_attention_triton(q, k, v, tokens, 0.3, splits=splits)
        ref = rows_reference(q, k, v, tokens, 0.3)
        assert out.dtype == q.dtype and out.shape == (B, H, T, Dv)
        torch.testing.assert_close(out.double(), ref, rtol=1e-5, atol=1e-5)
        assert out[0, : (3 if shared else 1), 0].abs().max() == 0

    def test_decode_kernel_rows_read_a_strided_cache_and_broadcast_rows():
        """Rows taken from a cache's storage (a view longer than the filled part) and one row list for every pair."""
        from sparse_attn.decode.rows_kernel import rows_attention_triton

        g = torch.Generator().manual_seed(6)
        store_k, store_v = torch.randn(2, 2, 64, 16, generator=g), torch.randn(2, 2, 64, 16, generator=g)
        q = torch.randn(2, 4, 1, 16, generator=g)
        rows = torch.arange(10, 40).view(1, 1, 1, -1).expand(2, 2, 1, -1)  # strides 0: no copy of the list
        out = rows_attention_triton(q, store_k, store_v, rows, 0.25)
        ref = dense_attention(q.double(), store_k[:, :, 10:40].double(), store_v[:, :, 10:40].double(), scale=0.25)
        torch.testing.assert_close(out.double(), ref, rtol=1e-5, atol=1e-5)

    @pytest.mark.parametrize("group_sum", [False, True])
    def test_decode_kernel_page_bounds_equal_the_float64_products(group_sum):
        from einops import reduce

        from sparse_attn.decode.bounds_kernel import page_bounds_triton
        from sparse_attn.decode.quest import _upper_bounds

        g = torch.Generator().manual_seed(7)
        for B, H, Hkv, T, L, D, P in ((2, 8, 2, 1, 300, 32, 4), (1, 6, 3, 2, 100, 20, 8)):
            k, v = torch.randn(B, Hkv, L, D, generator=g), torch.randn(B, Hkv, L, D, generator=g)
            cache = KVCache.from_tensors(k, v, page_size=P)
            qs = torch.randn(B, H, T, D, generator=g)
            ref = _upper_bounds(qs.double(), KVCache.from_tensors(k.double(), v.double(), page_size=P))
            if group_sum:
                ref = reduce(ref, "b (hk g) t n -> b hk t n", "sum", hk=Hkv)
            got = page_bounds_triton(qs, cache.page_max, cache.page_min, group_sum=group_sum)
            assert got.shape == ref.shape and got.dtype == qs.dtype
            torch.testing.assert_close(got.double(), ref, rtol=1e-5, atol=1e-4)

    @pytest.mark.parametrize("T", [1, 3])
    def test_decode_kernel_steps_equal_the_pytorch_steps(monkeypatch, T):
        """Whole decode steps with every decode kernel taken (as on CUDA) against the same steps without."""
        from sparse_attn.decode import gather, nsa, quest

        q, k, v = qkv(B=2, H=8, Hkv=2, L=45, D=16, Dv=16, dtype=torch.float32)
        cache = KVCache.for_config(CFG, 2, 2, 45, 16, value_dim=16).append(k, v)

        def steps():
            out = {m: decode(m, q[:, :, -T:], cache, CFG).output for m in ("nsa", "quest", "streaming_llm")}
            out["quest_grouped"] = quest_decode(q[:, :, -T:], cache, CFG.token_budget,
                                                query_heads_share_pages=True).output
            return out

        want = steps()
        calls = []

        def take(*args):
            calls.append(1)
            return True

        for module, name in ((gather, "use_rows_kernel"), (nsa, "use_rows_kernel"), (quest, "_use_bounds_kernel")):
            monkeypatch.setattr(module, name, take)
        got = steps()
        assert len(calls) >= 6  # the kernels did run
        for m in want:
            torch.testing.assert_close(got[m], want[m], rtol=1e-5, atol=1e-5)

    @pytest.mark.parametrize("T", [1, 3])
    def test_decode_kernel_nsa_and_quest_steps_pick_and_weigh_as_the_pytorch_steps(monkeypatch, T):
        """The fused steps (nsa_kernel; Quest's bounds, ranking and unit rows) against the PyTorch steps: outputs,
        picks slot for slot, importance and the compressed weights made on demand."""
        from sparse_attn.decode import nsa, quest

        q, k, v = qkv(B=2, H=8, Hkv=2, L=45, D=16, Dv=12, seed=T, dtype=torch.float32)
        cache = KVCache.for_config(CFG, 2, 2, 45, 16, value_dim=12).append(k, v)
        gates = torch.rand(2, 8, T, 3, generator=torch.Generator().manual_seed(T))  # per head and query

        def steps():
            return {"nsa": nsa_decode(q[:, :, -T:], cache, gates=gates, **nsa_kwargs(CFG)),
                    "quest": quest_decode(q[:, :, -T:], cache, CFG.token_budget),
                    "quest_grouped": quest_decode(q[:, :, -T:], cache, CFG.token_budget, query_heads_share_pages=True)}

        want = steps()
        monkeypatch.setattr(nsa, "_use_nsa_kernels", lambda *a: True)
        monkeypatch.setattr(quest, "_use_step_kernels", lambda *a: True)
        got = steps()
        for m in want:
            torch.testing.assert_close(got[m].output, want[m].output, rtol=1e-5, atol=1e-5)
            assert torch.equal(got[m].selection.indices, want[m].selection.indices), m
            assert got[m].bytes_read == want[m].bytes_read, m
        for name in ("importance", "compressed_weights"):
            torch.testing.assert_close(got["nsa"].extras[name], want["nsa"].extras[name], rtol=1e-5, atol=1e-7)

    def test_decode_kernel_topk_is_the_stable_rule_slot_for_slot():
        """The in-register sort of ranking keys: ties to the lower index, -0.0 equal to 0.0, +-inf, half dtypes."""
        from sparse_attn.decode.ranking import ranked_topk
        from sparse_attn.decode.topk_kernel import topk_indices_triton

        g = torch.Generator().manual_seed(4)
        for dtype in (torch.float32, torch.bfloat16, torch.float16):
            x = (torch.randint(-3, 4, (4, 21), generator=g).float() / 2).to(dtype)  # few values: ties everywhere
            x[0, :5] = -0.0
            x[1, ::2] = float("-inf")
            x[2, 3] = float("inf")
            x[3] = torch.randn(21, generator=g).to(dtype)
            assert torch.equal(topk_indices_triton(x, 9), ranked_topk(x, 9).indices), dtype

    def test_decode_kernel_units_and_ranges_equal_the_float64_rows():
        """The rows kernel's unit source (causal cut at each query) and range source (a window; compressed rows
        ended by each query, their scores written out) against float64 attention over the same rows."""
        from einops import rearrange

        from sparse_attn.decode.rows_kernel import range_attention, units_attention
        from sparse_attn.ops.nsa.compression import num_compressed_blocks

        g = torch.Generator().manual_seed(8)
        B, H, Hkv, T, N, D, Dv, U = 2, 4, 2, 3, 70, 24, 20, 5
        q, k, v = torch.randn(B, H, T, D, generator=g), torch.randn(B, Hkv, N, D, generator=g), torch.randn(
            B, Hkv, N, Dv, generator=g)
        L = 67  # rows past the length are never read
        pos = torch.arange(L - T, L)
        units = torch.stack([torch.randperm(14, generator=g)[:6] for _ in range(B * Hkv * T)]).view(B, Hkv, T, 6)
        units[0, 0, 0, :2] = -1
        tok = units.unsqueeze(-1) * U + torch.arange(U)
        tok = tok.masked_fill((units < 0).unsqueeze(-1) | (tok > pos.view(-1, 1, 1)), -1).flatten(-2)
        want = rows_reference(q, k, v, tok, 0.3)
        torch.testing.assert_close(units_attention(q, k, v, units, U, L, 0.3, splits=2).double(), want,
                                   rtol=1e-5, atol=1e-5)

        window, lo = 9, L - T - 9 + 1
        j = torch.arange(lo, L)
        rows = torch.where((j <= pos.view(-1, 1)) & (j > pos.view(-1, 1) - window), j, -1).expand(B, Hkv, T, -1)
        got = range_attention(q, k, v, L, 0.3, window=window, first=lo, slots=L - lo, splits=2)
        torch.testing.assert_close(got.double(), rows_reference(q, k, v, rows, 0.3), rtol=1e-5, atol=1e-5)

        bs, stride, Lc = 4, 2, 21  # compressed rows: row c ends at token c * stride + bs - 1
        nc = num_compressed_blocks(Lc, bs, stride)
        scores = torch.full((B, Hkv, T, H // Hkv, nc), float("nan"))
        got = range_attention(q, k, v, Lc, 0.3, window=None, slots=nc, compressed=(bs, stride), scores=scores,
                              splits=3)
        c = torch.arange(nc)
        seen = c * stride + bs - 1 <= torch.arange(Lc - T, Lc).view(-1, 1)  # (T, nc)
        rows = torch.where(seen, c, -1).expand(B, Hkv, T, -1)
        torch.testing.assert_close(got.double(), rows_reference(q, k, v, rows, 0.3), rtol=1e-5, atol=1e-5)
        full = torch.einsum("bhtd,bhnd->bhtn", q.double(), k[:, :, :nc].double().repeat_interleave(2, 1)) * 0.3
        full = rearrange(full, "b (hk g) t n -> b hk t g n", hk=Hkv).masked_fill(~seen[:, None], float("-inf"))
        torch.testing.assert_close(scores.double(), full, rtol=1e-5, atol=1e-5)  # every slot written
