"""NSA as the paper selects: forced initial and local blocks, float32 ranking, lower index on ties; the module's gates.

References are built another way: forced sets and selections by Python loops
over rows (sorted by falling importance, then by index), ``torch.topk`` on
float64 importance, and ``SparseAttention`` recomputed by hand from its own
layers as its docstring lays them out.
"""
from __future__ import annotations

import itertools
import math

import pytest
import torch
from einops import rearrange

from sparse_attn.modules import SparseAttention
from sparse_attn.ops.dense import dense_attention
from sparse_attn.ops.nsa import check_nsa_options, forced_blocks, nsa_attention, select_blocks, sliding_window_attention
from sparse_attn.sources import synthetic_qkv

F64 = torch.float64
DEVICES = ["cpu"] + (["cuda"] if torch.cuda.is_available() else [])


def naive_forced(i, num_blocks, sbs, causal, n_init, n_local):
    """The forced blocks of query i, ascending: initial blocks (causal: started by i), then own and previous ones."""
    own = i // sbs
    initial = {b for b in range(min(n_init, num_blocks)) if not causal or b * sbs <= i}
    local = {b for b in range(own - n_local + 1, own + 1) if 0 <= b < num_blocks}
    return sorted(initial | local)


def naive_select(imp, n, sbs, causal, n_init, n_local):
    """select_blocks by loops: forced blocks, then eligible ones by (falling importance, ascending index), -1 pad."""
    *lead, Lq, nb = imp.shape
    S = min(n, nb)
    out = torch.full((*lead, Lq, S), -1, dtype=torch.long)
    for idx in itertools.product(*map(range, (*lead, Lq))):
        i = idx[-1]
        row = imp[idx].double().tolist()
        forced = naive_forced(i, nb, sbs, causal, n_init, n_local)
        others = sorted((b for b in range(nb) if b not in forced and row[b] > 0 and (not causal or b * sbs <= i)),
                        key=lambda b: (-row[b], b))
        picks = (forced + others)[:S]
        out[idx][: len(picks)] = torch.tensor(picks, dtype=torch.long)
    return out


def qkv(B=2, H=4, Hkv=2, L=37, D=8, dtype=F64, seed=0):
    g = torch.Generator().manual_seed(seed)
    return [torch.randn(B, h, L, D, generator=g, dtype=dtype) for h in (H, Hkv, Hkv)]


NSA = dict(gates=(0.3, 0.5, 0.2), sliding_window_size=3, compress_block_size=4, compress_block_sliding_stride=2,
           selection_block_size=4)


# --------------------------------------------------------------------------- forced blocks


@pytest.mark.parametrize("causal", [False, True])
@pytest.mark.parametrize("share", [True, False])
@pytest.mark.parametrize("L,n,forcing", [(37, 4, (1, 2)), (1, 3, (1, 2)), (23, 5, (2, 3)), (16, 4, (0, 2)),
                                         (16, 2, (1, 0)), (30, 9, (1, 2))])
def test_every_row_holds_its_forced_blocks(causal, share, L, n, forcing):
    # sink_local puts the mass on the first keys and the diagonal: the cases the forced blocks exist for.
    q, k, v = (t.double() for t in synthetic_qkv("sink_local", batch=2, heads=4, kv_heads=2, length=L,
                                                 head_dim=16, seed=3))
    _, maps = nsa_attention(q, k, v, **NSA, num_selected_blocks=n, causal=causal, query_heads_share_selected_kv=share,
                            num_initial_blocks=forcing[0], num_local_blocks=forcing[1], return_maps=True)
    nb = math.ceil(L / 4)
    idx = maps.block_indices
    assert idx.shape == (2, 2 if share else 4, L, min(n, nb))
    for b, h, i in itertools.product(*map(range, idx.shape[:3])):
        want = naive_forced(i, nb, 4, causal, *forcing)
        got = idx[b, h, i].tolist()
        assert got[: len(want)] == want, (b, h, i, got, want)  # forced first, ascending
        assert maps.forced[b, h, i].tolist() == [j < len(want) for j in range(len(got))]
    assert torch.equal(idx, naive_select(maps.importance, n, 4, causal, *forcing))
    if forcing[0]:
        # The attention sink at key 0 stays in the selected picture of every query.
        assert (maps.selected[..., 0] > 0).all()


