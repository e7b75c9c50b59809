"""The numbers and maps behind the picture, cached per settings (bounded: many students share a server).

Everything cached is small: maps pooled to at most 512 x 512 per side,
small multiples to 128, and a metrics dict. The (B, H, L, L) tensors live only
while one call runs.
"""
from __future__ import annotations

import statistics
from dataclasses import fields

import streamlit as st
import torch

from sparse_attn import metrics
from sparse_attn.methods import METHODS, Config, shape_of
from sparse_attn.viz import MAX_CELLS, pool_map

from . import errors, inputs
from .memory import check_budget

# The Config fields the settings dict holds (under the same names); the softmax scale and the
# compression stride keep Config's defaults (the head dimension's scale, non-overlapping blocks).
CONFIG_KEYS = tuple(f.name for f in fields(Config) if f.name not in ("scale", "compress_block_sliding_stride"))
# Keys of the settings dict that change what is computed (view-only settings like log stay out).
COMPUTE_KEYS = ("source", "pattern", "text", "layer", "L", "H", "D", "method", "device", "dtype", *CONFIG_KEYS)


def config(s: dict) -> Config:
    """The methods' Config from the settings dict (its keys are Config's field names)."""
    return Config(**{name: s[name] for name in CONFIG_KEYS})


def qkv(s: dict, upload: tuple[str, bytes] | None = None, *, with_view: bool = True):
    """Load the source and move it to the chosen device and dtype; refuse over-budget settings first.

    ``with_view`` counts the maps the picture needs (off for timing, which draws none).
    """
    method = METHODS[s["method"]]
    cfg = config(s)
    if method.validate is not None:
        method.validate(cfg)
    dtype = getattr(torch, s["dtype"])
    itemsize = torch.empty((), dtype=dtype).element_size()
    if s["source"] == "synthetic":
        # Refuse before anything is allocated; model and file inputs are checked once loaded (their size is bounded).
        planned = shape_of(*(torch.empty(1, s["H"], s["L"], s["D"], device="meta") for _ in range(3)))
        check_budget(s["method"], planned, cfg, itemsize, with_view=with_view)
    q, k, v, tokens, notes = inputs.load_qkv(s, upload)
    check_budget(s["method"], shape_of(q, k, v), cfg, itemsize, with_view=with_view)
    q, k, v = (x.to(s["device"], dtype) for x in (q, k, v))
    return q, k, v, tokens, notes


# Methods whose output is the exact softmax over the keys they select (sampling estimates, NSA mixes branches).
EXACT_SUBSET_METHODS = ("topk", "quest", "streaming_llm")


@st.cache_data(max_entries=16, ttl=1800, show_spinner=False)
def view(s: dict, head: int, pool: str, upload: tuple[str, bytes] | None = None) -> dict:
    """Pooled maps for one head (clamped to the heads there are), small multiples of every head, and the metrics.

    ``s`` holds COMPUTE_KEYS; ``upload`` is (file name, bytes) for the file source.
    """
    q, k, v, tokens, notes = qkv(s, upload)
    cfg = config(s)
    with torch.no_grad():
        dense = METHODS["dense"].run(q, k, v, cfg)
        errors.inject_fault("maps")
        sparse = METHODS[s["method"]].run_for_picture(q, k, v, cfg)
    H, Lq, Lk = q.shape[1], q.shape[2], k.shape[2]
    head = min(head, H - 1)
    notes = [(n.code, dict(n.params)) for n in notes]
    # An exact softmax over a selection that covers every key a query may see is dense attention:
    # say so, or a student reads the identical maps (and white difference) as "sparse is perfect".
    if s["method"] in EXACT_SUBSET_METHODS and bool((sparse.mask | (dense.weights == 0)).all()):
        notes.append(("all_keys_kept", {"keys": Lk}))
    dw, sw = dense.weights.float(), sparse.weights.float()
    # The per-head table; every head has the same number of query rows (and allowed pairs), so the
    # headline numbers, means over all rows, are the means of its columns.
    table = metrics.summarize(sparse.output.double(), dense.output.double(), dw, sparse.mask, v=v.double(),
                              weights=sw, causal=s["causal"])
    per_head = {c: table[c].tolist() for c in ("mass_kept", "relative_error", "error_vs_uniform", "total_variation")}
    result = {
        "shape": (H, Lq, Lk),
        "head": head,
        "tokens": tokens,
        "notes": notes,
        "metrics": {
            "mass_kept": statistics.fmean(per_head["mass_kept"]),
            "relative_error": statistics.fmean(per_head["relative_error"]),
            "error_vs_uniform": statistics.fmean(per_head["error_vs_uniform"]),
            "sparsity": statistics.fmean(table["sparsity"]),
            "keys_scored": sparse.cost.keys_scored,
            "keys_attended": sparse.cost.keys_attended,
            "flops": sparse.cost.flops,
            "flops_dense": dense.cost.flops,
            "memory": sparse.cost.memory_bytes,
            "memory_dense": dense.cost.memory_bytes,
        },
        "per_head": per_head,
        # Why relative error can exceed 1: the dense output's rows are short next to v's (mean row norms).
        "norms": {"ref": dense.output.double().norm(dim=-1).mean().item(), "v": v.double().norm(dim=-1).mean().item()},
        "maps": {
            "dense": pool_map(dw[0, head].cpu(), MAX_CELLS, pool),
            "sparse": pool_map(sw[0, head].cpu(), MAX_CELLS, pool),
            "mask": pool_map(sparse.mask[0, head].float().cpu(), MAX_CELLS, pool),
            "diff": pool_map((sw[0, head] - dw[0, head]).cpu(), MAX_CELLS, pool, signed=True),
        },
        "grid": [pool_map(sw[0, h].cpu(), 128, pool) for h in range(H)],
    }
    return result
