"""NSA branch by branch: the numbers and pictures that explain one ``nsa_attention`` run (its ``NSAMaps``).

The combined NSA map alone misleads: the compressed branch spreads weight
over every key it summarises, so the mix touches every key while most of the
exact work happens in a few blocks and a window. These functions take the
maps apart: each branch's effective weights on one colour scale, which
selection blocks each query took (forced or by importance), how the gates mix
the branches, and mass kept / sparsity / keys read counted per branch.

No Streamlit: a notebook makes the same pictures with the same calls, e.g.
``nsa_branch_maps(*(getattr(maps, b)[0, 0] for b in BRANCHES))``,
``block_selection_map(block_grid(maps.block_indices[0, 0], maps.forced[0, 0],
maps.importance.shape[-1], 16, importance=maps.importance[0, 0]))``.
"""
from __future__ import annotations

import math
from typing import NamedTuple, Sequence

import numpy as np
import plotly.graph_objects as go
import torch
import torch.nn.functional as F

from ._checks import check_int
from .i18n import t
from .ops.dense import allowed_pairs
from .ops.nsa import compressed_visibility
from .viz import (LOG_FLOOR, MAX_CELLS, SEQUENTIAL, Pooled, _axes, _axis_id, _cell_axis, _cell_labels, _colorbar,
                  _figure, _outer_titles, _pool_note, _subplots, _trace, _words, pool_map)

__all__ = [
    "BRANCHES", "MIX_BRANCHES", "METRIC_ROWS", "NOT_PICKED", "PICKED", "FORCED", "BlockGrid", "RowMix",
    "selection_categories", "block_grid", "branch_shares", "row_mix", "branch_metrics",
    "nsa_branch_maps", "block_selection_map", "gate_mix",
]

BRANCHES = ("compressed", "selected", "sliding", "combined")  # NSAMaps' map fields, in drawing order
MIX_BRANCHES = BRANCHES[:3]  # the gates' last dimension
# Rows of the per-branch table: "exact" is selected and sliding together, the keys NSA reads at full resolution.
METRIC_ROWS = ("compressed", "selected", "sliding", "exact", "combined")
NOT_PICKED, PICKED, FORCED = 0, 1, 2  # a (query, selection block) cell; max-pooling keeps the strongest mark
CATEGORY_KEYS = ("nsa.block.not_picked", "nsa.block.picked", "nsa.block.forced")
CATEGORY_COLOURS = ("#ececec", "#1f77b4", "#ff7f0e")  # grey, blue, orange: apart for colour-blind readers too
BRANCH_COLOURS = {"compressed": "#9467bd", "selected": "#1f77b4", "sliding": "#2ca02c"}


# ---- the data behind the pictures ---------------------------------------------------------

def selection_categories(block_indices: torch.Tensor, forced: torch.Tensor, num_blocks: int) -> torch.Tensor:
    """int8 (..., Lq, num_blocks): ``NOT_PICKED``, ``PICKED`` (by importance) or ``FORCED`` per selection block.

    ``block_indices`` (..., Lq, S) lists the picked blocks (-1 in an empty
    slot) and ``forced`` (same shape, bool) marks the slots holding a forced
    block, as ``NSAMaps`` gives them.
    """
    if not isinstance(block_indices, torch.Tensor) or not isinstance(forced, torch.Tensor):
        raise TypeError("block_indices and forced must be tensors (as NSAMaps holds them)")
    if block_indices.shape != forced.shape or forced.dtype != torch.bool:
        raise ValueError(f"forced must be a bool tensor shaped like block_indices {tuple(block_indices.shape)}, "
                         f"got {forced.dtype} {tuple(forced.shape)}")
    check_int(num_blocks, "num_blocks", minimum=0)
    idx = block_indices.long()
    if idx.numel() and int(idx.max()) >= num_blocks:
        raise ValueError(f"num_blocks ({num_blocks}) must exceed every block in block_indices (found {int(idx.max())})")
    mark = torch.where(forced, FORCED, PICKED).to(torch.int8)
    # Empty slots (-1) land in an extra column that is dropped, so they never overwrite block 0.
    slot = torch.where(idx < 0, num_blocks, idx)
    out = torch.zeros(*idx.shape[:-1], num_blocks + 1, dtype=torch.int8, device=idx.device)
    out.scatter_reduce_(-1, slot, mark, reduce="amax")
    return out[..., :num_blocks]


