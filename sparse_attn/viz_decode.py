"""Decoding, drawn: bytes of K and V read per new token against context length, step time against its floor,
and which keys each new token read as the cache grew.

Rows are what ``python -m benchmarks.decode`` writes (one dict per method and
length: ``method``, ``length``, ``batch``, ``bytes_per_token``,
``median_s``, ``q1_s``, ``q3_s``, ``roofline_s``), so the app, a notebook
and the benchmark report draw the same picture. No Streamlit.
"""
from __future__ import annotations

from dataclasses import dataclass, replace

import numpy as np
import plotly.graph_objects as go
import torch
from plotly.colors import qualitative
from plotly.subplots import make_subplots

from ._checks import check_int
from .decode import DECODERS, KVCache, bytes_per_step, decode
from .i18n import t
from .methods import Config

__all__ = ["method_label", "decode_figure", "BYTES_LENGTHS", "DECODE_METHODS", "gen_method_label", "bytes_rows",
           "bytes_figure", "StepGrid", "decode_steps", "step_category_label", "steps_figure", "MAX_STEPS"]

_MIB = 1 << 20
# Characters per line of the note under the panels: plotly never wraps an annotation itself.
_NOTE_WIDTH = {"en": 130, "zh": 62}
_NO_LINE_START = "，。、；：！？）」』"


def _wrap(text: str, lang: str) -> str:
    width = _NOTE_WIDTH.get(lang, 120)
    if lang == "zh":  # no spaces to break at: any character is a place to break, except before punctuation
        lines, start = [], 0
        while len(text) - start > width:
            end = start + width
            while end < len(text) and text[end] in _NO_LINE_START:
                end += 1
            lines.append(text[start:end])
            start = end
        return "<br>".join(lines + [text[start:]])
    lines, line = [], ""
    for word in text.split():
        if line and len(line) + 1 + len(word) > width:
            lines.append(line)
            line = word
        else:
            line = f"{line} {word}" if line else word
    return "<br>".join(lines + [line])


def method_label(method: str, lang: str = "en") -> str:
    """The catalog name of a decoder: a registry method's own; SDPA, the spelled-out dense step and grouped Quest their own."""
    return t(f"decode.method.{method}" if method in ("sdpa", "dense", "quest_grouped") else f"method.{method}", lang)


