"""What a decode step returns (output, selection, bytes of K and V read), the query check, and the row counting.

Decoding is memory-bound: one new query does two multiply-adds per key and
element it reads, so the step's time is set by the bytes it pulls from
memory. Every decoder therefore reports what it read, counted from what it
actually selected. Rows are counted once per (sequence, KV head): the query
heads of a group and the few queries of a step share one read of a row, as a
kernel that serves a KV group together reads it (the least traffic the
selection allows; separate per-head gathers may hit the cache for repeats).
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field
from functools import cached_property
from typing import Callable, NamedTuple

import torch
from einops import rearrange

from .cache import KVCache

__all__ = ["BytesRead", "DecodeSelection", "DecodeResult", "Lazy", "LazyExtras", "check_query", "query_positions",
           "rows_read"]


class BytesRead(NamedTuple):
    """Bytes one step read from memory, over the whole batch.

    keys / values: rows of the cache's K and V; summaries: NSA's compressed
    keys and values, or Quest's page min and max.
    """

    keys: int
    values: int
    summaries: int = 0

    @property
    def total(self) -> int:
        return self.keys + self.values + self.summaries


@dataclass(frozen=True)
class DecodeSelection:
    """What a step read in full, per query: units of ``unit`` tokens (keys, pages or blocks).

    kind: "all" (dense: every key up to the query), "keys" (top-k,
        StreamingLLM), "pages" (Quest) or "blocks" (NSA's selected blocks).
    indices: (B, Hs, T, S) int64 unit numbers, -1 in empty slots; Hs is H
        (one selection per query head), Hkv (shared by a KV group) or 1 (the
        same for every head and sequence). None for "all".
    unit: tokens per index (1, page_size or selection_block_size).
    positions: (T,) the queries' positions in the cache.
    length: the cache length the step saw.
    window: NSA's sliding window; keys i - window < j <= i are read in full too.
    weights: (B, H, T, S) attention weights on ``indices`` where the method has one softmax over them (top-k).
    """

    kind: str
    indices: torch.Tensor | None
    unit: int
    positions: torch.Tensor
    length: int
    window: int = 0
    weights: torch.Tensor | None = None

    def token_mask(self) -> torch.Tensor:
        """Boolean (B or 1, Hs or 1, T, length): the keys each query attended to in full (O(T * length))."""
        j = torch.arange(self.length, device=self.positions.device)
        pos = self.positions.view(-1, 1)
        seen = j <= pos  # (T, length)
        if self.kind == "all":
            return seen[None, None]
        idx = self.indices
        unit_of_key = j // self.unit
        hit = torch.zeros(*idx.shape[:3], math.ceil(self.length / self.unit) + 1, dtype=torch.bool, device=j.device)
        hit.scatter_(-1, idx.masked_fill(idx < 0, hit.shape[-1] - 1), True)
        mask = hit[..., :-1][..., unit_of_key] & seen
        if self.window:
            mask |= (seen & (j > pos - self.window))[None, None]
        return mask


class Lazy:
    """A value of ``LazyExtras`` made by ``make()`` on first read (once)."""

    __slots__ = ("make",)

    def __init__(self, make: Callable[[], object]) -> None:
        self.make = make


class LazyExtras(dict):
    """A dict whose ``Lazy`` values are made when first read, then kept.

    NSA's per-head compressed weights are (B, H, T, Nc) float32: 33 MB a step
    at B=32, 64k. A picture reads them; a timed step should not write them.
    """

    def __getitem__(self, key):
        value = super().__getitem__(key)
        if isinstance(value, Lazy):
            value = value.make()
            super().__setitem__(key, value)
        return value

    def get(self, key, default=None):
        return self[key] if key in self else default

    def values(self):
        return [self[k] for k in self]

    def items(self):
        return [(k, self[k]) for k in self]


@dataclass
class DecodeResult:
    """A step's output (B, H, T, Dv), its ``DecodeSelection`` and, counted on first access, its ``BytesRead``.

    ``extras``: what only one method has (NSA: ``compressed_weights``
    (B, H, T, Nc), ``importance`` (B, Hkv, T, Nsel), ``gates``).
    """

    output: torch.Tensor
    selection: DecodeSelection
    count_bytes: Callable[[], BytesRead] = field(repr=False)
    extras: dict = field(default_factory=dict)

    @cached_property
    def bytes_read(self) -> BytesRead:
        # Counted lazily: a timed step should not pay for its own accounting (nor sync a GPU for it).
        return self.count_bytes()


def check_query(q: object, cache: object) -> tuple[int, int, int, int]:
    """Validate a query block against the cache; return (B, H, T, D).

    q is (B, H, T, D), T >= 1 new queries whose keys and values the cache
    already holds (append first, then decode), H a multiple of the cache's
    Hkv, on the cache's device and in its dtype.
    """
    if not isinstance(cache, KVCache):
        raise TypeError(f"cache must be a KVCache, got {type(cache).__name__}")
    if not isinstance(q, torch.Tensor):
        raise TypeError(f"q must be a torch.Tensor, got {type(q).__name__}")
    if q.dim() != 4:
        raise ValueError(f"q must be 4-d (B, H, T, D), got shape {tuple(q.shape)}")
    if q.device != cache.device:
        raise ValueError(f"q is on {q.device}, the cache on {cache.device}: q must be on the cache's device")
    if q.dtype != cache.dtype:
        raise TypeError(f"q has dtype {q.dtype}, the cache {cache.dtype}: they must share a dtype")
    B, H, T, D = q.shape
    if D != cache.head_dim:
        raise ValueError(f"q's head dim ({D}) must equal the cache's head_dim ({cache.head_dim})")
    if B != cache.batch_size:
        raise ValueError(f"q's batch size ({B}) must equal the cache's ({cache.batch_size})")
    if H % cache.num_kv_heads:
        raise ValueError(f"q's heads ({H}) must be a multiple of the cache's KV heads ({cache.num_kv_heads})")
    if not 1 <= T <= cache.length:
        raise ValueError(f"q holds {T} queries and the cache {cache.length} tokens: T must be in 1..{cache.length} "
                         "(append the new tokens' keys and values, then decode their queries)")
    return B, H, T, D


def query_positions(T: int, cache: KVCache) -> torch.Tensor:
    """(T,) positions of the step's queries: the last T tokens of the cache."""
    return torch.arange(cache.length - T, cache.length, device=cache.device)


def rows_read(units: torch.Tensor, ends: torch.Tensor, unit: int, length: int, num_kv_heads: int) -> int:
    """Distinct cache rows that reads cover, summed over sequences and KV heads.

    units: (B', Hs, M) int64 unit numbers (-1: no read); ends: the same shape,
    the row after the last one each read reaches (a causal query stops at
    itself). A read of unit u covers rows [u * unit, end). Hs is a multiple of
    ``num_kv_heads`` (query heads fold into their group) or 1 (one read that
    every KV head makes: counted for each). B' is B, or 1 for a read every
    sequence makes (multiply by B yourself).
    """
    Bp, Hs, M = units.shape
    n_units = math.ceil(length / unit)
    groups = 1 if Hs == 1 else num_kv_heads
    u = rearrange(units, "b (hk g) m -> b hk (g m)", hk=groups)
    e = rearrange(ends, "b (hk g) m -> b hk (g m)", hk=groups)
    valid = u >= 0
    e = torch.minimum(e, ((u + 1) * unit).clamp(max=length))  # a read never passes its unit or the cache
    # The extra column n_units soaks up the empty slots.
    reach = torch.zeros(Bp, groups, n_units + 1, dtype=torch.long, device=units.device)
    reach.scatter_reduce_(-1, u.masked_fill(~valid, n_units), e.masked_fill(~valid, 0), "amax")
    start = torch.arange(n_units, device=units.device) * unit
    rows = int((reach[..., :n_units] - start).clamp(min=0).sum())
    return rows * (num_kv_heads if groups == 1 else 1)