def test_forced_blocks_against_loops_with_more_queries_than_keys():
    for Lq, nb, sbs, causal, ni, nl in itertools.product((1, 9, 20), (1, 3, 5), (1, 3), (False, True), (0, 1, 2),
                                                         (0, 1, 3)):
        got = forced_blocks(Lq, nb, sbs, causal=causal, num_initial_blocks=ni, num_local_blocks=nl)
        want = torch.zeros(Lq, nb, dtype=torch.bool)
        for i in range(Lq):
            want[i, naive_forced(i, nb, sbs, causal, ni, nl)] = True
        assert torch.equal(got, want), (Lq, nb, sbs, causal, ni, nl)


def test_forced_blocks_need_no_importance():
    # Zero importance everywhere (nothing scored yet): only the forced blocks are picked, nothing else.
    imp = torch.zeros(1, 1, 12, 6)
    idx = select_blocks(imp, 4, 2, causal=True)
    assert torch.equal(idx, naive_select(imp, 4, 2, True, 1, 2))
    assert idx[0, 0, 0].tolist() == [0, -1, -1, -1] and idx[0, 0, 11].tolist() == [0, 4, 5, -1]
    # Negative and NaN importance do not make a block eligible, nor stop a forced one.
    imp = torch.tensor([float("nan"), -1.0, 0.5, float("nan"), -2.0, 0.25]).expand(1, 1, 12, 6).contiguous()
    idx = select_blocks(imp, 4, 2, causal=False)
    assert torch.equal(idx, naive_select(imp, 4, 2, False, 1, 2))
    assert idx[0, 0, 7].tolist() == [0, 2, 3, 5]  # 0 and 2, 3 forced (NaN at 0 and 3), then 5 by importance


@pytest.mark.parametrize("causal", [False, True])
def test_num_selected_at_least_the_blocks_is_dense(causal):
    # n >= number of blocks: every block a query may see is forced or scored (compressed blocks of 4 every 2
    # tokens score each block before the own one), so the selected branch is dense attention.
    q, k, v = qkv(L=24)
    _, maps = nsa_attention(q, k, v, **NSA, num_selected_blocks=50, causal=causal, return_maps=True)
    assert maps.block_indices.shape[-1] == 6
    assert torch.equal(maps.block_indices, naive_select(maps.importance, 50, 4, causal, 1, 2))
    sel = nsa_attention(q, k, v, **{**NSA, "gates": (0.0, 1.0, 0.0)}, num_selected_blocks=50, causal=causal)
    torch.testing.assert_close(sel, dense_attention(q, k, v, causal=causal), rtol=1e-12, atol=1e-12)


# --------------------------------------------------------------------------- ranking


@pytest.mark.parametrize("causal", [False, True])
@pytest.mark.parametrize("share", [True, False])
def test_forcing_off_is_plain_topk_of_float64_importance(causal, share):
    q, k, v = qkv(L=41, seed=5)
    _, maps = nsa_attention(q, k, v, **NSA, num_selected_blocks=4, causal=causal, query_heads_share_selected_kv=share,
                            num_initial_blocks=0, num_local_blocks=0, return_maps=True)
    imp = maps.importance
    assert imp.dtype == F64
    nb = imp.shape[-1]
    eligible = imp > 0
    if causal:
        eligible &= torch.arange(nb) * 4 <= torch.arange(41).unsqueeze(-1)
    scores = imp.masked_fill(~eligible, float("-inf"))
    vals, idx = scores.topk(4, dim=-1)
    pos = vals.isfinite()
    finite = vals.masked_fill(~pos, 0)
    assert (finite[..., :-1] - finite[..., 1:]).abs().where(pos[..., 1:], 1.0).min() > 1e-9  # no ties to break
    assert torch.equal(maps.block_indices, idx.masked_fill(~pos, -1))
    assert not maps.forced.any()


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, torch.bfloat16])
@pytest.mark.parametrize("forcing", [(0, 0), (1, 2), (2, 1)])
@pytest.mark.parametrize("causal", [False, True])
def test_exact_ties_go_to_the_lower_block_index(device, dtype, forcing, causal):
    # Importance from {0, 1, 2, 3}: nearly every row has ties at its cut-off and inside its top blocks.
    g = torch.Generator().manual_seed(11)
    imp = torch.randint(0, 4, (2, 3, 19, 40), generator=g).to(dtype)
    imp[0, 0] = 1.0  # one head where every eligible block ties
    want = naive_select(imp, 5, 2, causal, *forcing)
    got = select_blocks(imp.to(device), 5, 2, causal=causal, num_initial_blocks=forcing[0],
                        num_local_blocks=forcing[1])
    assert got.dtype == torch.long and torch.equal(got.cpu(), want)
    # The same on a permuted copy: the winner of a tie is its index, not where topk happened to meet it.
    perm = torch.randperm(40, generator=g)
    flip = select_blocks(imp.flip(-1).to(device), 5, 2, causal=False, num_initial_blocks=0, num_local_blocks=0).cpu()
    assert torch.equal(flip, naive_select(imp.flip(-1), 5, 2, False, 0, 0))
    shuffled = select_blocks(imp[..., perm].to(device), 40, 2, causal=False, num_initial_blocks=0,
                             num_local_blocks=0).cpu()
    assert torch.equal(shuffled, naive_select(imp[..., perm], 40, 2, False, 0, 0))


