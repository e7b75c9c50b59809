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

__all__ = ["CodedError", "check_int", "check_choice", "check_dim", "check_generator", "check_qkv", "resolve_scale"]


class CodedError(ValueError):
    """A ValueError a user interface can explain: ``code`` names a message, ``params`` fill it."""

    def __init__(self, code: str, message: str, **params: Any) -> None:
        super().__init__(message)
        self.code = code
        self.params = params


def check_int(value: object, name: str, *, minimum: int | None = None, allow_none: bool = False) -> int | None:
    """``value`` itself when it is an int (not a bool) >= ``minimum``; else TypeError / ValueError naming ``name``."""
    if value is None and allow_none:
        return None
    if isinstance(value, bool) or not isinstance(value, int):
        raise TypeError(f"{name} must be an int, got {type(value).__name__}")
    if minimum is not None and value < minimum:
        raise ValueError(f"{name} must be >= {minimum}, got {value}")
    return value


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


def resolve_scale(scale: float | None, head_dim: int) -> float:
    if scale is None:
        return 1.0 / math.sqrt(head_dim) if head_dim > 0 else 1.0
    if isinstance(scale, bool) or not isinstance(scale, (int, float)):
        raise TypeError(f"scale must be a float or None, got {type(scale).__name__}")
    if not math.isfinite(scale):
        raise ValueError(f"scale must be finite, got {scale}")
    return float(scale)
