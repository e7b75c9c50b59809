"""Pictures: tensors in, plotly Figures out. No Streamlit, so notebooks call the same functions.

Every function takes ``lang`` ("en" / "zh") for its default titles and axis
labels (from ``sparse_attn.i18n``); pass ``title=`` etc. to override them.
Maps larger than ``max_cells`` per side are pooled (max or mean) before they
reach the browser, and the title says so; axes keep token positions, so a
pooled cell's hover shows where it sits in the original matrix.
"""
from __future__ import annotations

import math
from typing import NamedTuple, Sequence

import numpy as np
import plotly.colors
import plotly.graph_objects as go
import torch
import torch.nn.functional as F
from plotly.subplots import make_subplots

from ._checks import check_choice, check_int, check_number
from .i18n import t

__all__ = [
    "Pooled", "pool_map", "heatmap", "attention_maps", "head_grid", "budget_curve", "CURVE_METRICS",
    "scaling_plot", "chunked_topk_figure", "MAX_CELLS", "MAX_TOKEN_LABELS",
]

MAX_CELLS = 512         # per side, beyond which maps are pooled
MAX_TOKEN_LABELS = 48   # per side, up to which tokens label the axes
LOG_FLOOR = 1e-6        # log colour scale: weights below this (and zeros) show as this
DIFF_FLOOR = 1e-3       # difference maps: the colour scale spans at least +-this, so rounding noise shows white
SEQUENTIAL = "Viridis"
DIVERGING = "RdBu_r"


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
    img = x[None, None]
    if mode == "mean":
        # count_include_pad=False: a ragged last cell averages only its real entries.
        out = F.avg_pool2d(img, (sq, sk), ceil_mode=True, count_include_pad=False)
    elif signed:
        hi = F.max_pool2d(img, (sq, sk), ceil_mode=True)
        lo = -F.max_pool2d(-img, (sq, sk), ceil_mode=True)
        out = torch.where(hi.abs() >= lo.abs(), hi, lo)
    else:
        out = F.max_pool2d(img, (sq, sk), ceil_mode=True)
    return Pooled(out[0, 0].numpy(), sq, sk, mode, (Lq, Lk))


def _pool_note(p: Pooled, lang: str) -> str:
    if p.mode == "none":
        return ""
    return " " + t("viz.pooled", lang, mode=t(f"viz.pool_{p.mode}", lang), sq=p.step_q, sk=p.step_k)


def _trace(p: Pooled, *, log: bool, coloraxis: str, name: str) -> go.Heatmap:
    z = p.values
    if log:
        z = np.log10(np.maximum(z, LOG_FLOOR))
    return go.Heatmap(
        z=z.astype(np.float32), x0=(p.step_k - 1) / 2, dx=p.step_k, y0=(p.step_q - 1) / 2, dy=p.step_q,
        coloraxis=coloraxis, name=name, hovertemplate="%{y} → %{x}: %{z:.3g}<extra>" + name + "</extra>",
    )


