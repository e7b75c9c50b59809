"""Importance-sampled attention: draw keys at random from a proposal and reweight them.

Top-k selection is deterministic and biased: it drops the tail's softmax mass
every time. Importance sampling draws keys from a proposal distribution and
reweights each draw by (true weight / proposal probability), so the estimate
is consistent: it converges to dense attention as samples grow, trading the
bias of top-k for variance. The hybrid (``top_k > 0``) keeps the exact top-k
keys and samples only the remaining tail, as vAttention does; the ``"lsh"``
proposal picks keys from SimHash buckets, as MagicPIG does, so that choosing
keys needs no query-key score at all.

Shapes and masking follow ``sparse_attn.ops.topk.topk_attention``.
"""
from __future__ import annotations

import math

import torch
from einops import rearrange

from .._checks import check_choice, check_generator, check_int, check_qkv, resolve_scale
from ..selection import Selection, gather_kv
from ..topk import stable_topk
from .dense import causal_mask, dense_attention, safe_softmax

__all__ = ["PROPOSALS", "sampled_attention", "proposal_probs", "simhash_codes"]

PROPOSALS = ("lsh", "uniform", "oracle")

# Share of the LSH proposal spread uniformly over the tail. It keeps every
# allowed key's probability above zero, which is what makes the estimator
# consistent however the hash buckets fall.
LSH_UNIFORM_MIX = 0.1


