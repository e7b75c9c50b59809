"""Decoding, drawn: bytes of K and V read per new token against context length, and step time against its floor.

Rows are what ``python -m benchmarks.decode`` writes (one dict per method and
length: ``method``, ``length``, ``batch``, ``bytes_per_token``,
``median_s``, ``q1_s``, ``q3_s``, ``roofline_s``), so the app, a notebook
and the benchmark report draw the same picture. No Streamlit.
"""
from __future__ import annotations

import plotly.graph_objects as go
from plotly.colors import qualitative
from plotly.subplots import make_subplots

from .i18n import t

__all__ = ["method_label", "decode_figure"]

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
