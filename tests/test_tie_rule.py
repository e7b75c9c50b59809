"""One tie rule for token top-k: among equal scores the lower key index wins, on every path.

References are stable sorts: ``torch.sort(x, descending=True, stable=True)``
keeps equal entries in index order, so its first k entries are the rule's
answer (values, indices and order). Attention inputs are small integers (the
shipped periodic pattern aside), so every score is exact in float32 and
float64 whatever order a matmul sums in: the full-score and the streaming
paths see bit-identical scores, and only the tie rule decides between equal
ones. The fused Triton kernels are checked on
the CPU through Triton's interpreter (see tests/triton_interpreter.py).
"""
from __future__ import annotations

import importlib.util

import pytest
import torch
from einops import rearrange

import sparse_attn.topk as topk_module
from sparse_attn.ops.topk import topk_attention
from sparse_attn.sources import synthetic_qkv
from sparse_attn.topk import StreamingTopK, chunked_topk, merge_topk, stable_topk
from tests.triton_interpreter import INTERPRETED, run_kernel_tests

NEG_INF = float("-inf")


@pytest.fixture(autouse=True)
def _one_thread():
    # Small tensors and many tiny ops: a second thread only adds synchronisation.
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def stable_reference(x, k, dim=-1, largest=True):
    """The rule's top-k of x along dim: the first k entries of a stable sort."""
    s = torch.sort(x, dim=dim, descending=largest, stable=True)
    return s.values.narrow(dim, 0, k), s.indices.narrow(dim, 0, k)


def int_qkv(B, H, Hkv, Lq, Lk, D, *, low=-1, high=2, seed=0):
    """float64 q, k with integer entries in [low, high): exact scores, many of them equal; v Gaussian."""
    g = torch.Generator().manual_seed(seed)
    q = torch.randint(low, high, (B, H, Lq, D), generator=g).double()
    k = torch.randint(low, high, (B, Hkv, Lk, D), generator=g).double()
    v = torch.randn(B, Hkv, Lk, 3, generator=g, dtype=torch.float64)
    return q, k, v


