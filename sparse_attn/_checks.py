"""Argument checks shared by the whole library: the one place input is validated.

Bad input must fail here, with the argument's name and what is allowed, and
never as a shape error from deep inside torch. ``CodedError`` is the error a
user interface can translate: a ``code`` naming the message and the
``params`` that fill it (the English ``str()`` is for logs and notebooks).
"""
from __future__ import annotations

import math
from typing import Any, Sequence

import torch

# The floating dtypes q, k and v may have anywhere in the library (kernels take fewer: kernels/dispatch.py).
FLOAT_DTYPES = (torch.float16, torch.bfloat16, torch.float32, torch.float64)

__all__ = ["FLOAT_DTYPES", "CodedError", "check_int", "check_number", "check_choice", "check_dim", "check_generator", "check_block_indices", "check_qkv", "resolve_scale"]


class CodedError(ValueError):
    """A ValueError a user interface can explain: ``code`` names a message, ``params`` fill it."""

    def __init__(self, code: str, message: str, **params: Any) -> None:
        super().__init__(message)
        self.code = code
        self.params = params


def check_int(value: object, name: str, *, minimum: int | None = None, maximum: int | None = None,
              allow_none: bool = False) -> int | None:
    """``value`` itself when it is an int (not a bool) in [minimum, maximum]; else TypeError / ValueError naming ``name``."""
    if value is None and allow_none:
        return None
    if isinstance(value, bool) or not isinstance(value, int):
        raise TypeError(f"{name} must be an int, got {type(value).__name__}")
    if minimum is not None and value < minimum:
        raise ValueError(f"{name} must be >= {minimum}, got {value}")
    if maximum is not None and value > maximum:
        raise ValueError(f"{name} must be <= {maximum}, got {value}")
    return value


def check_number(value: object, name: str, *, positive: bool = False) -> float:
    """``value`` as a float when it is a finite real number (not a bool), > 0 when ``positive``."""
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise TypeError(f"{name} must be a number, got {type(value).__name__}")
    if not math.isfinite(value) or (positive and value <= 0):
        raise ValueError(f"{name} must be a finite number{' > 0' if positive else ''}, got {value}")
    return float(value)


def check_choice(value: object, name: str, allowed: Sequence[object]) -> Any:
    """``value`` when it is one of ``allowed``; else a ValueError that lists them."""
    if not isinstance(value, type(allowed[0])) or value not in allowed:
        raise ValueError(f"{name} must be one of {tuple(allowed)}, got {value!r}")
    return value


def check_dim(dim: object, ndim: int) -> int:
    """``dim`` as a non-negative index into a tensor of ``ndim`` dims (a 0-d tensor has one, as in torch)."""
    if isinstance(dim, bool) or not isinstance(dim, int):
        raise TypeError(f"dim must be an int, got {type(dim).__name__}")
    lo, hi = -max(ndim, 1), max(ndim, 1) - 1
    if not lo <= dim <= hi:
        raise ValueError(f"dim={dim} is out of range for a {ndim}-d tensor (allowed {lo}..{hi})")
    return dim % max(ndim, 1)


def check_generator(generator: object, device: torch.device) -> None:
    """None, or a ``torch.Generator`` on ``device`` (draws on another device would fail deep inside torch)."""
    if generator is None:
        return
    if not isinstance(generator, torch.Generator):
        raise TypeError(f"generator must be a torch.Generator or None, got {type(generator).__name__}")
    gdev = torch.device(generator.device)
    if gdev.type != device.type or (gdev.index is not None and device.index is not None and gdev.index != device.index):
        raise ValueError(f"generator must be on q's device ({device}), got a generator on {gdev}")


