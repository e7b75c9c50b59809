"""How far a sparse approximation is from dense attention, per query row and per head.

Every metric takes tensors whose leading dims are (B, H, Lq) and returns one
number per query row, (B, H, Lq), or with ``reduce="head"`` the mean over
batch and query rows, (H,), or with ``reduce="all"`` the mean of every row.
Attention rows are distributions over the Lk keys: ``dense_weights`` is the
(B, H, Lq, Lk) matrix from ``dense_attention(..., return_weights=True)``; a
sparse method's effective row is ``Selection.to_dense(Lk)``. A row with no
allowed key (all zeros) is handled without NaN, as each docstring says.

Two output errors: ``relative_error`` divides by the dense output's norm,
which is the error of returning zeros; when near-uniform weights average v's
rows toward zero that norm is small and the ratio can exceed 1 for every
method. ``error_vs_uniform`` divides by the error of the trivial answer that
attends to every allowed key equally (``uniform_output``), so below 1 means
better than that.
"""
from __future__ import annotations

import torch
from einops import repeat

from ._checks import check_choice, check_int
from .ops.dense import allowed_pairs
from .selection import Selection

__all__ = [
    "mass_kept",
    "relative_error",
    "uniform_output",
    "error_vs_uniform",
    "kl_divergence",
    "total_variation",
    "topk_recall",
    "keys_attended",
    "summarize",
]

_REDUCE = ("none", "head", "all")


def _reduce(x: torch.Tensor, reduce: str, keep: torch.Tensor | None = None) -> torch.Tensor:
    """``reduce`` "none": x; "head": mean over batch and rows, (H,); "all": mean of every row, a 0-d tensor.

    With ``keep`` (bool, x's shape) the means are over the kept rows; where no
    row is kept they fall back to the mean of all rows.
    """
    check_choice(reduce, "reduce", _REDUCE)
    if reduce == "none":
        return x
    if reduce == "head" and x.dim() != 3:
        raise ValueError(f'reduce="head" needs rows shaped (B, H, Lq), got shape {tuple(x.shape)}')
    dims = (0, 2) if reduce == "head" else tuple(range(x.dim()))
    if keep is None:
        return x.mean(dim=dims)
    n = keep.sum(dim=dims)
    kept = torch.where(keep, x, 0.0).sum(dim=dims) / n.clamp(min=1)  # where, not x * keep: inf * 0 is NaN
    return torch.where(n > 0, kept, x.mean(dim=dims))


def _check_rows(name: str, x: object) -> torch.Tensor:
    if not isinstance(x, torch.Tensor):
        raise TypeError(f"{name} must be a torch.Tensor, got {type(x).__name__}")
    if x.dim() < 1:
        raise ValueError(f"{name} must have a last dim over keys, got shape {tuple(x.shape)}")
    return x


def _as_mask(selection_or_mask, num_keys: int) -> torch.Tensor:
    if isinstance(selection_or_mask, Selection):
        return selection_or_mask.mask(num_keys)
    if isinstance(selection_or_mask, torch.Tensor) and selection_or_mask.dtype == torch.bool:
        return selection_or_mask
    raise TypeError(
        f"selection must be a Selection or a boolean (..., Lk) mask, got {type(selection_or_mask).__name__}"
        + (f" of dtype {selection_or_mask.dtype}" if isinstance(selection_or_mask, torch.Tensor) else "")
    )


def _as_dist(name: str, x, num_keys: int | None) -> torch.Tensor:
    if isinstance(x, Selection):
        if num_keys is None:
            raise ValueError(f"{name} is a Selection: the other argument must be a tensor so Lk is known")
        return x.to_dense(num_keys)
    return _check_rows(name, x)


def _same_shape(a_name: str, a: torch.Tensor, b_name: str, b: torch.Tensor) -> None:
    if a.shape != b.shape:
        raise ValueError(f"{a_name} and {b_name} must have the same shape, got {tuple(a.shape)} and {tuple(b.shape)}")


def _ratio(num: torch.Tensor, den: torch.Tensor) -> torch.Tensor:
    """num / den, with 0 where both are 0 and inf where only den is (never NaN)."""
    return torch.where(den > 0, num / den.clamp(min=torch.finfo(den.dtype).tiny), torch.where(num > 0, torch.inf, 0.0))


