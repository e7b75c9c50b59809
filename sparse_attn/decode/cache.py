"""A KV cache that grows by append, and keeps the summaries sparse decoding reads instead of the keys.

Generation writes one token (or a few) at a time. Two methods need more than
the raw rows, and both summaries can be kept up to date as tokens arrive,
without ever re-reading the whole cache:

- NSA's compressed keys and values: block c pools tokens
  [c * stride, c * stride + compress_block_size); it is emitted the moment its
  last token is written, with the same pooling as the parallel
  ``sparse_attn.ops.nsa.compress_kv`` (so decoding matches the parallel forward).
- Quest's page bounds: the elementwise min and max of the keys of each page of
  ``page_size`` tokens; the newest page's bounds cover the keys written so far.

Storage is preallocated at ``capacity`` (an append never reallocates, as a
serving engine's cache does not); ``keys`` and ``values`` are views of the
filled part. Decoders gather picked rows from the storage itself (``k``,
``v``: contiguous), never from those views: flattening a view shorter than
its storage for a gather would copy the whole cache.
"""
from __future__ import annotations

import math

import torch

from .._checks import FLOAT_DTYPES, check_int
from ..ops.nsa.compression import compress_kv, num_compressed_blocks
from ..ops.quest import page_min_max

__all__ = ["KVCache", "COMPRESSED_ROW_ALIGN"]

COMPRESSED_ROW_ALIGN = 16  # compressed rows stored per multiple of this: 32 bytes of bf16 scores per row step


