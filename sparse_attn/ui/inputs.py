"""Where q, k, v come from: one entry per source, shown only when its library code exists.

Each loader takes the settings dict and returns (q, k, v, tokens, notes) with
q (1, H, L, D) and k, v (1, Hkv, L, D) on the CPU in float32; ``tokens`` is a
list of strings or None; ``notes`` a list of objects with code/params.
"""
from __future__ import annotations

from typing import Callable

import torch

LOADERS: dict[str, Callable] = {}


def _synthetic(s: dict, upload: bytes | None):
    from sparse_attn.sources.synthetic import synthetic_qkv

    q, k, v = synthetic_qkv(s["pattern"] or "random", heads=s["H"], length=s["L"], head_dim=s["D"], seed=s["seed"])
    return q, k, v, None, []


def patterns() -> list[str]:
    try:
        from sparse_attn.sources.synthetic import PATTERNS
    except ImportError:
        return []
    return list(PATTERNS)


if patterns():
    LOADERS["synthetic"] = _synthetic
else:  # the synthetic patterns are not available: plain Gaussian q, k, v
    def _gaussian(s: dict, upload: bytes | None):
        g = torch.Generator().manual_seed(s["seed"])
        q, k, v = (torch.randn(1, s["H"], s["L"], s["D"], generator=g) for _ in range(3))
        return q, k, v, None, []

    LOADERS["synthetic"] = _gaussian


def load(s: dict, upload: bytes | None = None):
    if s["source"] not in LOADERS:
        raise ValueError(f"source must be one of {list(LOADERS)}, got {s['source']!r}")
    return LOADERS[s["source"]](s, upload)
