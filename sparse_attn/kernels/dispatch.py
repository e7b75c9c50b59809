"""The one rule for when a Triton kernel runs instead of the PyTorch reference.

Every op has a PyTorch reference that runs anywhere and is what the tests
compare against float64. A kernel takes over only when all of these hold:

- the tensors are on CUDA and Triton imports;
- no gradient is needed (the kernels are forward-only);
- their dtype is one the kernel was measured on;
- nobody asked for the reference (``reference_only()`` or
  ``SPARSE_ATTN_REFERENCE=1``), e.g. to compare a kernel with its reference
  on one GPU.

Kernel-specific conditions (an index dtype, a shape the launch cannot tile)
stay with each kernel; this module only says whether a kernel may run at all.
"""
from __future__ import annotations

import contextlib
import contextvars
import os
from typing import Iterator

import torch

__all__ = ["REFERENCE_ENV", "KERNEL_DTYPES", "reference_only", "use_triton", "triton_available"]

REFERENCE_ENV = "SPARSE_ATTN_REFERENCE"
KERNEL_DTYPES = (torch.float16, torch.bfloat16, torch.float32)

# A ContextVar, not a module global: each thread (each classroom session) forces its own.
_forced = contextvars.ContextVar("sparse_attn_reference_only", default=False)


@contextlib.contextmanager
def reference_only() -> Iterator[None]:
    """Inside this block every op takes its PyTorch reference path, on every device."""
    token = _forced.set(True)
    try:
        yield
    finally:
        _forced.reset(token)


def triton_available() -> bool:
    """True when Triton imports (it is optional: the reference paths need only PyTorch)."""
    # Imported here, not at the top: importing Triton is slow, and only a CUDA call needs it.
    from . import _triton

    return _triton.triton is not None


def use_triton(*tensors: torch.Tensor, dtypes: tuple[torch.dtype, ...] = KERNEL_DTYPES) -> bool:
    """Whether a forward-only Triton kernel may replace the reference for ``tensors`` (see the module docstring)."""
    if _forced.get() or os.environ.get(REFERENCE_ENV) == "1":
        return False
    first = tensors[0]
    if not first.is_cuda or any(t.device != first.device for t in tensors):
        return False
    if any(t.dtype not in dtypes for t in tensors if t.is_floating_point()):
        return False
    if torch.is_grad_enabled() and any(t.requires_grad for t in tensors):
        return False
    return triton_available()
