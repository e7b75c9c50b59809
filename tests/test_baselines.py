"""StreamingLLM and Quest against float64 dense attention restricted to masks this file builds on its own."""
import math

import pytest
import torch

from sparse_attn.ops.quest import page_min_max, page_upper_bounds, quest_attention
from sparse_attn.ops.streaming_llm import streaming_llm_attention, streaming_llm_pairs


def _qkv(B=1, H=4, Hkv=2, Lq=24, Lk=None, D=8, Dv=None, seed=0, dtype=torch.float64):
    g = torch.Generator().manual_seed(seed)
    Lk = Lq if Lk is None else Lk
    q = torch.randn(B, H, Lq, D, generator=g, dtype=dtype)
    k = torch.randn(B, Hkv, Lk, D, generator=g, dtype=dtype)
    v = torch.randn(B, Hkv, Lk, Dv or D, generator=g, dtype=dtype)
    return q, k, v


def _masked_dense(q, k, v, mask, scale=None):
    """float64 softmax(q k^T * scale) v over the keys ``mask`` allows (any shape that broadcasts); 0 on empty rows."""
    G = q.shape[1] // k.shape[1]
    kk, vv = k.double().repeat_interleave(G, 1), v.double().repeat_interleave(G, 1)
    scale = 1 / math.sqrt(q.shape[-1]) if scale is None else scale
    scores = (q.double() @ kk.transpose(-1, -2) * scale).masked_fill(~mask, float("-inf"))
    weights = torch.softmax(scores, -1).nan_to_num(0.0)
    return weights @ vv, weights


def _no_repeats(indices):
    srt = indices.sort(-1).values
    return not ((srt[..., 1:] == srt[..., :-1]) & (srt[..., 1:] >= 0)).any()


# ---- StreamingLLM --------------------------------------------------------------------------------

def _sink_window_mask(Lq, Lk, sinks, window, causal):
    i, j = torch.arange(Lq)[:, None], torch.arange(Lk)[None, :]
    near = ((j > i - window) & (j <= i)) if causal else ((i - j).abs() < window)
    mask = (j < sinks) | near
    return mask & (j <= i) if causal else mask


@pytest.mark.parametrize("causal", [False, True])
@pytest.mark.parametrize("sinks, window, Lq, Lk", [
    (4, 6, 30, 30),    # the usual case: sinks, a gap, the window
    (4, 8, 10, 10),    # the window reaches back into the sinks: they overlap and must count once
    (0, 5, 20, 20),    # no sinks: a plain sliding window
    (3, 0, 20, 20),    # no window: the sinks alone
    (40, 3, 16, 16),   # more sinks than keys
    (2, 50, 16, 16),   # a window longer than the sequence: dense (with the sinks inside it)
    (2, 4, 25, 11),    # more queries than keys (top-left aligned, as SDPA)
    (2, 4, 9, 21),     # more keys than queries
    (1, 1, 1, 1),      # L = 1
])
def test_streaming_llm_is_dense_attention_on_sinks_and_window(causal, sinks, window, Lq, Lk):
    q, k, v = _qkv(Lq=Lq, Lk=Lk, Dv=5, seed=Lq * 31 + Lk + sinks)
    mask = _sink_window_mask(Lq, Lk, sinks, window, causal)
    ref, ref_w = _masked_dense(q, k, v, mask)
    out, sel = streaming_llm_attention(q, k, v, sinks, window, causal=causal, return_selection=True)
    torch.testing.assert_close(out, ref, rtol=1e-12, atol=1e-12)
    assert torch.equal(sel.mask(Lk), mask.expand_as(sel.mask(Lk)))
    torch.testing.assert_close(sel.to_dense(Lk), ref_w, rtol=1e-12, atol=1e-12)
    assert _no_repeats(sel.indices)
    assert streaming_llm_pairs(Lq, Lk, sinks, window, causal=causal) == int(mask.sum())
    torch.testing.assert_close(streaming_llm_attention(q, k, v, sinks, window, causal=causal), out, rtol=0, atol=0)


def test_streaming_llm_grouped_heads_share_the_pattern_and_a_scale_applies():
    q, k, v = _qkv(H=6, Hkv=2, Lq=33, seed=5)
    mask = _sink_window_mask(33, 33, 4, 7, True)
    out = streaming_llm_attention(q, k, v, 4, 7, causal=True, scale=-0.3)
    torch.testing.assert_close(out, _masked_dense(q, k, v, mask, scale=-0.3)[0], rtol=1e-12, atol=1e-12)