class BlockGrid(NamedTuple):
    """Queries x selection blocks for one head, ready to draw.

    categories (rows, cols) int8 of ``NOT_PICKED`` / ``PICKED`` / ``FORCED``
    (pooled by max: a cell shows the strongest mark inside it); importance
    (rows, cols) float (max per cell) or None; each cell covers step_q queries
    and step_b blocks of the original (Lq, Nsel) grid ``shape``; block_size
    is the selection block size in keys.
    """

    categories: np.ndarray
    importance: np.ndarray | None
    step_q: int
    step_b: int
    shape: tuple[int, int]
    block_size: int


def _max_pool(x: torch.Tensor, max_cells: int) -> tuple[torch.Tensor, int, int]:
    """Max-pool the last two dims so neither exceeds ``max_cells`` (ceil mode: ragged edges keep their cells)."""
    rows, cols = x.shape[-2:]
    sq, sk = max(1, math.ceil(rows / max_cells)), max(1, math.ceil(cols / max_cells))
    if sq == 1 and sk == 1:
        return x, 1, 1
    lead = x.shape[:-2]
    y = F.max_pool2d(x.reshape(-1, 1, rows, cols).float(), (sq, sk), ceil_mode=True)
    return y.reshape(*lead, *y.shape[-2:]), sq, sk


def block_grid(block_indices, forced, num_blocks: int, block_size: int, *, importance=None,
               max_cells: int = MAX_CELLS) -> BlockGrid:
    """The ``BlockGrid`` of one head: ``block_indices`` and ``forced`` (Lq, S), ``importance`` (Lq, num_blocks)."""
    check_int(block_size, "block_size", minimum=1)
    check_int(max_cells, "max_cells", minimum=1)
    cats = selection_categories(torch.as_tensor(block_indices), torch.as_tensor(forced), num_blocks)
    if cats.dim() != 2:
        raise ValueError(f"block_indices must be (Lq, S) for one head, got shape {tuple(block_indices.shape)}")
    pooled, sq, sb = _max_pool(cats, max_cells)
    imp = None
    if importance is not None:
        imp_t = torch.as_tensor(importance).detach().cpu().float()
        if tuple(imp_t.shape) != tuple(cats.shape):
            raise ValueError(f"importance must be (Lq, num_blocks) = {tuple(cats.shape)}, got {tuple(imp_t.shape)}")
        imp = _max_pool(imp_t, max_cells)[0].numpy()
    return BlockGrid(pooled.to(torch.int8).cpu().numpy(), imp, sq, sb, tuple(cats.shape), block_size)


def branch_shares(maps) -> torch.Tensor:
    """(B, H, Lq, 3): the weight each branch puts into the mixed row, gate x the branch's row sum.

    A branch's row sums to 1 where it sees a key and to 0 where it sees none
    (a causal query before the first compressed block has ended), so where
    every branch sees keys the shares are the gates, and elsewhere the mixed
    row sums to less than 1.
    """
    acc = torch.promote_types(maps.combined.dtype, torch.float32)  # half maps: sum rows in float32
    sums = torch.stack([getattr(maps, b).to(acc).sum(-1) for b in MIX_BRANCHES], dim=-1)
    return maps.gates.to(acc) * sums


class RowMix(NamedTuple):
    """Per-query shares of the mix ``values`` and ``gates`` (rows, 3), mean over ``step`` queries each; ``length`` Lq."""

    values: np.ndarray
    gates: np.ndarray
    step: int
    length: int