def sampled_attention(
    q,
    k,
    v,
    num_samples: int,
    *,
    proposal: str = "lsh",
    top_k: int = 0,
    causal: bool = False,
    scale: float | None = None,
    generator: torch.Generator | None = None,
    return_selection: bool = False,
    lsh_bits: int = 4,
    lsh_tables: int = 8,
):
    r"""Attention estimated from ``top_k`` exact keys plus ``num_samples`` sampled keys per query.

    For one query, let :math:`s_j = \text{scale}\cdot q\cdot k_j` over the
    allowed keys :math:`A` (all keys, or :math:`j \le i` when causal), let
    :math:`T \subset A` be the ``top_k`` highest scores (empty when
    ``top_k = 0``; among equal scores the lower key index wins) and
    :math:`R = A \setminus T` the tail. Draw :math:`j_1..j_n` i.i.d. from a
    proposal :math:`\pi` over :math:`R` (with replacement, :math:`n` =
    ``num_samples``). The estimate is

    .. math::

        \hat o = \frac{\sum_{j\in T} e^{s_j} v_j + \frac1n\sum_{i=1}^n \frac{e^{s_{j_i}}}{\pi_{j_i}} v_{j_i}}
                      {\sum_{j\in T} e^{s_j} + \frac1n\sum_{i=1}^n \frac{e^{s_{j_i}}}{\pi_{j_i}}}

    Numerator and denominator are unbiased for the dense ones
    (:math:`\sum_A e^{s_j} v_j` and :math:`Z = \sum_A e^{s_j}`), so the ratio
    is *self-normalised* importance sampling: consistent (it converges to
    dense attention as ``num_samples`` grows), with a bias of order
    :math:`1/n`, and the effective weights sum to 1. With
    ``proposal="oracle"`` (:math:`\pi_j \propto e^{s_j}` on :math:`R`) every
    draw has the same weight, the denominator equals :math:`Z` exactly and the
    estimate is unbiased.

    Proposals over the tail :math:`R`:

    - ``"uniform"``: :math:`\pi_j = 1/|R|`.
    - ``"oracle"``: :math:`\pi_j = e^{s_j} / \sum_R e^{s_l}`, the zero-variance
      proposal for the denominator; it needs every score (a teaching baseline).
    - ``"lsh"``: SimHash as in MagicPIG. ``lsh_tables`` tables each hash q and
      k to ``lsh_bits`` signs of random projections. A draw picks a table at
      random and then a key uniformly from the query's bucket in it (uniform
      over :math:`R` when that bucket holds no tail key), mixed with
      ``LSH_UNIFORM_MIX`` of uniform:
      :math:`\pi_j = \epsilon/|R| + \frac{1-\epsilon}{L}\sum_t \pi^{(t)}_j`.
      Keys at a small angle to the query share its bucket more often. Choosing
      keys needs only hash codes; scores are computed for the drawn keys only.
      Keys are hashed centred, :math:`k_j - c`, with :math:`c` the mean of the
      row's own tail keys :math:`R`: centring spreads the keys' angles, and it
      shifts every score of the row by the same :math:`q\cdot c`, which softmax
      ignores. With ``causal=True`` that mean is over keys of the row's prefix
      (less its kept keys), so a key after position :math:`i` changes nothing
      in row :math:`i`.

    Every proposal reads only the row's allowed keys, so with ``causal=True``
    row :math:`i` depends on ``q[..., i, :]`` and keys and values ``0..i``
    only: a generator in the same state draws the same keys for it whatever
    the later positions hold.

    A row whose allowed keys number at most ``top_k + num_samples`` attends to
    all of them exactly (dense attention), so a budget at least the key length
    is dense attention.

    This reference forms the proposal densely, (Lq, Lk) per head, for clarity;
    ``"oracle"`` and ``top_k > 0`` also form every score. Use it on sizes you
    could run dense attention on.

    Args:
        q: (B, H, Lq, D); k: (B, Hkv, Lk, D); v: (B, Hkv, Lk, Dv); H a multiple
            of Hkv; one floating dtype and one device.
        num_samples: draws per query from the tail, >= 1.
        proposal: ``"lsh"`` (default), ``"uniform"`` or ``"oracle"``.
        top_k: exact top-scoring keys kept per query before sampling, >= 0.
        causal: SDPA's ``is_causal`` (query i sees keys 0..i).
        scale: default 1/sqrt(D).
        generator: a ``torch.Generator`` on q's device, for reproducible draws;
            None uses torch's global generator. Its first draws are the hash
            projections, so ``proposal_probs`` given a generator in the same
            state rebuilds the proposal the keys were drawn from.
        return_selection: also return ``Selection(indices, weights)``, each
            (B, H, Lq, S) with S = min(top_k + num_samples, Lk): the exact keys
            first, then the draws in order. ``weights`` are the effective
            weights (they sum to 1 per row), so ``selection.to_dense(Lk) @ v``
            is the output: :math:`e^{s_j}/\hat Z` for a kept key and
            :math:`e^{s_{j_i}}/(n\,\pi_{j_i}\hat Z)` for draw :math:`i`, with
            :math:`\hat Z` the denominator above. A draw never repeats a kept
            key; a key drawn twice fills two slots whose weights add. Unused
            slots hold index -1 and weight 0.
        lsh_bits, lsh_tables: SimHash shape for ``proposal="lsh"``: 1..30 bits
            per table, >= 1 tables.

    Returns:
        out (B, H, Lq, Dv) in q's dtype, or (out, Selection). Gradients reach
        q, k and v through the kept and drawn keys' scores and values; the
        draws themselves are not differentiable.

    Raises:
        TypeError: an int argument that is not an int, a generator that is
            not a ``torch.Generator``.
        ValueError: num_samples < 1, top_k < 0, lsh_bits outside 1..30,
            lsh_tables < 1, an unknown proposal, or a generator on another
            device than q.
    """
    B, H, Hkv, Lq, Lk, D, Dv = check_qkv(q, k, v)
    check_int(num_samples, "num_samples", minimum=1)
    check_int(top_k, "top_k", minimum=0)
    # 2**30 buckets already leave almost every bucket empty; the cap also keeps simhash_codes' ids in int64.
    check_int(lsh_bits, "lsh_bits", minimum=1, maximum=30)
    check_int(lsh_tables, "lsh_tables", minimum=1)
    check_choice(proposal, "proposal", PROPOSALS)
    check_generator(generator, q.device)
    scale = resolve_scale(scale, D)
    S = top_k + num_samples

    if S >= Lk:  # every row may attend to all its allowed keys: exact
        out, weights = dense_attention(q, k, v, causal=causal, scale=scale, return_weights=True)
        if not return_selection:
            return out
        idx = torch.arange(Lk, device=q.device).expand(B, H, Lq, Lk)
        if causal:
            idx = idx.masked_fill(~causal_mask(Lq, Lk, q.device), -1)
        return out, Selection(idx.contiguous(), weights.detach())

    if Lq == 0:
        out = q.new_zeros(B, H, 0, Dv)
        empty = Selection(torch.zeros(B, H, 0, S, dtype=torch.long, device=q.device), q.new_zeros(B, H, 0, S))
        return (out, empty) if return_selection else out

    G = H // Hkv
    qg = rearrange(q, "b (hk g) i d -> b hk g i d", hk=Hkv)
    allowed = causal_mask(Lq, Lk, q.device) if causal else torch.ones(Lq, Lk, dtype=torch.bool, device=q.device)
    n_allowed = allowed.sum(-1)  # (Lq,)
    with torch.no_grad():
        idx, log_w = _draw(qg, k, allowed, top_k, num_samples, proposal, scale, generator, lsh_bits, lsh_tables)
        # Rows with no more allowed keys than the budget attend to all of them.
        exact = (n_allowed <= S).view(Lq, 1)
        slot = torch.arange(S, device=q.device)
        exact_idx = torch.where(slot < n_allowed.view(Lq, 1), slot, -1)
        idx = torch.where(exact, exact_idx, idx)
        log_w = torch.where(exact, torch.where(exact_idx >= 0, 0.0, float("-inf")).to(log_w.dtype), log_w)

    flat = lambda t: rearrange(t, "b hk g i s -> b hk (g i) s")  # noqa: E731
    idx_safe = flat(idx.clamp(min=0))
    k_sel = gather_kv(k, idx_safe)
    scores = torch.einsum("bhrd,bhrsd->bhrs", rearrange(qg, "b hk g i d -> b hk (g i) d"), k_sel) * scale
    logits = scores.to(log_w.dtype) + flat(log_w)
    weights = safe_softmax(logits).to(q.dtype)
    out = torch.einsum("bhrs,bhrsd->bhrd", weights, gather_kv(v, idx_safe))
    out = rearrange(out, "b hk (g i) d -> b (hk g) i d", g=G)
    if not return_selection:
        return out
    to_heads = lambda t: rearrange(t, "b hk g i s -> b (hk g) i s")  # noqa: E731
    sel_w = rearrange(weights.detach(), "b hk (g i) s -> b (hk g) i s", g=G)
    return out, Selection(to_heads(idx).contiguous(), sel_w)


