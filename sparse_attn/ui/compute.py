"""The numbers and maps behind the picture, cached per settings (bounded: many students share a server).

Everything cached is small: every head's maps pooled to at most 256 x 256
under both poolings (float16), small multiples to 128, and a metrics dict, so
switching head, pooling, log scale or language recomputes nothing. The
(B, H, L, L) tensors live only while one call runs.
"""
from __future__ import annotations

import math
import os
import statistics
from dataclasses import fields
from typing import NamedTuple

import numpy as np
import streamlit as st
import torch

from sparse_attn import metrics
from sparse_attn.i18n import t
from sparse_attn.methods import METHODS, Config, shape_of
from sparse_attn.ops.dense import allowed_pairs
from sparse_attn.viz import MAX_CELLS, Pooled, pool_cells

from . import admission, errors, inputs, nsa_panel, threads
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
POOLS = ("max", "mean")
GRID_CELLS = 128  # per side of each small multiple
CALL_LOG_ENV = "SPARSE_ATTN_CALL_LOG"  # a file: every computation appends a line (the tests count recomputes)


class Maps(NamedTuple):
    """Every head's map of one kind, pooled: ``values`` (H, rows, cols) float16 (half the cache; plenty for colours)."""

    values: np.ndarray
    step_q: int
    step_k: int
    mode: str
    shape: tuple[int, int]

    def head(self, h: int) -> Pooled:
        # a new float32 array (torch converts several times faster than numpy's astype)
        values = torch.from_numpy(self.values[h]).to(torch.float32, copy=True).numpy()
        return Pooled(values, self.step_q, self.step_k, self.mode, self.shape)


def _pool(x: torch.Tensor, mode: str, cells: int = MAX_CELLS, *, signed: bool = False) -> Maps:
    """``viz.pool_map`` for every head at once: x (H, Lq, Lk) float32 -> Maps (the same cells and rules)."""
    H, Lq, Lk = x.shape
    sq, sk = max(1, math.ceil(Lq / cells)), max(1, math.ceil(Lk / cells))
    if sq == 1 and sk == 1:
        return Maps(x.numpy(), 1, 1, "none", (Lq, Lk))
    return Maps(pool_cells(x, sq, sk, mode, signed=signed).numpy(), sq, sk, mode, (Lq, Lk))


def _derived(m: Maps, values: np.ndarray, mode: str) -> Maps:
    return m._replace(values=values.astype(np.float32), mode=mode if m.mode != "none" else "none")


def _half(maps: dict[str, Maps]) -> dict[str, Maps]:
    # torch converts to float16 several times faster than numpy's astype
    return {kind: m._replace(values=torch.from_numpy(m.values).half().numpy()) for kind, m in maps.items()}


def pooled_maps(dense_w: torch.Tensor, sparse_w: torch.Tensor, mask: torch.Tensor,
                exact: torch.Tensor | None = None) -> dict[str, dict[str, Maps]]:
    """Pool -> kind -> Maps for (H, Lq, Lk) CPU maps, both poolings at once.

    Means are linear, so the difference's mean pool is the sparse pool minus the
    dense pool, and a boolean map's max pool is "its mean pool is above 0": each
    costs no pass over the full maps. Maps small enough to draw as they are are
    the same under both poolings and are stored once.
    """
    out = {}
    mean = {"dense": _pool(dense_w, "mean"), "sparse": _pool(sparse_w, "mean"), "mask": _pool(mask.float(), "mean")}
    if exact is not None:
        mean["exact"] = _pool(exact.float(), "mean")
    mean["diff"] = _derived(mean["sparse"], mean["sparse"].values - mean["dense"].values, "mean")
    out["mean"] = _half(mean)
    if mean["dense"].mode == "none":
        out["max"] = out["mean"]
        return out
    mx = {"dense": _pool(dense_w, "max"), "sparse": _pool(sparse_w, "max"),
          "mask": _derived(mean["mask"], mean["mask"].values > 0, "max"),
          "diff": _pool(sparse_w - dense_w, "max", signed=True)}
    if exact is not None:
        mx["exact"] = _derived(mean["exact"], mean["exact"].values > 0, "max")
    out["max"] = _half(mx)
    return out


def _grid(m: Maps, raw: torch.Tensor, mode: str) -> Maps:
    """Small multiples: pooled from the pooled map where that gives the cells pooling the raw map would, else raw."""
    def step(n: int, cells: int) -> int:
        return max(1, math.ceil(n / cells))

    (Lq, Lk), (rows, cols) = m.shape, m.values.shape[1:]
    same_cells = all(a % s == 0 and s * step(c, GRID_CELLS) == step(a, GRID_CELLS)
                     for a, s, c in ((Lq, m.step_q, rows), (Lk, m.step_k, cols)))
    if same_cells:
        g = _pool(torch.from_numpy(m.values.astype(np.float32)), mode, GRID_CELLS)
        if g.mode != "none":
            g = g._replace(step_q=g.step_q * m.step_q, step_k=g.step_k * m.step_k, shape=m.shape)
    else:
        g = _pool(raw, mode, GRID_CELLS)
    return g._replace(values=torch.from_numpy(g.values).half().numpy())


def _log_call(name: str) -> None:
    path = os.environ.get(CALL_LOG_ENV)
    if path:
        with open(path, "a", encoding="utf-8") as f:
            f.write(name + "\n")


