"""Top-k with the project's tie rule (the lower index wins) in one ``torch.topk``, without a host sync.

``sparse_attn.topk.stable_topk`` asks ``torch.topk`` for k + 1 values and
mends the rows where values tie, which needs ``nonzero``: the host waits for
the GPU on every call, and a CUDA graph cannot hold the step. A decode step
ranks a few thousand blocks or pages per KV head, so it can afford to make
every key distinct instead: the float's bits, mapped to an integer of the
same order, in the high half of an int64, and the reversed index in the low
half. Equal values then differ only by index, lower index larger, and the
one ``torch.topk`` over those keys is the stable rule's answer, slot for slot.
"""
from __future__ import annotations

import torch

from ..topk import TopK, stable_topk

__all__ = ["ranked_topk"]

_EXACT_IN_FLOAT32 = (torch.float16, torch.bfloat16, torch.float32)


def ranked_topk(x: torch.Tensor, k: int) -> TopK:
    """``stable_topk(x, k)`` along the last dim (largest first, ties to the lower index), in fixed-shape ops.

    float16, bfloat16 and float32 take the one-topk path (each is exact in
    float32); other dtypes, and NaN-free assumptions aside, go to
    ``stable_topk``. NaN must not occur in ``x`` (the rule would rank it
    largest; the integer keys would rank it by its bits).
    """
    if x.dtype not in _EXACT_IN_FLOAT32 or k == 0 or x.shape[-1] <= 1:
        return stable_topk(x, k)
    n = x.shape[-1]
    # + 0.0 turns -0.0 into +0.0: the two are equal values and must tie, not order by their sign bit.
    bits = (x.float() + 0.0).view(torch.int32)
    # Negative floats order backwards in their magnitude bits: flipping those makes int32 order equal float order.
    ordered = bits ^ ((bits >> 31) & 0x7FFFFFFF)
    reverse = torch.arange(n - 1, -1, -1, device=x.device)  # lower index, larger key: it wins a tie
    keys = (ordered.to(torch.int64) << 32) | reverse
    idx = torch.topk(keys, k, dim=-1, largest=True, sorted=True).indices
    return TopK(x.gather(-1, idx), idx)
