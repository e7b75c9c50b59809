"""Exact top-k with one tie rule, computed chunk by chunk, and the streaming merge attention uses.

The tie rule, on every path of the library: among equal values the **lower
index wins**. ``torch.topk`` makes no such promise (which of two equal entries
it returns is left to the implementation), so a chunked or streaming top-k
built on it could pick different keys than one over the whole row. Here the result is always the first ``k`` entries of
``torch.sort(x, descending=largest, stable=True)``: values, indices and order.

The seed's ``batched_topk`` concatenated the per-chunk winners and returned
``num_chunks * k`` values. Chunking is only correct as two stages: every chunk
nominates its own top-k (the global top-k is a subset of the union of those
nominations, under the tie rule too, since it is a total order), then one
final top-k over the candidates picks the answer.

``StreamingTopK`` is the same idea for data that arrives one chunk at a time
(key chunks in attention): it keeps a running top-k and never holds more than
``k + chunk`` values per row.
"""
from __future__ import annotations

from typing import NamedTuple

import torch

from ._checks import check_dim, check_int

__all__ = ["TopK", "stable_topk", "chunked_topk", "merge_topk", "StreamingTopK"]

# Rows up to this long are picked by one stable sort (about as fast as torch.topk there).
_SORT_ROW = 64
# Entries per block when tied rows are searched for the lowest-index ties (bounds nonzero's output).
_TIE_BLOCK = 1 << 22


class TopK(NamedTuple):
    """(values, indices), like ``torch.return_types.topk``."""

    values: torch.Tensor
    indices: torch.Tensor


def _check_x_k(x: object, k: object, dim: object) -> tuple[int, int]:
    if not isinstance(x, torch.Tensor):
        raise TypeError(f"x must be a torch.Tensor, got {type(x).__name__}")
    dim = check_dim(dim, x.dim())
    size = x.shape[dim] if x.dim() > 0 else 1
    if check_int(k, "k", minimum=0) > size:
        raise ValueError(f"k={k} is larger than the size of the selected dimension ({size})")
    return dim, size


def stable_topk(x: torch.Tensor, k: int, dim: int = -1, *, largest: bool = True, sorted: bool = True) -> TopK:
    """``torch.topk`` with the tie rule: among equal values the lower index wins.

    The values are exactly torch's (NaN counts as the largest value, as in
    torch and ``torch.sort``; +-inf and integer dtypes as in torch; 0.0 and
    -0.0 are equal). The indices are those of the first ``k`` entries of
    ``torch.sort(x, dim, descending=largest, stable=True)``.

    Args:
        x: any shape, any dtype ``torch.topk`` accepts; may be non-contiguous.
        k: 0 <= k <= x.size(dim).
        dim: the dimension to select along (negative counts from the end).
        largest: the k largest (True) or smallest.
        sorted: True: best first (descending for ``largest``), equal values in
            ascending index order, i.e. exactly the stable sort's order.
            False: the same entries in ascending index order.

    Returns:
        ``TopK(values, indices)``, ``x``'s shape except ``k`` along ``dim``; indices int64.

    Raises:
        TypeError: ``x`` is not a tensor, or ``k``/``dim`` not ints.
        ValueError: ``k`` < 0 or > x.size(dim), ``dim`` out of range.
    """
    dim, _ = _check_x_k(x, k, dim)
    if x.dim() == 0:  # one entry, nothing can tie
        return TopK(*torch.topk(x, k, dim=0, largest=largest, sorted=sorted))
    vals, idx = _topk_last(x.movedim(dim, -1), k, largest, sorted)
    return TopK(vals.movedim(-1, dim), idx.movedim(-1, dim))


