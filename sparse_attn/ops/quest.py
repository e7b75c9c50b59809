"""Quest (Tang et al. 2024, arXiv 2406.10774): query-aware page selection by an upper bound on the scores.

Keys are split into pages of ``page_size`` tokens, and each page is summarised
by the elementwise min and max of its keys. For a query q,
``sum_d max(q_d * min_d, q_d * max_d)`` bounds ``q . k`` from above for every
key k of the page, without reading the page: each query reads the pages with
the highest bounds and attends exactly to their tokens. Shapes as in SDPA
(``sparse_attn.ops.dense``).
"""
from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from einops import rearrange, reduce

from .._checks import check_int, check_qkv, resolve_scale
from ..topk import stable_topk
from .indexed import QUERY_CHUNK, indexed_attention

__all__ = ["quest_attention", "page_min_max", "page_upper_bounds"]


def page_min_max(k: torch.Tensor, page_size: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Elementwise min and max of the keys of each page: k (B, Hkv, Lk, D) -> two (B, Hkv, ceil(Lk / page_size), D).

    The last page may be shorter; its padding never wins a min or a max.
    """
    check_int(page_size, "page_size", minimum=1)
    pad = -k.shape[2] % page_size
    lo = reduce(F.pad(k, (0, 0, 0, pad), value=float("inf")), "b h (n p) d -> b h n d", "min", p=page_size)
    hi = reduce(F.pad(k, (0, 0, 0, pad), value=float("-inf")), "b h (n p) d -> b h n d", "max", p=page_size)
    return lo, hi


def page_upper_bounds(q: torch.Tensor, page_min: torch.Tensor, page_max: torch.Tensor) -> torch.Tensor:
    """``sum_d max(q_d * min_d, q_d * max_d)`` per query head and page.

    q is (B, H, Lq, D), page_min and page_max (B, Hkv, N, D); returns (B, H, Lq, N).

    At least ``q . k`` for every key k of the page, each term being the
    largest q_d * k_d can be over the page. Query head h reads KV head
    h // (H / Hkv), and every query head gets its own bounds.
    """
    Hkv = page_min.shape[1]
    if page_min.shape != page_max.shape or page_min.dim() != 4 or q.dim() != 4 or q.shape[1] % Hkv \
            or q.shape[-1] != page_min.shape[-1]:
        raise ValueError(f"page_min and page_max must both be (B, Hkv, N, D) with H = {q.shape[1]} a multiple of Hkv "
                         f"and D = q's {q.shape[-1]}, got {tuple(page_min.shape)} and {tuple(page_max.shape)}")
    qg = rearrange(q, "b (hk g) i d -> b hk g i d", hk=Hkv)
    # min <= max, so the larger product takes max where q_d >= 0 and min where q_d < 0: two matmuls, and
    # no (Lq, N, D) tensor of products.
    at_max = qg.clamp(min=0) @ page_max.unsqueeze(2).transpose(-1, -2)
    at_min = qg.clamp(max=0) @ page_min.unsqueeze(2).transpose(-1, -2)
    return rearrange(at_max + at_min, "b hk g i n -> b (hk g) i n")


def quest_attention(q, k, v, token_budget: int, page_size: int, *, causal: bool = False, scale: float | None = None,
                    return_selection: bool = False):
    """Each query attends exactly to the tokens of its ``ceil(token_budget / page_size)`` highest-bound pages.

    Pages are ranked by ``page_upper_bounds`` of the scaled query (so they
    bound the scores the softmax sees, whatever the sign of ``scale``); equal
    bounds go to the lower page index. Under ``causal`` a page is a candidate
    only if it starts at or before the query, and inside a picked page only
    keys j <= i count; the query's own page is bounded by its keys up to i,
    so no later key steers the choice. With grouped heads (Hkv < H) each
    query head ranks the pages with its own bounds and may pick other pages
    than the other heads of its group (Quest scores per head).

    Args:
        q: (B, H, Lq, D); k: (B, Hkv, Lk, D); v: (B, Hkv, Lk, Dv); H a multiple of Hkv.
        token_budget: >= 1 tokens per query, read as whole pages (rounded up).
            At least Lk means every page: the result is dense attention.
        page_size: tokens per page, 1 .. Lk; the last page holds the rest.
        causal: SDPA's ``is_causal`` (query i sits at position i, top-left aligned).
        scale: default 1/sqrt(D).
        return_selection: also return ``Selection(indices, weights)``, each
            (B, H, Lq, S * page_size) with S = min(pages picked, pages there are);
            the tokens of the picked pages by falling bound, -1 where a slot
            holds no allowed key.

    Returns:
        out (B, H, Lq, Dv), or (out, Selection). Gradients reach q, k and v
        through the picked tokens (the choice of pages is not differentiable).
    """
    B, H, Hkv, Lq, Lk, D, Dv = check_qkv(q, k, v)
    check_int(token_budget, "token_budget", minimum=1)
    check_int(page_size, "page_size", minimum=1, maximum=Lk)
    scale = resolve_scale(scale, D)
    S = min(math.ceil(token_budget / page_size), math.ceil(Lk / page_size))
    with torch.no_grad():
        tokens = _quest_tokens(q * scale, k, S, page_size, causal)
    return indexed_attention(q, k, v, tokens, scale, return_selection=return_selection)


def _quest_tokens(qs, k, S: int, page_size: int, causal: bool) -> torch.Tensor:
    """(B, H, Lq, S * page_size) int64: the tokens of each scaled query's S best pages, -1 where not allowed."""
    B, H, Lq, _ = qs.shape
    Lk = k.shape[2]
    pages = page_min_max(k, page_size)
    running = _running_min_max(k, page_size) if causal else None  # freed on return, before attention runs
    tokens = torch.empty(B, H, Lq, S * page_size, dtype=torch.long, device=qs.device)
    # Bounds are (queries, pages) per head: a block of queries at a time keeps them small.
    for i0 in range(0, Lq, QUERY_CHUNK):
        i1 = min(Lq, i0 + QUERY_CHUNK)
        tokens[:, :, i0:i1] = _pick_tokens(qs[:, :, i0:i1], i0, *pages, running, S, page_size, Lk, causal)
    return tokens


def _pick_tokens(qs, i0: int, page_min, page_max, running, S: int, page_size: int, Lk: int, causal: bool):
    """Tokens (B, H, n, S * page_size) of the pages the scaled queries i0 .. i0 + n - 1 pick; -1 where not allowed."""
    bounds = page_upper_bounds(qs, page_min, page_max)
    n, num_pages = bounds.shape[-2:]
    query = torch.arange(i0, i0 + n, device=qs.device).unsqueeze(-1)
    if causal:
        eligible = torch.arange(num_pages, device=qs.device) * page_size <= query
        _bound_own_page_by_its_past(bounds, qs, *running, page_size, i0)
        bounds = bounds.masked_fill(~eligible, float("-inf"))
    else:
        eligible = torch.ones(n, num_pages, dtype=torch.bool, device=qs.device)
    pages = stable_topk(bounds, S).indices  # the library's tie rule: the lower page wins
    picked = eligible.expand_as(bounds).gather(-1, pages)
    tokens = rearrange(pages.unsqueeze(-1) * page_size + torch.arange(page_size, device=qs.device),
                       "b h i s p -> b h i (s p)")
    allowed = picked.repeat_interleave(page_size, dim=-1) & (tokens < Lk)
    if causal:
        allowed &= tokens <= query
    return tokens.masked_fill(~allowed, -1)


def _running_min_max(k: torch.Tensor, page_size: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Elementwise min and max of the keys from the start of each key's page up to it: two (B, Hkv, Lk, D)."""
    Lk = k.shape[2]
    # Padding goes after the keys: a running min or max at a real key never reads it. F.pad returns a new
    # tensor even when it pads nothing, so the steps below never write into k.
    lo = rearrange(F.pad(k, (0, 0, 0, -Lk % page_size)), "b h (n p) d -> b h n p d", p=page_size)
    hi = lo.clone()
    # One step per position in the page, in place: cummin and cummax would also return int64 indices, 2x k each.
    for p in range(1, page_size):
        lo[:, :, :, p] = torch.minimum(lo[:, :, :, p - 1], lo[:, :, :, p])
        hi[:, :, :, p] = torch.maximum(hi[:, :, :, p - 1], hi[:, :, :, p])
    return tuple(rearrange(t, "b h n p d -> b h (n p) d")[:, :, :Lk] for t in (lo, hi))


def _bound_own_page_by_its_past(bounds, qs, run_min, run_max, page_size: int, i0: int) -> None:
    """Under causal, bound query i's own page by its keys up to i only (in place on ``bounds`` (B, H, n, N)).

    The whole page's min and max would let keys after i steer which pages i
    reads; Quest decodes with the newest page partly filled, so its bound
    covers the keys written so far, as here.
    """
    B, H = qs.shape[:2]
    Hkv, Lk = run_min.shape[1], run_min.shape[2]
    n = min(qs.shape[2], Lk - i0)  # later queries see every page whole
    if n <= 0:
        return
    qg = rearrange(qs[:, :, :n], "b (hk g) i d -> b hk g i d", hk=Hkv)
    lo, hi = (t[:, :, i0:i0 + n].unsqueeze(2) for t in (run_min, run_max))
    own = rearrange((qg.clamp(min=0) * hi + qg.clamp(max=0) * lo).sum(-1), "b hk g i -> b (hk g) i")
    i = torch.arange(i0, i0 + n, device=qs.device)
    page = (i // page_size).expand(B, H, n).unsqueeze(-1)
    # A query at its page's last key sees the whole page: keep the matmul's bound, so that exact ties
    # with other whole pages stay ties (the two sums round differently).
    partial = ((i + 1) % page_size != 0) & (i != Lk - 1)
    rows = bounds[:, :, :n]
    rows.scatter_(-1, page, torch.where(partial, own, rows.gather(-1, page).squeeze(-1)).unsqueeze(-1))