def reference_selection(q, k, top_k, causal, scale=None):
    """Float64 stable-argsort reference: (B, H, Lq, min(top_k, Lk)) key indices, -1 in empty slots."""
    H, Hkv, Lq, Lk = q.shape[1], k.shape[1], q.shape[2], k.shape[2]
    scale = q.shape[-1] ** -0.5 if scale is None else scale
    s = q.double() @ k.double().repeat_interleave(H // Hkv, 1).transpose(-1, -2) * scale
    allowed = torch.ones(Lq, Lk, dtype=torch.bool)
    if causal:
        allowed = allowed.tril()
    s = s.masked_fill(~allowed, NEG_INF)
    order = torch.sort(s, dim=-1, descending=True, stable=True).indices[..., : min(top_k, Lk)]
    return order.masked_fill(~allowed.expand_as(s).gather(-1, order), -1)


def reference_output(q, k, v, sel_indices, scale=None):
    """Float64 softmax over the given keys' scores (-1: no key), weighted sum of their values."""
    H, Hkv = q.shape[1], k.shape[1]
    scale = q.shape[-1] ** -0.5 if scale is None else scale
    s = q.double() @ k.double().repeat_interleave(H // Hkv, 1).transpose(-1, -2) * scale
    # scatter_add: an empty slot (-1, clamped to 0) must not overwrite a pick of key 0.
    hits = torch.zeros_like(s, dtype=torch.int64).scatter_add_(-1, sel_indices.clamp(min=0), (sel_indices >= 0).long())
    picked = hits > 0
    w = torch.softmax(s.masked_fill(~picked, NEG_INF), -1).nan_to_num(0.0)
    return w @ v.double().repeat_interleave(H // Hkv, 1)


def assert_rule_on_every_path(q, k, v, top_k, causal, tilings, scale=None):
    """Full-score and streaming selections equal the stable reference (order included); outputs agree.

    ``tilings``: (chunk_size, query_chunk_size) pairs for the streaming path.
    """
    want = reference_selection(q, k, top_k, causal, scale)
    full, sel_full = topk_attention(q, k, v, top_k, causal=causal, scale=scale, return_selection=True)
    assert torch.equal(sel_full.indices, want)
    torch.testing.assert_close(full, reference_output(q, k, v, want, scale), rtol=1e-12, atol=1e-12)
    for c, qc in tilings:
        out, sel = topk_attention(q, k, v, top_k, causal=causal, scale=scale, chunk_size=c,
                                  query_chunk_size=qc, return_selection=True)
        assert torch.equal(sel.indices, want), (c, qc)
        torch.testing.assert_close(out, full, rtol=1e-12, atol=1e-12)


def tied_rows(scores, top_k):
    """Per row: more keys score the k-th value than there are slots left for it (a wrong pick is possible)."""
    kth = scores.topk(top_k, dim=-1).values[..., -1:]
    above = (scores > kth).sum(-1)
    return (scores == kth).sum(-1) > top_k - above


# --- the tensor helpers ---------------------------------------------------------------------------


def tie_heavy(shape, seed, specials=True):
    g = torch.Generator().manual_seed(seed)
    x = torch.randint(-2, 3, shape, generator=g).float()
    if specials:  # NaN, +-inf and -0.0 among the ties; NaN ranks above everything, as in torch
        r = torch.rand(shape, generator=g)
        x[r < 0.08] = float("nan")
        x[(r >= 0.08) & (r < 0.14)] = float("inf")
        x[(r >= 0.14) & (r < 0.2)] = NEG_INF
        x[(r >= 0.2) & (r < 0.3)] = -0.0
    return x


def assert_same_topk(got, want_values, want_indices):
    assert torch.equal(got.indices, want_indices)
    assert torch.equal(got.values.isnan(), want_values.isnan())
    assert torch.equal(got.values.nan_to_num(0.0), want_values.nan_to_num(0.0))


@pytest.mark.parametrize("largest", [True, False])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16, torch.float64, torch.int64,
                                   torch.uint8])
@pytest.mark.parametrize("n", [61, 161])  # rows a stable sort picks, and rows torch.topk's threshold picks
def test_tensor_helpers_follow_the_stable_sort(n, dtype, largest):
    x = tie_heavy((5, n), seed=3, specials=dtype.is_floating_point)
    x = (x + 2).to(dtype) if dtype == torch.uint8 else x.to(dtype)
    for k in (0, 1, 13, n - 1, n):
        want_v, want_i = stable_reference(x, k, largest=largest)
        assert_same_topk(stable_topk(x, k, largest=largest), want_v, want_i)
        for chunk in (1, 32, 70, n):
            assert_same_topk(chunked_topk(x, k, chunk_size=chunk, largest=largest), want_v, want_i)
        # sorted=False: the same picks, in ascending index order.
        asc = stable_topk(x, k, largest=largest, sorted=False)
        assert torch.equal(asc.indices, want_i.sort(-1).values)
        assert torch.equal(chunked_topk(x, k, chunk_size=7, largest=largest, sorted=False).indices, asc.indices)


def test_stable_topk_any_dim_and_non_contiguous():
    x = tie_heavy((6, 30, 4), seed=5).permute(2, 1, 0)[:, ::2]  # (4, 15, 6), non-contiguous
    assert not x.is_contiguous()
    for dim in range(-3, 3):
        k = min(5, x.shape[dim])
        want_v, want_i = stable_reference(x, k, dim)
        assert_same_topk(stable_topk(x, k, dim), want_v, want_i)
        assert_same_topk(chunked_topk(x, k, dim, chunk_size=2), want_v, want_i)


@pytest.mark.parametrize("block", [1, 300, 1 << 22])
def test_tied_rows_searched_in_blocks_of_any_size(block, monkeypatch):
    # Rows with more ties than slots are searched a block of entries at a time; the block must not matter.
    monkeypatch.setattr(topk_module, "_TIE_BLOCK", block)
    x = tie_heavy((9, 300), seed=8)
    for largest in (True, False):
        for k in (1, 20, 299):
            assert_same_topk(stable_topk(x, k, largest=largest), *stable_reference(x, k, largest=largest))


def test_stable_topk_all_equal_and_all_nan():
    for fill in (1.0, 0.0, float("nan"), float("inf"), NEG_INF):
        x = torch.full((3, 150), fill)
        for largest in (True, False):
            for got in (stable_topk(x, 9, largest=largest), chunked_topk(x, 9, chunk_size=70, largest=largest)):
                assert got.indices.tolist() == [list(range(9))] * 3


@pytest.mark.parametrize("largest", [True, False])
def test_merge_topk_lower_carried_index_wins_in_any_order(largest):
    x = tie_heavy((4, 40), seed=11)
    g = torch.Generator().manual_seed(12)
    perm = torch.stack([torch.randperm(40, generator=g) for _ in range(4)])  # candidates in shuffled order
    for k in (1, 6, 40):
        want_v, want_i = stable_reference(x, k, largest=largest)
        got = merge_topk(x.gather(-1, perm), perm, k, largest=largest)
        assert_same_topk(got, want_v, want_i)


@pytest.mark.parametrize("largest", [True, False])
def test_streaming_topk_any_chunking(largest):
    x = tie_heavy((3, 2, 137), seed=21)
    sizes = [1, 5, 16, 2, 70, 7, 36]  # uneven chunks, boundaries everywhere
    starts = [sum(sizes[:i]) for i in range(len(sizes))]
    for k in (1, 8, 20):
        want_v, want_i = stable_reference(x, k, largest=largest)
        for order in (range(len(sizes)), reversed(range(len(sizes)))):  # in order, then last chunk first
            acc = StreamingTopK(k, largest=largest)
            for c in order:
                acc.update(x[..., starts[c] : starts[c] + sizes[c]], offset=starts[c])
            assert_same_topk(acc.result(), want_v, want_i)
            asc = acc.result(sorted=False)
            assert torch.equal(asc.indices, want_i.sort(-1).values)
        # Caller-given indices go through the same rule.
        acc = StreamingTopK(k, largest=largest)
        for s0 in range(0, 137, 10):
            chunk = x[..., s0 : s0 + 10]
            acc.update(chunk, offset=0, indices=torch.arange(s0, s0 + chunk.shape[-1]).expand_as(chunk))
        assert_same_topk(acc.result(), want_v, want_i)


@pytest.mark.parametrize(
    "call, exc, match",
    [
        (lambda: stable_topk([1.0, 2.0], 1), TypeError, "x must be a torch.Tensor"),
        (lambda: stable_topk(torch.zeros(3, 4), 5), ValueError, "larger than the size"),
        (lambda: stable_topk(torch.zeros(3, 4), -1), ValueError, "k must be >= 0"),
        (lambda: stable_topk(torch.zeros(3, 4), 2, dim=2), ValueError, "dim=2 is out of range"),
        (lambda: merge_topk(torch.zeros(()), torch.zeros((), dtype=torch.long), 1), ValueError,
         "at least one dimension"),
        (lambda: merge_topk(torch.zeros(3), [0, 1, 2], 1), TypeError, "values and indices must be torch.Tensors"),
        (lambda: merge_topk(torch.zeros(3), torch.zeros(3, dtype=torch.long), 1.5), TypeError, "k must be an int"),
    ],
)
def test_bad_input(call, exc, match):
    with pytest.raises(exc, match=match):
        call()


# --- topk_attention: full-score and streaming --------------------------------------------------------


@pytest.mark.parametrize("causal", [False, True])
def test_periodic_pattern_streaming_equals_full_score(causal):
    # The shipped pattern the app draws: equal float32 scores for keys a period apart.
    # Before the tie rule, streaming and full-score picked different keys in every row.
    q, k, v = synthetic_qkv("periodic", heads=4, kv_heads=2, length=256, head_dim=64)
    top_k = 8
    # The float32 scores as the full-score path makes them (one einsum over all keys, unscaled).
    grouped = torch.einsum("bhgid,bhjd->bhgij", rearrange(q, "b (hk g) i d -> b hk g i d", hk=2), k)
    scores = rearrange(grouped, "b hk g i j -> b (hk g) i j")
    allowed = torch.ones(256, 256, dtype=torch.bool)
    if causal:
        allowed = allowed.tril()
        scores = scores.masked_fill(~allowed, NEG_INF)
    assert tied_rows(scores, top_k).float().mean() > (0.75 if causal else 0.999)
    # The stable argsort in float64 (which holds every float32 score exactly) is the rule's pick.
    want = torch.sort(scores.double(), dim=-1, descending=True, stable=True).indices[..., :top_k]
    want = want.masked_fill(~allowed.expand_as(scores).gather(-1, want), -1)
    full, sel_full = topk_attention(q, k, v, top_k, causal=causal, return_selection=True)
    assert torch.equal(sel_full.indices, want)
    # App sizes, one that divides neither the length nor the query blocks, the whole row.
    for chunk, query_chunk in ((8, 64), (64, None), (100, 37), (256, None)):
        out, sel = topk_attention(q, k, v, top_k, causal=causal, chunk_size=chunk, query_chunk_size=query_chunk,
                                  return_selection=True)
        assert torch.equal(sel.indices, sel_full.indices), chunk
        torch.testing.assert_close(out, full, rtol=1e-6, atol=1e-6)


@pytest.mark.parametrize("causal", [False, True])
@pytest.mark.parametrize("gqa", [(4, 2), (3, 1)])
def test_all_equal_scores_pick_the_first_keys(causal, gqa):
    H, Hkv = gqa
    g = torch.Generator().manual_seed(1)
    q = torch.randint(-3, 4, (2, H, 13, 4), generator=g).double()
    k = torch.randint(-3, 4, (2, Hkv, 1, 4), generator=g).double().expand(2, Hkv, 29, 4).contiguous()
    v = torch.randn(2, Hkv, 29, 3, generator=g, dtype=torch.float64)
    for top_k in (1, 5, 40):  # and k >= Lk: every allowed key
        want = reference_selection(q, k, top_k, causal)
        n = min(top_k, 29)
        first = torch.arange(n).expand_as(want)
        if causal:
            first = first.masked_fill(first > torch.arange(13).view(13, 1), -1)
        assert torch.equal(want, first)  # the reference itself: keys 0, 1, 2, ... in order
        assert_rule_on_every_path(q, k, v, top_k, causal, tilings=((1, 13), (3, 4), (28, 5), (29, None)))


@pytest.mark.parametrize("causal", [False, True])
@pytest.mark.parametrize("seed", [0, 1])
def test_ties_straddling_chunk_boundaries(causal, seed):
    # D = 2 and entries in {-1, 0, 1}: scores in -2..2, so equal scores sit on both
    # sides of every chunk boundary and the k-th value is tied in most rows.
    q, k, v = int_qkv(1, 4, 2, 23, 37, 2, seed=seed)
    top_k = 6
    s = q @ k.repeat_interleave(2, 1).transpose(-1, -2)
    if causal:
        s = s.masked_fill(torch.ones(23, 37, dtype=torch.bool).triu(1), NEG_INF)
    assert tied_rows(s, top_k).float().mean() > 0.5
    assert_rule_on_every_path(q, k, v, top_k, causal, tilings=((1, 23), (5, 3), (16, 7), (36, None)))


def test_tie_across_one_boundary_keeps_the_earlier_chunks_key():
    # One query, top 3 of scores 3 1 1 | 1 3 1 | 1 1 1: with chunks of 3 the running pick after
    # the first chunk is keys 0, 1, 2; key 4 (a 3) must push out key 2, and the 1 kept is key 1.
    q = torch.ones(1, 1, 1, 1, dtype=torch.float64)
    k = torch.tensor([3.0, 1, 1, 1, 3, 1, 1, 1, 1], dtype=torch.float64).view(1, 1, 9, 1)
    v = torch.arange(9, dtype=torch.float64).view(1, 1, 9, 1)
    for chunk in (None, 1, 2, 3, 4, 8):
        _, sel = topk_attention(q, k, v, 3, chunk_size=chunk, return_selection=True)
        assert sel.indices.tolist() == [[[[0, 4, 1]]]], chunk


@pytest.mark.parametrize("shape", [(1, 1), (1, 9), (9, 1), (5, 12)])
def test_edges_one_query_one_key_and_negative_scale(shape):
    Lq, Lk = shape
    q, k, v = int_qkv(1, 2, 1, Lq, Lk, 2, seed=4)
    for causal in (False, True):
        for top_k in (1, 3, Lk + 2):
            assert_rule_on_every_path(q, k, v, top_k, causal, tilings=((1, None), (4, 2)))
            # A negative scale ranks the lowest dot products first; the rule is unchanged.
            assert_rule_on_every_path(q, k, v, top_k, causal, tilings=((1, 3), (4, None)), scale=-0.5)


# --- the fused Triton kernels, through the interpreter ------------------------------------------------

HAVE_TRITON = importlib.util.find_spec("triton") is not None

if not INTERPRETED:

    def test_kernels_under_triton_interpreter():
        pytest.importorskip("triton")
        run_kernel_tests(__file__, min_passed=3)


if INTERPRETED and HAVE_TRITON:
    from sparse_attn.kernels import topk_fused

    @pytest.mark.parametrize(
        "causal, capacity, sort_max",
        [
            (False, 32, None),  # row mask + re-score, every row picked in registers (seed 1: no row has 32 candidates)
            (True, 4, None),    # appended in the tile; capacity = top_k: tied rows overflow to the exact redo
            (False, 64, 0),     # the threshold and the pick by stable_topk (rows too long for a register sort)
        ],
    )
    def test_kernel_fused_topk_ties_pick_the_lower_index(causal, capacity, sort_max, monkeypatch):
        if sort_max is not None:
            monkeypatch.setattr(topk_fused, "_SORT_MAX", sort_max)
        picks = []
        select = topk_fused.fused_topk_select
        spy = lambda *a, **kw: picks.append(select(*a, **kw)) or picks[-1]  # noqa: E731
        monkeypatch.setattr(topk_fused, "fused_topk_select", spy)
        q, k, v = (t.float() for t in int_qkv(1, 2, 1, 16, 64, 16, low=0, high=2, seed=1))
        top_k = 4
        out = topk_fused.fused_topk_attention(q, k, v, top_k, causal=causal, capacity=capacity,
                                              block_m=16, block_n=16)
        want = reference_selection(q, k, top_k, causal)[0]  # (H, Lq, top_k), highest score first
        s = q[0] @ k[0, 0].T
        if causal:
            s = s.masked_fill(torch.ones(16, 64, dtype=torch.bool).triu(1), NEG_INF)
        assert tied_rows(s, top_k).float().mean() > 0.5
        vals, idx, overflow = picks[0]
        got = idx.masked_fill(torch.isneginf(vals), -1).view(2, 16, top_k)
        # Documented order: ascending key index, empty slots (-1) last.
        asc = torch.where(want < 0, 64, want).sort(-1).values
        assert torch.equal(got, torch.where(asc == 64, -1, asc))
        assert (overflow > 0) == (capacity == top_k)  # the redo path ran exactly where it was meant to
        torch.testing.assert_close(out.double(), reference_output(q, k, v, want.unsqueeze(0)), rtol=1e-5, atol=1e-5)
