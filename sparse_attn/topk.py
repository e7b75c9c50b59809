"""Exact top-k computed chunk by chunk, and the streaming merge attention uses.

The seed's ``batched_topk`` concatenated the per-chunk winners and returned
``num_chunks * k`` values. Chunking is only correct as two stages: every chunk
nominates its own top-k (the global top-k is a subset of the union of those
nominations), then one final top-k over the candidates picks the answer.

``StreamingTopK`` is the same idea for data that arrives one chunk at a time
(key chunks in attention): it keeps a running top-k and never holds more than
``k + chunk`` values per row.
"""
from __future__ import annotations

from typing import NamedTuple

import torch

from ._checks import check_dim, check_int

__all__ = ["TopK", "chunked_topk", "merge_topk", "StreamingTopK"]


class TopK(NamedTuple):
    """(values, indices), like ``torch.return_types.topk``."""

    values: torch.Tensor
    indices: torch.Tensor


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

    A drop-in for ``torch.topk(x, k, dim, largest, sorted)``: the values are
    exactly torch's (NaN counts as the largest value, as in torch; ties, +-inf
    and integer dtypes behave the same), and the indices are distinct, in range
    and point at those values; where there are no ties they equal torch's.

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
            is handed to ``torch.topk`` directly.
        largest, sorted: as in ``torch.topk``. With ``sorted=False`` the order
            of the result is unspecified (as in torch).

    Returns:
        ``TopK(values, indices)`` with ``x``'s shape except ``k`` along ``dim``;
        indices are int64.

    Raises:
        TypeError: ``x`` is not a tensor, or ``k``/``dim``/``chunk_size`` not ints.
        ValueError: ``k`` < 0 or > x.size(dim), ``chunk_size`` < 1, ``dim`` out of range.
    """
    if not isinstance(x, torch.Tensor):
        raise TypeError(f"x must be a torch.Tensor, got {type(x).__name__}")
    dim = check_dim(dim, x.dim())
    size = x.shape[dim] if x.dim() > 0 else 1
    if check_int(k, "k", minimum=0) > size:
        raise ValueError(f"k={k} is larger than the size of the selected dimension ({size})")
    chunk_size = check_int(chunk_size, "chunk_size", minimum=1)
    if size <= chunk_size:
        return TopK(*torch.topk(x, k, dim=dim, largest=largest, sorted=sorted))

    cand_values, cand_indices = [], []
    for start in range(0, size, chunk_size):
        chunk = x.narrow(dim, start, min(chunk_size, size - start))
        v, i = torch.topk(chunk, min(k, chunk.shape[dim]), dim=dim, largest=largest, sorted=False)
        cand_values.append(v)
        cand_indices.append(i + start)
    values = torch.cat(cand_values, dim=dim)
    indices = torch.cat(cand_indices, dim=dim)
    return merge_topk(values, indices, k, dim=dim, largest=largest, sorted=sorted)


def merge_topk(
    values: torch.Tensor,
    indices: torch.Tensor,
    k: int,
    dim: int = -1,
    *,
    largest: bool = True,
    sorted: bool = True,
) -> TopK:
    """Top-k of candidate ``values`` that carry their own ``indices``.

    Candidates are usually the concatenation of a running top-k and a new
    chunk. ``indices`` has ``values``' shape and is gathered along with the
    winners; ``k`` is clipped to the number of candidates.
    """
    if values.shape != indices.shape:
        raise ValueError(f"indices shape {tuple(indices.shape)} must equal values shape {tuple(values.shape)}")
    k = min(k, values.shape[dim])
    top, pos = torch.topk(values, k, dim=dim, largest=largest, sorted=sorted)
    return TopK(top, torch.gather(indices, dim, pos))


class StreamingTopK:
    """A running top-k along the last dimension over chunks that arrive one at a time.

    ``update(chunk, offset)`` takes a chunk of shape (..., C) whose first entry
    has global index ``offset``; ``result()`` returns ``TopK`` over everything
    seen, shape (..., min(k, seen)). Memory stays at (..., k + C).

    >>> acc = StreamingTopK(k=2)
    >>> acc.update(torch.tensor([[1., 5., 2.]]), offset=0)
    >>> acc.update(torch.tensor([[4., 0.]]), offset=3)
    >>> acc.result().indices.tolist()
    [[1, 3]]
    """

    def __init__(self, k: int, *, largest: bool = True):
        self.k = check_int(k, "k", minimum=0)
        self.largest = largest
        self.values: torch.Tensor | None = None
        self.indices: torch.Tensor | None = None

    def update(self, chunk: torch.Tensor, offset: int, indices: torch.Tensor | None = None) -> None:
        """Merge a chunk of candidates; ``indices`` defaults to ``offset + arange(C)``."""
        if indices is None:
            if chunk.shape[-1] > self.k:
                # Reduce the chunk to its own top-k first: the merge then sorts
                # 2k candidates, not k + C, and no (..., C) index tensor is built.
                chunk, indices = torch.topk(chunk, self.k, dim=-1, largest=self.largest, sorted=False)
                indices = indices + offset
            else:
                idx = torch.arange(offset, offset + chunk.shape[-1], device=chunk.device)
                indices = idx.expand_as(chunk)
        if self.values is not None:
            chunk = torch.cat([self.values, chunk], dim=-1)
            indices = torch.cat([self.indices, indices], dim=-1)
        # sorted=False: the order only matters once, in result().
        self.values, self.indices = merge_topk(chunk, indices, self.k, largest=self.largest, sorted=False)

    def result(self, sorted: bool = True) -> TopK:
        if self.values is None:
            raise ValueError("StreamingTopK.result() called before any update()")
        if not sorted:
            return TopK(self.values, self.indices)
        return merge_topk(self.values, self.indices, self.k, largest=self.largest, sorted=True)
