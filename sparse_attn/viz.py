"""Pictures: tensors in, plotly Figures out. No Streamlit, so notebooks call the same functions.

Every function takes ``lang`` ("en" / "zh") for its default titles and axis
labels (from ``sparse_attn.i18n``); pass ``title=`` etc. to override them.
Maps larger than ``max_cells`` per side are pooled (max or mean) before they
reach the browser, and the title says so; axes keep token positions, so a
pooled cell's hover shows where it sits in the original matrix.
"""
from __future__ import annotations

import functools
import math
from typing import NamedTuple, Sequence

import numpy as np
import plotly.colors
import plotly.graph_objects as go
import torch
import torch.nn.functional as F
from plotly.subplots import make_subplots

from ._checks import check_choice, check_int, check_number
from .i18n import normalize_lang, t

__all__ = [
    "Pooled", "pool_map", "pool_cells", "heatmap", "attention_maps", "head_grid", "budget_curve", "CURVE_METRICS",
    "scaling_plot", "log_ticks", "chunked_topk_figure", "MAX_CELLS", "MAX_TOKEN_LABELS", "MASK_CATEGORIES",
]

MAX_CELLS = 256         # per side, beyond which maps are pooled: about the pixels a map panel has on screen
MAX_TOKEN_LABELS = 48   # per side, up to which tokens label the axes
LOG_FLOOR = 1e-6        # log colour scale: weights below this (and zeros) show as this
DIFF_FLOOR = 1e-3       # difference maps: the colour scale spans at least +-this, so rounding noise shows white
SEQUENTIAL = "Viridis"
# Spelled out: plotly.py knows the "_r" names, plotly.js does not, and the app sends plain dicts to plotly.js.
DIVERGING = plotly.colors.get_colorscale("RdBu_r")


class Pooled(NamedTuple):
    """A 2-D map ready to draw: ``values`` (rows, cols) float32, each cell covering step_q x step_k entries."""

    values: np.ndarray
    step_q: int
    step_k: int
    mode: str          # "max", "mean" or "none"
    shape: tuple[int, int]


def _as_2d(m) -> torch.Tensor:
    if isinstance(m, np.ndarray):
        m = torch.from_numpy(m)
    if not isinstance(m, torch.Tensor):
        raise TypeError(f"m must be a 2-d tensor or array, got {type(m).__name__}")
    if m.dim() != 2:
        raise ValueError(f"m must be 2-d (queries, keys), got shape {tuple(m.shape)}")
    return m.detach().to("cpu", torch.float32)


def pool_map(m, max_cells: int = MAX_CELLS, mode: str = "max", *, signed: bool = False) -> Pooled:
    """Pool a (Lq, Lk) map so neither side exceeds ``max_cells``.

    ``mode`` "max" keeps the largest entry of each cell (a selected key never
    disappears), "mean" the average (mass per cell). With ``signed`` (a
    difference map) "max" keeps the entry of largest magnitude with its sign.
    A map already small enough is returned as is (mode "none"); a Pooled passes through.
    """
    if isinstance(m, Pooled):
        return m
    check_choice(mode, "mode", ("max", "mean"))
    check_int(max_cells, "max_cells", minimum=1)
    x = _as_2d(m)
    Lq, Lk = x.shape
    sq, sk = max(1, math.ceil(Lq / max_cells)), max(1, math.ceil(Lk / max_cells))
    if sq == 1 and sk == 1:
        return Pooled(x.numpy(), 1, 1, "none", (Lq, Lk))
    return Pooled(pool_cells(x[None], sq, sk, mode, signed=signed)[0].numpy(), sq, sk, mode, (Lq, Lk))


def pool_cells(x: torch.Tensor, step_q: int, step_k: int, mode: str, *, signed: bool = False) -> torch.Tensor:
    """The pooling rule of ``pool_map`` on maps (N, Lq, Lk): cells of step_q x step_k, the last ones ragged."""
    img = x[None]
    if mode == "mean":
        # count_include_pad=False: a ragged last cell averages only its real entries.
        out = F.avg_pool2d(img, (step_q, step_k), ceil_mode=True, count_include_pad=False)
    elif signed:
        hi = F.max_pool2d(img, (step_q, step_k), ceil_mode=True)
        lo = -F.max_pool2d(-img, (step_q, step_k), ceil_mode=True)
        out = torch.where(hi.abs() >= lo.abs(), hi, lo)
    else:
        out = F.max_pool2d(img, (step_q, step_k), ceil_mode=True)
    return out[0]


# ---- figures as plain dicts -------------------------------------------------------------------
# Plotly's object model validates every property through a chain of Python calls: make_subplots plus
# add_trace and update_*axes took 0.15-0.3 s per map figure, on every rerun of a classroom server. The map
# builders below assemble plain dicts (the same layout make_subplots makes) and wrap them once, unvalidated;
# the tests rebuild every figure with validation on, so a misspelled property still fails there.