def _token_axis(axis: dict, tokens: Sequence[str] | None, n: int) -> dict:
    if tokens is not None and len(tokens) == n and n <= MAX_TOKEN_LABELS:
        axis.update(tickmode="array", tickvals=list(range(n)), ticktext=[str(s) for s in tokens])
    return axis


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
    label both axes when there are at most ``MAX_TOKEN_LABELS`` of them.
    """
    p = pool_map(m, max_cells, pool)
    title = t("viz.attention_map", lang) if title is None else title
    fig = go.Figure(_trace(p, log=log, coloraxis="coloraxis", name=title))
    fig.update_layout(
        title=title + _pool_note(p, lang),
        coloraxis=dict(colorscale=SEQUENTIAL, cmin=zmin, cmax=zmax, colorbar=_colorbar(log)),
        xaxis=_token_axis(dict(title=x_title or t("viz.key_axis", lang)), tokens, p.shape[1]),
        yaxis=_token_axis(dict(title=y_title or t("viz.query_axis", lang), autorange="reversed"), tokens, p.shape[0]),
    )
    return fig


def attention_maps(dense, sparse, mask, *, diff=None, log: bool = False, tokens: Sequence[str] | None = None,
                   max_cells: int = MAX_CELLS, pool: str = "max", method_name: str | None = None,
                   title: str | None = None, lang: str = "en") -> go.Figure:
    """Dense and sparse weights on one colour scale, the selection mask and the difference (sparse - dense).

    Each input is a (Lq, Lk) tensor or array (one head), or a ``Pooled`` from
    ``pool_map`` (then ``diff``, sparse - dense pooled with ``signed=True``, is
    needed too). Layout 2 x 2: dense | sparse on top with their shared colour
    bar, mask | difference below with a diverging colour bar centred on 0.
    With ``log`` the shared scale is log10.
    """
    if diff is None:
        if isinstance(dense, Pooled) or isinstance(sparse, Pooled):
            raise ValueError("diff is required when dense or sparse is already pooled")
        diff = _as_2d(sparse) - _as_2d(dense)
    d, s = pool_map(dense, max_cells, pool), pool_map(sparse, max_cells, pool)
    msk = mask if isinstance(mask, Pooled) else pool_map(_as_2d(torch.as_tensor(mask)).float(), max_cells, pool)
    diff = pool_map(diff, max_cells, pool, signed=True)
    method_name = method_name or t("viz.sparse", lang)
    names = [t("viz.dense", lang), method_name, t("viz.mask", lang), t("viz.difference", lang)]
    fig = make_subplots(rows=2, cols=2, subplot_titles=names, horizontal_spacing=0.12, vertical_spacing=0.17)
    top = float(max(d.values.max(initial=0), s.values.max(initial=0)))
    fig.add_trace(_trace(d, log=log, coloraxis="coloraxis", name=names[0]), 1, 1)
    fig.add_trace(_trace(s, log=log, coloraxis="coloraxis", name=names[1]), 1, 2)
    fig.add_trace(_trace(msk, log=False, coloraxis="coloraxis3", name=names[2]), 2, 1)
    fig.add_trace(_trace(diff, log=False, coloraxis="coloraxis2", name=names[3]), 2, 2)
    # A floor on the scale: float32 rounding (about 1e-8) would otherwise fill the whole colour range
    # and look like error; differences below DIFF_FLOOR stay white.
    lim = max(float(np.abs(diff.values).max(initial=0)), DIFF_FLOOR)
    fig.update_layout(
        title=(title or t("viz.maps_title", lang)) + _pool_note(d, lang),
        coloraxis=dict(colorscale=SEQUENTIAL, cmin=math.log10(LOG_FLOOR) if log else 0.0,
                       cmax=math.log10(max(top, LOG_FLOOR)) if log else top,
                       colorbar=_colorbar(log, x=1.0, y=0.79, len=0.42, title=t("viz.weight", lang))),
        coloraxis2=dict(colorscale=DIVERGING, cmin=-lim, cmax=lim,
                        colorbar=dict(x=1.0, y=0.21, len=0.42, title=t("viz.difference_short", lang))),
        coloraxis3=dict(colorscale=[[0, "#f4f4f4"], [1, "#222222"]], cmin=0, cmax=1, showscale=False),
        height=820, margin=dict(t=90),
    )
    for i in (1, 2):
        for j in (1, 2):
            n = d.shape
            fig.update_xaxes(_token_axis(dict(title=t("viz.key_axis", lang)), tokens, n[1]), row=i, col=j)
            fig.update_yaxes(_token_axis(dict(title=t("viz.query_axis", lang), autorange="reversed"), tokens, n[0]),
                             row=i, col=j)
    return fig


def head_grid(weights, *, log: bool = False, max_cells: int = 128, pool: str = "max", cols: int = 4,
              title: str | None = None, lang: str = "en") -> go.Figure:
    """Small multiples: one map per head from ``weights`` (H, Lq, Lk) or a list of ``Pooled``; one colour scale."""
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
    fig = make_subplots(rows=rows, cols=cols, subplot_titles=names, horizontal_spacing=0.03, vertical_spacing=0.08)
    pooled = [pool_map(w[h], max_cells, pool) for h in range(H)]
    top = max(float(p.values.max(initial=0)) for p in pooled)
    for h, p in enumerate(pooled):
        fig.add_trace(_trace(p, log=log, coloraxis="coloraxis", name=names[h]), h // cols + 1, h % cols + 1)
    fig.update_yaxes(autorange="reversed", showticklabels=False)
    fig.update_xaxes(showticklabels=False)
    fig.update_layout(
        title=(title or t("viz.heads_title", lang)) + _pool_note(pooled[0], lang),
        coloraxis=dict(colorscale=SEQUENTIAL, cmin=math.log10(LOG_FLOOR) if log else 0.0,
                       cmax=math.log10(max(top, LOG_FLOOR)) if log else top, colorbar=_colorbar(log)),
        height=max(260, 230 * rows), margin=dict(t=80),
    )
    return fig


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
                 current_label: str | None = None, exact_below: float = 0.0, lang: str = "en") -> go.Figure:
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
    settings, with the value).
    """
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
    shown = values[np.isfinite(values) & ~exact]
    lo = math.floor(math.log10(shown.min())) if shown.size else 0
    hi = max(math.ceil(math.log10(shown.max())) if shown.size else 0, lo + 1)
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
        fig.add_trace(go.Scatter(x=px, y=main_y, mode="lines+markers", name=name, legendgroup=str(key),
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
        title=title or t("viz.budget_title", lang, metric=label[:1].upper() + label[1:]),
        xaxis=dict(title=x_title or t("viz.budget_axis", lang), type="log", tickmode="array", tickvals=budgets,
                   ticktext=[f"{b:g}" for b in budgets]),
        yaxis=dict(title=label, type="log", tickmode="array", tickvals=[10.0 ** e for e in ticks],
                   ticktext=[t("viz.exact_tick", lang) if e == floor_e else _decade_label(e) for e in ticks],
                   range=[first - 0.15, hi + 0.1]),  # log10 units: whole decades, a little margin
        legend=dict(orientation="h", yanchor="top", y=-0.18, xanchor="left", x=0),  # the plot keeps the width
        margin=dict(b=120),
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


def scaling_plot(df, *, x: str = "seq_len", y: str = "median_ms", spread: str | None = "iqr_ms",
                 color: str = "method", names: dict[str, str] | None = None, title: str | None = None,
                 x_title: str | None = None, y_title: str | None = None, lang: str = "en") -> go.Figure:
    """Cost against sequence length on log-log axes, one line per method; ``spread`` draws error bars."""
    fig = go.Figure()
    for key, part in df.groupby(color, sort=False):
        part = part.sort_values(x)
        err = dict(type="data", array=part[spread].to_numpy() / 2, visible=True) if spread else None
        fig.add_trace(go.Scatter(x=part[x].to_numpy(), y=part[y].to_numpy(), error_y=err, mode="lines+markers",
                                 name=(names or {}).get(key, str(key))))
    fig.update_layout(title=title or t("viz.scaling_title", lang),
                      xaxis=dict(title=x_title or t("viz.seq_len_axis", lang), type="log"),
                      yaxis=dict(title=y_title or t("viz.time_axis", lang), type="log"))
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
    fig = make_subplots(rows=len(starts) + 1, cols=1, shared_xaxes=True, subplot_titles=names, vertical_spacing=0.04)
    idx = np.arange(n)
    for r, a in enumerate(starts, start=1):
        chunk = x[a : a + chunk_size]
        cand = set((stable_topk(chunk, min(k, chunk.numel())).indices + a).tolist())  # ties as chunked_topk breaks them
        colors = ["#d62728" if i in cand else "#c7c7c7" for i in range(a, a + chunk.numel())]
        fig.add_trace(go.Bar(x=idx[a : a + chunk.numel()], y=chunk.numpy(), marker_color=colors, showlegend=False), r, 1)
    colors = ["#1f77b4" if i in final else "#c7c7c7" for i in range(n)]
    fig.add_trace(go.Bar(x=idx, y=x.numpy(), marker_color=colors, showlegend=False), len(starts) + 1, 1)
    fig.update_xaxes(range=[-0.5, n - 0.5])
    fig.update_xaxes(title=t("viz.position_axis", lang), row=len(starts) + 1, col=1)
    fig.update_layout(title=title or t("viz.chunked_title", lang), height=140 * (len(starts) + 1) + 80, bargap=0.1)
    return fig
