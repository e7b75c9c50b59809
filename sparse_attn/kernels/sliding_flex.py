"""The sliding-window branch on CUDA through PyTorch's FlexAttention.

``sparse_attn.ops.sliding_window_attention`` runs SDPA on query chunks with a
boolean mask: every chunk still scores its whole band of keys and reads a
mask. FlexAttention takes the window as a block mask instead: key tiles
wholly outside every query's window are never visited, tiles wholly inside
skip the mask, and only the tiles the window's edges cross evaluate it. One
compiled kernel per shape (``torch.compile`` of ``flex_attention``), and one
block mask per (Lq, Lk, window, causal, device), both kept for reuse.

Same contract as the reference: causal keys i - window < j <= i, otherwise
|i - j| < window; grouped-query attention; a query with no key in reach gets
zeros (FlexAttention returns 0 for a fully masked row).
"""
from __future__ import annotations

import functools
import threading
import warnings

import torch

from . import dispatch

__all__ = ["flex_available", "sliding_window_flex", "triton_supports"]

# Head dims FlexAttention's generated kernel tiles without padding (and that were run on the GPU).
_HEAD_DIMS = (16, 32, 64, 128, 256)
# Half types only: in float32 (IEEE dot products) the window took 73.6 ms through FlexAttention
# against 28.9 ms for chunked SDPA at L=16384 on an H200 (docs/benchmarks.md).
_DTYPES = (torch.float16, torch.bfloat16)
# Block-mask tile (query and key): FlexAttention's default.
_BLOCK = 128
# Compiled shapes kept before Dynamo gives up compiling (see _flex).
_RECOMPILE_LIMIT = 64

_lock = threading.Lock()
_compiled = None
_failed: set = set()  # shapes whose compile failed once: they stay on the reference path


def flex_available() -> bool:
    try:
        from torch.nn.attention import flex_attention  # noqa: F401
    except ImportError:  # pragma: no cover - only on a torch without FlexAttention
        return False
    return True


