"""What importance-sampled attention promises, checked draw by draw against float64 references.

- Causality: with ``causal=True`` row t reads nothing after position t, for every proposal.
- The weights are the estimator's: rebuilt from the proposal pi (``proposal_probs``, same seed) and
  float64 scores, e^{s_j} / Z_hat for a kept key and e^{s_j} / (n pi_j Z_hat) for a draw.
- The hybrid's draws never repeat a kept (top-k) key.
- Z_hat, the estimate of the softmax normaliser, is unbiased: a z-test over 2000 estimates, and a
  deliberately biased estimator fails the same test (so the test has power).

Inputs and generators are seeded: every test is deterministic. From the repository root,

    python -m tests.test_sampling_statistics

prints the numbers docs/sampling.md quotes.
"""
from __future__ import annotations

import argparse
import functools
import math

import pytest
import torch
from einops import rearrange

from sparse_attn.ops import sampling
from sparse_attn.ops.dense import causal_mask, dense_attention
from sparse_attn.ops.sampling import PROPOSALS, proposal_probs, sampled_attention

F64 = torch.float64


def _qkv(B, H, Hkv, Lq, Lk, D, Dv=3, seed=0, q_scale=1.0):
    g = torch.Generator().manual_seed(seed)
    q = torch.randn(B, H, Lq, D, generator=g, dtype=F64) * q_scale
    k = torch.randn(B, Hkv, Lk, D, generator=g, dtype=F64)
    v = torch.randn(B, Hkv, Lk, Dv, generator=g, dtype=F64)
    return q, k, v


def _run(q, k, v, n, proposal, top_k, causal, seed):
    return sampled_attention(q, k, v, n, proposal=proposal, top_k=top_k, causal=causal, return_selection=True,
                             generator=torch.Generator().manual_seed(seed))


# ---- float64 references --------------------------------------------------------------------------

def _allowed(Lq, Lk, causal):
    return causal_mask(Lq, Lk) if causal else torch.ones(Lq, Lk, dtype=torch.bool)


