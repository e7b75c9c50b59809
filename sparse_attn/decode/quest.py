"""Quest decoding: rank pages by an upper bound read from the page min/max, then read only the picked pages.

Per step Quest reads two D-long vectors per page (the bounds, 2 / page_size
of the keys) and the K and V of ``ceil(token_budget / page_size)`` pages per
query head. The cache keeps the bounds up to date as pages fill
(``KVCache(page_size=...)``), so no step reads the keys to bound them.
"""
from __future__ import annotations

import math

import torch
from einops import rearrange, reduce

from .._checks import check_int, resolve_scale
from ..ops.indexed import indexed_attention
from .cache import KVCache
from . import gather
from .gather import shared_gather_attention
from .ranking import ranked_topk
from .result import BytesRead, DecodeResult, DecodeSelection, check_query, query_positions, rows_read

__all__ = ["quest_decode"]


def quest_decode(q: torch.Tensor, cache: KVCache, token_budget: int, *, page_size: int | None = None,
                 scale: float | None = None, query_heads_share_pages: bool = False) -> DecodeResult:
    """Each query head attends exactly to the tokens of its ``ceil(token_budget / page_size)`` highest-bound pages.

    Equals the last T rows of ``quest_attention(..., causal=True)`` on the
    cache's tokens: a page is a candidate when it starts at or before the
    query; the newest page is bounded by the keys written so far, as the
    parallel form bounds a query's own page by its keys up to the query.
    With T > 1 an earlier query whose page is not yet whole reads that page's
    keys up to itself to bound it (counted in the bytes).

    Args:
        q: (B, H, T, D), the cache's last T tokens' queries.
        cache: a ``KVCache`` built with ``page_size``.
        token_budget: >= 1 tokens per query, read as whole pages.
        page_size: optional; when given it must be the cache's (pages are fixed when the cache is built).
        scale: default 1/sqrt(D).
        query_heads_share_pages: the query heads of a KV group sum their
            bounds and read one set of pages together (as NSA selects for
            GQA), so a group reads ``ceil(token_budget / page_size)`` pages, not
            that many per head. Not Quest's own rule (it ranks per head): with
            64 query heads over 4 KV heads per-head picks can cover up to 16x
            the budget per group. False (the default) equals the parallel form.
    """
    B, H, T, D = check_query(q, cache)
    check_int(token_budget, "token_budget", minimum=1)
    if page_size is not None:
        check_int(page_size, "page_size", minimum=1)
    cache._need_pages()
    P = cache.page_size
    if page_size is not None and page_size != P:
        raise ValueError(f"page_size ({page_size}) must be the cache's page_size ({P}): pages are fixed when the "
                         "cache is built")
    scale = resolve_scale(scale, D)
    L, Hkv = cache.length, cache.num_kv_heads
    pos = query_positions(T, cache)
    N = cache.num_pages
    S = min(math.ceil(token_budget / P), N)
    if T == 1 and _use_step_kernels(q, cache, N, S):
        # Four launches: bounds (the query scaled inside, the group's sum too), ranking, the pages' rows, combine.
        from .rows_kernel import units_attention
        from .topk_kernel import topk_indices_triton

        bounds = _bounds_triton(q, cache, group_sum=query_heads_share_pages, scale=scale)
        pages = topk_indices_triton(bounds, S)
        out = units_attention(q, cache.k, cache.v, pages, P, L, scale)
        return _result(out, pages, q, cache, pos, [])
    acc = torch.promote_types(q.dtype, torch.float32)
    qs = (q.to(acc) * scale).to(q.dtype)
    kernel = _use_bounds_kernel(qs, cache)
    if kernel and query_heads_share_pages and T == 1:  # one launch: both products and the group's sum
        bounds, partial = _bounds_triton(qs, cache, group_sum=True), []
    else:
        bounds = _bounds_triton(qs, cache) if kernel else _upper_bounds(qs, cache)  # (B, H, T, N)
        partial = _bound_partial_pages(bounds, qs, cache, T)
        if query_heads_share_pages:
            # A sum of upper bounds bounds the sum of the group's scores: the pages the group needs most.
            bounds = reduce(bounds, "b (hk g) t n -> b hk t n", "sum", hk=Hkv)
    if T == 1:
        # Every page starts at or before the newest query: all N are candidates, and the S <= N picks all real.
        pages = ranked_topk(bounds, S).indices
    else:
        eligible = torch.arange(N, device=q.device) * P <= pos.view(-1, 1)  # (T, N)
        pages = ranked_topk(bounds.masked_fill(~eligible, float("-inf")), S).indices  # lower page wins ties
        picked = eligible.expand_as(bounds).gather(-1, pages)
        pages = pages.masked_fill(~picked, -1)
    tokens = pages.unsqueeze(-1) * P + torch.arange(P, device=q.device)  # (B, Hs, T, S, P)
    allowed = (pages >= 0).unsqueeze(-1) & (tokens < L) & (tokens <= pos.view(-1, 1, 1))
    tokens = tokens.masked_fill(~allowed, -1).flatten(-2)
    if query_heads_share_pages:
        out = shared_gather_attention(q, cache.k, cache.v, tokens, scale)
    else:
        out = _per_head_attention(q, cache, tokens, scale)
    return _result(out, pages, q, cache, pos, partial)