class KVCache:
    """Keys (B, Hkv, capacity, D) and values (B, Hkv, capacity, Dv), filled from the start by ``append``.

    Args:
        batch_size, num_kv_heads, capacity, head_dim: sizes, each >= 1.
        value_dim: Dv, default ``head_dim``.
        dtype: one of float16, bfloat16, float32, float64. device: any torch device.
        compress_block_size: keep NSA's compressed keys/values (blocks of this
            many tokens); None keeps none (``nsa_decode`` then refuses the cache).
        compress_block_sliding_stride: tokens between compressed blocks, in
            [1, compress_block_size]; default compress_block_size.
        page_size: keep Quest's per-page key min/max (pages of this many
            tokens, >= 1); None keeps none.

    Compressed rows are pooled in float32 for half dtypes and stored in the
    cache's dtype, as the parallel forward's fused GPU kernel pools them
    (its CPU reference keeps the float32 pool: half-precision results may
    differ by that rounding; float32 and float64 match).
    """

    def __init__(self, batch_size: int, num_kv_heads: int, capacity: int, head_dim: int, *,
                 value_dim: int | None = None, dtype: torch.dtype = torch.float32, device="cpu",
                 compress_block_size: int | None = None, compress_block_sliding_stride: int | None = None,
                 page_size: int | None = None) -> None:
        B = check_int(batch_size, "batch_size", minimum=1)
        Hkv = check_int(num_kv_heads, "num_kv_heads", minimum=1)
        cap = check_int(capacity, "capacity", minimum=1)
        D = check_int(head_dim, "head_dim", minimum=1)
        Dv = D if value_dim is None else check_int(value_dim, "value_dim", minimum=1)
        if dtype not in FLOAT_DTYPES:
            raise TypeError(f"dtype must be one of {FLOAT_DTYPES}, got {dtype}")
        self.device = torch.device(device)
        self.dtype = dtype
        self.capacity = cap
        self.length = 0
        self.read_only = False
        self.k = torch.zeros(B, Hkv, cap, D, dtype=dtype, device=self.device)
        self.v = torch.zeros(B, Hkv, cap, Dv, dtype=dtype, device=self.device)
        # The device as tensors report it: "cuda" becomes "cuda:0", so the device checks compare like with like.
        self.device = self.k.device

        self.compress_block_size = check_int(compress_block_size, "compress_block_size", minimum=1, allow_none=True)
        self.compress_block_sliding_stride = None
        self._ck = self._cv = None
        self.num_compressed = 0
        if compress_block_size is not None:
            stride = compress_block_size if compress_block_sliding_stride is None else compress_block_sliding_stride
            check_int(stride, "compress_block_sliding_stride", minimum=1, maximum=compress_block_size)
            self.compress_block_sliding_stride = stride
            # Rows padded to a multiple of COMPRESSED_ROW_ALIGN, zeros until written: NSA's products over the
            # compressed rows then run on aligned widths (at 64k, 4095 blocks made cuBLAS take a kernel several
            # times slower than its bandwidth; decode.nsa masks the padding).
            n = num_compressed_blocks(cap, compress_block_size, stride)
            n_pad = -(-n // COMPRESSED_ROW_ALIGN) * COMPRESSED_ROW_ALIGN
            self._ck = torch.zeros(B, Hkv, n_pad, D, dtype=dtype, device=self.device)
            self._cv = torch.zeros(B, Hkv, n_pad, Dv, dtype=dtype, device=self.device)
        elif compress_block_sliding_stride is not None:
            raise ValueError("compress_block_sliding_stride needs compress_block_size (the cache keeps no "
                             "compressed blocks without it)")

        self.page_size = check_int(page_size, "page_size", minimum=1, allow_none=True)
        self._pmin = self._pmax = None
        if page_size is not None:
            pages = math.ceil(cap / page_size)
            # +-inf never wins a min or a max: a page's bounds are its written keys' only.
            self._pmin = torch.full((B, Hkv, pages, D), float("inf"), dtype=dtype, device=self.device)
            self._pmax = torch.full((B, Hkv, pages, D), float("-inf"), dtype=dtype, device=self.device)

    # ---- sizes and views -------------------------------------------------------------------

    @property
    def batch_size(self) -> int:
        return self.k.shape[0]

    @property
    def num_kv_heads(self) -> int:
        return self.k.shape[1]

    @property
    def head_dim(self) -> int:
        return self.k.shape[-1]

    @property
    def value_dim(self) -> int:
        return self.v.shape[-1]

    @property
    def itemsize(self) -> int:
        return self.k.element_size()

    @property
    def keys(self) -> torch.Tensor:
        """(B, Hkv, length, D): the keys written so far (a view)."""
        return self.k[:, :, : self.length]

    @property
    def values(self) -> torch.Tensor:
        """(B, Hkv, length, Dv): the values written so far (a view)."""
        return self.v[:, :, : self.length]

    def _need_compressed(self) -> None:
        if self._ck is None:
            raise ValueError("compress_block_size: this cache keeps no compressed blocks; build it with "
                             "compress_block_size (and compress_block_sliding_stride) for NSA")

    @property
    def compressed_keys(self) -> torch.Tensor:
        """(B, Hkv, Nc, D): one pooled key per whole compressed block written so far."""
        self._need_compressed()
        return self._ck[:, :, : self.num_compressed]

    @property
    def compressed_values(self) -> torch.Tensor:
        self._need_compressed()
        return self._cv[:, :, : self.num_compressed]

    @property
    def num_pages(self) -> int:
        """Pages holding at least one key (the last may be partly filled); 0 without page bounds."""
        return 0 if self.page_size is None else math.ceil(self.length / self.page_size)

    def _need_pages(self) -> None:
        if self._pmin is None:
            raise ValueError("page_size: this cache keeps no page bounds; build it with page_size >= 1 for Quest")

    @property
    def page_min(self) -> torch.Tensor:
        """(B, Hkv, num_pages, D): elementwise min of each page's keys written so far."""
        self._need_pages()
        return self._pmin[:, :, : self.num_pages]

    @property
    def page_max(self) -> torch.Tensor:
        self._need_pages()
        return self._pmax[:, :, : self.num_pages]

    # ---- writing ---------------------------------------------------------------------------

    def append(self, k: torch.Tensor, v: torch.Tensor) -> "KVCache":
        """Write n new tokens, k (B, Hkv, n, D) and v (B, Hkv, n, Dv), after the ones there; returns self.

        Compressed blocks whose last token is among the new ones are emitted,
        and the bounds of the pages the new tokens fall in are updated.
        """
        if self.read_only:
            raise ValueError("this cache is a read-only prefix view (KVCache.prefix): append to the cache it views")
        for name, t, last in (("k", k, self.head_dim), ("v", v, self.value_dim)):
            if not isinstance(t, torch.Tensor):
                raise TypeError(f"{name} must be a torch.Tensor, got {type(t).__name__}")
            if t.device != self.device:
                raise ValueError(f"{name} is on {t.device}, the cache on {self.device}: append tensors on the cache's "
                                 f"device")
            if t.dtype != self.dtype:
                raise TypeError(f"{name} has dtype {t.dtype}, the cache {self.dtype}: append the cache's dtype")
            want = (self.batch_size, self.num_kv_heads, "n", last)
            if t.dim() != 4 or tuple(t.shape[:2]) != want[:2] or t.shape[-1] != last:
                raise ValueError(f"{name} must be (B, Hkv, n, {'D' if name == 'k' else 'Dv'}) = {want}, "
                                 f"got {tuple(t.shape)}")
        n = k.shape[2]
        if v.shape[2] != n:
            raise ValueError(f"k and v must hold the same number of new tokens, got {n} and {v.shape[2]}")
        if self.length + n > self.capacity:
            raise ValueError(f"capacity: appending {n} token(s) to a cache holding {self.length} of its capacity "
                             f"{self.capacity} would overflow it (allowed: at most {self.capacity - self.length})")
        if n == 0:
            return self
        old, new = self.length, self.length + n
        self.k[:, :, old:new] = k
        self.v[:, :, old:new] = v
        self.length = new
        self._emit_compressed()
        self._update_pages(old)
        return self

    def _emit_compressed(self) -> None:
        if self._ck is None:
            return
        bs, stride = self.compress_block_size, self.compress_block_sliding_stride
        done = num_compressed_blocks(self.length, bs, stride)
        first = self.num_compressed
        if done == first:
            return
        # The tokens of blocks first .. done-1 only: compress_kv on them gives exactly those blocks.
        span = slice(first * stride, (done - 1) * stride + bs)
        pool = torch.promote_types(self.dtype, torch.float32)
        self._ck[:, :, first:done] = compress_kv(self.k[:, :, span].to(pool), bs, stride).to(self.dtype)
        self._cv[:, :, first:done] = compress_kv(self.v[:, :, span].to(pool), bs, stride).to(self.dtype)
        self.num_compressed = done

    def _update_pages(self, old: int) -> None:
        if self._pmin is None:
            return
        P = self.page_size
        p0 = old // P
        # Min and max are exact: recomputing the touched pages from their keys equals any running update.
        lo, hi = page_min_max(self.k[:, :, p0 * P : self.length], P)
        self._pmin[:, :, p0 : p0 + lo.shape[2]] = lo
        self._pmax[:, :, p0 : p0 + hi.shape[2]] = hi

    # ---- building ----------------------------------------------------------------------------

    @classmethod
    def from_tensors(cls, k: torch.Tensor, v: torch.Tensor, *, capacity: int | None = None, **options) -> "KVCache":
        """A cache holding k (B, Hkv, L, D) and v (B, Hkv, L, Dv), with room for ``capacity`` (default L) tokens."""
        if not isinstance(k, torch.Tensor) or k.dim() != 4:
            raise ValueError(f"k must be a 4-d tensor (B, Hkv, L, D), got {getattr(k, 'shape', type(k).__name__)}")
        if not isinstance(v, torch.Tensor) or v.dim() != 4:
            raise ValueError(f"v must be a 4-d tensor (B, Hkv, L, Dv), got {getattr(v, 'shape', type(v).__name__)}")
        B, Hkv, L, D = k.shape
        cache = cls(B, Hkv, max(1, L) if capacity is None else capacity, D, value_dim=v.shape[-1], dtype=k.dtype,
                    device=k.device, **options)
        return cache.append(k, v)

    @classmethod
    def for_config(cls, cfg, batch_size: int, num_kv_heads: int, capacity: int, head_dim: int, **options) -> "KVCache":
        """A cache that keeps what every decoder reads under ``cfg`` (a ``sparse_attn.methods.Config``)."""
        return cls(batch_size, num_kv_heads, capacity, head_dim, compress_block_size=cfg.compress_block_size,
                   compress_block_sliding_stride=cfg.compress_block_sliding_stride, page_size=cfg.page_size,
                   **options)

    def prefix(self, length: int) -> "KVCache":
        """A read-only view of the first ``length`` tokens, sharing storage (decode at many lengths from one fill)."""
        check_int(length, "length", minimum=1, maximum=self.length)
        view = object.__new__(KVCache)
        view.__dict__.update(self.__dict__)
        view.length, view.read_only = length, True
        if self._ck is not None:
            view.num_compressed = num_compressed_blocks(length, self.compress_block_size,
                                                        self.compress_block_sliding_stride)
        if self._pmin is not None and length % self.page_size:
            # The shared last page's bounds cover keys past ``length``: this view gets its own.
            p = length // self.page_size
            lo, hi = page_min_max(self.k[:, :, p * self.page_size : length], self.page_size)
            view._pmin, view._pmax = self._pmin[:, :, : p + 1].clone(), self._pmax[:, :, : p + 1].clone()
            view._pmin[:, :, p:], view._pmax[:, :, p:] = lo, hi
        return view

    def __repr__(self) -> str:
        extras = []
        if self.compress_block_size is not None:
            extras.append(f"compress_block_size={self.compress_block_size}, "
                          f"stride={self.compress_block_sliding_stride}")
        if self.page_size is not None:
            extras.append(f"page_size={self.page_size}")
        return (f"KVCache(B={self.batch_size}, Hkv={self.num_kv_heads}, length={self.length}/{self.capacity}, "
                f"D={self.head_dim}, Dv={self.value_dim}, {self.dtype}, {self.device}"
                + "".join(", " + e for e in extras) + ")")