def _work_dtype(dtype: torch.dtype) -> torch.dtype:
    # Proposal probabilities and log-weights need more range than half precision.
    return torch.promote_types(dtype, torch.float32)


def _draw(qg, k, allowed, top_k, n, proposal, scale, generator, lsh_bits, lsh_tables):
    """Indices (B, Hkv, G, Lq, top_k + n) and their log-weight offsets.

    The offset is 0 for a kept top-k key and -log(n * pi_j) for a draw, so
    that softmax(score + offset) over the slots is the estimator's effective
    weights. Slots that hold no key have index -1 and offset -inf.
    """
    B, Hkv, G, Lq, _ = qg.shape
    Lk = k.shape[2]
    wdt = _work_dtype(qg.dtype)
    tail = allowed.expand(B, Hkv, G, Lq, Lk)
    full = None
    if top_k > 0 or proposal == "oracle":
        full = (torch.einsum("bhgid,bhjd->bhgij", qg, k) * scale).to(wdt).masked_fill(~allowed, float("-inf"))
    parts_idx, parts_off = [], []
    if top_k > 0:
        top_idx, kept = _exact_topk(full, top_k)
        tail = _tail(tail, top_idx, kept)
        parts_idx.append(top_idx)
        parts_off.append(torch.where(kept, 0.0, float("-inf")).to(wdt))

    probs = proposal_probs(qg, k, tail, proposal, scores=full, generator=generator, bits=lsh_bits, tables=lsh_tables)
    has_tail = tail.any(-1, keepdim=True)
    # Rows with an empty tail are exact rows (top_k covers them); give them a
    # harmless distribution so one multinomial call serves every row.
    probs = torch.where(has_tail, probs, 1.0 / Lk)
    draws = torch.multinomial(probs.reshape(-1, Lk), n, replacement=True, generator=generator)
    draws = draws.view(B, Hkv, G, Lq, n)
    log_pi = probs.gather(-1, draws).log()
    off = -(log_pi + math.log(n))
    parts_idx.append(torch.where(has_tail, draws, -1))
    parts_off.append(torch.where(has_tail, off, float("-inf")))
    return torch.cat(parts_idx, -1), torch.cat(parts_off, -1)


def _exact_topk(scores, top_k):
    """The ``top_k`` highest finite scores per row: (indices, kept), each (..., top_k).

    ``stable_topk`` picks them, so among equal scores the lower key index
    wins, as on every token top-k path of the library. Slots past a row's
    last finite score hold index -1, kept False.
    """
    values, idx = stable_topk(scores, top_k, dim=-1)
    kept = torch.isfinite(values)
    return idx.masked_fill(~kept, -1), kept


def _tail(allowed, top_idx, kept):
    """The keys left to sample: allowed and not kept exactly.

    A draw of a kept key would count its mass twice, once exactly and once in
    the tail's estimate, and bias the denominator up by the kept mass.
    """
    hits = torch.zeros(allowed.shape, dtype=torch.int32, device=allowed.device)
    # scatter_add, not scatter: an empty slot (-1, clamped to 0) must not overwrite a kept key 0.
    taken = hits.scatter_add_(-1, top_idx.clamp(min=0), kept.to(torch.int32)) > 0
    return allowed & ~taken


