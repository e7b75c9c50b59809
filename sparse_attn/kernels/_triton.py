"""What every kernel module shares: the one Triton import, and the launch helpers.

Triton is optional (the PyTorch references need only torch), so ``triton``,
``tl`` and ``libdevice`` are None where it does not import; each kernel module
defines its ``@triton.jit`` functions only when ``triton`` is not None. Which
dtypes a kernel may take is ``dispatch.KERNEL_DTYPES``; when it may run at all
is ``dispatch.use_triton``.
"""
from __future__ import annotations

import torch

try:
    import triton
    import triton.language as tl
except ImportError:  # pragma: no cover - only where Triton is absent
    triton = tl = None

try:
    from triton.language.extra import libdevice
except ImportError:  # pragma: no cover - only where Triton (or this part of it) is absent
    libdevice = None

__all__ = ["LOG2E", "check_dtype", "dot_precision", "libdevice", "pow2", "require_triton", "tl", "triton"]

# The kernels' softmaxes use exp2 (one instruction); scores are scaled by log2(e) once instead.
LOG2E = 1.4426950408889634


def pow2(n: int, floor: int) -> int:
    """The smallest power of two >= n, and at least ``floor`` (1 for n <= 1 with floor 1).

    ``tl.arange`` needs power-of-two lengths, and ``tl.dot`` needs every dimension >= 16.
    """
    return max(floor, 1 << max(n - 1, 0).bit_length())


def dot_precision(dtype: torch.dtype) -> str:
    """``tl.dot``'s input precision: float32 inputs keep IEEE products (tf32 rounds them); others are unaffected."""
    return "ieee" if dtype == torch.float32 else "tf32"


def require_triton(name: str) -> None:
    if triton is None:
        raise RuntimeError(f"{name} needs Triton, which is not installed")


def check_dtype(dtype: torch.dtype, dtypes: tuple[torch.dtype, ...], names: str = "q, k, v") -> None:
    """The inputs' one dtype must be one the kernel is compiled for (check_qkv has made them share one)."""
    if dtype not in dtypes:
        allowed = [str(d).removeprefix("torch.") for d in dtypes]
        allowed = ", ".join(allowed[:-1]) + " or " + allowed[-1] if len(allowed) > 1 else allowed[0]
        raise TypeError(f"{names} must share one dtype among {allowed} for the Triton kernel, got {dtype}")
