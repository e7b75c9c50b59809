"""Memory: the CPU resident set's high-water mark, free memory on a device, and a case's size before it runs.

On the CPU the peak of one call is the kernel's resident-set high-water mark
(VmHWM), reset just before the call; a fresh process per case keeps other
cases' freed-but-cached memory out of it. On CUDA the allocator's own peak
counter is used (``sparse_attn.timing.cuda_peak_bytes``).
"""
from __future__ import annotations

import math
import os
import resource

import torch

from sparse_attn.methods import METHODS, Shape

from .cases import DTYPES, Case

__all__ = ["rss_bytes", "reset_peak_rss", "peak_rss_bytes", "available_bytes", "estimate_bytes"]

def rss_bytes() -> int:
    """The resident set of this process now."""
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


def reset_peak_rss() -> bool:
    """Reset the kernel's resident-set high-water mark (VmHWM) to the current RSS.

    Without it the peak would include whatever importing torch and friends
    touched before the call. Linux only; False where it is not allowed.
    """
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
        return True
    except OSError:
        return False


def peak_rss_bytes() -> int:
    """VmHWM where /proc has it, else ``ru_maxrss`` (the lifetime peak)."""
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith("VmHWM:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024  # KiB on Linux


def available_bytes(device: str) -> int:
    """Free memory on the device now: CUDA's free memory, or the CPU's MemAvailable."""
    if device.startswith("cuda"):
        return torch.cuda.mem_get_info(torch.device(device))[0]
    with open("/proc/meminfo") as f:
        for line in f:
            if line.startswith("MemAvailable:"):
                return int(line.split()[1]) * 1024
    return 1 << 62


def estimate_bytes(case: Case) -> int:
    """A rough upper bound of the memory a case needs (inputs, output and the method's big temporaries).

    Only used to skip cases that cannot fit before trying them; the measured
    peak is what the tables report. These bounds describe the timed call,
    which is not always what the registry's cost model describes: dense is
    timed as SDPA (no score matrix on CUDA), while its cost model is the
    reference that returns the weights. A method without a bound here uses
    the registry's cost model.
    """
    B, H, L, D = case.batch, case.heads, case.length, case.head_dim
    cfg = case.config
    e = DTYPES[case.dtype].itemsize
    hkv = case.kv_heads or H
    inputs = B * (2 * H + 2 * hkv) * L * D * e
    rows = B * H * L
    m = case.method
    stride = cfg.compress_block_sliding_stride or cfg.compress_block_size
    if m == "topk_full":
        extra = rows * L * (e + 8) * 2
    elif m == "seed_topk":
        extra = rows * L * e * 2 + rows * min(cfg.top_k, L) * (2 * D * e + 8) + 2 * rows * L * D * e // max(H // hkv, 1)
    elif m == "topk":
        chunk = L if cfg.chunk_size is None else cfg.chunk_size
        extra = B * H * min(chunk, L) * L * (e + 8) * 2 + rows * cfg.top_k * (D * e + 16)
    elif m in ("nsa", "nsa_compressed"):
        extra = rows * (L // stride + 1) * e * 4 + rows * math.ceil(L / cfg.selection_block_size) * e * 2
    elif m == "nsa_selected":
        extra = inputs
    elif m == "sampling":
        extra = rows * cfg.num_samples * (D * e * 2 + 16)
    elif m == "nsa_sliding":
        extra = B * H * 512 * (512 + 2 * cfg.sliding_window_size) * (e + 1) * 3
    elif m == "dense":
        extra = B * H * min(L, 4096) * L * e if case.device == "cpu" else inputs  # CPU kernels work in query blocks
    elif m in METHODS and METHODS[m].cost is not None:
        extra = int(METHODS[m].cost(Shape(B, H, hkv, L, L, D, D), cfg, e).memory_bytes)
    else:
        extra = inputs
    return inputs + extra