def _topk_last(x: torch.Tensor, k: int, largest: bool, sorted: bool) -> TopK:
    """``stable_topk`` along the last dim, arguments already checked; among equal values the earlier position wins."""
    *lead, n = x.shape
    if k == 0 or k == n or x.numel() == 0:
        # Nothing to choose between: every entry (in index order), or none.
        idx = torch.arange(n, device=x.device)[:k].expand(*lead, k)
        vals = x[..., :k].clone()
        return _canonical(vals, idx, largest) if sorted else TopK(vals, idx.contiguous())
    x = x.reshape(-1, n)  # rows, so that the rows with ties can be picked out
    if n <= _SORT_ROW:
        # Short rows: one stable sort is the rule itself, and as cheap as torch.topk there.
        vals, idx = x.sort(dim=-1, descending=largest, stable=True)
        vals, idx = vals[:, :k], idx[:, :k]
    else:
        # torch.topk's values are exact and sorted; only its choice and order among
        # equal values are not ours. Asked for k + 1, it shows which rows hold equal
        # values at all: every other row has one answer, and torch's is it. A stable
        # sort of every row would cost O(n log n) where torch.topk costs about O(n).
        vals, idx = torch.topk(x, k + 1, dim=-1, largest=largest, sorted=True)
        equal_next = _same(vals[:, 1:], vals[:, :-1])
        fix = equal_next.any(dim=-1).nonzero()[:, 0]
        vals, idx = vals[:, :k].contiguous(), idx[:, :k].contiguous()
        if fix.numel():
            fv, fi = vals[fix], idx[fix]
            # Rows whose k-th value equals the (k+1)-th: entries equal to it were left
            # out, and which ones must be found in the whole row.
            over = equal_next[fix, k - 1].nonzero()[:, 0]
            if over.numel():
                rows = fix[over]
                xs = x if rows.numel() == x.shape[0] else x[rows]  # all rows tied (a periodic pattern): no copy
                fi[over] = _lower_index_ties(xs, fv[over], fi[over], largest)
                fv[over] = xs.gather(-1, fi[over])
            vals[fix], idx[fix] = _canonical(fv, fi, largest)
    if not sorted:
        idx, perm = idx.sort(dim=-1)
        vals = vals.gather(-1, perm)
    return TopK(vals.reshape(*lead, k), idx.reshape(*lead, k))