def test_streaming_llm_ignores_the_future_and_the_keys_it_does_not_see():
    q, k, v = _qkv(Lq=40, seed=2)
    out = streaming_llm_attention(q, k, v, 4, 6, causal=True)
    k2, v2 = k.clone(), v.clone()
    k2[:, :, 25:] += 100 * torch.randn_like(k2[:, :, 25:])
    v2[:, :, 25:] -= 7
    # The middle of the sequence, outside every window that ends after position 20: no query looks there.
    k2[:, :, 4:14] = 1e3
    after = streaming_llm_attention(q, k2, v2, 4, 6, causal=True)
    torch.testing.assert_close(after[:, :, 20:25], out[:, :, 20:25], rtol=0, atol=0)
    assert not torch.allclose(after[:, :, 25:], out[:, :, 25:])


def test_streaming_llm_gradients_are_those_of_masked_dense_attention():
    q, k, v = (t.requires_grad_() for t in _qkv(Lq=18, seed=9))
    mask = _sink_window_mask(18, 18, 3, 4, False)
    grads = torch.autograd.grad(streaming_llm_attention(q, k, v, 3, 4).square().sum(), (q, k, v))
    want = torch.autograd.grad(_masked_dense(q, k, v, mask)[0].square().sum(), (q, k, v))
    for got, ref in zip(grads, want):
        torch.testing.assert_close(got, ref, rtol=1e-10, atol=1e-12)


@pytest.mark.parametrize("kwargs, error, match", [
    (dict(num_sink_tokens=-1, sliding_window_size=4), ValueError, r"num_sink_tokens must be >= 0"),
    (dict(num_sink_tokens=4, sliding_window_size=-2), ValueError, r"sliding_window_size must be >= 0"),
    (dict(num_sink_tokens=0, sliding_window_size=0), ValueError,
     r"num_sink_tokens and sliding_window_size cannot both be 0.*allowed"),
    (dict(num_sink_tokens=2.0, sliding_window_size=4), TypeError, r"num_sink_tokens must be an int"),
    (dict(num_sink_tokens=2, sliding_window_size=True), TypeError, r"sliding_window_size must be an int"),
])
def test_streaming_llm_refuses_bad_counts(kwargs, error, match):
    q, k, v = _qkv(Lq=8)
    with pytest.raises(error, match=match):
        streaming_llm_attention(q, k, v, **kwargs)


# ---- Quest ---------------------------------------------------------------------------------------

def _brute_bounds(q, k, page_size):
    """float64 sum_d max(q_d * min_d, q_d * max_d) per query head and page, page by page."""
    G = q.shape[1] // k.shape[1]
    Lk = k.shape[2]
    cols = []
    for a in range(0, Lk, page_size):
        page = k[:, :, a:a + page_size].double().repeat_interleave(G, 1)
        lo, hi = page.amin(2, keepdim=True), page.amax(2, keepdim=True)
        cols.append(torch.maximum(q.double() * lo, q.double() * hi).sum(-1))
    return torch.stack(cols, -1)