def _figure(data: list[dict], layout: dict, grid: tuple[int, int] | None = None, plain: bool = False):
    """The figure, unvalidated; ``grid`` (rows, cols) of a ``_subplots`` layout lets callers address panels by
    row and column (``fig.update_xaxes(..., row=1)``), as on a figure from ``make_subplots``.

    ``plain``: the dict itself, for a caller that only sends it to plotly.js. Wrapping it still walks
    plotly's object model (about 20 ms for the maps), and serialising the wrapper deep-copies every array.
    """
    if plain:
        return {"data": data, "layout": layout}
    fig = go.Figure(dict(data=data, layout=layout), _validate=False)
    if grid is not None:
        from plotly._subplots import SubplotRef  # the record make_subplots keeps per panel

        rows, cols = grid
        refs = []
        for r in range(rows):
            row = []
            for c in range(cols):
                n = _axis_id(r * cols + c)
                row.append((SubplotRef("xy", ("xaxis" + n, "yaxis" + n), {"xaxis": "x" + n, "yaxis": "y" + n}),))
            refs.append(row)
        fig._grid_ref = refs
    return fig


def _axis_id(i: int) -> str:
    """Plotly's suffix of the i-th subplot's axes (0-based): "" for the first, then 2, 3, ..."""
    return "" if i == 0 else str(i + 1)


def _subplots(rows: int, cols: int, titles: Sequence[str] | None = None, *, horizontal_spacing: float,
              vertical_spacing: float) -> dict:
    """The layout ``make_subplots`` gives (axis domains and anchors, titles as annotations), as a dict."""
    w = (1 - horizontal_spacing * (cols - 1)) / cols
    h = (1 - vertical_spacing * (rows - 1)) / rows
    layout, notes = {}, []
    for r in range(rows):
        for c in range(cols):
            n = _axis_id(r * cols + c)
            x0, y1 = c * (w + horizontal_spacing), 1 - r * (h + vertical_spacing)
            # Rounded into [0, 1]: 1 - 0.57 - 0.43 is -5.6e-17, which plotly refuses as a domain.
            layout["xaxis" + n] = dict(anchor="y" + n, domain=[_unit(x0), _unit(x0 + w)])
            layout["yaxis" + n] = dict(anchor="x" + n, domain=[_unit(y1 - h), _unit(y1)])
            if titles is not None and r * cols + c < len(titles):
                notes.append(dict(text=titles[r * cols + c], x=x0 + w / 2, y=y1, xref="paper", yref="paper",
                                  xanchor="center", yanchor="bottom", showarrow=False, font=dict(size=16)))
    layout["annotations"] = notes
    return layout


def _unit(x: float) -> float:
    return min(1.0, max(0.0, round(x, 12)))


def _compact(z: np.ndarray) -> np.ndarray:
    """float32 with the low 13 mantissa bits zeroed (float16's precision, float32's range).

    Plotly.js reads no float16, so maps go as float32; with the dropped bits zero,
    the websocket's compression shrinks them about four times. The hover's three
    significant digits need the 11 bits kept (relative error at most 2**-11).
    """
    z = np.ascontiguousarray(z, dtype=np.float32)
    bits = z.view(np.uint32)
    finite = np.isfinite(z)
    rounded = ((bits + np.uint32(0x1000)) & np.uint32(0xFFFFE000)).view(np.float32)
    return np.where(finite, rounded, z)


def _pool_note(p: Pooled, lang: str) -> str:
    if p.mode == "none":
        return ""
    return " " + t("viz.pooled", lang, mode=t(f"viz.pool_{p.mode}", lang), sq=p.step_q, sk=p.step_k)


# Maps use category axes, one category per drawn cell, so a hover can name what a cell holds: a token, or
# the range of positions a pooled cell covers ("8–15"), never a half position such as 123.5.
def _cell_labels(length: int, step: int, tokens: Sequence[str] | None = None) -> tuple[str, ...]:
    """One label per cell along an axis of ``length`` positions pooled by ``step``: "3 (cat)", "3" or "8–15"."""
    return _labels(length, step, None if tokens is None else tuple(map(str, tokens)))


# Cached: a page draws the same axes many times (every map, both its axes, every small multiple), and
# building hundreds of strings each time was about a tenth of a classroom server's time per rerun.
@functools.lru_cache(maxsize=256)
def _labels(length: int, step: int, tokens: tuple[str, ...] | None) -> tuple[str, ...]:
    if step == 1:
        if tokens is not None and len(tokens) == length:
            return tuple(f"{i} ({tok})" for i, tok in enumerate(tokens))
        return tuple(str(i) for i in range(length))
    return tuple(f"{a}–{min(a + step, length) - 1}" if min(a + step, length) - 1 > a else str(a)
                 for a in range(0, length, step))


def _tick_step(length: int, max_ticks: int) -> int:
    """A round distance between ticks: powers of two on a power-of-two axis, else 1-2-5, at most ``max_ticks``."""
    pow2 = length & (length - 1) == 0
    steps = [2**e for e in range(32)] if pow2 else sorted(m * 10**e for e in range(10) for m in (1, 2, 5))
    return next(s for s in steps if math.ceil(length / s) <= max_ticks)