def mass_kept(dense_weights: torch.Tensor, selection_or_mask, *, reduce: str = "none") -> torch.Tensor:
    r"""Share of the dense softmax mass on the selected keys: :math:`\sum_{j \in S} p_j`.

    ``dense_weights`` p is (..., Lk); ``selection_or_mask`` a ``Selection``
    (a key counts once however often it was drawn) or a boolean (..., Lk)
    mask. 1 when every key with weight is selected; 0 for a row with no
    allowed key. Returns (...), or its means as ``reduce`` says.
    """
    p = _check_rows("dense_weights", dense_weights)
    mask = _as_mask(selection_or_mask, p.shape[-1])
    _same_shape("dense_weights", p, "mask", mask)
    return _reduce((p * mask).sum(-1), reduce)


def relative_error(out: torch.Tensor, ref: torch.Tensor, *, reduce: str = "none") -> torch.Tensor:
    r"""Per row :math:`\lVert o - o^{\mathrm{ref}} \rVert_2 / \lVert o^{\mathrm{ref}} \rVert_2` over the value dim.

    This is the error measured against the error of returning zeros
    (:math:`\lVert 0 - o^{\mathrm{ref}} \rVert = \lVert o^{\mathrm{ref}} \rVert`): above 1 the
    method is further from dense than the zero output. When near-uniform
    weights average v's rows toward zero the dense output is short and every
    method can exceed 1; ``error_vs_uniform`` measures against a trivial
    answer that knows that average.

    ``out`` and ``ref`` are (..., Dv). A row where both are zero gives 0; a
    zero reference row with a non-zero ``out`` gives ``inf`` (never NaN).
    """
    _check_rows("out", out)
    _check_rows("ref", ref)
    _same_shape("out", out, "ref", ref)
    num = (out - ref).norm(dim=-1)
    den = ref.norm(dim=-1)
    return _reduce(_ratio(num, den), reduce)



def _check_4d(name: str, x: object) -> torch.Tensor:
    if not isinstance(x, torch.Tensor):
        raise TypeError(f"{name} must be a torch.Tensor, got {type(x).__name__}")
    if x.dim() != 4:
        raise ValueError(f"{name} must be 4-d (B, heads, L, Dv), got shape {tuple(x.shape)}")
    if not x.is_floating_point():
        raise TypeError(f"{name} must have a floating dtype, got {x.dtype}")
    return x