def _scores(q, k):
    """scale * q . k in float64, (B, H, Lq, Lk), each query head against its kv head."""
    kh = k.repeat_interleave(q.shape[1] // k.shape[1], dim=1)
    return torch.einsum("bhid,bhjd->bhij", q, kh) / math.sqrt(q.shape[-1])


def _reference_topk(s, allowed, top_k):
    """Boolean (B, H, Lq, Lk): the top_k highest allowed scores, the lower key index winning ties.

    Key j's rank is the number of keys that beat it: a higher score, or an equal score at a lower index.
    """
    s = s.masked_fill(~allowed, float("-inf"))
    Lk = s.shape[-1]
    higher = s[..., None, :] > s[..., :, None]                                      # [.., j, l]: l beats j
    tied_lower = (s[..., None, :] == s[..., :, None]) & torch.ones(Lk, Lk, dtype=torch.bool).tril(-1)
    rank = (higher | tied_lower).sum(-1)
    return allowed & (rank < top_k)


def _to_groups(t, Hkv):
    return rearrange(t, "b (hk g) i j -> b hk g i j", hk=Hkv)


def _proposal(q, k, tail, s, proposal, seed):
    """pi over keys, (B, H, Lq, Lk), as the op draws from it: the generator's first draws are the hash planes."""
    Hkv = k.shape[1]
    qg = rearrange(q, "b (hk g) i d -> b hk g i d", hk=Hkv)
    scores = _to_groups(s.masked_fill(~tail, float("-inf")), Hkv)
    pi = proposal_probs(qg, k, _to_groups(tail, Hkv), proposal, scores=scores,
                        generator=torch.Generator().manual_seed(seed))
    return rearrange(pi, "b hk g i j -> b (hk g) i j").to(F64)


def _estimate(idx, e, pi, top_k, n):
    """Z_hat (..., Lq) and the weights it implies, (..., Lq, top_k + n), from the kept keys and the draws.

    ``e`` is e^{s} (times any per-row constant, which cancels in the weights), ``pi`` the proposal.
    """
    kept, draws = idx[..., :top_k], idx[..., top_k:]
    e_kept, e_draw, pi_draw = e.gather(-1, kept), e.gather(-1, draws), pi.gather(-1, draws)
    z_hat = e_kept.sum(-1) + (e_draw / pi_draw).sum(-1) / n
    weights = torch.cat([e_kept, e_draw / (n * pi_draw)], -1) / z_hat[..., None]
    return z_hat, weights


def _check_selection(q, k, v, out, sel, proposal, top_k, n, causal, seed):
    """Every claim a Selection makes, row by row, against float64 references. Raises AssertionError."""
    Lq, Lk = q.shape[2], k.shape[2]
    allowed = _allowed(Lq, Lk, causal)
    s = _scores(q, k)
    ref, p = dense_attention(q, k, v, causal=causal, return_weights=True)
    exact = allowed.sum(-1) <= top_k + n                                    # (Lq,): rows computed densely
    torch.testing.assert_close(sel.to_dense(Lk)[:, :, exact], p[:, :, exact], rtol=0, atol=1e-12)
    torch.testing.assert_close(out[:, :, exact], ref[:, :, exact], rtol=0, atol=1e-12)
    if exact.all():
        return
    rows = ~exact
    top = _reference_topk(s, allowed, top_k)
    pi = _proposal(q, k, allowed & ~top, s, proposal, seed)[:, :, rows]
    idx, taken, tail = sel.indices[:, :, rows], top[:, :, rows], (allowed & ~top)[:, :, rows]
    kept_mask = torch.zeros_like(taken).scatter_(-1, idx[..., :top_k], True)
    assert torch.equal(kept_mask, taken), "the kept keys are not the top-k (lower index first among ties)"
    draws = idx[..., top_k:]
    assert allowed[rows].expand_as(taken).gather(-1, draws).all(), "a draw outside the allowed keys"
    assert not taken.gather(-1, draws).any(), "a draw repeats a top-k key"
    assert (pi.gather(-1, draws) > 0).all(), "a draw the proposal gives no probability"
    assert (pi[~tail] == 0).all(), "the proposal puts mass outside the tail"
    torch.testing.assert_close(pi.sum(-1), torch.ones(pi.shape[:-1], dtype=F64), rtol=0, atol=1e-12)
    e = torch.exp(s[:, :, rows] - s[:, :, rows].amax(-1, keepdim=True))
    _, want = _estimate(idx, e, pi, top_k, n)
    torch.testing.assert_close(sel.weights[:, :, rows], want, rtol=1e-10, atol=1e-15)
    # The output is the rebuilt weights applied to the picked values (a key drawn twice adds its slots).
    dense_w = torch.zeros(*want.shape[:-1], Lk, dtype=F64).scatter_add_(-1, idx, want)
    vh = v.repeat_interleave(q.shape[1] // v.shape[1], dim=1)
    torch.testing.assert_close(out[:, :, rows], torch.einsum("bhrj,bhjd->bhrd", dense_w, vh), rtol=0, atol=1e-12)


# ---- causality -----------------------------------------------------------------------------------

CAUSAL_CUTS = (0, 9, 20)


def _causal_change(proposal, top_k):
    """Largest change of rows 0..t (outputs, and whether any draw differs) when every position after t changes."""
    B, H, Hkv, L, D = 2, 4, 2, 32, 8
    q, k, v = _qkv(B, H, Hkv, L, L, D, seed=21)
    g = torch.Generator().manual_seed(22)
    worst, draws_differ = 0.0, False
    for t in CAUSAL_CUTS:
        q2, k2, v2 = q.clone(), k.clone(), v.clone()
        # Adversarial: later keys move far off (a mean over all keys would follow them), values and queries are new.
        k2[:, :, t + 1:] = 5.0 + 3.0 * torch.randn(B, Hkv, L - t - 1, D, generator=g, dtype=F64)
        v2[:, :, t + 1:] = torch.randn(B, Hkv, L - t - 1, v.shape[-1], generator=g, dtype=F64)
        q2[:, :, t + 1:] = torch.randn(B, H, L - t - 1, D, generator=g, dtype=F64)
        out, sel = _run(q, k, v, 5, proposal, top_k, True, seed=t)
        out2, sel2 = _run(q2, k2, v2, 5, proposal, top_k, True, seed=t)
        worst = max(worst, (out[:, :, :t + 1] - out2[:, :, :t + 1]).abs().max().item())
        draws_differ |= not torch.equal(sel.indices[:, :, :t + 1], sel2.indices[:, :, :t + 1])
    return worst, draws_differ


def _assert_causal(proposal, top_k):
    worst, draws_differ = _causal_change(proposal, top_k)
    assert not draws_differ, f"{proposal}, top_k={top_k}: a later position changed an earlier row's draws"
    assert worst <= 1e-12, f"{proposal}, top_k={top_k}: a later position moved an earlier row by {worst:.3g}"


@pytest.mark.parametrize("top_k", [0, 3])
@pytest.mark.parametrize("proposal", PROPOSALS)
def test_causal_rows_ignore_later_positions(proposal, top_k):
    _assert_causal(proposal, top_k)


def _centre_on_all_keys(k, tail):
    """A non-causal centring: the mean of every key, whatever the row may see."""
    B, Hkv, G, Lq, _ = tail.shape
    return k.to(F64).mean(2)[:, :, None, None].expand(B, Hkv, G, Lq, k.shape[-1])


def test_causality_check_catches_a_centre_over_all_keys(monkeypatch):
    monkeypatch.setattr(sampling, "_key_centres", _centre_on_all_keys)
    with pytest.raises(AssertionError, match="later position"):
        _assert_causal("lsh", 0)


# ---- the weights, rebuilt from pi ----------------------------------------------------------------

# (B, H, Hkv, Lq, Lk, num_samples, top_k, causal)
CASES = {
    "grouped": (2, 4, 2, 6, 40, 7, 0, False),
    "grouped_hybrid": (2, 4, 2, 6, 40, 7, 3, False),
    "causal": (1, 4, 2, 20, 20, 5, 0, True),           # rows 0..4 (the first row too) are exact
    "causal_hybrid": (1, 4, 2, 20, 20, 5, 3, True),
    "causal_more_queries": (1, 2, 1, 30, 20, 4, 2, True),  # rows past the last key see every key
    "one_query": (1, 2, 2, 1, 50, 6, 0, False),
    "one_query_hybrid": (1, 2, 2, 1, 50, 6, 4, False),
    "one_key": (1, 2, 1, 1, 1, 1, 0, False),
    "samples_cover_keys": (1, 2, 1, 5, 12, 12, 0, False),
    "samples_cover_keys_causal": (1, 2, 1, 12, 12, 13, 2, True),
}


@pytest.mark.parametrize("proposal", PROPOSALS)
@pytest.mark.parametrize("case", list(CASES))
def test_weights_are_rebuilt_from_the_proposal(case, proposal):
    B, H, Hkv, Lq, Lk, n, top_k, causal = CASES[case]
    q, k, v = _qkv(B, H, Hkv, Lq, Lk, 8, seed=list(CASES).index(case), q_scale=1.5)
    out, sel = _run(q, k, v, n, proposal, top_k, causal, seed=3)
    _check_selection(q, k, v, out, sel, proposal, top_k, n, causal, seed=3)


def _tail_with_top_k(allowed, top_idx, kept):
    """The planted bug: the tail keeps the top-k keys, so a draw can count one twice."""
    return allowed


@pytest.mark.parametrize("proposal", PROPOSALS)
def test_draw_check_catches_a_tail_that_keeps_the_top_k(monkeypatch, proposal):
    monkeypatch.setattr(sampling, "_tail", _tail_with_top_k)
    q, k, v = _qkv(2, 4, 2, 6, 16, 8, q_scale=1.5)
    out, sel = _run(q, k, v, 10, proposal, 4, False, seed=0)
    with pytest.raises(AssertionError, match="repeats a top-k key"):
        _check_selection(q, k, v, out, sel, proposal, 4, 10, False, seed=0)


# ---- Z_hat is unbiased ---------------------------------------------------------------------------

Z_SEEDS, Z_REPLICAS = 4, 500  # 2000 estimates per row: 4 hash draws, 500 independent draws of keys each
Z_DRAWS, Z_LIMIT = 8, 4.0


@functools.cache
def _z_hat_samples(proposal, top_k):
    """Z_hat over 2000 runs, (2000, H, Lq), its biased twin from the same draws, and the exact Z, (H, Lq).

    All are relative to each row's largest e^{s}. The biased twin weights every draw by 1/|A| (|A| the
    row's allowed keys) in place of 1/pi: it drops the proposal's shape and the top-k's removal from the tail.
    """
    q, k, v = _qkv(1, 2, 1, 4, 32, 8, seed=5, q_scale=1.5)
    Lq, Lk = q.shape[2], k.shape[2]
    s = _scores(q, k)
    e = torch.exp(s - s.amax(-1, keepdim=True))
    allowed = _allowed(Lq, Lk, False)
    tail = allowed & ~_reference_topk(s, allowed, top_k)
    rep = lambda t: t.expand(Z_REPLICAS, *t.shape[1:])  # noqa: E731
    good, biased = [], []
    for seed in range(Z_SEEDS):
        _, sel = _run(rep(q), rep(k), rep(v), Z_DRAWS, proposal, top_k, False, seed)
        pi = _proposal(q, k, tail, s, proposal, seed)
        good.append(_estimate(sel.indices, rep(e), rep(pi), top_k, Z_DRAWS)[0])
        biased.append(_estimate(sel.indices, rep(e), torch.full_like(rep(e), 1.0 / Lk), top_k, Z_DRAWS)[0])
    return torch.cat(good), torch.cat(biased), e.sum(-1)[0]


def _z(samples, exact):
    return (samples.mean(0) - exact) / (samples.std(0) / math.sqrt(samples.shape[0]))


@pytest.mark.parametrize("top_k", [0, 4])
@pytest.mark.parametrize("proposal", ["uniform", "lsh"])
def test_z_hat_is_unbiased(proposal, top_k):
    good, _, exact = _z_hat_samples(proposal, top_k)
    z = _z(good, exact)
    assert z.abs().max() < Z_LIMIT, z


@pytest.mark.parametrize("top_k", [0, 4])
def test_oracle_z_hat_is_exact(top_k):
    # pi = e^{s} / Z_R on the tail makes every draw's e^{s}/pi equal Z_R: zero variance, so no z-test.
    good, _, exact = _z_hat_samples("oracle", top_k)
    torch.testing.assert_close(good, exact.expand_as(good), rtol=1e-12, atol=0)


@pytest.mark.parametrize("proposal, top_k", [("uniform", 4), ("lsh", 0), ("lsh", 4), ("oracle", 0), ("oracle", 4)])
def test_z_test_rejects_a_biased_estimator(proposal, top_k):
    # (uniform, 0) is left out: there 1/|A| is 1/pi, and the twin is not biased.
    _, biased, exact = _z_hat_samples(proposal, top_k)
    z = _z(biased, exact)
    assert z.abs().max() > Z_LIMIT, z


# ---- the numbers docs/sampling.md quotes ---------------------------------------------------------

def main(argv=None) -> None:
    """``python -m tests.test_sampling_statistics``: print what the tests above measure."""
    parser = argparse.ArgumentParser(prog="python -m tests.test_sampling_statistics",
                                     description="Print the causality changes and z-scores the sampling tests check.")
    parser.parse_args(argv)
    torch.manual_seed(0)
    print("causality: max |change| of rows 0..t when positions after t change, t in", CAUSAL_CUTS)
    for proposal in PROPOSALS:
        for top_k in (0, 3):
            print(f"  {proposal:8s} top_k={top_k}: {_causal_change(proposal, top_k)[0]:.3g}")
    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(sampling, "_key_centres", _centre_on_all_keys)
        for top_k in (0, 3):
            worst = _causal_change("lsh", top_k)[0]
            print(f"  lsh      top_k={top_k}, keys centred on the mean of all keys (the old rule): {worst:.3g}")
    print(f"Z_hat z-scores over {Z_SEEDS * Z_REPLICAS} estimates of {Z_DRAWS} draws (8 rows; |z| < {Z_LIMIT} passes)")
    for proposal, top_k in (("uniform", 0), ("uniform", 4), ("lsh", 0), ("lsh", 4), ("oracle", 0), ("oracle", 4)):
        good, biased, exact = _z_hat_samples(proposal, top_k)
        line = f"  {proposal:8s} top_k={top_k}: "
        if proposal == "oracle":
            line += f"max |Z_hat / Z - 1| = {(good / exact - 1).abs().max().item():.2g} (exact)"
        else:
            rel_se = (good.std(0) / math.sqrt(good.shape[0]) / exact).max().item()
            line += f"max |z| = {_z(good, exact).abs().max().item():.2f} (standard error <= {rel_se:.2%} of Z)"
        if (proposal, top_k) != ("uniform", 0):
            z_bad = _z(biased, exact).abs()
            line += f"; weights 1/|A| instead of 1/pi: |z| from {z_bad.min().item():.1f} to {z_bad.max().item():.1f}"
        print(line)


if __name__ == "__main__":
    main()