def test_selection_in_query_chunks_is_the_same(monkeypatch):
    # A tiny sort budget: one query per chunk, the chunk edges inside forced and causal ranges.
    from sparse_attn.ops.nsa import selection

    imp = torch.randint(0, 3, (2, 2, 23, 9)).float()
    want = naive_select(imp, 5, 3, True, 1, 2)
    monkeypatch.setattr(selection, "_SORT_BUDGET", 7)
    assert torch.equal(select_blocks(imp, 5, 3, causal=True), want)


def test_ties_in_nsa_attention_pick_the_lower_index():
    # Identical keys give every query uniform compressed weights, so interior blocks tie in importance.
    q, k, v = qkv(L=32)
    k = k[:, :, :1].expand_as(k).contiguous()
    for causal in (False, True):
        _, maps = nsa_attention(q, k, v, **NSA, num_selected_blocks=5, causal=causal, return_maps=True)
        imp = maps.importance
        assert ((imp[..., 2:6] == imp[..., 2:3]).all(-1) & (imp[..., 5] > 0)).float().mean() > 0.2  # 4 blocks tie
        assert torch.equal(maps.block_indices, naive_select(imp, 5, 4, causal, 1, 2))


@pytest.mark.parametrize("causal", [False, True])
@pytest.mark.parametrize("share", [True, False])
def test_bfloat16_inputs_rank_as_float32(causal, share):
    # The float32 run gets the very values the bfloat16 run holds, so any difference is bfloat16 arithmetic.
    g = torch.Generator().manual_seed(2)
    q, k, v = (torch.randn(2, h, 96, 16, generator=g).bfloat16().float() for h in (4, 2, 2))
    kw = dict(**NSA, num_selected_blocks=6, causal=causal, query_heads_share_selected_kv=share, return_maps=True)
    _, m32 = nsa_attention(q, k, v, **kw)
    _, m16 = nsa_attention(q.bfloat16(), k.bfloat16(), v.bfloat16(), **kw)
    assert m16.importance.dtype == torch.float32 and m16.compressed_weights.dtype == torch.float32
    torch.testing.assert_close(m16.importance, m32.importance, rtol=0, atol=0)
    assert torch.equal(m16.block_indices, m32.block_indices)
    # The check has teeth: ranking the same importance rounded to bfloat16 picks other blocks in some rows.
    rounded = select_blocks(m32.importance.bfloat16(), 6, 4, causal=causal)
    assert (rounded != m32.block_indices).any(-1).float().mean() > 0.01


# --------------------------------------------------------------------------- the module against the function


def _module(causal, kv_heads, share, forcing, dim_head=8, heads=4, seed=0):
    torch.manual_seed(seed)
    m = SparseAttention(dim=24, dim_head=dim_head, heads=heads, kv_heads=kv_heads, causal=causal,
                        sliding_window_size=3, compress_block_size=4, compress_block_sliding_stride=2,
                        selection_block_size=4, num_selected_blocks=4, query_heads_share_selected_kv=share,
                        num_initial_blocks=forcing[0], num_local_blocks=forcing[1]).double()
    with torch.no_grad():  # gates far from the initial ones, and compressors that are not the mean
        m.to_gates.weight.normal_(0, 0.5)
        m.to_gates.bias.normal_(0, 1.0)
        for c in (m.k_compress, m.v_compress):
            c.proj.weight.add_(torch.randn_like(c.proj.weight) * 0.1)
    return m


def _by_hand(m, x, **extra):
    """SparseAttention's forward as its docstring states it, from the module's own layers."""
    o = m.options
    heads = lambda t, h: rearrange(t, "b l (h d) -> b h l d", h=h)  # noqa: E731
    gates = rearrange(torch.sigmoid(m.to_gates(x)), "b l (h s) -> b h l s", s=3)  # column 3h + s: head h, branch s
    out = nsa_attention(heads(m.to_q(x), m.heads), heads(m.to_k(x), m.kv_heads), heads(m.to_v(x), m.kv_heads),
                        gates=gates, compress_fn=(m.k_compress, m.v_compress), causal=o["causal"],
                        sliding_window_size=3, compress_block_size=4, compress_block_sliding_stride=2,
                        selection_block_size=4, num_selected_blocks=4,
                        query_heads_share_selected_kv=o["query_heads_share_selected_kv"],
                        num_initial_blocks=o["num_initial_blocks"], num_local_blocks=o["num_local_blocks"], **extra)
    return m.to_out(rearrange(out, "b h l d -> b l (h d)"))