def triton_supports(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> bool:
    """True when ``sliding_window_attention`` should run through FlexAttention for these inputs.

    The generic rule (``dispatch.use_triton``: CUDA, no gradient, not forced to the
    reference) for float16 / bfloat16 (``_DTYPES``), FlexAttention importable, and one
    head dim for q, k and v among ``_HEAD_DIMS``.
    """
    D, Dv = q.shape[-1], v.shape[-1]
    return (dispatch.use_triton(q, k, v, dtypes=_DTYPES) and flex_available() and D == Dv and D in _HEAD_DIMS
            and q.shape[2] > 0 and k.shape[2] > 0)


def _window_mod(window: int, causal: bool):
    if causal:
        def mask_mod(b, h, q_idx, kv_idx):
            return (kv_idx <= q_idx) & (q_idx - kv_idx < window)
    else:
        def mask_mod(b, h, q_idx, kv_idx):
            return (q_idx - kv_idx < window) & (kv_idx - q_idx < window)
    return mask_mod


def _window_tiles(Lq: int, Lk: int, window: int, causal: bool, block: int, device):
    """(partial, full) booleans over (query tile, key tile): tiles the window touches, and those it covers whole.

    A tile holds the offsets i - j from block * (m - n) - (block - 1) to block * (m - n) + (block - 1); the
    window allows 0 <= i - j < window (causal) or |i - j| < window. A tile cut by the end of the queries or
    keys is never full, so the mask is evaluated there.
    """
    m = torch.arange(-(-Lq // block), device=device).unsqueeze(-1)
    n = torch.arange(-(-Lk // block), device=device)
    lo, hi = block * (m - n) - (block - 1), block * (m - n) + (block - 1)
    low = 0 if causal else -(window - 1)
    touched = (hi >= low) & (lo <= window - 1)
    whole = (lo >= low) & (hi <= window - 1) & (block * (m + 1) <= Lq) & (block * (n + 1) <= Lk)
    return touched & ~whole, whole


def _ordered(tiles: torch.Tensor):
    """BlockMask's (num_blocks, indices) for a boolean (Q tiles, K tiles): the True columns first, ascending."""
    counts = tiles.sum(-1, dtype=torch.int32)
    order = torch.sort(tiles.to(torch.uint8), dim=-1, descending=True, stable=True).indices.to(torch.int32)
    return counts[None, None].contiguous(), order[None, None].contiguous()


@functools.lru_cache(maxsize=32)
def _block_mask(Lq: int, Lk: int, window: int, causal: bool, device: str):
    """The sliding-window BlockMask, built from its tiles directly (a few (Lq / 128) x (Lk / 128) tensors).

    ``create_block_mask`` would evaluate the mask on the whole (Lq, Lk) grid: 40 GiB at L=65536 on an H200,
    or a 37 s compile with ``_compile=True`` (docs/benchmarks.md). The band needs neither.
    """
    from torch.nn.attention.flex_attention import BlockMask

    partial, whole = _window_tiles(Lq, Lk, window, causal, _BLOCK, device)
    return BlockMask.from_kv_blocks(*_ordered(partial), *_ordered(whole), BLOCK_SIZE=_BLOCK,
                                    mask_mod=_window_mod(window, causal), seq_lengths=(Lq, Lk))


def _flex(compiled: bool):
    """``flex_attention``, compiled once per process (torch.compile keeps one graph per shape)."""
    from torch.nn.attention.flex_attention import flex_attention

    global _compiled
    if not compiled:
        def eager(*args, **kwargs):
            with warnings.catch_warnings():  # the eager path is chosen on purpose (tests on the CPU)
                warnings.filterwarnings("ignore", message="flex_attention called without torch.compile")
                return flex_attention(*args, **kwargs)
        return eager
    with _lock:
        if _compiled is None:
            # Dynamo keeps one graph per shape and, past its recompile limit (8 by default), runs the
            # function eagerly: for FlexAttention that materialises the whole score matrix. A session
            # that tries several lengths, dtypes and windows passes 8 quickly, so allow more.
            cfg = torch._dynamo.config
            for name in ("recompile_limit", "cache_size_limit"):
                if hasattr(cfg, name):
                    setattr(cfg, name, max(getattr(cfg, name), _RECOMPILE_LIMIT))
            _compiled = torch.compile(flex_attention, dynamic=False)
    return _compiled


def sliding_window_flex(q, k, v, sliding_window_size: int, *, causal: bool, scale: float, compiled: bool = True):
    """Sliding-window attention through FlexAttention; same result as the chunked-SDPA reference.

    q (B, H, Lq, D), k (B, Hkv, Lk, D), v (B, Hkv, Lk, D): checked by the caller
    (``sliding_window_attention``). ``compiled=False`` runs FlexAttention's
    eager path (it materialises the scores: small inputs only), which is how
    the mask is tested where there is no GPU. Returns (B, H, Lq, D) in q's dtype,
    or None when the compiled kernel cannot be built for these shapes (a warning
    says why once; the caller then runs its reference).
    """
    Lq, Lk = q.shape[2], k.shape[2]
    key = (tuple(q.shape), tuple(k.shape), q.dtype, sliding_window_size, bool(causal), str(q.device))
    if key in _failed:
        return None
    mask = _block_mask(Lq, Lk, int(sliding_window_size), bool(causal), str(q.device))
    try:
        return _flex(compiled)(q, k, v, block_mask=mask, scale=scale, enable_gqa=q.shape[1] != k.shape[1])
    except Exception as e:  # noqa: BLE001 - a shape the compiler refuses falls back, it does not fail the op
        if not compiled:
            raise
        _failed.add(key)
        warnings.warn(f"FlexAttention failed for {key} ({type(e).__name__}: {str(e).splitlines()[0][:200]}); "
                      "using the chunked SDPA reference", RuntimeWarning, stacklevel=3)
        return None