def _result(out, pages, q, cache: KVCache, pos, partial) -> DecodeResult:
    B, T, P, L, Hkv, D = q.shape[0], q.shape[2], cache.page_size, cache.length, cache.num_kv_heads, q.shape[-1]
    N = cache.num_pages
    sel = DecodeSelection("pages", pages, P, pos, L)

    def count() -> BytesRead:
        units = rearrange(pages, "b h t s -> b h (t s)")
        ends = rearrange((pos + 1).view(1, 1, T, 1).expand_as(pages), "b h t s -> b h (t s)")
        v_rows = rows_read(units, ends, P, L, Hkv)
        if partial:  # the keys an earlier query read to bound its unfinished page (every head: amax dedups)
            extra = torch.tensor(partial, device=q.device).T.reshape(2, 1, 1, -1).expand(2, B, pages.shape[1], -1)
            units, ends = torch.cat([units, extra[0]], -1), torch.cat([ends, extra[1]], -1)
        k_rows = rows_read(units, ends, P, L, Hkv)
        summaries = 2 * B * Hkv * N * D * cache.itemsize
        return BytesRead(k_rows * D * cache.itemsize, v_rows * cache.value_dim * cache.itemsize, summaries)

    return DecodeResult(out, sel, count)


def _per_head_attention(q, cache: KVCache, tokens: torch.Tensor, scale: float) -> torch.Tensor:
    """Each query head over its own rows (B, H, T, K): the rows kernel on CUDA, ``indexed_attention`` elsewhere."""
    if gather.use_rows_kernel(q, cache.k, cache.v, tokens):
        from .rows_kernel import rows_attention_triton

        return rows_attention_triton(q, cache.k, cache.v, tokens, scale)
    return indexed_attention(q, cache.k, cache.v, tokens, scale)


def _use_step_kernels(q: torch.Tensor, cache: KVCache, num_pages: int, picks: int) -> bool:
    """Whether a one-query step takes the bounds, ranking and rows kernels together (``topk_kernel``'s sizes)."""
    if not q.is_cuda:
        return False
    from ..kernels import dispatch
    from . import bounds_kernel, topk_kernel

    return (bounds_kernel.supports(q, cache.page_max, cache.page_min) and dispatch.use_triton(q, cache.k, cache.v)
            and cache.value_dim <= 256 and num_pages <= topk_kernel.MAX_ROW and topk_kernel.supports_k(picks))


def _use_bounds_kernel(qs: torch.Tensor, cache: KVCache) -> bool:
    if not qs.is_cuda:  # checked first: the kernel module imports Triton
        return False
    from . import bounds_kernel

    return bounds_kernel.supports(qs, cache.page_max, cache.page_min)


def _bounds_triton(qs: torch.Tensor, cache: KVCache, *, group_sum: bool = False, scale: float | None = None):
    from .bounds_kernel import page_bounds_triton

    return page_bounds_triton(qs, cache.page_max, cache.page_min, group_sum=group_sum, scale=scale)


def _upper_bounds(qs: torch.Tensor, cache: KVCache) -> torch.Tensor:
    """``page_upper_bounds`` with the group's heads and queries as rows of one product per KV head.

    Broadcasting the bounds over the heads (as the parallel form does) would
    copy them once per head of the group: 16 copies of every page's min and
    max at 64 query over 4 KV heads.
    """
    Hkv, T = cache.num_kv_heads, qs.shape[2]
    qg = rearrange(qs, "b (hk g) t d -> b hk (g t) d", hk=Hkv)
    bounds = qg.clamp(min=0) @ cache.page_max.transpose(-1, -2) + qg.clamp(max=0) @ cache.page_min.transpose(-1, -2)
    return rearrange(bounds, "b hk (g t) n -> b (hk g) t n", t=T)


def _bound_partial_pages(bounds, qs, cache: KVCache, T: int) -> list[tuple[int, int]]:
    """With T > 1, bound each earlier query's unfinished page by its keys up to it (in place on ``bounds``).

    Returns the (page, row after the query) reads this took. The newest query
    (and any query at its page's last key) sees its page whole: the cache's
    bounds are already right for it.
    """
    P, L, Hkv = cache.page_size, cache.length, cache.num_kv_heads
    reads = []
    for t in range(T - 1):
        p = L - T + t
        if (p + 1) % P == 0:
            continue
        page = p // P
        keys = cache.k[:, :, page * P : p + 1]
        lo, hi = keys.amin(dim=2), keys.amax(dim=2)  # (B, Hkv, D)
        qg = rearrange(qs[:, :, t], "b (hk g) d -> b hk g d", hk=Hkv)
        # The same sum as the parallel form's own-page bound, so equal bounds stay equal.
        own = (qg.clamp(min=0) * hi.unsqueeze(2) + qg.clamp(max=0) * lo.unsqueeze(2)).sum(-1)
        bounds[:, :, t, page] = rearrange(own, "b hk g -> b (hk g)")
        reads.append((page, p + 1))
    return reads