def simhash_codes(x: torch.Tensor, planes: torch.Tensor, centre: torch.Tensor | None = None) -> torch.Tensor:
    """Bucket ids of SimHash: x (..., D), planes (T, D, bits) -> int64 (..., T).

    Bit b of table t is the sign of (x - centre) . planes[t, :, b] (``centre``
    broadcastable to x, default none). Over random Gaussian planes, two
    vectors whose centred forms are at angle theta share a table's bucket with
    probability (1 - theta / pi) ** bits. ``proposal_probs`` forms the same
    buckets bit by bit, without the ids.
    """
    bits = planes.shape[-1]
    proj = torch.einsum("...d,tdb->...tb", x.to(planes.dtype), planes)
    if centre is not None:
        # Project, then subtract: x - centre would first broadcast x to the centres' shape.
        proj = proj - torch.einsum("...d,tdb->...tb", centre.to(planes.dtype), planes)
    powers = 2 ** torch.arange(bits, device=x.device)
    return ((proj > 0).long() * powers).sum(-1)


def _key_centres(k, tail):
    """The mean of each row's tail keys, (B, Hkv, G, Lq, D): what the LSH proposal centres keys on.

    Only keys a row may draw enter its mean, so a causal row's centre is a
    statistic of its prefix and no later key can move it. A row with an empty
    tail gets the origin (it draws nothing).
    """
    w = tail.to(_work_dtype(k.dtype))
    return torch.einsum("bhgij,bhjd->bhgid", w, k.to(w.dtype)) / w.sum(-1, keepdim=True).clamp(min=1)


def _bucket_members(q_bits, k_proj, c_proj, tail):
    """(B, Hkv, G, Lq, Lk) bool: the tail keys in query i's bucket of one table.

    q_bits (B, Hkv, G, Lq, bits) are the query's signs, k_proj (B, Hkv, bits, Lk)
    the keys' projections and c_proj (B, Hkv, G, Lq, bits) the row centres'. Bit
    b of key j in row i is the sign of (k_j - c_i) . plane_b, taken as
    k_proj > c_proj; one bit at a time keeps the working set at one boolean
    per (query, key) pair.
    """
    member = tail.clone()
    for b in range(q_bits.shape[-1]):
        key_bit = k_proj[:, :, None, None, b, :] > c_proj[..., b, None]
        member &= key_bit == q_bits[..., b, None]
    return member


def proposal_probs(qg, k, tail, proposal, *, scores=None, generator=None, bits=4, tables=8):
    """The proposal pi over keys for each query, zero outside ``tail``.

    qg is (B, Hkv, G, Lq, D), k (B, Hkv, Lk, D), tail a boolean broadcastable
    to (B, Hkv, G, Lq, Lk). ``scores`` (the masked scaled scores) is needed
    for ``"oracle"`` only. ``"lsh"`` draws its (tables, D, bits) projections
    from ``generator`` first and centres the keys on the mean of each row's
    tail keys, so nothing outside a row's tail reaches that row. Returns
    (B, Hkv, G, Lq, Lk) in a float dtype of at least float32; rows with an
    empty tail are all zero.
    """
    B, Hkv, G, Lq, D = qg.shape
    Lk = k.shape[2]
    wdt = _work_dtype(qg.dtype)
    tail = tail.expand(B, Hkv, G, Lq, Lk)
    size = tail.sum(-1, keepdim=True).clamp(min=1).to(wdt)
    uniform = tail.to(wdt) / size
    if proposal == "uniform":
        return uniform
    if proposal == "oracle":
        return safe_softmax(scores.masked_fill(~tail, float("-inf")))
    planes = torch.randn(tables, D, bits, generator=generator, device=qg.device, dtype=wdt)
    q_bits = torch.einsum("bhgid,tdc->bhgitc", qg.to(wdt), planes) > 0
    # Keys last: each (table, bit) slice is then one contiguous row of Lk projections.
    k_proj = torch.einsum("bhjd,tdc->bhtcj", k.to(wdt), planes).contiguous()
    c_proj = torch.einsum("bhgid,tdc->bhgitc", _key_centres(k, tail), planes)
    lsh = torch.zeros_like(uniform)
    no_bucket = torch.zeros_like(size)  # tables whose bucket holds no tail key of the row: uniform there
    for t in range(tables):
        member = _bucket_members(q_bits[..., t, :], k_proj[:, :, t], c_proj[..., t, :], tail)
        count = member.sum(-1, keepdim=True)
        lsh += member / count.clamp(min=1).to(wdt)
        no_bucket += count == 0
    lsh += no_bucket * uniform
    return LSH_UNIFORM_MIX * uniform + (1 - LSH_UNIFORM_MIX) / tables * lsh
