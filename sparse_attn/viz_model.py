"""BertViz-style pictures of a real model's attention: tokens linked by lines, and every layer x head at once.

No Streamlit: notebooks call the same functions. ``line_view`` draws one
head: queries in a left column, keys in a right one, each link a line whose
opacity is its attention weight; beside dense attention, a sparse method's
links, the ones it kept and the ones it dropped. ``overview`` draws one small
map per layer and head, the chosen one framed.
"""
from __future__ import annotations

from typing import Sequence

import numpy as np
import plotly.graph_objects as go
import torch

from ._checks import check_int
from .i18n import t
from .viz import SEQUENTIAL, Pooled, pool_map

__all__ = ["line_view", "overview", "links", "MAX_LINE_TOKENS", "LINE_FLOOR", "OPACITY_STEP"]

MAX_LINE_TOKENS = 64   # beyond this, the columns of token labels no longer fit a screen: later tokens are left out
LINE_FLOOR = 0.005     # links lighter than this are not drawn (they would be invisible)
OPACITY_STEP = 0.01    # opacities are weights rounded to this: one trace per step keeps the figure light
DENSE_COLOUR = "#1f5fa8"
KEPT_COLOUR = "#1f5fa8"
DROPPED_COLOUR = "#d62728"
UNKNOWN_COLOUR = "#9a9a9a"
QUERY_COLOUR = "#d97400"  # the chosen query: apart from the red of dropped links
FRAME_COLOUR = "#d62728"


def _square(m, name: str) -> np.ndarray:
    if isinstance(m, torch.Tensor):
        m = m.detach().to("cpu", torch.float32).numpy()
    if not isinstance(m, np.ndarray):
        raise TypeError(f"{name} must be a 2-d tensor or array, got {type(m).__name__}")
    if m.ndim != 2:
        raise ValueError(f"{name} must be 2-d (queries, keys), got shape {m.shape}")
    return m.astype(np.float32, copy=False)


def links(weights, *, query: int | None = None, floor: float = LINE_FLOOR) -> list[tuple[int, int, float]]:
    """(query, key, weight) of every link at least ``floor`` heavy, row by row; only row ``query`` when given."""
    w = _square(weights, "weights")
    rows = range(w.shape[0]) if query is None else [query]
    return [(i, j, float(w[i, j])) for i in rows for j in range(w.shape[1]) if w[i, j] >= floor]


def _level(w: float) -> float:
    """The opacity a weight is drawn at: the weight to the nearest OPACITY_STEP, never fully transparent."""
    return min(1.0, max(OPACITY_STEP, round(w / OPACITY_STEP) * OPACITY_STEP))


def _line_traces(found, tokens, colour: str, name: str, lang: str, xaxis: str, yaxis: str) -> list[dict]:
    """One trace per opacity level: a trace has one opacity, and a trace per link would be thousands."""
    by_level: dict[float, list] = {}
    for i, j, w in found:
        by_level.setdefault(_level(w), []).append((i, j, w))
    traces = []
    for level in sorted(by_level):
        group = by_level[level]
        # Each link is start, midpoint, end and a NaN gap (plotly shows hover text on a line's points only).
        xs = np.tile(np.array([0.0, 0.5, 1.0, np.nan], dtype=np.float32), len(group))
        ys = np.array([[i, (i + j) / 2, j, np.nan] for i, j, _ in group], dtype=np.float32).ravel()
        texts = []
        for i, j, w in group:
            label = t("model.hover", lang, i=i, q=tokens[i], j=j, k=tokens[j], w=f"{w:.3f}")
            texts += [label, label, label, ""]
        traces.append(dict(
            type="scatter", x=xs, y=ys, text=texts, mode="lines", opacity=level, name=name, legendgroup=name,
            showlegend=False, hovertemplate="%{text}<extra></extra>", xaxis=xaxis, yaxis=yaxis,
            # Heavier links are also drawn wider, so a strong link stands out among many faint ones.
            line=dict(color=colour, width=1 + 3 * level),
        ))
    return traces


