"""chunked_topk and StreamingTopK against torch.topk and a stable sort, on random and adversarial inputs.

torch.topk gives the values; the indices follow the library's tie rule (the
lower index wins among equal values), whose reference is the first k entries
of ``torch.sort(x, descending=largest, stable=True)``. tests/test_tie_rule.py
checks the rule on every path.
"""
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from sparse_attn.topk import StreamingTopK, chunked_topk, merge_topk

FLOAT_DTYPES = [torch.float16, torch.bfloat16, torch.float32, torch.float64]
INT_DTYPES = [torch.int8, torch.int16, torch.int32, torch.int64, torch.uint8]


def assert_matches_topk(x, k, dim, chunk_size, largest=True, sorted=True):
    ours = chunked_topk(x, k, dim, chunk_size=chunk_size, largest=largest, sorted=sorted)
    ref = torch.topk(x, k, dim, largest=largest, sorted=sorted)
    assert ours.values.shape == ref.values.shape and ours.indices.dtype == torch.int64
    vals, ref_vals = ours.values, ref.values
    if not sorted:  # order unspecified: compare as multisets
        vals = vals.sort(dim=dim, descending=largest).values
        ref_vals = ref_vals.sort(dim=dim, descending=largest).values
    # equal_nan: NaN is a value topk returns, and must come back as NaN.
    assert torch.equal(vals.isnan(), ref_vals.isnan())
    assert torch.equal(vals.nan_to_num(0), ref_vals.nan_to_num(0))
    idx = ours.indices
    size = x.shape[dim] if x.dim() else 1
    assert bool(((idx >= 0) & (idx < size)).all())
    # indices point at the returned values ...
    picked = torch.gather(x, dim, idx) if x.dim() else x
    assert torch.equal(picked.isnan(), ours.values.isnan())
    assert torch.equal(picked.nan_to_num(0), ours.values.nan_to_num(0))
    # ... and are distinct within each row
    if k > 1:
        s = idx.movedim(dim, -1).sort(dim=-1).values
        assert bool((s[..., 1:] != s[..., :-1]).all())
    # ... and are the stable sort's first k: in its order when sorted, else in ascending index.
    if x.dim():
        want = torch.sort(x, dim=dim, descending=largest, stable=True).indices.narrow(dim, 0, k)
        assert torch.equal(idx, want if sorted else want.sort(dim=dim).values)
    return ours, ref


@pytest.mark.parametrize("dtype", FLOAT_DTYPES + INT_DTYPES)
def test_every_dtype_matches_torch(dtype):
    g = torch.Generator().manual_seed(1)
    if dtype.is_floating_point:
        x = torch.randn(3, 517, generator=g).to(dtype)
    else:
        x = torch.randint(0, 100, (3, 517), generator=g).to(dtype)  # many ties
    for k in (0, 1, 7, 64, 517):
        for largest in (True, False):
            assert_matches_topk(x, k, -1, chunk_size=50, largest=largest)


def test_seed_bug_is_fixed():
    # The seed returned the 256 concatenated chunk winners for this case.
    x = torch.randn(2, 2048)
    vals, idx = chunked_topk(x, 128, chunk_size=1024)
    assert vals.shape == (2, 128)
    assert torch.equal(vals, torch.topk(x, 128).values)
    assert torch.equal(idx, torch.topk(x, 128).indices)


def test_indices_equal_torch_without_ties():
    x = torch.randperm(10_000).float().view(4, 2500)  # distinct values
    ours, ref = assert_matches_topk(x, 100, 1, chunk_size=333)
    assert torch.equal(ours.indices, ref.indices)


@pytest.mark.parametrize("largest", [True, False])
def test_adversarial_values(largest):
    inf, nan = float("inf"), float("nan")
    rows = [
        [nan, 1.0, nan, -inf, inf, 0.0, -0.0, 2.0, nan, inf],
        [inf] * 10,
        [-inf] * 10,
        [nan] * 10,
        [1.0] * 10,
        [0.0, -0.0] * 5,
    ]
    x = torch.tensor(rows)
    for k in range(0, 11):
        for chunk in (1, 3, 4, 9):
            assert_matches_topk(x, k, -1, chunk_size=chunk, largest=largest)