def row_mix(shares, gates, max_cells: int = MAX_CELLS) -> RowMix:
    """Mean-pool (Lq, 3) shares and gates along the queries to at most ``max_cells`` rows."""
    check_int(max_cells, "max_cells", minimum=1)
    out = []
    for name, x in (("shares", shares), ("gates", gates)):
        x = torch.as_tensor(x).detach().cpu().float()
        if x.dim() != 2 or x.shape[-1] != 3:
            raise ValueError(f"{name} must be (Lq, 3) (compressed, selected, sliding), got {tuple(x.shape)}")
        out.append(x)
    shares, gates = out
    if shares.shape != gates.shape:
        raise ValueError(f"shares and gates must have one shape, got {tuple(shares.shape)} and {tuple(gates.shape)}")
    Lq = shares.shape[0]
    step = max(1, math.ceil(Lq / max_cells))
    if step > 1:
        shares, gates = (F.avg_pool1d(x.T[None], step, ceil_mode=True, count_include_pad=False)[0].T
                         for x in (shares, gates))
    return RowMix(shares.numpy(), gates.numpy(), step, Lq)


def _below(C: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
    """Dense mass on the keys before ``x``, from the running sums ``C`` (C[..., j]: keys 0 .. j)."""
    return torch.where(x > 0, C.gather(-1, (x - 1).clamp(min=0)), 0.0).double()


def _intervals(C: torch.Tensor, lo: torch.Tensor, hi: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Keys and dense mass in [lo, hi) per entry (empty when hi <= lo); ``C`` holds the rows' running sums."""
    hi = torch.maximum(hi, lo)
    return (hi - lo).double(), _below(C, hi) - _below(C, lo)


def _union(C, starts, ends, wa, wb, floor):
    """Keys and mass of (the picked blocks [starts, ends) together with the window [wa, wb)) from ``floor`` on.

    The blocks are disjoint, so the union is blocks + window - (each block within the window).
    """
    bs = torch.maximum(starts, floor)
    be = torch.maximum(ends, bs)
    ws = torch.maximum(wa, floor)
    we = torch.maximum(wb, ws)
    nb, mb = _intervals(C, bs, be)
    nw, mw = _intervals(C, ws, we)
    no, mo = _intervals(C, torch.maximum(bs, ws), torch.minimum(be, we))
    return nb.sum(-1) + nw[..., 0] - no.sum(-1), mb.sum(-1) + mw[..., 0] - mo.sum(-1)


def branch_metrics(maps, dense_weights: torch.Tensor, *, causal: bool, sliding_window_size: int,
                   selection_block_size: int, compress_block_size: int,
                   compress_block_sliding_stride: int | None = None) -> dict[str, dict[str, np.ndarray]]:
    """Per head, the numbers that go with each branch's picture (means over batch and queries).

    Rows (``METRIC_ROWS``): each branch, ``exact`` (selected and sliding
    together: the keys read at full resolution) and ``combined`` (the gated
    mix, whose support the main maps call its mask). Columns, each an (H,)
    float64 array:

    - ``summaries``: compressed keys (block averages) a query reads;
    - ``tokens``: keys a query reads one by one (at full resolution);
    - ``covered``: keys where the row's map can be non-zero: the tokens read,
      plus every key under a compressed block read (as part of an average);
    - ``mass_kept``: the dense attention weight on the covered keys;
    - ``sparsity``: share of the allowed query-key pairs not covered;
    - ``total_variation``: half the L1 distance between the row's map and the
      dense row (NaN for ``exact``, which has no map of its own).

    Supports come from the settings and ``maps.block_indices`` as intervals
    of keys (the picked blocks, the window, the prefix the compressed blocks
    cover), not from where a map is non-zero: a weight that rounds to 0 in
    half precision still counts as read, and the masses are differences of
    one prefix sum of the dense row instead of passes over (Lq, Lk) masks.
    The settings must be the run's.
    """
    p = dense_weights
    if not isinstance(p, torch.Tensor) or p.dim() != 4:
        raise ValueError(f"dense_weights must be a (B, H, Lq, Lk) tensor, got {getattr(p, 'shape', type(p).__name__)}")
    if tuple(maps.combined.shape) != tuple(p.shape):
        raise ValueError(f"dense_weights {tuple(p.shape)} and the NSA maps {tuple(maps.combined.shape)} must match")
    check_int(sliding_window_size, "sliding_window_size", minimum=1)
    check_int(selection_block_size, "selection_block_size", minimum=1)
    check_int(compress_block_size, "compress_block_size", minimum=1)
    stride = compress_block_sliding_stride or compress_block_size
    if not 1 <= stride <= compress_block_size:  # the compressed blocks then tile a prefix of the keys
        raise ValueError(f"compress_block_sliding_stride must be in [1, {compress_block_size}], got {stride}")
    B, H, Lq, Lk = p.shape
    Hs = maps.block_indices.shape[1]
    if Hs == 0 or H % Hs:
        raise ValueError(f"the maps' selection heads ({Hs}) must divide the query heads ({H})")
    dev = p.device
    i = torch.arange(Lq, device=dev)
    # Compressed: query i sees blocks 0 .. n_i - 1, which cover the keys [0, end_i).
    Nc = maps.compressed_weights.shape[-1]
    n_seen = compressed_visibility(Lq, Nc, compress_block_size, stride, causal, dev).sum(-1)
    cmp_end = torch.where(n_seen > 0, (n_seen - 1) * stride + compress_block_size, 0).clamp(max=Lk).view(1, Lq, 1)
    # Sliding: causal i - w < j <= i, otherwise |i - j| < w.
    wa = (i - sliding_window_size + 1).clamp(0, Lk).view(1, Lq, 1)
    wb = (i + 1 if causal else i + sliding_window_size).clamp(0, Lk).view(1, Lq, 1)
    # gather takes the batch from its index: every interval bound is (B, Lq, 1) or (B, Lq, S)
    cmp_end, wa, wb = (x.expand(B, Lq, 1) for x in (cmp_end, wa, wb))
    zero = torch.zeros(B, Lq, 1, dtype=torch.long, device=dev)
    allowed = max(allowed_pairs(Lq, Lk, causal), 1)
    cols = ("summaries", "tokens", "covered", "mass_kept", "sparsity", "total_variation")
    out = {row: {c: np.zeros(H) for c in cols} for row in METRIC_ROWS}
    if Lq == 0:
        return out
    for h in range(H):
        idx = maps.block_indices[:, h // (H // Hs)].long()  # (B, Lq, S)
        starts = (idx * selection_block_size).clamp(0, Lk)
        ends = ((idx + 1) * selection_block_size).clamp(max=Lk)
        if causal:
            ends = torch.minimum(ends, (i + 1).view(1, Lq, 1))
        ends = torch.where(idx < 0, starts, ends)  # an empty slot covers nothing
        # One running sum per row, in the weights' dtype (float32 in the app: about 1e-6 off at 4096 keys,
        # far below the 0.1% the view shows; a float64 sum costs several passes more); masses are differences.
        C = p[:, h].cumsum(-1)
        counts, masses = {}, {}
        counts["selected"], masses["selected"] = _union(C, starts, ends, zero, zero, zero)
        n, m = _intervals(C, wa, wb)
        counts["sliding"], masses["sliding"] = n[..., 0], m[..., 0]
        counts["exact"], masses["exact"] = _union(C, starts, ends, wa, wb, zero)
        n, m = _intervals(C, zero, cmp_end)
        counts["compressed"], masses["compressed"] = n[..., 0], m[..., 0]
        n, m = _union(C, starts, ends, wa, wb, cmp_end)
        counts["combined"], masses["combined"] = counts["compressed"] + n, masses["compressed"] + m
        tokens = {"compressed": torch.zeros(()), "selected": counts["selected"], "sliding": counts["sliding"],
                  "exact": counts["exact"], "combined": counts["exact"]}
        for row in METRIC_ROWS:
            rec = out[row]
            rec["summaries"][h] = float(n_seen.double().mean()) if row in ("compressed", "combined") else 0.0
            rec["tokens"][h] = float(tokens[row].double().mean())
            rec["covered"][h] = float(counts[row].mean())
            rec["mass_kept"][h] = float(masses[row].mean())
            rec["sparsity"][h] = 1.0 - float(counts[row].sum()) / (B * allowed)
            if row == "exact":
                rec["total_variation"][h] = math.nan
            else:  # from the map itself: the picture's distance from dense, whatever produced it
                diff = getattr(maps, row)[:, h].to(p.dtype) - p[:, h]
                rec["total_variation"][h] = 0.5 * float(torch.linalg.vector_norm(diff, 1, dim=-1).double().mean())
    return out


# ---- pictures -----------------------------------------------------------------------------
# Drawn with viz's own map helpers (category axes, hover "queries 0–7 → keys 8–15: ..."), so these maps
# read exactly like the main dense / sparse maps beside them.

def nsa_branch_maps(compressed, selected, sliding, combined, *, log: bool = False,
                    tokens: Sequence[str] | None = None, max_cells: int = MAX_CELLS, pool: str = "max",
                    title: str | None = None, lang: str = "en", plain: bool = False):
    """NSA's three branches and their gated mix for one head, 2 x 2 on one colour scale.

    Each argument is a (Lq, Lk) tensor or array (``NSAMaps.compressed[b, h]``,
    ...) or a ``Pooled`` from ``pool_map``. The compressed map spreads each
    block's weight evenly over the block's keys (mean pooling), so it is
    dim and everywhere; the selected and sliding maps are exact softmax rows
    over their keys; the mix is the gate-weighted sum, the map NSA computes.
    With ``log`` the scale is log10 (zeros at ``LOG_FLOOR``). ``plain``: a plain dict, not a ``go.Figure``.
    """
    pooled = [pool_map(m, max_cells, pool) for m in (compressed, selected, sliding, combined)]
    if len({p.shape for p in pooled}) != 1 or len({(p.step_q, p.step_k) for p in pooled}) != 1:
        raise ValueError(f"the four maps must have one shape and pooling, got {[p.shape for p in pooled]}")
    names = [t(f"nsa.map.{b}", lang) for b in BRANCHES]
    layout = _subplots(2, 2, names, horizontal_spacing=0.1, vertical_spacing=0.14)
    data = [dict(_trace(p, log=log, coloraxis="coloraxis", name=name, tokens=tokens, lang=lang),
                 xaxis="x" + _axis_id(n), yaxis="y" + _axis_id(n)) for n, (p, name) in enumerate(zip(pooled, names))]
    top = max(float(np.max(p.values, initial=0)) for p in pooled)
    layout.update(
        title=dict(text=(title or t("nsa.maps_title", lang)) + _pool_note(pooled[0], lang)),
        coloraxis=dict(colorscale=SEQUENTIAL, cmin=math.log10(LOG_FLOOR) if log else 0.0,
                       cmax=math.log10(max(top, LOG_FLOOR)) if log else top,
                       colorbar=_colorbar(log, title=dict(text=t("viz.weight", lang)))),
        height=860, margin=dict(t=90, b=60),
    )
    _outer_titles(layout, _axes(pooled[0], tokens), 2, 2, lang)
    return _figure(data, layout, grid=(2, 2), plain=plain)


def _grid_note(grid: BlockGrid, lang: str) -> str:
    if grid.step_q == grid.step_b == 1:
        return ""
    if grid.step_b == 1:
        return " " + t("nsa.blocks_pooled_q", lang, sq=grid.step_q)
    return " " + t("nsa.blocks_pooled", lang, sq=grid.step_q, sb=grid.step_b)


def block_selection_map(grid: BlockGrid, *, tokens: Sequence[str] | None = None, title: str | None = None,
                        lang: str = "en", plain: bool = False):
    """Which selection blocks each query took: not picked (grey), picked by importance (blue), forced (orange).

    One heatmap trace per kind present, so the legend names them and the
    hover says which kind a cell is: "query 40 → block 2: forced (importance 0)".
    ``tokens`` name the queries (when there are few). ``plain``: a plain dict, not a ``go.Figure``.
    """
    if not isinstance(grid, BlockGrid):
        raise TypeError(f"grid must be a BlockGrid (see block_grid), got {type(grid).__name__}")
    cats = grid.categories
    imp = grid.importance if grid.importance is not None else np.zeros(cats.shape, np.float32)
    pooled = grid.step_q > 1 or grid.step_b > 1
    cell = Pooled(imp.astype(np.float32), grid.step_q, grid.step_b, "max" if pooled else "none", grid.shape)
    words = _words(lang, x_title=t("nsa.hover.block", lang))
    value_key = "nsa.hover.importance_max" if pooled else "nsa.hover.importance"
    Lq, Nsel = grid.shape
    # Tokens label queries only; a block is never one token unless blocks are one key long.
    q_tokens = tokens if tokens is not None and len(tokens) == Lq and (grid.block_size == 1 or Nsel != Lq) else None
    data = []
    for kind, (key, colour) in enumerate(zip(CATEGORY_KEYS, CATEGORY_COLOURS)):
        where = cats == kind
        if not where.any():
            continue
        name = t(key, lang)
        tr = _trace(cell._replace(values=np.where(where, cell.values, np.nan)), log=False, coloraxis=None,
                    name=name, tokens=q_tokens, value=t(value_key, lang, kind=name),
                    words=words, lang=lang,
                    colorscale=[[0, colour], [1, colour]], showscale=False, hoverongaps=False, showlegend=True)
        data.append(dict(tr, hovertemplate=tr["hovertemplate"].split("<extra>")[0] + "<extra></extra>"))
    xa, ya = _axes(cell, q_tokens)
    return _figure(data, dict(
        title=dict(text=(title or t("nsa.blocks_title", lang)) + _grid_note(grid, lang)),
        xaxis={**xa, "title": dict(text=t("nsa.block_axis", lang, size=grid.block_size))},
        yaxis={**ya, "title": dict(text=t("viz.query_axis", lang))},
        legend=dict(orientation="h", yanchor="bottom", y=1.0, x=0, xanchor="left"),
        plot_bgcolor="white", height=560, margin=dict(t=110),
    ), plain=plain)


def gate_mix(mix: RowMix, *, equal_gates: bool = False, title: str | None = None, lang: str = "en") -> go.Figure:
    """Per query, stacked: the weight each branch puts into the mixed row (gate x the branch's row sum).

    Where every branch sees keys the bands are the gates; a band that thins
    to 0 marks queries whose branch sees no key yet. ``equal_gates`` says in
    the title that the gates are fixed at 1/3, not learned. Pooled queries
    are named by their range ("queries 0–7"), as on the maps.
    """
    if not isinstance(mix, RowMix):
        raise TypeError(f"mix must be a RowMix (see row_mix), got {type(mix).__name__}")
    labels = _cell_labels(mix.length, mix.step)
    fig = go.Figure()
    for c, branch in enumerate(MIX_BRANCHES):
        name = t(f"nsa.branch.{branch}", lang)
        fig.add_trace(go.Scatter(
            x=labels, y=mix.values[:, c].astype(np.float32), customdata=mix.gates[:, c].astype(np.float32),
            name=name, mode="lines", stackgroup="mix", line=dict(width=0.5, color=BRANCH_COLOURS[branch]),
            hovertemplate=t("nsa.hover.share", lang, name=name) + "<extra></extra>",
        ))
    xa = _cell_axis(labels, mix.length, mix.step, None, max_ticks=8)
    fig.update_layout(
        title=title or t("nsa.gates_title_equal" if equal_gates else "nsa.gates_title", lang),
        xaxis={**xa, "title": t("viz.query_axis", lang)},
        yaxis=dict(title=t("nsa.share_axis", lang), range=[0, 1.02]),
        legend=dict(orientation="h", yanchor="bottom", y=1.0, x=0, xanchor="left", traceorder="normal"),
        hovermode="x unified", height=380, margin=dict(t=110),
    )
    return fig