def _label_trace(tokens, x: float, side: str, query: int | None, unk: str | None, xaxis: str, yaxis: str,
                 weights=None, lost=None) -> dict:
    """A column of token labels; with one query chosen, each key shows its weight (``lost``: dropped, in red)."""
    colours, texts = [], []
    for i, tok in enumerate(tokens):
        is_query = side == "left" and i == query
        colours.append(QUERY_COLOUR if is_query else UNKNOWN_COLOUR if tok == unk else "#222222")
        text = f"<b>{tok}</b>" if is_query else tok
        if weights is not None and weights[i] >= 2 * LINE_FLOOR:
            shade = DROPPED_COLOUR if lost is not None and lost[i] else "#777777"
            text += f"  <span style='color:{shade}'>{weights[i]:.2f}</span>"
        texts.append(text)
    return dict(
        type="scatter", x=np.full(len(tokens), x, dtype=np.float32), y=np.arange(len(tokens), dtype=np.float32),
        text=texts, mode="text+markers", textposition="middle left" if side == "left" else "middle right",
        textfont=dict(color=colours, size=13), marker=dict(size=5, color=colours), hoverinfo="skip",
        showlegend=False, xaxis=xaxis, yaxis=yaxis,
    )


def line_view(dense, tokens: Sequence[str], *, sparse=None, mask=None, query: int | None = None,
              method_name: str | None = None, title: str | None = None, subtitle: str | None = None,
              max_tokens: int = MAX_LINE_TOKENS, unknown_token: str | None = "[UNK]", lang: str = "en") -> go.Figure:
    """One head's attention as lines from queries (left) to keys (right), opacity = weight.

    ``dense`` is (L, L) weights; with ``sparse`` weights and its ``mask``
    (both (L, L)) a second panel shows the sparse method's links: kept ones
    at the sparse weight, dropped ones (outside the mask) in red at their
    dense weight. ``query`` draws only that query's links. Opacities are the
    weights to the nearest ``OPACITY_STEP``; links under ``LINE_FLOOR`` are
    not drawn. Beyond ``max_tokens`` tokens only the first ones are drawn
    (with their links among themselves), and the title says so.
    """
    d = _square(dense, "dense")
    L = d.shape[0]
    if d.shape[1] != L:
        raise ValueError(f"dense must be square (the model's self-attention), got shape {d.shape}")
    tokens = [str(x) for x in tokens]
    if len(tokens) != L:
        raise ValueError(f"tokens must have one string per query ({L}), got {len(tokens)}")
    if (sparse is None) != (mask is None):
        raise ValueError("sparse and mask go together: pass both or neither")
    check_int(max_tokens, "max_tokens", minimum=2)
    if query is not None:
        check_int(query, "query", minimum=0, maximum=L - 1)
    n = min(L, max_tokens)
    if query is not None and query >= n:
        raise ValueError(f"query must be below max_tokens={n} (only the first {n} tokens are drawn), got {query}")
    d, toks = d[:n, :n], tokens[:n]
    panels = [t("viz.dense", lang)]
    if sparse is not None:
        s = _square(sparse, "sparse")[:n, :n]
        m = _square(np.asarray(mask, dtype=np.float32) if not isinstance(mask, torch.Tensor) else mask.float(),
                    "mask")[:n, :n] > 0
        if s.shape != d.shape or m.shape != d.shape:
            raise ValueError(f"sparse and mask must have dense's shape {tuple(dense.shape)}")
        panels.append(method_name or t("viz.sparse", lang))
    # Built as plain dicts and one Figure: plotly validates every trace once (make_subplots and
    # add_trace would validate each again, several times slower on every rerun).
    data = _line_traces(links(d, query=query), toks, DENSE_COLOUR, panels[0], lang, "x", "y")
    if sparse is not None:
        kept = [(i, j, w) for i, j, w in links(s, query=query) if m[i, j]]
        dropped = [(i, j, w) for i, j, w in links(d, query=query) if not m[i, j]]
        kept_name = t("model.kept", lang, method=panels[1])
        dropped_name = t("model.dropped", lang, method=panels[1])
        data += _line_traces(kept, toks, KEPT_COLOUR, kept_name, lang, "x2", "y2")
        data += _line_traces(dropped, toks, DROPPED_COLOUR, dropped_name, lang, "x2", "y2")
        # Legend entries drawn at full opacity (the line traces' own opacity varies with the weight).
        data += [dict(type="scatter", x=[None], y=[None], mode="lines", name=name, legendgroup=name,
                      line=dict(color=colour, width=3), xaxis="x2", yaxis="y2")
                 for name, colour in ((kept_name, KEPT_COLOUR), (dropped_name, DROPPED_COLOUR))]
    width, gap = (1.0, 0.0) if len(panels) == 1 else (0.46, 0.08)
    layout, notes = {}, []
    for col, name in enumerate(panels):
        xa, ya = ("x", "y") if col == 0 else (f"x{col + 1}", f"y{col + 1}")
        shown = lost = None
        if query is not None:  # the chosen query's weights beside the keys: kept at the sparse weight, lost at dense
            shown = d[query] if col == 0 else np.where(m[query], s[query], d[query])
            lost = None if col == 0 else ~m[query]
        data.append(_label_trace(toks, 0, "left", query, unknown_token, xa, ya))
        data.append(_label_trace(toks, 1, "right", query, unknown_token, xa, ya, shown, lost))
        left = col * (width + gap)
        layout["xaxis" + xa[1:]] = dict(domain=[left, left + width], anchor=ya, range=[-0.55, 1.75], visible=False,
                                        fixedrange=True)
        layout["yaxis" + ya[1:]] = dict(domain=[0, 1], anchor=xa, range=[n - 0.4, -1.8], visible=False,
                                        fixedrange=True)
        notes.append(dict(text=name, x=left + width / 2, y=1.0, xref="paper", yref="paper", yanchor="bottom",
                          showarrow=False, font=dict(size=16)))
        notes += [dict(x=x, y=-1.1, xref=xa, yref=ya, text=f"<i>{t(key, lang)}</i>", showarrow=False,
                       font=dict(size=12, color="#555555")) for x, key in ((0, "model.queries"), (1, "model.keys"))]
    head = title or t("model.lines_title_plain", lang)
    if n < L:
        head += " " + t("model.lines_first", lang, shown=n, total=L)
    if subtitle:
        head += f"<br><span style='font-size:13px;color:{QUERY_COLOUR}'>{subtitle}</span>"
    layout.update(
        title=dict(text=head), annotations=notes, height=max(380, 24 * n + 170),
        margin=dict(t=110 if subtitle else 90, b=20),
        legend=dict(orientation="h", yanchor="top", y=-0.01, xanchor="right", x=1.0),
        plot_bgcolor="white", hoverlabel=dict(bgcolor="white"),
    )
    return go.Figure(data=data, layout=layout)