def uniform_output(v: torch.Tensor, num_queries: int, *, causal: bool = False,
                   num_heads: int | None = None) -> torch.Tensor:
    r"""The trivial answer: each query's mean of v over the keys it may see, (B, num_heads, Lq, Dv).

    This is attention with equal weights on every allowed key (all scores
    equal). ``v`` is (B, Hkv, Lk, Dv); ``num_heads`` H (default Hkv) must be a
    multiple of Hkv, and query head h reads kv head h // (H // Hkv), as the ops
    do. Under ``causal`` query i sees keys 0..i (top-left aligned, as
    ``dense_attention``), so its row is the prefix mean of v over
    :math:`\min(i + 1, L_k)` keys. With no key (Lk = 0) the rows are zeros, as
    dense attention gives. Computed in v's dtype, at least float32.
    """
    v = _check_4d("v", v)
    num_queries = check_int(num_queries, "num_queries", minimum=0)
    B, Hkv, Lk, Dv = v.shape
    H = Hkv if num_heads is None else check_int(num_heads, "num_heads", minimum=1)
    if Hkv == 0 or H % Hkv:
        raise ValueError(f"num_heads ({H}) must be a multiple of v's heads ({Hkv})")
    x = v.to(torch.promote_types(v.dtype, torch.float32))
    if Lk == 0:
        out = x.new_zeros(B, Hkv, num_queries, Dv)
    elif not causal:
        out = x.mean(dim=2, keepdim=True).expand(B, Hkv, num_queries, Dv)
    else:
        last = torch.arange(num_queries, device=v.device).clamp(max=Lk - 1)  # the last key query i sees
        out = x.cumsum(dim=2)[:, :, last] / (last + 1).to(x.dtype).unsqueeze(-1)
    return repeat(out, "b hk i d -> b (hk g) i d", g=H // Hkv)


def error_vs_uniform(out: torch.Tensor, ref: torch.Tensor, v: torch.Tensor, *, causal: bool = False,
                     reduce: str = "none") -> torch.Tensor:
    r"""Per row :math:`\lVert o - o^{\mathrm{ref}} \rVert_2 / \lVert o^{\mathrm{uni}} - o^{\mathrm{ref}} \rVert_2`.

    :math:`o^{\mathrm{uni}}` is ``uniform_output(v, Lq, causal=causal,
    num_heads=H)``: the mean of v over the keys each query may see. Below 1
    the method is closer to dense than attending to every allowed key equally;
    ``relative_error`` is the same ratio against the zero output (its
    denominator :math:`\lVert 0 - o^{\mathrm{ref}} \rVert` is
    :math:`\lVert o^{\mathrm{ref}} \rVert`).

    ``out`` and ``ref`` are (B, H, Lq, Dv), ``v`` (B, Hkv, Lk, Dv) with H a
    multiple of Hkv; ``causal`` must be the attention's. Where the uniform
    answer is exact (a query that may see one key: L = 1, the first causal
    row; or equal value rows) the ratio is 0 when ``out`` is exact too and
    ``inf`` otherwise (never NaN), and those rows carry no comparison: with
    ``reduce`` "head" (H,) or "all" (a 0-d tensor) the mean is over the other
    rows, or over all rows when every row is such a row.
    """
    out, ref = _check_4d("out", out), _check_4d("ref", ref)
    _same_shape("out", out, "ref", ref)
    v = _check_4d("v", v)
    B, H, Lq, Dv = ref.shape
    if v.shape[0] != B or v.shape[-1] != Dv:
        raise ValueError(f"v must be (B, Hkv, Lk, Dv) = ({B}, Hkv, Lk, {Dv}) to match ref, got {tuple(v.shape)}")
    if v.shape[1] == 0 or H % v.shape[1]:
        raise ValueError(f"ref's heads ({H}) must be a multiple of v's heads ({v.shape[1]})")
    uni = uniform_output(v, Lq, causal=causal, num_heads=H)
    acc = torch.promote_types(uni.dtype, ref.dtype)
    ref = ref.to(acc)
    num = (out.to(acc) - ref).norm(dim=-1)
    den = (uni.to(acc) - ref).norm(dim=-1)
    return _reduce(_ratio(num, den), reduce, keep=den > 0)


def kl_divergence(p, q, *, reduce: str = "none") -> torch.Tensor:
    r"""Per row :math:`\mathrm{KL}(p \Vert q) = \sum_j p_j \log(p_j / q_j)`, with :math:`0 \log 0 = 0`.

    p is the dense row, q the effective sparse row (a tensor (..., Lk) or a
    ``Selection``). ``inf`` whenever q drops a key that p gives weight: every
    top-k row that loses any tail mass has infinite KL, which is the point
    (top-k never puts weight on the tail); sampled rows with every key drawn
    are finite. Use ``total_variation`` for a bounded distance.
    """
    num_keys = p.shape[-1] if isinstance(p, torch.Tensor) else (q.shape[-1] if isinstance(q, torch.Tensor) else None)
    p = _as_dist("p", p, num_keys)
    q = _as_dist("q", q, num_keys)
    _same_shape("p", p, "q", q)
    pos = p > 0
    ratio = torch.where(pos, p, 1.0) / torch.where(pos, q, 1.0)
    terms = torch.where(pos, p * ratio.log(), 0.0)  # q_j = 0 < p_j gives log(inf) = inf
    return _reduce(terms.sum(-1), reduce)


def total_variation(p, q, *, reduce: str = "none") -> torch.Tensor:
    r"""Per row :math:`\mathrm{TV}(p, q) = \tfrac12 \sum_j |p_j - q_j|`, in [0, 1] for distributions.

    p and q are (..., Lk) tensors or ``Selection``\ s (at least one a tensor).
    For top-k, TV equals 1 - mass kept (its weights are p renormalised on the
    kept keys).
    """
    num_keys = p.shape[-1] if isinstance(p, torch.Tensor) else (q.shape[-1] if isinstance(q, torch.Tensor) else None)
    p = _as_dist("p", p, num_keys)
    q = _as_dist("q", q, num_keys)
    _same_shape("p", p, "q", q)
    return _reduce(0.5 * (p - q).abs().sum(-1), reduce)


def topk_recall(dense_weights: torch.Tensor, selection_or_mask, k: int, *, reduce: str = "none") -> torch.Tensor:
    r"""Share of the true top-k keys that were selected: :math:`|S \cap T_k| / k'`.

    :math:`T_k` holds the k largest dense weights of the row and
    :math:`k' = \min(k, \#\{p_j > 0\})`. Ties at the k-th largest weight make
    :math:`T_k` ambiguous, so a selected key counts when its weight is at
    least the k'-th largest: recall is :math:`\min(k', |\{j \in S: p_j \ge
    \tau_{k'}, p_j > 0\}|) / k'`, which equals the set formula when there are
    no ties. A row with no positive weight gives 1 (nothing to recall).
    """
    check_int(k, "k", minimum=1)
    p = _check_rows("dense_weights", dense_weights)
    mask = _as_mask(selection_or_mask, p.shape[-1])
    _same_shape("dense_weights", p, "mask", mask)
    k_eff = (p > 0).sum(-1).clamp(max=k)
    top = torch.topk(p, min(k, p.shape[-1]), dim=-1).values
    tau = top.gather(-1, (k_eff - 1).clamp(min=0).unsqueeze(-1))
    hits = (mask & (p >= tau) & (p > 0)).sum(-1)
    recall = torch.where(k_eff > 0, torch.minimum(hits, k_eff).to(p.dtype) / k_eff.clamp(min=1), 1.0)
    return _reduce(recall, reduce)


def keys_attended(selection_or_mask, num_keys: int, *, reduce: str = "none") -> torch.Tensor:
    """Distinct keys each query attends to (a key drawn twice counts once), as a float."""
    mask = _as_mask(selection_or_mask, num_keys)
    return _reduce(mask.sum(-1).to(torch.get_default_dtype()), reduce)


def summarize(out, ref, dense_weights, selection, *, v, weights=None, causal: bool = False):
    """A per-head table of how far ``out`` is from dense, for showing next to the picture.

    Args:
        out: the sparse output (B, H, Lq, Dv); ref: dense output, same shape.
        dense_weights: (B, H, Lq, Lk) from ``dense_attention(..., return_weights=True)``.
        selection: the method's ``Selection`` (B, H, Lq, S), or its boolean
            (B, H, Lq, Lk) mask with ``weights``, the effective (B, H, Lq, Lk)
            weights (as a registry method's ``run`` returns them).
        v: the values (B, Hkv, Lk, Dv) the attention read, for ``error_vs_uniform``.
        causal: whether the attention was causal (sets how many keys each
            query was allowed, for the sparsity column, and the uniform answer).

    Returns:
        A pandas DataFrame, one row per head, columns: ``head``,
        ``keys_per_query`` (distinct keys attended, mean over queries),
        ``sparsity`` (share of allowed query-key pairs not attended),
        ``mass_kept``, ``relative_error``, ``error_vs_uniform``,
        ``total_variation`` (means over batch and queries; ``error_vs_uniform``
        leaves out the rows its docstring says), ``kl_finite`` (share of rows
        whose KL is finite: a row that drops a key with weight has infinite
        KL) and ``kl_divergence`` (mean over those finite rows; NaN, i.e. no
        value, when there is none).
    """
    import pandas as pd  # the table is for display; the metrics above need only torch

    p = _check_rows("dense_weights", dense_weights)
    if p.dim() != 4:
        raise ValueError(f"dense_weights must be (B, H, Lq, Lk), got shape {tuple(p.shape)}")
    B, H, Lq, Lk = p.shape
    if isinstance(selection, Selection):
        mask, effective = selection.mask(Lk), selection.to_dense(Lk)
    elif weights is None:
        raise TypeError("selection must be a Selection, or a boolean mask given with weights")
    else:
        mask, effective = _as_mask(selection, Lk), _check_rows("weights", weights)
        _same_shape("dense_weights", p, "weights", effective)
    allowed = allowed_pairs(Lq, Lk, causal)
    attended = mask.sum(dim=(0, 2, 3)).double() / B
    sparsity = 1.0 - attended / max(allowed, 1)
    kl = kl_divergence(p, effective.to(p.dtype))
    finite = torch.isfinite(kl)
    n_finite = finite.sum(dim=(0, 2))
    kl_mean = torch.where(finite, kl, 0.0).sum(dim=(0, 2)) / n_finite.clamp(min=1)
    cols = {
        "head": list(range(H)),
        "keys_per_query": keys_attended(mask, Lk, reduce="head").tolist(),
        "sparsity": sparsity.tolist(),
        "mass_kept": mass_kept(p, mask, reduce="head").tolist(),
        "relative_error": relative_error(out, ref, reduce="head").tolist(),
        "error_vs_uniform": error_vs_uniform(out, ref, v, causal=causal, reduce="head").tolist(),
        "total_variation": total_variation(p, effective.to(p.dtype), reduce="head").tolist(),
        "kl_finite": (n_finite.double() / max(B * Lq, 1)).tolist(),
        "kl_divergence": torch.where(n_finite > 0, kl_mean, torch.nan).tolist(),
    }
    return pd.DataFrame(cols)