def test_any_dim_and_non_contiguous():
    x = torch.randn(6, 40, 5, 9).permute(3, 1, 0, 2)[:, ::2]  # non-contiguous view
    assert not x.is_contiguous()
    for dim in range(-x.dim(), x.dim()):
        k = min(3, x.shape[dim])
        assert_matches_topk(x, k, dim, chunk_size=2)


def test_zero_dim_and_empty():
    x = torch.tensor(3.5)
    assert_matches_topk(x, 1, 0, chunk_size=1)
    e = torch.empty(4, 0)
    ours = chunked_topk(e, 0, chunk_size=3)
    assert ours.values.shape == (4, 0)


@settings(max_examples=60, deadline=None)
@given(
    shape=st.lists(st.integers(1, 40), min_size=1, max_size=3),
    data=st.data(),
    chunk_size=st.integers(1, 50),
    largest=st.booleans(),
    sorted_=st.booleans(),
    ties=st.booleans(),
)
def test_property_matches_torch(shape, data, chunk_size, largest, sorted_, ties):
    dim = data.draw(st.integers(-len(shape), len(shape) - 1))
    k = data.draw(st.integers(0, shape[dim]))
    seed = data.draw(st.integers(0, 2**31 - 1))
    g = torch.Generator().manual_seed(seed)
    x = torch.randint(-3, 4, shape, generator=g).float() if ties else torch.randn(shape, generator=g)
    ours, ref = assert_matches_topk(x, k, dim, chunk_size, largest=largest, sorted=sorted_)
    if not ties and sorted_:
        assert torch.equal(ours.indices, ref.indices)


def test_streaming_merge_equals_topk():
    x = torch.randn(3, 4, 1000)
    acc = StreamingTopK(k=37)
    for start in range(0, 1000, 64):
        acc.update(x[..., start:start + 64], offset=start)
    vals, idx = acc.result()
    ref = torch.topk(x, 37)
    assert torch.equal(vals, ref.values) and torch.equal(idx, ref.indices)


def test_streaming_fewer_than_k_seen_and_smallest():
    acc = StreamingTopK(k=10, largest=False)
    acc.update(torch.tensor([[5.0, 1.0, 3.0]]), offset=100)
    vals, idx = acc.result()
    assert vals.tolist() == [[1.0, 3.0, 5.0]] and idx.tolist() == [[101, 102, 100]]


def test_merge_topk_carries_indices():
    v, i = merge_topk(torch.tensor([[1.0, 9.0, 4.0]]), torch.tensor([[10, 20, 30]]), 2)
    assert v.tolist() == [[9.0, 4.0]] and i.tolist() == [[20, 30]]


@pytest.mark.parametrize(
    "kwargs, exc, match",
    [
        (dict(k=-1), ValueError, "k must be >= 0"),
        (dict(k=11), ValueError, "larger than the size"),
        (dict(k=2, chunk_size=0), ValueError, "chunk_size must be >= 1"),
        (dict(k=2, dim=2), ValueError, "dim=2 is out of range"),
        (dict(k=2.0), TypeError, "k must be an int"),
        (dict(k=2, chunk_size=1.5), TypeError, "chunk_size must be an int"),
    ],
)
def test_bad_input(kwargs, exc, match):
    with pytest.raises(exc, match=match):
        chunked_topk(torch.randn(3, 10), **kwargs)


def test_bad_input_streaming():
    with pytest.raises(ValueError, match="before any update"):
        StreamingTopK(3).result()
    with pytest.raises(ValueError, match="k must be >= 0"):
        StreamingTopK(-2)
    with pytest.raises(TypeError, match="x must be a torch.Tensor"):
        chunked_topk([1, 2, 3], 1)