def _lower_index_ties(x: torch.Tensor, top: torch.Tensor, top_idx: torch.Tensor, largest: bool) -> torch.Tensor:
    """The rule's k positions in rows ``x`` (r, n), given torch's sorted top-k ``top`` and ``top_idx`` (r, k).

    Entries strictly better than the k-th value are forced (torch lists them
    first); the remaining slots take the entries equal to the k-th value with
    the lowest positions.
    """
    r, k = top.shape
    kth = top[:, k - 1 :]
    n_better = _worse(kth, top, largest).sum(dim=-1, keepdim=True)  # (r, 1), < k
    ties = torch.empty(r, k, dtype=torch.long, device=x.device)
    # In blocks of rows: nonzero() lists every tied entry, and a row may be all ties.
    step = max(1, _TIE_BLOCK // x.shape[1])
    for r0 in range(0, r, step):
        t = kth[r0 : r0 + step]
        xs = x[r0 : r0 + step]
        # Only a NaN k-th value needs the NaN test: NaN equals nothing else.
        same = _same(xs, t) if xs.is_floating_point() and bool(t.isnan().any()) else xs == t
        hit = same.nonzero()  # row-major: ascending position within each row
        row, pos = hit[:, 0], hit[:, 1]
        count = torch.bincount(row, minlength=xs.shape[0])
        rank = torch.arange(row.numel(), device=x.device) - (count.cumsum(0) - count)[row]
        room = k - n_better[r0 : r0 + step, 0]
        keep = rank < room[row]
        ties[r0 : r0 + step][row[keep], rank[keep]] = pos[keep]
    slot = torch.arange(k, device=x.device)
    from_ties = slot >= n_better
    return torch.where(from_ties, ties.gather(-1, (slot - n_better).clamp(min=0)), top_idx)


def _same(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """Where ``a`` and ``b`` tie: equal, or both NaN (NaN ties with NaN, as in a stable sort)."""
    same = a == b
    if a.is_floating_point():
        same |= a.isnan() & b.isnan()
    return same


def _worse(a: torch.Tensor, b: torch.Tensor, largest: bool) -> torch.Tensor:
    """Where ``a`` ranks strictly after ``b``: smaller (larger for ``largest=False``), NaN ranking as the largest."""
    worse = (a < b) if largest else (a > b)
    if a.is_floating_point():
        a_nan, b_nan = a.isnan(), b.isnan()
        worse |= (b_nan & ~a_nan) if largest else (a_nan & ~b_nan)
    return worse


def _canonical(vals: torch.Tensor, idx: torch.Tensor, largest: bool) -> TopK:
    """Picks in any order -> the rule's order: best first, equal values in ascending index."""
    idx, perm = idx.sort(dim=-1)
    vals, order = vals.gather(-1, perm).sort(dim=-1, descending=largest, stable=True)
    return TopK(vals, idx.gather(-1, order))


def chunked_topk(
    x: torch.Tensor,
    k: int,
    dim: int = -1,
    *,
    chunk_size: int = 1024,
    largest: bool = True,
    sorted: bool = True,
) -> TopK:
    """The ``k`` largest (or smallest) entries of ``x`` along ``dim``, chunk by chunk.

    The same result as ``stable_topk(x, k, dim, largest=largest, sorted=sorted)``
    for every ``chunk_size``: values, indices and order. The values are
    exactly ``torch.topk``'s (NaN counts as the largest value, as in torch;
    +-inf and integer dtypes behave the same); among equal values the lower
    index wins, so where there are no ties the indices equal torch's.

    Stage 1 takes ``min(k, chunk)`` candidates from every chunk of
    ``chunk_size`` entries; stage 2 takes the top-k of the candidates. Peak
    extra memory is ``rows * num_chunks * k`` instead of torch's workspace over
    the whole row; the point is the streaming form (``StreamingTopK``), which
    attention uses to avoid materialising a full score matrix.

    Args:
        x: any shape, any dtype ``torch.topk`` accepts; may be non-contiguous.
            A 0-d tensor is treated as size 1 along ``dim`` 0, as in torch.
        k: 0 <= k <= x.size(dim).
        dim: the dimension to select along (negative counts from the end).
        chunk_size: entries per chunk, >= 1. A row no longer than one chunk
            is one stage (``stable_topk``).
        largest: as in ``torch.topk``.
        sorted: True: best first, equal values in ascending index order (the
            order of ``torch.sort(x, dim, descending=largest, stable=True)``);
            False: ascending index order.

    Returns:
        ``TopK(values, indices)`` with ``x``'s shape except ``k`` along ``dim``;
        indices are int64.

    Raises:
        TypeError: ``x`` is not a tensor, or ``k``/``dim``/``chunk_size`` not ints.
        ValueError: ``k`` < 0 or > x.size(dim), ``chunk_size`` < 1, ``dim`` out of range.
    """
    dim, size = _check_x_k(x, k, dim)
    chunk_size = check_int(chunk_size, "chunk_size", minimum=1)
    if size <= chunk_size:
        return stable_topk(x, k, dim, largest=largest, sorted=sorted)

    xl = x.movedim(dim, -1)
    cand_values, cand_indices = [], []
    for start in range(0, size, chunk_size):
        chunk = xl[..., start : start + chunk_size]
        v, i = _topk_last(chunk, min(k, chunk.shape[-1]), largest, sorted=True)
        cand_values.append(v)
        cand_indices.append(i + start)
    # Chunks are in order and each one's equal values in ascending index, so among
    # equal candidates the earlier position is the lower index: the positional rule is the rule.
    values = torch.cat(cand_values, dim=-1)
    indices = torch.cat(cand_indices, dim=-1)
    v, pos = _topk_last(values, k, largest, sorted=True)
    idx = indices.gather(-1, pos)
    if not sorted:
        idx, perm = idx.sort(dim=-1)
        v = v.gather(-1, perm)
    return TopK(v.movedim(-1, dim), idx.movedim(-1, dim))


def merge_topk(
    values: torch.Tensor,
    indices: torch.Tensor,
    k: int,
    dim: int = -1,
    *,
    largest: bool = True,
    sorted: bool = True,
) -> TopK:
    """Top-k of candidate ``values`` that carry their own ``indices``; among equal values the lower index wins.

    Candidates are usually the concatenation of a running top-k and a new
    chunk, in any order. ``values`` has at least one dimension; ``indices``
    has its shape (integers, distinct within a row for the rule to decide)
    and is gathered along with the winners; ``k`` (>= 0) is clipped to the
    number of candidates. Order as ``stable_topk``'s, by the carried
    indices: ``sorted`` best first with equal values in ascending index,
    else ascending index.
    """
    if not isinstance(values, torch.Tensor) or not isinstance(indices, torch.Tensor):
        raise TypeError("values and indices must be torch.Tensors, got "
                        f"{type(values).__name__} and {type(indices).__name__}")
    if values.shape != indices.shape:
        raise ValueError(f"indices shape {tuple(indices.shape)} must equal values shape {tuple(values.shape)}")
    if values.dim() == 0:
        raise ValueError("values must have at least one dimension, got a 0-d tensor")
    dim = check_dim(dim, values.dim())
    k = min(check_int(k, "k", minimum=0), values.shape[dim])
    # Sorting by index first makes "lower index" the same as "earlier position".
    idx, perm = indices.movedim(dim, -1).sort(dim=-1)
    vals = values.movedim(dim, -1).gather(-1, perm)
    top, pos = _topk_last(vals, k, largest, sorted)
    return TopK(top.movedim(-1, dim), idx.gather(-1, pos).movedim(-1, dim))


class StreamingTopK:
    """A running top-k along the last dimension over chunks that arrive one at a time.

    ``update(chunk, offset)`` takes a chunk of shape (..., C) whose first entry
    has global index ``offset``; ``result()`` returns ``TopK`` over everything
    seen, shape (..., min(k, seen)). Memory stays at (..., k + C). Among equal
    values the lower index wins, so the result is ``stable_topk`` of the
    chunks laid out at their indices, whatever the chunk sizes.

    >>> acc = StreamingTopK(k=2)
    >>> acc.update(torch.tensor([[1., 5., 5.]]), offset=0)
    >>> acc.update(torch.tensor([[5., 0.]]), offset=3)
    >>> acc.result().indices.tolist()
    [[1, 2]]
    """

    def __init__(self, k: int, *, largest: bool = True):
        self.k = check_int(k, "k", minimum=0)
        self.largest = largest
        # The running pick. Kept so that among equal values the earlier position holds
        # the lower index: appending a later chunk then keeps that true.
        self.values: torch.Tensor | None = None
        self.indices: torch.Tensor | None = None
        self._end = 0  # every index seen so far is below this (None: unknown, after caller-given indices)

    def update(self, chunk: torch.Tensor, offset: int, indices: torch.Tensor | None = None) -> None:
        """Merge a chunk of candidates; ``indices`` defaults to ``offset + arange(C)``."""
        if indices is not None:
            self._end = None
            if self.values is not None:
                chunk = torch.cat([self.values, chunk], dim=-1)
                indices = torch.cat([self.indices, indices], dim=-1)
            self.values, self.indices = merge_topk(chunk, indices, self.k, largest=self.largest)
            return
        in_order = self._end is not None and offset >= self._end
        if self._end is not None:
            self._end = max(self._end, offset + chunk.shape[-1])
        if chunk.shape[-1] > self.k:
            # Reduce the chunk to its own top-k first: the merge then sees 2k
            # candidates, not k + C, and no (..., C) index tensor is built.
            chunk, indices = _topk_last(chunk, self.k, self.largest, sorted=True)
            indices = indices + offset
        else:
            indices = torch.arange(offset, offset + chunk.shape[-1], device=chunk.device).expand_as(chunk)
        if self.values is None:
            self.values, self.indices = chunk.clone(), indices.contiguous()
        elif in_order:
            # Every earlier index is below offset: in [running, chunk] equal values
            # keep ascending index by position, so the positional rule is the index rule.
            vals = torch.cat([self.values, chunk], dim=-1)
            idx = torch.cat([self.indices, indices], dim=-1)
            top, pos = _topk_last(vals, min(self.k, vals.shape[-1]), self.largest, sorted=True)
            self.values, self.indices = top, idx.gather(-1, pos)
        else:
            self.values, self.indices = merge_topk(torch.cat([self.values, chunk], dim=-1),
                                                   torch.cat([self.indices, indices], dim=-1),
                                                   self.k, largest=self.largest)

    def result(self, sorted: bool = True) -> TopK:
        """``TopK`` of everything seen: ``sorted`` best first, equal values in ascending index; else ascending index."""
        if self.values is None:
            raise ValueError("StreamingTopK.result() called before any update()")
        if sorted:
            # Equal values already sit in ascending index, so a stable sort by value finishes the order.
            vals, order = self.values.sort(dim=-1, descending=self.largest, stable=True)
            return TopK(vals, self.indices.gather(-1, order))
        idx, perm = self.indices.sort(dim=-1)
        return TopK(self.values.gather(-1, perm), idx)