def _cell_axis(labels: Sequence[str], length: int, step: int, tokens: Sequence[str] | None, *,
               max_ticks: int = 6, **kw) -> dict:
    """A category axis over ``labels``: tokens as ticks when few, else round positions at the cells holding them."""
    axis = dict(type="category", tickmode="array", **kw)
    if tokens is not None and step == 1 and len(tokens) == length and length <= MAX_TOKEN_LABELS:
        return {**axis, "tickvals": labels, "ticktext": [str(s) for s in tokens]}
    positions = range(0, length, _tick_step(length, max_ticks))
    return {**axis, "tickvals": [labels[p // step] for p in positions], "ticktext": [str(p) for p in positions]}


class _Words(NamedTuple):
    """How a hover names a row and a column: one position, or a pooled range of them."""

    query: str
    queries: str
    key: str
    keys: str


def _words(lang: str, y_title: str | None = None, x_title: str | None = None) -> _Words:
    w = _Words(t("charts.hover_query", lang, i="{i}"), t("charts.hover_queries", lang, i="{i}"),
               t("charts.hover_key", lang, j="{j}"), t("charts.hover_keys", lang, j="{j}"))
    if y_title:  # a caller's own axes (blocks, layers): the hover uses their names
        w = w._replace(query=y_title + " {i}", queries=y_title + " {i}")
    if x_title:
        w = w._replace(key=x_title + " {j}", keys=x_title + " {j}")
    return w


_COLON = {"en": ": ", "zh": "："}  # punctuation only: the words around it come from the catalogs


def _hover(p: Pooled, value: str, name: str, words: _Words, lang: str) -> str:
    """A hovertemplate: "query 3 (cat) → key 1 (The): weight 0.086", the cell's ranges when pooled."""
    q = (words.queries if p.step_q > 1 else words.query).format(i="%{y}")
    k = (words.keys if p.step_k > 1 else words.key).format(j="%{x}")
    return f"{q} → {k}{_COLON[normalize_lang(lang)]}{value}<extra>{name}</extra>"


def _weight_value(p: Pooled, log: bool, lang: str) -> str:
    number = "10<sup>%{z:.2f}</sup>" if log else "%{z:.3g}"
    kind = {"max": "charts.hover_weight_max", "mean": "charts.hover_weight_mean"}.get(p.mode, "charts.hover_weight")
    return t(kind, lang, w=number)


def _trace(p: Pooled, *, log: bool, coloraxis: str | None, name: str, tokens: Sequence[str] | None = None,
           value: str | None = None, words: _Words | None = None, lang: str = "en", **kw) -> dict:
    """One map as a heatmap trace (a dict) on category axes; ``value`` is the hover's text for z (default: the weight)."""
    z = p.values
    if log:
        z = np.log10(np.maximum(z, LOG_FLOOR))
    if z.dtype != np.uint8:  # uint8 stays: a category map needs one byte per cell, not four
        z = _compact(z)
    Lq, Lk = p.shape
    value = _weight_value(p, log, lang) if value is None else value
    if coloraxis:
        kw["coloraxis"] = coloraxis
    return dict(type="heatmap", z=z, x=_cell_labels(Lk, p.step_k, tokens), y=_cell_labels(Lq, p.step_q, tokens),
                name=name, hovertemplate=_hover(p, value, name, words or _words(lang), lang), **kw)


def _axes(p: Pooled, tokens: Sequence[str] | None, **kw) -> tuple[dict, dict]:
    """(x axis, y axis) layouts for a map drawn by ``_trace``: queries down, keys across."""
    Lq, Lk = p.shape
    xa = _cell_axis(_cell_labels(Lk, p.step_k, tokens), Lk, p.step_k, tokens, **kw)
    ya = _cell_axis(_cell_labels(Lq, p.step_q, tokens), Lq, p.step_q, tokens, autorange="reversed", **kw)
    return xa, ya


def _colorbar(log: bool, **kw) -> dict:
    if not log:
        return kw
    ticks = list(range(int(math.log10(LOG_FLOOR)), 1))
    return {**kw, "tickvals": ticks, "ticktext": [f"1e{v}" if v else "1" for v in ticks]}


def heatmap(m, *, title: str | None = None, x_title: str | None = None, y_title: str | None = None,
            log: bool = False, zmin: float | None = None, zmax: float | None = None,
            tokens: Sequence[str] | None = None, max_cells: int = MAX_CELLS, pool: str = "max",
            lang: str = "en") -> go.Figure:
    """One attention map (Lq, Lk) as a heatmap: queries down, keys across.

    ``log`` shows log10 of the weights (zeros at ``LOG_FLOOR``). ``tokens``
    label both axes when there are at most ``MAX_TOKEN_LABELS`` of them, and
    name the cells in the hover. ``x_title`` / ``y_title`` rename the axes
    and the hover's words (e.g. "compressed block 3" instead of "key 3").
    """
    p = pool_map(m, max_cells, pool)
    title = t("viz.attention_map", lang) if title is None else title
    trace = _trace(p, log=log, coloraxis="coloraxis", name=title, tokens=tokens, words=_words(lang, y_title, x_title),
                   lang=lang)
    xa, ya = _axes(p, tokens)
    return _figure([trace], dict(
        title=dict(text=title + _pool_note(p, lang)),
        coloraxis=dict(colorscale=SEQUENTIAL, cmin=zmin, cmax=zmax, colorbar=_colorbar(log)),
        xaxis={**xa, "title": dict(text=x_title or t("viz.key_axis", lang))},
        yaxis={**ya, "title": dict(text=y_title or t("viz.query_axis", lang))},
    ))


# Mask categories: catalog key and colour ramp (light: few of a pooled cell's keys, full: all of them).
MASK_CATEGORIES = {
    "not_selected": ("charts.mask_not_selected", ("#f2f2f2", "#f2f2f2")),
    "selected": ("charts.mask_selected", ("#b0b0b0", "#222222")),
    "sampled": ("charts.mask_sampled", ("#fdd0a2", "#e6550d")),
    "exact": ("charts.mask_exact", ("#b0b0b0", "#222222")),
}


def _as_mask(m, max_cells: int, pool: str) -> Pooled:
    """A selection mask as a Pooled share of selected keys per cell (a Pooled passes through)."""
    if isinstance(m, Pooled):
        return m
    return pool_map(_as_2d(torch.as_tensor(m)).float(), max_cells, pool)


def _mask_traces(msk: Pooled, exact: Pooled | None, *, name: str, tokens, lang: str) -> list[dict]:
    """One heatmap per category (not selected / selected, or not selected / sampled / top-k exact), each with
    a legend entry.

    A cell belongs to the highest category any of its keys has (top-k over
    sampled over not selected), as max pooling decides; under mean pooling
    the colour's depth is the share of the cell's keys that were selected.
    "Not selected" lies under every cell as one byte per cell; each category
    above it holds its own cells and gaps elsewhere. Plotly's hover takes the
    topmost trace that has the cell, and falls through a gap to the one below,
    so every cell's hover names its category.
    """
    if exact is not None and exact.values.shape != msk.values.shape:
        raise ValueError(f"mask_exact must be the mask's shape {msk.shape} pooled like it, got {exact.shape}")
    chosen = msk.values > 0
    code = np.where(chosen, 1, 0)
    if exact is not None:
        code = np.where(exact.values > 0, 2, code)
    cats = ("not_selected", "sampled", "exact") if exact is not None else ("not_selected", "selected")
    share = np.clip(msk.values, 0, 1) if msk.mode == "mean" else chosen.astype(np.float32)
    traces = []
    for c, cat in enumerate(cats):
        where = code == c
        if not where.any():
            continue
        label = t(MASK_CATEGORIES[cat][0], lang)
        value = t("charts.mask_share", lang, category=label, share="%{z:.0%}") if msk.mode == "mean" and c else label
        light, full = MASK_CATEGORIES[cat][1]
        z = np.zeros(code.shape, np.uint8) if c == 0 else np.where(where, share, np.nan)
        traces.append(_trace(msk._replace(values=z), log=False, coloraxis=None, name=name, tokens=tokens, value=value,
                             lang=lang, colorscale=[[0, light], [1, full]], zmin=0, zmax=1, showscale=False,
                             hoverongaps=False, legendgroup=f"mask_{cat}"))
        # A heatmap's own legend entry is a colour ramp; a square marker reads as "this colour means".
        traces.append(dict(type="scatter", x=[None], y=[None], mode="markers", name=label, legendgroup=f"mask_{cat}",
                           marker=dict(symbol="square", size=13, color=full, line=dict(color="#888", width=1)),
                           hoverinfo="skip"))
    return traces


def attention_maps(dense, sparse, mask, *, diff=None, mask_exact=None, log: bool = False,
                   tokens: Sequence[str] | None = None, max_cells: int = MAX_CELLS, pool: str = "max",
                   method_name: str | None = None, title: str | None = None, lang: str = "en", plain: bool = False):
    """Dense and sparse weights on one colour scale, the selection mask and the difference (sparse - dense).

    Each input is a (Lq, Lk) tensor or array (one head), or a ``Pooled`` from
    ``pool_map`` (then ``diff``, sparse - dense pooled with ``signed=True``, is
    needed too). Layout 2 x 2: dense | sparse on top with their shared colour
    bar, mask | difference below with a diverging colour bar centred on 0.
    With ``log`` the shared scale is log10. ``mask_exact`` (a hybrid's keys
    kept exactly by top-k, True on them; (Lq, Lk) or pooled like ``mask``)
    splits the mask into not selected / sampled / top-k (exact).

    Traces: dense, sparse, difference, then for each mask category present
    its heatmap and its legend entry (a marker-only scatter). ``plain``: the
    figure as the plain dict plotly.js reads, not a ``go.Figure`` (for a server).
    """
    if diff is None:
        if isinstance(dense, Pooled) or isinstance(sparse, Pooled):
            raise ValueError("diff is required when dense or sparse is already pooled")
        diff = _as_2d(sparse) - _as_2d(dense)
    d, s = pool_map(dense, max_cells, pool), pool_map(sparse, max_cells, pool)
    msk = _as_mask(mask, max_cells, pool)
    exact = None if mask_exact is None else _as_mask(mask_exact, max_cells, pool)
    diff = pool_map(diff, max_cells, pool, signed=True)
    method_name = method_name or t("viz.sparse", lang)
    names = [t("viz.dense", lang), method_name, t("viz.mask", lang), t("viz.difference", lang)]
    layout = _subplots(2, 2, names, horizontal_spacing=0.1, vertical_spacing=0.14)
    top = float(max(d.values.max(initial=0), s.values.max(initial=0)))
    data = [_trace(d, log=log, coloraxis="coloraxis", name=names[0], tokens=tokens, lang=lang),
            dict(_trace(s, log=log, coloraxis="coloraxis", name=names[1], tokens=tokens, lang=lang), xaxis="x2", yaxis="y2"),
            dict(_trace(diff, log=False, coloraxis="coloraxis2", name=names[3], tokens=tokens, lang=lang,
                        value=t("charts.hover_difference", lang, d="%{z:+.3g}")), xaxis="x4", yaxis="y4")]
    data += [dict(tr, xaxis="x3", yaxis="y3") for tr in _mask_traces(msk, exact, name=names[2], tokens=tokens, lang=lang)]
    # A floor on the scale: float32 rounding (about 1e-8) would otherwise fill the whole colour range
    # and look like error; differences below DIFF_FLOOR stay white.
    lim = max(float(np.abs(diff.values).max(initial=0)), DIFF_FLOOR)
    layout.update(
        title=dict(text=(title or t("viz.maps_title", lang)) + _pool_note(d, lang)),
        coloraxis=dict(colorscale=SEQUENTIAL, cmin=math.log10(LOG_FLOOR) if log else 0.0,
                       cmax=math.log10(max(top, LOG_FLOOR)) if log else top,
                       colorbar=_colorbar(log, x=1.0, y=0.79, len=0.42, title=dict(text=t("viz.weight", lang)))),
        coloraxis2=dict(colorscale=DIVERGING, cmin=-lim, cmax=lim,
                        colorbar=dict(x=1.0, y=0.21, len=0.42, title=dict(text=t("viz.difference_short", lang)))),
        legend=dict(orientation="h", x=0, xanchor="left", y=-0.085, yanchor="top",
                    title=dict(text=t("charts.mask_legend", lang))),
        height=860, margin=dict(t=90, b=90),
    )
    _outer_titles(layout, _axes(d, tokens), 2, 2, lang)
    return _figure(data, layout, grid=(2, 2), plain=plain)


def _outer_titles(layout: dict, axes: tuple[dict, dict], rows: int, cols: int, lang: str, **y_extra) -> None:
    """Every panel's axes, with titles only on the outer edges: every panel shares them, and an inner title
    would sit on the neighbouring panel ("query position" on the dense map, "key position" on the mask's title)."""
    xa, ya = axes
    for r in range(rows):
        for c in range(cols):
            n = _axis_id(r * cols + c)
            layout["xaxis" + n].update(xa, title=dict(text=t("viz.key_axis", lang) if r == rows - 1 else None))
            layout["yaxis" + n].update(ya, title=dict(text=t("viz.query_axis", lang) if c == 0 else None), **y_extra)


def head_grid(weights, *, log: bool = False, max_cells: int = 128, pool: str = "max", cols: int = 4,
              title: str | None = None, lang: str = "en", plain: bool = False):
    """Small multiples: one map per head from ``weights`` (H, Lq, Lk) or a list of ``Pooled``; one colour scale.

    Each panel is square (its cells too) and has a few tick numbers; only the
    outer panels carry axis titles. ``plain``: a plain dict, not a ``go.Figure``.
    """
    if isinstance(weights, (list, tuple)):
        w = list(weights)
    else:
        w = torch.as_tensor(weights) if isinstance(weights, np.ndarray) else weights
        if not isinstance(w, torch.Tensor) or w.dim() != 3:
            raise ValueError(f"weights must be (H, Lq, Lk), got {getattr(w, 'shape', type(w).__name__)}")
    H = len(w)
    cols = max(1, min(cols, H))
    rows = math.ceil(H / cols)
    names = [t("viz.head_n", lang, h=h) for h in range(H)]
    layout = _subplots(rows, cols, names, horizontal_spacing=0.06, vertical_spacing=min(0.3, 70 / (290 * rows)))
    pooled = [pool_map(w[h], max_cells, pool) for h in range(H)]
    top = max(float(p.values.max(initial=0)) for p in pooled)
    data = []
    for h, p in enumerate(pooled):
        n = _axis_id(h)
        data.append(dict(_trace(p, log=log, coloraxis="coloraxis", name=names[h], lang=lang),
                         xaxis="x" + n, yaxis="y" + n))
        xa, ya = _axes(p, None, max_ticks=4)
        r, c = divmod(h, cols)
        # Square panels: each y axis is scaled to its own x axis, inside the panel's domain.
        layout["xaxis" + n].update(xa, constrain="domain",
                                   title=dict(text=t("viz.key_axis", lang) if r == rows - 1 else None))
        layout["yaxis" + n].update(ya, constrain="domain", scaleanchor="x" + n,
                                   title=dict(text=t("viz.query_axis", lang) if c == 0 else None))
    layout.update(
        title=dict(text=(title or t("viz.heads_title", lang)) + _pool_note(pooled[0], lang)),
        coloraxis=dict(colorscale=SEQUENTIAL, cmin=math.log10(LOG_FLOOR) if log else 0.0,
                       cmax=math.log10(max(top, LOG_FLOOR)) if log else top, colorbar=_colorbar(log)),
        height=290 * rows + 120, margin=dict(t=80, b=60),
    )
    return _figure(data, layout, grid=(rows, cols), plain=plain)


# Sweep columns (sparse_attn.sweep.COLUMNS) a budget curve can show, and the catalog key of each one's axis label.
CURVE_METRICS = {
    "error_mean": "viz.error_axis",
    "error_vs_uniform_mean": "viz.error_vs_uniform_axis",
    "tv_mean": "viz.tv_axis",
}
EXACT_SYMBOL = "diamond-open"


def _decade_label(e: int) -> str:
    return {-1: "0.1", 0: "1", 1: "10"}.get(e, f"10<sup>{e}</sup>".replace("-", "\u2212"))  # a typographic minus


def budget_curve(df, *, x: str = "budget", y: str = "error_mean", color: str = "method",
                 title: str | None = None, x_title: str | None = None, y_title: str | None = None,
                 names: dict[str, str] | None = None, current: float | None = None,
                 current_label: str | None = None, exact_below: float = 0.0, spread: str | None = "auto",
                 lang: str = "en") -> go.Figure:
    """``y`` against budget (keys or samples per query), one line per ``color`` group, on log-log axes.

    ``y`` is a column of ``df``, e.g. one of ``CURVE_METRICS`` (a sweep
    table's columns; the axis and the default title name it) or any positive
    quantity (then pass ``y_title``). A log axis cannot show 0: points with
    ``y <= exact_below`` (exact, up to rounding) are drawn at a floor one
    decade below the smallest other value, with an open diamond; that tick
    reads "exact" and a legend entry says so. Non-finite values leave a gap.
    The x ticks are the budgets themselves, the y ticks one per decade (every
    other decade beyond eight). ``current`` draws a dashed vertical line at
    that budget, labelled ``current_label`` (default: the reader's current
    settings, with the value). ``spread`` names a column of standard
    deviations drawn as error bars ("auto": ``y``'s ``_mean`` as ``_std``
    when ``df`` has it; None: no bars); the y range holds every bar, and a
    bar that would reach 0 stops at the lowest decade shown.
    """
    if spread == "auto":
        spread = y[: -len("_mean")] + "_std" if y.endswith("_mean") and y[: -len("_mean")] + "_std" in df.columns else None
    if spread is not None and spread not in df.columns:
        raise ValueError(f"df has no column {spread!r} for spread (columns: {list(df.columns)})")
    if check_number(exact_below, "exact_below") < 0:
        raise ValueError(f"exact_below must be >= 0 (a log axis shows no value <= 0), got {exact_below}")
    if current is not None:
        check_number(current, "current", positive=True)
    for col in (x, y, color):
        if col not in df.columns:
            raise ValueError(f"df has no column {col!r} (columns: {list(df.columns)})")
    label = y_title or (t(CURVE_METRICS[y], lang) if y in CURVE_METRICS else y)

    def exact_of(values: np.ndarray) -> np.ndarray:
        return np.isfinite(values) & (values <= exact_below)

    values = df[y].to_numpy(dtype=float)
    exact = exact_of(values)
    real = np.isfinite(values) & ~exact
    shown = values[real]
    sd = np.nan_to_num(df[spread].to_numpy(dtype=float), nan=0.0, posinf=0.0) if spread else np.zeros_like(values)
    lo = math.floor(math.log10(shown.min())) if shown.size else 0
    hi = max(math.ceil(math.log10((shown + sd[real]).max())) if shown.size else 0, lo + 1)
    floor_e = lo - 1 if exact.any() else None
    first = lo if floor_e is None else floor_e
    step = 1 if hi - first <= 8 else 2
    ticks = list(range(first, hi + 1, step))
    fig = go.Figure()
    palette = plotly.colors.qualitative.Plotly
    groups = list(df.groupby(color, sort=False))
    # How many later groups are exact at each x: an exact marker is drawn larger by that many steps, so
    # methods exact at the same budget nest as rings instead of hiding each other.
    exact_x = [set(part[x].to_numpy(dtype=float)[exact_of(part[y].to_numpy(dtype=float))].tolist())
               for _, part in groups]
    for i, (key, part) in enumerate(groups):
        part = part.sort_values(x)
        px, py = part[x].to_numpy(dtype=float), part[y].to_numpy(dtype=float)
        is_exact = exact_of(py)
        name, col = (names or {}).get(key, str(key)), palette[i % len(palette)]
        main_y = np.where(np.isfinite(py) & ~is_exact, py, np.nan)  # NaN: plotly leaves a gap
        err = None
        if spread:
            up = np.where(np.isfinite(main_y), np.nan_to_num(part[spread].to_numpy(dtype=float), nan=0.0), 0.0)
            up = np.maximum(up, 0.0)
            down = np.minimum(up, np.maximum(np.nan_to_num(main_y, nan=0.0) - 10.0 ** lo, 0.0))
            if up.any():
                err = dict(type="data", array=up, arrayminus=down, visible=True, color=col, thickness=1.2, width=4)
        fig.add_trace(go.Scatter(x=px, y=main_y, error_y=err, mode="lines+markers", name=name, legendgroup=str(key),
                                 line=dict(color=col), marker=dict(color=col),
                                 hovertemplate="%{x}: %{y:.3g}<extra>" + name + "</extra>"))
        if is_exact.any():
            fig.add_trace(go.Scatter(
                x=px[is_exact], y=np.full(int(is_exact.sum()), 10.0 ** floor_e), customdata=py[is_exact],
                mode="markers", name=name, legendgroup=str(key), showlegend=False,
                marker=dict(color=col, symbol=EXACT_SYMBOL, line=dict(width=2, color=col),
                            size=[9 + 5 * sum(b in later for later in exact_x[i + 1:]) for b in px[is_exact]]),
                hovertemplate="%{x}: %{customdata:.2g} (" + t("viz.exact_tick", lang) + ")<extra>" + name + "</extra>"))
    if floor_e is not None:  # one legend entry explains every diamond
        fig.add_trace(go.Scatter(x=[None], y=[None], mode="markers", name=t("viz.exact_legend", lang),
                                 marker=dict(color="#555", symbol=EXACT_SYMBOL, size=11, line=dict(width=2))))
    budgets = sorted({float(b) for b in df[x].to_numpy(dtype=float) if math.isfinite(b) and b > 0})
    fig.update_layout(
        title=title or t("viz.budget_title", lang, tab=t("tab.budget", lang), metric=label),
        xaxis=dict(title=x_title or t("viz.budget_axis", lang), type="log", tickmode="array", tickvals=budgets,
                   ticktext=[f"{b:g}" for b in budgets]),
        yaxis=dict(title=label, type="log", tickmode="array", tickvals=[10.0 ** e for e in ticks],
                   ticktext=[t("viz.exact_tick", lang) if e == floor_e else _decade_label(e) for e in ticks],
                   range=[first - 0.15, hi + 0.1]),  # log10 units: whole decades, a little margin
        # Below the plot, so the plot keeps the width; far enough down to clear the x axis title.
        legend=dict(orientation="h", yanchor="top", y=-0.24, xanchor="left", x=0),
        height=540, margin=dict(b=150),
    )
    if current is not None:
        # Shapes take data values on a log axis (annotations would not): the label rides on the line,
        # on the side with more room.
        mid = (math.log10(budgets[0]) + math.log10(budgets[-1])) / 2 if budgets else 0.0
        side = "left" if math.log10(current) <= mid else "right"
        fig.add_shape(type="line", x0=current, x1=current, xref="x", y0=0, y1=1, yref="paper",
                      line=dict(color="#444", dash="dash", width=1.5),
                      label=dict(text=current_label or t("viz.current_budget", lang, value=f"{current:.3g}"),
                                 textposition="end", textangle=0, xanchor=side, yanchor="top", font=dict(size=11)))
    return fig


def _plain(v: float) -> str:
    """A tick label: a plain number where it stays short (0.001 .. 100000), else a power of ten."""
    e = math.log10(v)
    if -4 <= e <= 5:
        return f"{v:g}"
    return f"10<sup>{round(e)}</sup>".replace("-", "\u2212")


def log_ticks(lo: float, hi: float) -> dict:
    """Axis settings for a log axis over [lo, hi] (both > 0): labelled ticks only, no minor-digit clutter.

    Two decades or more: the decades inside the data's range (at least two).
    Less: the 1-2-5 values around the data, so a narrow range still has at
    least two labels, and the range reaches the outermost of them. Either
    way the range holds every value, with a small margin.
    """
    lo, hi = check_number(lo, "lo", positive=True), check_number(hi, "hi", positive=True)
    if hi < lo:
        raise ValueError(f"hi must be >= lo, got lo={lo}, hi={hi}")
    a, b = math.log10(lo), math.log10(hi)
    if b - a >= 2:
        ticks = [10.0 ** e for e in range(math.ceil(a - 1e-9), math.floor(b + 1e-9) + 1)]
    else:
        cands = sorted(m * 10.0 ** e for e in range(math.floor(a) - 1, math.ceil(b) + 2) for m in (1, 2, 5))
        first = max(c for c in cands if c <= lo * (1 + 1e-9))
        last = min(c for c in cands if c >= hi * (1 - 1e-9))
        if last == first:  # a single value sitting on a tick: show the 1-2-5 values either side
            first, last = cands[cands.index(first) - 1], cands[cands.index(last) + 1]
        ticks = [c for c in cands if first <= c <= last]
        a, b = math.log10(first), math.log10(last)
    pad = 0.04 * max(b - a, 1.0)
    return dict(type="log", tickmode="array", tickvals=ticks, ticktext=[_plain(v) for v in ticks],
                range=[a - pad, b + pad])


def scaling_plot(df, *, x: str = "seq_len", y: str = "median_ms", spread: str | tuple[str, str] | None = "iqr_ms",
                 color: str = "method", names: dict[str, str] | None = None, title: str | None = None,
                 x_title: str | None = None, y_title: str | None = None, noisy: str | None = None,
                 lang: str = "en") -> go.Figure:
    """Cost against sequence length on log-log axes, one line per method, with the spread as error bars.

    ``spread`` is a column of interquartile ranges (bars of half of it each
    side), or a pair of columns (first, third quartile: the bars span them),
    or None. Bars never reach 0 on the log axis and the range holds them all.
    ``noisy`` names a column of booleans: those points get an open marker.
    Ticks: the measured x values; on y, decades or 1-2-5 values (``log_ticks``).
    """
    for col in (x, y, color, *((spread,) if isinstance(spread, str) else spread or ()), *((noisy,) if noisy else ())):
        if col not in df.columns:
            raise ValueError(f"df has no column {col!r} (columns: {list(df.columns)})")
    df = df[np.isfinite(df[y].to_numpy(dtype=float)) & (df[y].to_numpy(dtype=float) > 0)]
    ys = df[y].to_numpy(dtype=float)
    if isinstance(spread, str):
        half = np.nan_to_num(df[spread].to_numpy(dtype=float), nan=0.0) / 2
        low, high = ys - half, ys + half
    elif spread:
        low = np.nan_to_num(df[spread[0]].to_numpy(dtype=float), nan=np.inf)
        high = np.nan_to_num(df[spread[1]].to_numpy(dtype=float), nan=0.0)
        low, high = np.minimum(low, ys), np.maximum(high, ys)
    else:
        low = high = ys
    positive_low = low[low > 0]
    yaxis = log_ticks(min(ys.min(), positive_low.min()) if positive_low.size else ys.min(), high.max()) if ys.size \
        else dict(type="log")
    bottom = 10.0 ** yaxis["range"][0] if ys.size else 0.0
    df = df.assign(_low=np.maximum(low, bottom), _high=high)
    fig = go.Figure()
    for key, part in df.groupby(color, sort=False):
        part = part.sort_values(x)
        py = part[y].to_numpy(dtype=float)
        err = None
        if spread:
            err = dict(type="data", array=part["_high"].to_numpy() - py, arrayminus=py - part["_low"].to_numpy(),
                       visible=True, thickness=1.2, width=4)
        symbols = None
        if noisy:
            symbols = ["circle-open" if b else "circle" for b in part[noisy].to_numpy(dtype=bool)]
        name = (names or {}).get(key, str(key))
        fig.add_trace(go.Scatter(x=part[x].to_numpy(), y=py, error_y=err, mode="lines+markers", name=name,
                                 marker=dict(symbol=symbols, size=8) if symbols else None,
                                 hovertemplate="%{x}: %{y:.3g}<extra>" + name + "</extra>"))
    xs = sorted({float(v) for v in df[x].to_numpy(dtype=float) if math.isfinite(v) and v > 0})
    fig.update_layout(title=title or t("viz.scaling_title", lang, tab=t("tab.speed", lang)),
                      xaxis=dict(title=x_title or t("viz.seq_len_axis", lang), type="log", tickmode="array",
                                 tickvals=xs, ticktext=[f"{v:g}" for v in xs]),
                      yaxis=dict(title=y_title or t("viz.time_axis", lang), **yaxis))
    return fig


def chunked_topk_figure(x, k: int, chunk_size: int, *, title: str | None = None, lang: str = "en") -> go.Figure:
    """How chunked top-k works on a 1-d ``x``: each chunk's candidates, then the final merge.

    Row per chunk: its values as bars, the chunk's own top-k (candidates)
    highlighted. Last row: all values, with the final top-k (the merge of the
    candidates, whose values equal ``torch.topk``'s; equal values: the lower index wins) highlighted.
    """
    from .topk import chunked_topk, stable_topk

    x = torch.as_tensor(x, dtype=torch.float32).flatten()
    n = x.numel()
    check_int(k, "k", minimum=1, maximum=n)  # at most the length of x
    check_int(chunk_size, "chunk_size", minimum=1)
    starts = list(range(0, n, chunk_size))
    final = set(chunked_topk(x, k, chunk_size=chunk_size).indices.tolist())
    names = [t("viz.chunk_n", lang, i=i, a=a, b=min(a + chunk_size, n) - 1) for i, a in enumerate(starts)]
    names.append(t("viz.merge", lang, k=k))
    rows = len(starts) + 1
    # Sizes in pixels, so a subplot title always has its own strip between two rows of bars.
    plot_h, gap, top, bottom = (110, 46, 80, 60) if rows <= 6 else (70, 38, 80, 60)
    height = rows * plot_h + (rows - 1) * gap + top + bottom
    fig = make_subplots(rows=rows, cols=1, shared_xaxes=True, subplot_titles=names,
                        vertical_spacing=gap / (height - top - bottom) if rows > 1 else 0.0)
    idx = np.arange(n)
    candidates: set[int] = set()
    for r, a in enumerate(starts, start=1):
        chunk = x[a : a + chunk_size]
        cand = set((stable_topk(chunk, min(k, chunk.numel())).indices + a).tolist())  # ties as chunked_topk breaks them
        candidates |= cand
        colors = ["#d62728" if i in cand else "#c7c7c7" for i in range(a, a + chunk.numel())]
        fig.add_trace(go.Bar(x=idx[a : a + chunk.numel()], y=chunk.numpy(), marker_color=colors, showlegend=False,
                             hovertemplate="%{x}: %{y:g}<extra></extra>"), r, 1)
    # The merge row: the winners in blue, the candidates that lost in pale red, the rest grey.
    colors = ["#1f77b4" if i in final else "#f4a6a6" if i in candidates else "#c7c7c7" for i in range(n)]
    fig.add_trace(go.Bar(x=idx, y=x.numpy(), marker_color=colors, showlegend=False,
                         hovertemplate="%{x}: %{y:g}<extra></extra>"), rows, 1)
    lo, hi = min(0.0, float(x.min())), max(0.0, float(x.max()))
    fig.update_yaxes(range=[lo * 1.08, hi * 1.08 if hi > 0 else 1.0], nticks=3)  # one scale: bars compare across rows
    fig.update_xaxes(range=[-0.5, n - 0.5])
    fig.update_xaxes(title=t("viz.position_axis", lang), row=rows, col=1)
    fig.update_annotations(font_size=13)
    fig.update_layout(title=title or t("viz.chunked_title", lang), height=height, bargap=0.1,
                      margin=dict(t=top, b=bottom))
    return fig