def overview(weights, *, layer: int | None = None, head: int | None = None, max_cells: int = 48, pool: str = "max",
             title: str | None = None, lang: str = "en") -> go.Figure:
    """Small multiples: one map per layer (rows) and head (columns), one colour scale; (layer, head) framed.

    ``weights`` is (layers, heads, Lq, Lk), or a list per layer of lists per
    head of (Lq, Lk) maps or ``Pooled``. Maps are pooled to ``max_cells`` per side.
    """
    if isinstance(weights, (torch.Tensor, np.ndarray)):
        if weights.ndim != 4:
            raise ValueError(f"weights must be (layers, heads, Lq, Lk), got shape {tuple(weights.shape)}")
    elif not isinstance(weights, (list, tuple)) or not weights or not all(isinstance(r, (list, tuple)) for r in weights):
        raise TypeError("weights must be a (layers, heads, Lq, Lk) tensor or array, or a list of lists of maps")
    rows, cols = len(weights), len(weights[0])
    if rows == 0 or cols == 0 or any(len(r) != cols for r in weights):
        raise ValueError("weights must have the same number of heads (at least one) in every layer")
    if layer is not None:
        check_int(layer, "layer", minimum=0, maximum=rows - 1)
    if head is not None:
        check_int(head, "head", minimum=0, maximum=cols - 1)
    pooled = [[pool_map(weights[r][c], max_cells, pool) for c in range(cols)] for r in range(rows)]
    top = max(float(p.values.max(initial=0)) for row in pooled for p in row)
    # The grid is laid out by hand: make_subplots takes about a second for 6 x 12 panels, on every rerun.
    gap_x, gap_y = 0.004, 0.012
    data, layout = [], {}
    axis = dict(showticklabels=False, showgrid=False, zeroline=False, ticks="")
    for r in range(rows):
        for c in range(cols):
            n = _n(r, c, cols)
            data.append(_tile(pooled[r][c], r, c, lang, "x" + n, "y" + n))
            layout["xaxis" + n] = dict(axis, anchor="y" + n, domain=[c / cols + gap_x / 2, (c + 1) / cols - gap_x / 2])
            layout["yaxis" + n] = dict(axis, anchor="x" + n, autorange="reversed",
                                       domain=[1 - (r + 1) / rows + gap_y / 2, 1 - r / rows - gap_y / 2])
    # Row and column labels once, outside the grid: 72 subplot titles would be squashed over the maps.
    notes = [dict(text=t("model.head_short", lang, h=c), xref=f"x{_n(0, c, cols)} domain", yref="paper", x=0.5, y=1.0,
                  yanchor="bottom", yshift=4, showarrow=False, font=dict(size=12)) for c in range(cols)]
    notes += [dict(text=t("model.layer_short", lang, layer=r), xref="paper", yref=f"y{_n(r, 0, cols)} domain", x=0,
                   xanchor="right", y=0.5, xshift=-6, showarrow=False, font=dict(size=12)) for r in range(rows)]
    shapes = []
    if layer is not None and head is not None:
        n = _n(layer, head, cols)
        shapes.append(dict(type="rect", xref=f"x{n} domain", yref=f"y{n} domain", x0=-0.04, x1=1.04, y0=-0.04,
                           y1=1.04, line=dict(color=FRAME_COLOUR, width=3)))
    note = ""
    p0 = pooled[0][0]
    if p0.mode != "none":
        note = " " + t("viz.pooled", lang, mode=t(f"viz.pool_{p0.mode}", lang), sq=p0.step_q, sk=p0.step_k)
    layout.update(
        title=dict(text=(title or t("model.overview_title", lang)) + note), annotations=notes, shapes=shapes,
        coloraxis=dict(colorscale=SEQUENTIAL, cmin=0.0, cmax=max(top, 1e-6),
                       colorbar=dict(title=dict(text=t("viz.weight", lang)), len=0.8)),
        height=96 * rows + 130, margin=dict(t=100, l=80, r=20, b=20),
    )
    return go.Figure(data=data, layout=layout)


def _n(r: int, c: int, cols: int) -> str:
    """Plotly's axis suffix of subplot (r, c): "" for the first, then 2, 3, ..."""
    i = r * cols + c + 1
    return "" if i == 1 else str(i)


def _tile(p: Pooled, layer: int, head: int, lang: str, xaxis: str, yaxis: str) -> dict:
    where = t("model.tile_hover", lang, layer=layer, head=head)
    return dict(
        type="heatmap", z=p.values.astype(np.float32), x0=(p.step_k - 1) / 2, dx=p.step_k, y0=(p.step_q - 1) / 2,
        dy=p.step_q, coloraxis="coloraxis", name=where, xaxis=xaxis, yaxis=yaxis,
        hovertemplate=where + "<br>" + t("model.cell_hover", lang, y="%{y}", x="%{x}", z="%{z:.3f}") + "<extra></extra>",
    )