def view(s: dict, upload: tuple[str, bytes] | None = None) -> dict:
    """Every head's pooled maps under both poolings, the small multiples and the metrics (``pick`` takes one head).

    ``s`` holds COMPUTE_KEYS; ``upload`` is (file name, bytes) for the file source. Head,
    pooling, log scale and language are not arguments: changing them recomputes nothing.
    When the server's memory is busy the student waits in line with a message
    (``admission``); if it stays busy they are told to try again and the run stops there.
    """
    try:
        lang = st.session_state.get("lang", "en")
    except Exception:  # called outside a Streamlit run (notebooks, tests): no session, English
        lang = "en"
    try:
        return admission.call(_view, s, upload, lang=lang)
    except admission.ServerBusy:
        st.warning(t("guard.busy", lang), icon=admission.ICON_WAIT)
        st.stop()


# A resource cache, not ``st.cache_data``: that pickles every new view into the cache and unpickles a
# copy on every hit (a few milliseconds of each rerun, most of a view-only change's server time). The
# views are read only: ``pick`` and ``Maps.head`` hand each session its own arrays.
@st.cache_resource(max_entries=16, ttl=1800, show_spinner=False)
def _view(s: dict, upload: tuple[str, bytes] | None = None) -> dict:
    _log_call("view")
    q, k, v, tokens, notes = qkv(s, upload)
    cfg = config(s)
    itemsize = q.element_size()
    # Inside the cache, so a hit queues for nothing; q, k and v (a few MiB) are already loaded, the maps are not.
    need = check_budget(s["method"], shape_of(q, k, v), cfg, itemsize)
    # A view that needs over half the server's bytes runs with no other of its size: every core is its own.
    with admission.admit(need), threads.wide(need > admission.gate().capacity / 2):
        return _maps(s, q, k, v, tokens, notes, cfg)


view.clear = _view.clear  # the tests empty the cache through the public name


def _maps(s: dict, q, k, v, tokens, notes, cfg) -> dict:
    # Its own function: the (B, H, L, L) tensors die when it returns, before the bytes are given back.
    with torch.no_grad():
        dense = METHODS["dense"].run(q, k, v, cfg)
        errors.inject_fault("maps")
        sparse = METHODS[s["method"]].run_for_picture(q, k, v, cfg)
    H, Lq, Lk = q.shape[1], q.shape[2], k.shape[2]
    notes = [(n.code, dict(n.params)) for n in notes]
    # An exact softmax over a selection that covers every key a query may see is dense attention:
    # say so, or a student reads the identical maps (and white difference) as "sparse is perfect".
    # (Counting first skips the full check, a pass over every pair, whenever fewer keys than allowed were used.)
    if (s["method"] in EXACT_SUBSET_METHODS and sparse.cost.keys_attended * Lq + 0.5 >= allowed_pairs(Lq, Lk, s["causal"])
            and bool((sparse.mask | (dense.weights == 0)).all())):
        notes.append(("all_keys_kept", {"keys": Lk}))
    dw, sw = dense.weights.float(), sparse.weights.float()
    # The per-head table: the columns the panel shows, not ``metrics.summarize``'s KL, whose float64 pass
    # over (H, L, L) took most of the time at L = 4096. Every head has the same number of query rows
    # (and allowed pairs), so the headline numbers, means over all rows, are the means of its columns.
    out, ref = sparse.output.double(), dense.output.double()
    per_head = {
        "mass_kept": metrics.mass_kept(dw, sparse.mask, reduce="head").tolist(),
        "relative_error": metrics.relative_error(out, ref, reduce="head").tolist(),
        "error_vs_uniform": metrics.error_vs_uniform(out, ref, v.double(), causal=s["causal"], reduce="head").tolist(),
        "total_variation": metrics.total_variation(dw, sw, reduce="head").tolist(),
    }
    allowed = allowed_pairs(Lq, Lk, s["causal"])
    sparsity = (1.0 - sparse.mask.sum(dim=(0, 2, 3)).double() / (q.shape[0] * max(allowed, 1))).tolist()
    exact = sparse.extras.get("exact_mask")
    maps = pooled_maps(dw[0].cpu(), sw[0].cpu(), sparse.mask[0].cpu(), None if exact is None else exact[0].cpu())
    result = {
        "shape": (H, Lq, Lk),
        "tokens": tokens,
        "notes": notes,
        "metrics": {
            "mass_kept": statistics.fmean(per_head["mass_kept"]),
            "relative_error": statistics.fmean(per_head["relative_error"]),
            "error_vs_uniform": statistics.fmean(per_head["error_vs_uniform"]),
            "sparsity": statistics.fmean(sparsity),
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
        "maps": maps,
        "grid": {pool: _grid(maps[pool]["sparse"], sw[0].cpu(), pool) for pool in POOLS},
    }
    if "nsa" in sparse.extras:
        result["nsa"] = nsa_panel.prepare(_to_cpu(sparse.extras["nsa"]), dw.cpu(), cfg)
    return result


def _to_cpu(maps):
    return type(maps)(*(x.cpu() for x in maps))


def pick(data: dict, head: int, pool: str) -> dict:
    """One head's maps (``viz.Pooled``, float32) and the small multiples, from ``view``'s data; ``head`` is clamped."""
    head = min(max(int(head), 0), data["shape"][0] - 1)
    maps = data["maps"][pool]
    return {
        "head": head,
        "maps": {kind: m.head(head) for kind, m in maps.items()},
        "grid": [data["grid"][pool].head(h) for h in range(data["shape"][0])],
    }