def decode_figure(rows: list[dict], lang: str = "en", *, batch: int | None = None, copy_gbs: float | None = None,
                  device: str = "", dtype: str = "") -> go.Figure:
    """Two panels over context length (log-log): bytes read per token, and step time with the bandwidth floor.

    ``batch`` picks the rows of one batch size (default: the largest);
    ``copy_gbs`` (the measured copy bandwidth) names the floor in the note.
    Rows with a ``note`` (a case that could not run) are left out.
    """
    rows = [r for r in rows if not r.get("note")]
    if not rows:
        raise ValueError("rows must hold at least one measured case (rows with a note did not run)")
    batch = max(r["batch"] for r in rows) if batch is None else batch
    rows = [r for r in rows if r["batch"] == batch]
    if not rows:
        raise ValueError(f"batch={batch}: no measured rows have this batch size")
    methods = list(dict.fromkeys(r["method"] for r in rows))
    fig = make_subplots(rows=1, cols=2, horizontal_spacing=0.1,
                        subplot_titles=(t("decode.fig.bytes_title", lang), t("decode.fig.time_title", lang)))
    for i, m in enumerate(methods):
        mine = sorted((r for r in rows if r["method"] == m), key=lambda r: r["length"])
        x = [r["length"] for r in mine]
        name, color = method_label(m, lang), qualitative.Plotly[i % len(qualitative.Plotly)]
        fig.add_trace(go.Scatter(x=x, y=[r["bytes_per_token"] / _MIB for r in mine], mode="lines+markers", name=name,
                                 legendgroup=m, line=dict(color=color),
                                 hovertemplate=t("decode.hover.bytes", lang, method=name) + "<extra></extra>"),
                      row=1, col=1)
        ms = [r["median_s"] * 1e3 for r in mine]
        fig.add_trace(go.Scatter(
            x=x, y=ms, mode="lines+markers", name=name, legendgroup=m, showlegend=False, line=dict(color=color),
            error_y=dict(type="data", symmetric=False, array=[(r["q3_s"] - r["median_s"]) * 1e3 for r in mine],
                         arrayminus=[(r["median_s"] - r["q1_s"]) * 1e3 for r in mine]),
            hovertemplate=t("decode.hover.time", lang, method=name) + "<extra></extra>"), row=1, col=2)
        if all(r.get("roofline_s") for r in mine):
            # In the method's legend group without an entry of its own: one "dashed" entry explains them all.
            fig.add_trace(go.Scatter(
                x=x, y=[r["roofline_s"] * 1e3 for r in mine], mode="lines", legendgroup=m, showlegend=False,
                name=t("decode.roofline", lang, method=name), line=dict(color=color, dash="dash"),
                hovertemplate=t("decode.hover.roofline", lang, method=name, gbs=copy_gbs or 0) + "<extra></extra>"),
                row=1, col=2)
    if any(r.get("roofline_s") for r in rows):
        fig.add_trace(go.Scatter(x=[None], y=[None], mode="lines", name=t("decode.roofline_legend", lang),
                                 line=dict(color="grey", dash="dash")), row=1, col=2)
    lengths = sorted({r["length"] for r in rows})
    for col, title in ((1, "decode.axis.bytes"), (2, "decode.axis.time")):
        fig.update_xaxes(type="log", title_text=t("decode.axis.length", lang), tickvals=lengths,
                         ticktext=[_tokens(n) for n in lengths], row=1, col=col)
        fig.update_yaxes(type="log", title_text=t(title, lang), row=1, col=col)
    fig.update_layout(
        title=t("decode.fig.title", lang, batch=batch, device=device, dtype=dtype), height=560,
        legend=dict(orientation="v", yanchor="top", y=1, xanchor="left", x=1.02),
        margin=dict(t=90, b=150 if copy_gbs else 80, r=20),
    )
    if copy_gbs:
        fig.add_annotation(text=_wrap(t("decode.note", lang, gbs=copy_gbs), lang), xref="paper", yref="paper", x=0,
                           y=-0.3, showarrow=False, align="left", xanchor="left", yanchor="top", font=dict(size=12))
    return fig


def _tokens(n: int) -> str:
    """4096 -> "4k", 131072 -> "128k": cache lengths are powers of two in practice."""
    return f"{n // 1024}k" if n >= 1024 and n % 1024 == 0 else str(n)


# ---- bytes per new token from the sizes alone, and the selection over a growing cache ---------------------

# The cache lengths the bytes picture runs over: 1k to 128k tokens, where serving long contexts lives.
BYTES_LENGTHS = tuple(2**n for n in range(10, 18))
DECODE_METHODS = tuple(DECODERS)


def gen_method_label(method: str, lang: str = "en") -> str:
    """A decoder's name in the generating view: dense says it reads every key (its registry name says SDPA)."""
    if method not in DECODERS:
        raise ValueError(f"method must be one of {DECODE_METHODS}, got {method!r}")
    return t("gen.method.dense", lang) if method == "dense" else t(f"method.{method}", lang)