def _quest_mask(q, k, token_budget, page_size, causal, scale=None):
    """The keys Quest must read, from brute-force float64 bounds: pages by falling bound, lower page on ties."""
    B, H, Lq, D = q.shape
    G, Lk = H // k.shape[1], k.shape[2]
    scale = 1 / math.sqrt(D) if scale is None else scale
    picks = min(math.ceil(token_budget / page_size), math.ceil(Lk / page_size))
    mask = torch.zeros(B, H, Lq, Lk, dtype=torch.bool)
    for b in range(B):
        for h in range(H):
            for i in range(Lq):
                qi = q[b, h, i].double() * scale
                ranked = []
                for page, a in enumerate(range(0, Lk, page_size)):
                    if causal and a > i:
                        continue
                    end = min(a + page_size, Lk, i + 1) if causal else min(a + page_size, Lk)
                    keys = k[b, h // G, a:end].double()
                    bound = torch.maximum(qi * keys.amin(0), qi * keys.amax(0)).sum().item()
                    ranked.append((-bound, page))
                for _, page in sorted(ranked)[:picks]:
                    a = page * page_size
                    mask[b, h, i, a:min(a + page_size, Lk, i + 1) if causal else a + page_size] = True
    return mask


@pytest.mark.parametrize("Lk, page_size", [(24, 4), (23, 5), (7, 7), (9, 1), (1, 1)])
def test_page_bounds_match_brute_force_and_bound_every_score(Lk, page_size):
    q, k, _ = _qkv(B=2, H=4, Hkv=2, Lq=11, Lk=Lk, seed=Lk + page_size)
    k[:, 0, : Lk // 2] *= 25  # pages of very different spread
    k[:, 1, ::3] = -k[:, 1, ::3].abs() - 3  # and of one sign in places
    q[:, :, 2] = 0
    bounds = page_upper_bounds(q, *page_min_max(k, page_size))
    torch.testing.assert_close(bounds, _brute_bounds(q, k, page_size), rtol=1e-12, atol=1e-12)
    scores = q @ k.repeat_interleave(2, 1).transpose(-1, -2)  # (B, H, Lq, Lk)
    page_of_key = torch.arange(Lk) // page_size
    assert (bounds[..., page_of_key] >= scores - 1e-12).all()
    if page_size == 1:  # a page of one key is bounded by its own score
        torch.testing.assert_close(bounds, scores, rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("causal", [False, True])
@pytest.mark.parametrize("token_budget, page_size, Lq, Lk, H, Hkv", [
    (8, 4, 32, 32, 4, 2),   # grouped heads, two pages of four
    (9, 4, 30, 30, 4, 4),   # a budget that is no multiple of the page: rounded up to three pages
    (6, 5, 27, 27, 2, 1),   # a short last page
    (3, 3, 20, 12, 4, 2),   # more queries than keys
    (5, 2, 9, 21, 2, 2),    # more keys than queries
    (1, 1, 15, 15, 2, 1),   # pages of one token: top-1 attention
])
def test_quest_is_dense_attention_on_the_pages_with_the_highest_bounds(causal, token_budget, page_size, Lq, Lk, H, Hkv):
    q, k, v = _qkv(H=H, Hkv=Hkv, Lq=Lq, Lk=Lk, Dv=6, seed=token_budget * 7 + Lq)
    mask = _quest_mask(q, k, token_budget, page_size, causal)
    ref, ref_w = _masked_dense(q, k, v, mask)
    out, sel = quest_attention(q, k, v, token_budget, page_size, causal=causal, return_selection=True)
    assert torch.equal(sel.mask(Lk), mask)
    torch.testing.assert_close(out, ref, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(sel.to_dense(Lk), ref_w, rtol=1e-12, atol=1e-12)
    assert _no_repeats(sel.indices) and sel.indices.shape[-1] == min(math.ceil(token_budget / page_size),
                                                                     math.ceil(Lk / page_size)) * page_size


def test_quest_query_heads_of_a_group_pick_their_own_pages():
    q, k, v = _qkv(H=4, Hkv=1, Lq=16, Lk=32, seed=4)
    q[:, 1] = -q[:, 0]  # two heads of one group asking opposite questions
    mask = _quest_mask(q, k, 8, 4, False)
    _, sel = quest_attention(q, k, v, 8, 4, return_selection=True)
    assert torch.equal(sel.mask(32), mask)
    assert (mask[:, 0] != mask[:, 1]).any()  # one shared choice per group would have failed the line above


def test_quest_negative_scale_ranks_the_scaled_scores():
    q, k, v = _qkv(Lq=20, seed=6)
    mask = _quest_mask(q, k, 8, 4, True, scale=-0.5)
    out = quest_attention(q, k, v, 8, 4, causal=True, scale=-0.5)
    torch.testing.assert_close(out, _masked_dense(q, k, v, mask, scale=-0.5)[0], rtol=1e-12, atol=1e-12)
    assert not torch.equal(mask, _quest_mask(q, k, 8, 4, True, scale=0.5))


@pytest.mark.parametrize("causal", [False, True])
def test_quest_ties_go_to_the_lower_page(causal):
    q, k, _ = _qkv(H=2, Hkv=1, Lq=24, seed=8)
    k = k[:, :, :4].repeat(1, 1, 6, 1)  # six identical pages of four: the bounds of whole pages all tie
    v = torch.randn_like(k)
    _, sel = quest_attention(q, k, v, 8, 4, causal=causal, return_selection=True)
    pages = sel.indices[..., ::4].div(4, rounding_mode="floor")  # the page of each slot's first token
    want = torch.tensor([0, 1]).expand_as(pages).clone()
    if causal:
        # A query's own page is bounded by its keys so far, a subset of the page: never above a whole
        # page, so page 0 and then page 1 still win; queries 0..3 see page 0 alone.
        want[..., :4, 1] = -1
    assert torch.equal(pages, want)


def test_quest_ignores_the_future_even_inside_the_query_page():
    q, k, v = _qkv(Lq=32, seed=3)
    out = quest_attention(q, k, v, 8, 8, causal=True)
    k2, v2 = k.clone(), v.clone()
    k2[:, :, 13:] = 50 * torch.randn_like(k2[:, :, 13:])  # from the middle of page 1 on
    v2[:, :, 13:] += 3
    after = quest_attention(q, k2, v2, 8, 8, causal=True)
    torch.testing.assert_close(after[:, :, :13], out[:, :, :13], rtol=0, atol=0)
    assert not torch.allclose(after[:, :, 13:], out[:, :, 13:])


@pytest.mark.parametrize("causal", [False, True])
@pytest.mark.parametrize("token_budget", [24, 25, 1000])
def test_quest_budget_of_all_keys_is_dense(causal, token_budget):
    q, k, v = _qkv(H=4, Hkv=2, Lq=24, seed=token_budget)
    everything = torch.ones(24, 24, dtype=torch.bool)
    ref = _masked_dense(q, k, v, everything.tril() if causal else everything)[0]
    torch.testing.assert_close(quest_attention(q, k, v, token_budget, 5, causal=causal), ref, rtol=1e-12, atol=1e-12)


def test_quest_one_token_and_gradients():
    q, k, v = _qkv(H=2, Hkv=1, Lq=1, seed=1)
    torch.testing.assert_close(quest_attention(q, k, v, 1, 1), v.repeat_interleave(2, 1), rtol=0, atol=1e-15)
    q, k, v = (t.requires_grad_() for t in _qkv(Lq=16, seed=12))
    mask = _quest_mask(q.detach(), k.detach(), 6, 3, True)
    grads = torch.autograd.grad(quest_attention(q, k, v, 6, 3, causal=True).square().sum(), (q, k, v))
    want = torch.autograd.grad(_masked_dense(q, k, v, mask)[0].square().sum(), (q, k, v))
    for got, ref in zip(grads, want):
        torch.testing.assert_close(got, ref, rtol=1e-10, atol=1e-12)


def test_quest_in_float32_picks_the_pages_float64_picks():
    q, k, v = _qkv(Lq=32, seed=14)
    out, sel = quest_attention(q.float(), k.float(), v.float(), 8, 4, causal=True, return_selection=True)
    assert out.dtype == sel.weights.dtype == torch.float32
    mask = _quest_mask(q, k, 8, 4, True)
    assert torch.equal(sel.mask(32), mask)
    torch.testing.assert_close(out.double(), _masked_dense(q, k, v, mask)[0], rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("causal", [False, True])
def test_queries_in_blocks_give_the_same_answer(monkeypatch, causal):
    from sparse_attn.ops import indexed, quest

    q, k, v = _qkv(H=4, Hkv=2, Lq=23, Lk=19, seed=21)
    for module in (indexed, quest):
        monkeypatch.setattr(module, "QUERY_CHUNK", 5)  # blocks of 5 queries, the last one short
    out, sel = quest_attention(q, k, v, 6, 3, causal=causal, return_selection=True)
    mask = _quest_mask(q, k, 6, 3, causal)
    assert torch.equal(sel.mask(19), mask)
    torch.testing.assert_close(out, _masked_dense(q, k, v, mask)[0], rtol=1e-12, atol=1e-12)
    out, sel = streaming_llm_attention(q, k, v, 2, 4, causal=causal, return_selection=True)
    mask = _sink_window_mask(23, 19, 2, 4, causal)
    assert torch.equal(sel.mask(19), mask.expand_as(sel.mask(19)))
    torch.testing.assert_close(out, _masked_dense(q, k, v, mask)[0], rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("args, error, match", [
    ((8, 0), ValueError, r"page_size must be >= 1"),
    ((8, 13), ValueError, r"page_size must be <= 12"),
    ((0, 4), ValueError, r"token_budget must be >= 1"),
    ((8.0, 4), TypeError, r"token_budget must be an int"),
    ((8, None), TypeError, r"page_size must be an int"),
])
def test_quest_refuses_bad_sizes(args, error, match):
    q, k, v = _qkv(Lq=12)
    with pytest.raises(error, match=match):
        quest_attention(q, k, v, *args)


def test_the_helpers_refuse_bad_arguments():
    from sparse_attn.ops.streaming_llm import streaming_llm_positions, streaming_llm_width

    q, k, _ = _qkv(H=4, Hkv=2, Lq=8)
    with pytest.raises(ValueError, match="page_size must be >= 1"):
        page_min_max(k, 0)
    lo, hi = page_min_max(k, 4)
    with pytest.raises(ValueError, match="page_min and page_max must both be"):
        page_upper_bounds(q, lo, hi[..., :3])
    with pytest.raises(ValueError, match="page_min and page_max must both be"):
        page_upper_bounds(q[:, :3], lo, hi)  # 3 query heads over 2 KV heads
    with pytest.raises(ValueError, match="Lq must be >= 0"):
        streaming_llm_positions(-1, 8, 2, 2, causal=True)
    with pytest.raises(ValueError, match="Lk must be >= 0"):
        streaming_llm_width(-3, 2, 2, causal=False)
    with pytest.raises(ValueError, match="both be 0"):
        streaming_llm_pairs(8, 8, 0, 0, causal=True)