def check_qkv(q: object, k: object, v: object) -> tuple[int, int, int, int, int, int, int]:
    """Validate SDPA-style shapes; return (B, H, Hkv, Lq, Lk, D, Dv).

    q is (B, H, Lq, D); k is (B, Hkv, Lk, D); v is (B, Hkv, Lk, Dv); H must be
    a multiple of Hkv (grouped-query attention). All three share a device and
    a floating dtype.
    """
    for name, t in (("q", q), ("k", k), ("v", v)):
        if not isinstance(t, torch.Tensor):
            raise TypeError(f"{name} must be a torch.Tensor, got {type(t).__name__}")
        if t.dim() != 4:
            raise ValueError(f"{name} must be 4-d (B, H, L, D), got shape {tuple(t.shape)}")
        if not t.is_floating_point():
            raise TypeError(f"{name} must have a floating dtype, got {t.dtype}")
    if not (q.dtype == k.dtype == v.dtype):
        raise TypeError(f"q, k and v must share a dtype, got {q.dtype}, {k.dtype}, {v.dtype}")
    if not (q.device == k.device == v.device):
        raise ValueError(f"q, k and v must be on one device, got {q.device}, {k.device}, {v.device}")
    B, H, Lq, D = q.shape
    Bk, Hkv, Lk, Dk = k.shape
    Bv, Hv, Lv, Dv = v.shape
    if not (B == Bk == Bv):
        raise ValueError(f"batch sizes differ: q {B}, k {Bk}, v {Bv}")
    if Hkv != Hv:
        raise ValueError(f"k and v must have the same number of heads, got {Hkv} and {Hv}")
    if Hkv == 0 or H % Hkv:
        raise ValueError(f"q's heads ({H}) must be a multiple of k/v's heads ({Hkv})")
    if Lk != Lv:
        raise ValueError(f"k and v must have the same length, got {Lk} and {Lv}")
    if D != Dk:
        raise ValueError(f"q and k must have the same head dim, got {D} and {Dk}")
    return B, H, Hkv, Lq, Lk, D, Dv


def check_block_indices(block_indices: object, B: int, H: int, Hkv: int, Lq: int, num_blocks: int | None = None,
                        *, device: torch.device | None = None) -> None:
    """NSA block indices: int64, (B, Hkv, Lq, S) or (B, H, Lq, S), on ``device``.

    With ``num_blocks`` also their values: each in [-1, num_blocks), no block
    twice in a row (that costs a pass over them, which a kernel's hot path skips).
    """
    if not isinstance(block_indices, torch.Tensor):
        raise TypeError(f"block_indices must be a torch.Tensor, got {type(block_indices).__name__}")
    if block_indices.dtype != torch.int64:
        raise TypeError(f"block_indices must be int64, got {block_indices.dtype}")
    shape = tuple(block_indices.shape)
    if len(shape) != 4 or shape[0] != B or shape[1] not in (Hkv, H) or shape[2] != Lq:
        raise ValueError(
            f"block_indices must have shape (B, Hkv, Lq, S) = ({B}, {Hkv}, {Lq}, S) or "
            f"(B, H, Lq, S) = ({B}, {H}, {Lq}, S), got {shape}"
        )
    if device is not None and block_indices.device != device:
        raise ValueError(f"block_indices must be on q's device {device}, got {block_indices.device}")
    if num_blocks is None or block_indices.numel() == 0:
        return
    lo, hi = int(block_indices.min()), int(block_indices.max())
    if lo < -1 or hi >= num_blocks:
        raise ValueError(
            f"block_indices must lie in [-1, {num_blocks}) (-1 = empty slot, {num_blocks} blocks of keys), "
            f"got values from {lo} to {hi}"
        )
    # A block listed twice would count its tokens twice in the softmax.
    srt = block_indices.sort(dim=-1).values
    if ((srt[..., 1:] == srt[..., :-1]) & (srt[..., 1:] >= 0)).any():
        raise ValueError("block_indices must not repeat a block number within a row (only -1 may repeat)")


def resolve_scale(scale: float | None, head_dim: int) -> float:
    if scale is None:
        return 1.0 / math.sqrt(head_dim) if head_dim > 0 else 1.0
    if isinstance(scale, bool) or not isinstance(scale, (int, float)):
        raise TypeError(f"scale must be a float or None, got {type(scale).__name__}")
    if not math.isfinite(scale):
        raise ValueError(f"scale must be finite, got {scale}")
    return float(scale)