def bytes_rows(cfg: Config, *, lengths=BYTES_LENGTHS, methods=DECODE_METHODS, num_heads: int, num_kv_heads: int,
               head_dim: int, itemsize: int, batch_size: int = 1) -> list[dict]:
    """One row per (method, length): ``bytes_per_token`` from ``bytes_per_step`` (sizes only, nothing runs).

    Rows carry ``method``, ``length``, ``batch`` and ``bytes_per_token``, the
    fields ``decode_figure`` reads, so a measured run and this count draw alike.
    """
    for name, value in (("num_heads", num_heads), ("num_kv_heads", num_kv_heads), ("head_dim", head_dim),
                        ("itemsize", itemsize), ("batch_size", batch_size)):
        check_int(value, name, minimum=1)
    if num_heads % num_kv_heads:
        raise ValueError(f"num_heads ({num_heads}) must be a multiple of num_kv_heads ({num_kv_heads})")
    unknown = [m for m in methods if m not in DECODERS]
    if unknown:
        raise ValueError(f"methods must be among {DECODE_METHODS}, got {unknown}")
    if not lengths or any(not isinstance(L, int) or L < 1 for L in lengths):
        raise ValueError(f"lengths must be positive ints, got {lengths!r}")
    sizes = dict(batch_size=batch_size, num_heads=num_heads, num_kv_heads=num_kv_heads, head_dim=head_dim,
                 itemsize=itemsize)
    return [dict(method=m, length=L, batch=batch_size, bytes_per_token=bytes_per_step(m, L, cfg, **sizes))
            for m in methods for L in lengths]


def bytes_figure(rows: list[dict], lang: str = "en", *, title: str | None = None) -> go.Figure:
    """Bytes of K and V read per new token against context length (log-log), one line per method, dense first."""
    if not rows:
        raise ValueError("rows must hold at least one (method, length, bytes_per_token) row")
    methods = sorted(dict.fromkeys(r["method"] for r in rows), key=lambda m: m != "dense")
    fig = go.Figure()
    for i, m in enumerate(methods):
        mine = sorted((r for r in rows if r["method"] == m), key=lambda r: r["length"])
        name = gen_method_label(m, lang)
        dense = m == "dense"
        fig.add_trace(go.Scatter(
            x=[r["length"] for r in mine], y=[r["bytes_per_token"] / _MIB for r in mine], mode="lines+markers",
            name=name, line=dict(color="black" if dense else qualitative.Plotly[i % len(qualitative.Plotly)],
                                 width=3 if dense else 2, dash="dash" if dense else "solid"),
            hovertemplate=t("decode.hover.bytes", lang, method=name) + "<extra></extra>"))
    lengths = sorted({r["length"] for r in rows})
    fig.update_xaxes(type="log", title_text=t("decode.axis.length", lang), tickvals=lengths,
                     ticktext=[_tokens(n) for n in lengths])
    fig.update_yaxes(type="log", title_text=t("decode.axis.bytes", lang), dtick=1)  # one tick per decade
    fig.update_layout(title=title or t("decode.fig.bytes_title", lang), height=460,
                      legend=dict(orientation="v", yanchor="top", y=1, xanchor="left", x=1.02),
                      margin=dict(t=60, b=60, r=20), plot_bgcolor="white")
    fig.update_xaxes(showgrid=True, gridcolor="#e5e5e5")
    fig.update_yaxes(showgrid=True, gridcolor="#e5e5e5")
    return fig


# What each cell of the step grid is; the legend words depend on the method (``step_category_label``).
FUTURE, SKIPPED, BY_SCORE, BY_POSITION, EVERY_KEY = range(5)
STEP_COLOURS = ("#ffffff", "#e4e4e4", "#1f77b4", "#ff7f0e", "#555555")
# Rows drawn at most: one decode step each. Every ceil(L / MAX_STEPS)-th token is decoded, so the view stays cheap
# (each step is a few dozen small tensor ops) and a row keeps a few pixels of height.
MAX_STEPS = 64


@dataclass(frozen=True)
class StepGrid:
    """The selection of each drawn decode step over a cache that grew token by token.

    categories: (H, S, L) int8, per query head, drawn step and cache position:
        FUTURE (not in the cache yet), SKIPPED, BY_SCORE (top-k's keys,
        Quest's pages, NSA's blocks picked by compressed score), BY_POSITION
        (NSA's window and forced blocks, StreamingLLM's sinks and window) or
        EVERY_KEY (dense).
    steps: (S,) the new token's position at each drawn step (its cache then holds steps + 1 tokens).
    bytes_read: (S,) bytes of K and V (and summaries) each step read, as the decoder counted them.
    dense_bytes: (S,) what dense attention reads at the same length.
    """

    method: str
    categories: np.ndarray
    steps: np.ndarray
    bytes_read: np.ndarray
    dense_bytes: np.ndarray

    @property
    def length(self) -> int:
        return self.categories.shape[-1]

    def keys_read(self, head: int, row: int = -1) -> int:
        """Keys of the cache read in full by ``head`` at drawn step ``row`` (K and V rows)."""
        return int((self.categories[head, row] >= BY_SCORE).sum())