@pytest.mark.parametrize("causal", [False, True])
@pytest.mark.parametrize("kv_heads,share", [(4, True), (2, True), (2, False)])
@pytest.mark.parametrize("forcing", [(1, 2), (0, 0)])
def test_module_equals_nsa_attention_with_its_own_layers(causal, kv_heads, share, forcing):
    m = _module(causal, kv_heads, share, forcing)
    x = torch.randn(2, 21, 24, dtype=F64)
    with torch.no_grad():
        out, maps = m(x, return_maps=True)
        torch.testing.assert_close(out, _by_hand(m, x), rtol=1e-12, atol=1e-12)
        gates = rearrange(torch.sigmoid(m.to_gates(x)), "b l (h s) -> b h l s", s=3)
        torch.testing.assert_close(maps.gates, gates, rtol=0, atol=0)
    assert m.options["num_initial_blocks"] == forcing[0] and m.options["num_local_blocks"] == forcing[1]


def _per_head_module(causal=True):
    """to_out the identity: the module's output is the concatenation of its heads' outputs."""
    m = _module(causal, 2, True, (1, 2), dim_head=6)
    with torch.no_grad():
        m.to_out.weight.copy_(torch.eye(24, dtype=F64))
    return m


def _branch(m, x, s):
    """The module's output with gate 1 on branch s and 0 elsewhere, by nsa_attention on the module's layers."""
    heads = lambda t, h: rearrange(t, "b l (h d) -> b h l d", h=h)  # noqa: E731
    gates = torch.zeros(3, dtype=F64)
    gates[s] = 1.0
    out = nsa_attention(heads(m.to_q(x), m.heads), heads(m.to_k(x), m.kv_heads), heads(m.to_v(x), m.kv_heads),
                        gates=gates, compress_fn=(m.k_compress, m.v_compress), **m.options)
    return m.to_out(rearrange(out, "b h l d -> b l (h d)"))


def test_gate_columns_are_head_major_and_pass_a_sigmoid():
    # Constant gates: weights 0 and one distinct bias per column. Column 3h + s must be sigmoid(bias) of
    # head h, branch s: read as (s h), or without the sigmoid, the heads' outputs differ.
    m = _per_head_module()
    bias = torch.linspace(-2.0, 2.0, 12, dtype=F64)
    with torch.no_grad():
        m.to_gates.weight.zero_()
        m.to_gates.bias.copy_(bias)
        x = torch.randn(1, 17, 24, dtype=F64)
        out = rearrange(m(x), "b l (h d) -> b h l d", h=4)
        per_branch = [rearrange(_branch(m, x, s), "b l (h d) -> b h l d", h=4) for s in range(3)]
    g = torch.sigmoid(bias).view(4, 3)  # (h s): head-major
    want = sum(g[:, s].view(1, 4, 1, 1) * per_branch[s] for s in range(3))
    torch.testing.assert_close(out, want, rtol=1e-12, atol=1e-12)


def test_permuting_gate_rows_moves_exactly_the_heads_it_must():
    m = _per_head_module()
    x = torch.randn(2, 19, 24, dtype=F64)
    with torch.no_grad():
        base = rearrange(m(x), "b l (h d) -> b h l d", h=4)
        w, b = m.to_gates.weight.clone(), m.to_gates.bias.clone()
        # Swap the gate triples of heads 0 and 1 (columns 0..2 and 3..5): only heads 0 and 1 may change.
        perm = torch.tensor([3, 4, 5, 0, 1, 2, *range(6, 12)])
        m.to_gates.weight.copy_(w[perm])
        m.to_gates.bias.copy_(b[perm])
        swapped = rearrange(m(x), "b l (h d) -> b h l d", h=4)
        # Swap head 2's compressed and sliding gates (columns 6 and 8): only head 2 may change.
        perm = torch.tensor([*range(6), 8, 7, 6, *range(9, 12)])
        m.to_gates.weight.copy_(w[perm])
        m.to_gates.bias.copy_(b[perm])
        branches = rearrange(m(x), "b l (h d) -> b h l d", h=4)
    moved = (swapped - base).abs().amax(dim=(0, 2, 3))
    assert (moved[:2] > 1e-3).all() and torch.equal(swapped[:, 2:], base[:, 2:])
    moved = (branches - base).abs().amax(dim=(0, 2, 3))
    assert moved[2] > 1e-3 and torch.equal(branches[:, [0, 1, 3]], base[:, [0, 1, 3]])