def _forced_blocks(cfg: Config, pos: int, n_blocks: int) -> np.ndarray:
    """NSA's forced blocks for a query at ``pos``: the initial ones and the local ones ending at its own."""
    b = np.arange(n_blocks)
    own = pos // cfg.selection_block_size
    return ((b < cfg.num_initial_blocks) & (b * cfg.selection_block_size <= pos)) | \
        ((b <= own) & (b > own - cfg.num_local_blocks))


def decode_steps(method: str, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, cfg: Config = Config(), *,
                 max_steps: int = MAX_STEPS) -> StepGrid:
    """Generate over q, k, v (B, H, L, D) / (B, Hkv, L, D): append tokens one step at a time and decode.

    The cache starts empty; before each drawn step the tokens up to the new
    one are appended, and ``decode(method, ...)`` runs for the new token's query
    alone (T = 1), as generation does. At most ``max_steps`` steps are drawn,
    evenly spaced and ending at the last token; batch 0 is drawn.
    """
    if method not in DECODERS:
        raise ValueError(f"method must be one of {DECODE_METHODS}, got {method!r}")
    check_int(max_steps, "max_steps", minimum=1)
    for name, x in (("q", q), ("k", k), ("v", v)):
        if not isinstance(x, torch.Tensor) or x.dim() != 4:
            raise ValueError(f"{name} must be a 4-d tensor (B, heads, L, D), got {getattr(x, 'shape', type(x))}")
    B, Hkv, L, D = k.shape
    H = q.shape[1]
    if q.shape[2] != L:
        raise ValueError(f"q must hold a query per token: q has {q.shape[2]} tokens, k {L}")
    stride = -(-L // max_steps)
    steps = np.arange(L - 1, -1, -stride)[::-1]
    cats = np.full((H, len(steps), L), FUTURE, dtype=np.int8)
    read, dense = np.zeros(len(steps), np.int64), np.zeros(len(steps), np.int64)
    sizes = dict(batch_size=B, num_heads=H, num_kv_heads=Hkv, head_dim=D, value_dim=v.shape[-1],
                 itemsize=k.element_size())
    cache = KVCache.for_config(cfg, B, Hkv, L, D, value_dim=v.shape[-1], dtype=k.dtype, device=k.device)
    with torch.no_grad():
        for row, pos in enumerate(steps):
            cache.append(k[:, :, cache.length : pos + 1], v[:, :, cache.length : pos + 1])
            r = decode(method, q[:, :, pos : pos + 1], cache, cfg)
            read[row] = r.bytes_read.total
            dense[row] = bytes_per_step("dense", pos + 1, cfg, **sizes)
            cats[:, row, : pos + 1] = SKIPPED
            sel = r.selection
            if sel.kind == "all":
                cats[:, row, : pos + 1] = EVERY_KEY
                continue
            full = _heads(replace(sel, window=0).token_mask()[0, :, 0], H)  # (H, pos + 1): read in full
            positional = np.zeros_like(full)
            if method == "streaming_llm":
                positional = full.copy()
            elif method == "nsa":
                blocks = np.arange(pos + 1) // cfg.selection_block_size
                forced = _forced_blocks(cfg, int(pos), int(blocks[-1]) + 1)[blocks]
                j = np.arange(pos + 1)
                positional = (full & forced) | (j > pos - sel.window)
            cats[:, row, : pos + 1][full] = BY_SCORE
            cats[:, row, : pos + 1][positional] = BY_POSITION
    return StepGrid(method, cats, steps, read, dense)


def _heads(mask: torch.Tensor, H: int) -> np.ndarray:
    """A selection's (Hs, n) mask as (H, n): a KV group's (or every head's) one selection repeated for its heads."""
    m = mask.cpu().numpy()
    return np.repeat(m, H // m.shape[0], axis=0)


def step_category_label(method: str, category: int, lang: str = "en") -> str:
    """The legend's words for one kind of cell, in the method's own terms (its sinks, its pages, its blocks)."""
    if category in (FUTURE, SKIPPED, EVERY_KEY):
        return t(("decode.cell.future", "decode.cell.skipped", "", "", "decode.cell.every_key")[category], lang)
    return t(f"decode.cell.{'score' if category == BY_SCORE else 'position'}.{method}", lang)


def steps_figure(grid: StepGrid, head: int = 0, lang: str = "en", *, title: str | None = None) -> go.Figure:
    """Left: which cache positions each new token read (rows: steps, columns: keys); right: bytes each step read.

    The right panel shares the rows: the method's bytes per step beside dense
    attention's at the same cache length, in KiB.
    """
    if not isinstance(grid, StepGrid):
        raise TypeError(f"grid must be a StepGrid (see decode_steps), got {type(grid).__name__}")
    H = grid.categories.shape[0]
    if not isinstance(head, (int, np.integer)) or not 0 <= head < H:
        raise ValueError(f"head must be an int in 0..{H - 1}, got {head!r}")
    cats = grid.categories[head]
    fig = make_subplots(rows=1, cols=2, shared_yaxes=True, column_widths=[0.74, 0.26], horizontal_spacing=0.03,
                        subplot_titles=(t("decode.steps.left_title", lang), t("decode.steps.right_title", lang)))
    x = np.arange(grid.length)
    for c in (SKIPPED, BY_SCORE, BY_POSITION, EVERY_KEY):
        where = cats == c
        if not where.any():
            continue
        name = step_category_label(grid.method, c, lang)
        fig.add_trace(go.Heatmap(
            z=np.where(where, 1.0, np.nan), x=x, y=grid.steps, colorscale=[[0, STEP_COLOURS[c]], [1, STEP_COLOURS[c]]],
            showscale=False, hoverongaps=False, name=name, showlegend=True, xgap=0, ygap=1,
            hovertemplate=t("decode.hover.cell", lang, kind=name) + "<extra></extra>"), row=1, col=1)
    kib = 1 << 10
    fig.add_trace(go.Scatter(x=grid.dense_bytes / kib, y=grid.steps, mode="lines", name=gen_method_label("dense", lang),
                             line=dict(color="black", dash="dash"), legendgroup="bytes",
                             hovertemplate=t("decode.hover.step_bytes", lang, method=gen_method_label("dense", lang))
                             + "<extra></extra>"), row=1, col=2)
    if grid.method != "dense":
        name = gen_method_label(grid.method, lang)
        fig.add_trace(go.Scatter(x=grid.bytes_read / kib, y=grid.steps, mode="lines+markers", name=name,
                                 marker=dict(size=4), line=dict(color=STEP_COLOURS[BY_SCORE]), legendgroup="bytes",
                                 hovertemplate=t("decode.hover.step_bytes", lang, method=name) + "<extra></extra>"),
                      row=1, col=2)
    fig.update_xaxes(title_text=t("decode.steps.key_axis", lang), range=[-0.5, grid.length - 0.5], row=1, col=1)
    most = max(int(grid.dense_bytes.max()), int(grid.bytes_read.max())) / kib
    fig.update_xaxes(title_text=t("decode.steps.bytes_axis", lang), range=[0, most * 1.08], showgrid=True,
                     gridcolor="#e5e5e5", row=1, col=2)
    fig.update_yaxes(title_text=t("decode.steps.step_axis", lang), autorange="reversed", row=1, col=1)
    fig.update_layout(
        title=title or t("decode.steps.title", lang, method=gen_method_label(grid.method, lang), h=head),
        height=640, plot_bgcolor="white", margin=dict(t=80, b=130, r=20),
        # Below the axes: above them it would run into the title and the panel titles.
        legend=dict(orientation="h", yanchor="top", y=-0.14, x=0, xanchor="left"),
    )
    return fig