# --------------------------------------------------------------------------- bad input


def test_check_nsa_options_positional_and_forcing_errors():
    assert check_nsa_options(3, 4, None, 4, 3) == 4  # the five positional arguments, as before
    assert check_nsa_options(3, 4, 2, 4, 5, num_initial_blocks=2, num_local_blocks=3) == 2
    with pytest.raises(ValueError, match=r"num_initial_blocks \(1\) \+ num_local_blocks \(2\) must not exceed "
                                         r"num_selected_blocks \(2\)"):
        check_nsa_options(3, 4, None, 4, 2)
    with pytest.raises(ValueError, match=r"num_initial_blocks \(3\) \+ num_local_blocks \(0\) must not exceed "
                                         r"num_selected_blocks \(2\)"):
        check_nsa_options(3, 4, None, 4, 2, num_initial_blocks=3, num_local_blocks=0)
    for name in ("num_initial_blocks", "num_local_blocks"):
        with pytest.raises(ValueError, match=f"{name} must be >= 0, got -1"):
            check_nsa_options(3, 4, None, 4, 4, **{name: -1})
        with pytest.raises(TypeError, match=f"{name} must be an int, got float"):
            check_nsa_options(3, 4, None, 4, 4, **{name: 1.0})
    check_nsa_options(3, 4, None, 4, 0)  # selected branch off: forcing does not apply
    check_nsa_options(3, 4, None, 4, 1, num_initial_blocks=0, num_local_blocks=1)


def test_bad_forcing_through_every_front_door():
    q, k, v = qkv(L=16)
    with pytest.raises(ValueError, match=r"num_local_blocks \(2\) must not exceed num_selected_blocks \(1\)"):
        nsa_attention(q, k, v, **NSA, num_selected_blocks=1)
    with pytest.raises(ValueError, match=r"num_local_blocks \(4\) must not exceed num_selected_blocks \(4\)"):
        SparseAttention(24, 8, 4, sliding_window_size=2, compress_block_size=4, selection_block_size=4,
                        num_selected_blocks=4, num_local_blocks=4)
    with pytest.raises(ValueError, match="num_initial_blocks must be >= 0, got -2"):
        SparseAttention(24, 8, 4, sliding_window_size=2, compress_block_size=4, selection_block_size=4,
                        num_selected_blocks=4, num_initial_blocks=-2)
    with pytest.raises(ValueError, match=r"must not exceed num_selected \(2\)"):
        select_blocks(torch.rand(1, 1, 4, 4), 2, 4, causal=True)
    with pytest.raises(ValueError, match="num_selected must be >= 0, got -1"):
        select_blocks(torch.rand(1, 1, 4, 4), -1, 4, causal=True)
    with pytest.raises(TypeError, match="importance must be a floating tensor"):
        select_blocks(torch.ones(1, 1, 4, 4, dtype=torch.long), 3, 4, causal=True)
    with pytest.raises(ValueError, match="num_local_blocks must be >= 0, got -1"):
        forced_blocks(4, 4, 2, causal=True, num_local_blocks=-1)


def test_selected_branch_off_ignores_forcing():
    # num_selected_blocks=0 with the default forcing: no error, no selection, and the branch gives zeros.
    q, k, v = qkv(L=13)
    out, maps = nsa_attention(q, k, v, **{**NSA, "gates": (0.0, 1.0, 0.0)}, num_selected_blocks=0, return_maps=True)
    assert maps.block_indices.shape[-1] == 0 and maps.forced.shape[-1] == 0
    assert torch.equal(out, torch.zeros_like(out))
    m = SparseAttention(24, 8, 4, sliding_window_size=2, compress_block_size=4, selection_block_size=4,
                        num_selected_blocks=0)
    assert m(torch.randn(1, 9, 24)).isfinite().all()


def test_one_token():
    # L = 1: the only block is forced; the selected branch is attention to key 0, as is the window.
    q, k, v = qkv(L=1)
    for causal in (False, True):
        out = nsa_attention(q, k, v, **{**NSA, "gates": (0.0, 1.0, 0.0)}, num_selected_blocks=3, causal=causal)
        torch.testing.assert_close(out, sliding_window_attention(q, k, v, 1, causal=causal), rtol=1e-12, atol=1e-12)
