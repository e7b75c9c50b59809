"""Results: a markdown table for the terminal, CSV, JSON, and one self-contained HTML page with plotly figures."""
from __future__ import annotations

import csv
import html as _html
import json
import os
import sys

import torch

__all__ = ["SETTING_COLUMNS", "CSV_COLUMNS", "label", "upgrade_row", "format_table", "write_results",
           "sweep_figures", "report_html"]

# What tells one case from another (a row's settings), then what was measured.
SETTING_COLUMNS = ["method", "sdpa_backend", "length", "batch", "heads", "kv_heads", "head_dim", "top_k",
                   "num_samples", "proposal", "chunk_size", "selection_block_size", "num_selected_blocks",
                   "compress_block_size", "compress_block_sliding_stride", "sliding_window_size", "causal", "dtype",
                   "device"]
CSV_COLUMNS = SETTING_COLUMNS + ["median_s", "iqr_s", "runs", "peak_extra_bytes", "speedup_vs_dense", "note"]

# Files written before the method names were unified hold the old names; a report reads them under today's.
# fused_topk (the kernels called directly) and prefilter_topk have no key of their own and keep their names.
_LEGACY_METHODS = {"sdpa": ("dense", "default"), "sdpa_flash": ("dense", "flash"), "sdpa_cudnn": ("dense", "cudnn"),
                   "full_topk": ("topk_full", "default"), "streaming_topk": ("topk", "default"),
                   "sampled": ("sampling", "default")}
_LEGACY_FIELDS = {"block_size": "selection_block_size", "num_blocks": "num_selected_blocks",
                  "compress_block": "compress_block_size", "compress_stride": "compress_block_sliding_stride",
                  "window": "sliding_window_size", "speedup_vs_sdpa": "speedup_vs_dense"}


def upgrade_row(row: dict) -> dict:
    """A row as this version writes it: old method and field names (rows without ``sdpa_backend``) renamed."""
    if "sdpa_backend" in row:
        return row
    r = {_LEGACY_FIELDS.get(k, k): v for k, v in row.items()}
    old = r.get("method")
    r["method"], r["sdpa_backend"] = _LEGACY_METHODS.get(old, (old, "default"))
    if old == "sampled":  # it drew top_k uniform samples
        r.update(num_samples=r.get("top_k"), proposal="uniform")
    return r


def label(row: dict) -> str:
    """The method's name, with the SDPA backend when one was pinned."""
    backend = row.get("sdpa_backend", "default")
    return row["method"] if backend == "default" else f"{row['method']} ({backend})"


def format_table(rows: list[dict]) -> str:
    """A markdown table: method, length, median, IQR, runs and peak extra memory (or why a case did not run)."""
    lines = ["| method | L | median | IQR | runs | peak extra memory |", "| --- | --- | --- | --- | --- | --- |"]
    for r in rows:
        if "error" in r or "note" in r:
            lines.append(f"| {label(r)} | {r['length']} | {r.get('error') or r.get('note')} | | | |")
            continue
        t = f"{r['median_s'] * 1e3:.1f} ms" if "median_s" in r else "-"
        iqr = f"{r['iqr_s'] * 1e3:.1f} ms" if "iqr_s" in r else "-"
        lines.append(f"| {label(r)} | {r['length']} | {t} | {iqr} | {r.get('runs', '-')} | "
                     f"{r['peak_extra_bytes'] / 2**20:.1f} MiB |")
    return "\n".join(lines)


def write_results(rows: list[dict], stem: str, *, html: bool = True) -> list[str]:
    """Write stem.csv, stem.json and (when plotly is installed) a self-contained stem.html. Returns the paths."""
    os.makedirs(os.path.dirname(os.path.abspath(stem)), exist_ok=True)
    paths = [f"{stem}.csv", f"{stem}.json"]
    with open(paths[0], "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=CSV_COLUMNS, extrasaction="ignore")
        w.writeheader()
        w.writerows(rows)
    meta = {"torch": torch.__version__, "cuda_device": torch.cuda.get_device_name(0) if torch.cuda.is_available() else None,
            "threads": torch.get_num_threads()}
    with open(paths[1], "w") as f:
        json.dump({"meta": meta, "rows": rows}, f, indent=1)
    if html:
        try:
            page = report_html(rows, meta)  # before opening the file: no empty page without plotly
            with open(f"{stem}.html", "w") as f:
                f.write(page)
            paths.append(f"{stem}.html")
        except ImportError:
            print(f"plotly is not installed: no HTML report (run `python -m benchmarks report {paths[1]}` "
                  "where it is)", file=sys.stderr)
    return paths


def _series_label(r: dict, varying: list[str]) -> str:
    extra = [f"{k}={r[k]}" for k in varying if k not in ("method", "sdpa_backend", "length")]
    return " ".join([label(r), *extra])


def sweep_figures(rows: list[dict]):
    """Plotly figures: time and peak memory vs length (log-log), and speed-up over dense (log x)."""
    import plotly.graph_objects as go

    rows = [upgrade_row(r) for r in rows]
    ok = [r for r in rows if "median_s" in r]
    keys = [k for k in SETTING_COLUMNS if len({str(r.get(k)) for r in ok}) > 1]
    series: dict[str, list[dict]] = {}
    for r in ok:
        series.setdefault(_series_label(r, keys), []).append(r)
    specs = [("median_s", 1e3, "time (ms, median)", "log"), ("peak_extra_bytes", 2**-20, "peak extra memory (MiB)", "log"),
             ("speedup_vs_dense", 1, "speed-up over dense SDPA (x)", "log")]
    figs = []
    for field_, mult, title, ytype in specs:
        fig = go.Figure()
        for name, rs in series.items():
            rs = sorted((r for r in rs if r.get(field_)), key=lambda r: r["length"])
            if not rs:
                continue
            err = [r["iqr_s"] * mult for r in rs] if field_ == "median_s" else None
            fig.add_trace(go.Scatter(x=[r["length"] for r in rs], y=[r[field_] * mult for r in rs], name=name,
                                     mode="lines+markers",
                                     error_y=dict(type="data", array=err, visible=True) if err else None))
        fig.update_layout(title=f"{title} vs sequence length", xaxis_title="sequence length (tokens)",
                          yaxis_title=title, template="plotly_white", height=420)
        fig.update_xaxes(type="log")
        fig.update_yaxes(type=ytype)
        figs.append(fig)
    return figs


def report_html(rows: list[dict], meta: dict | None = None) -> str:
    """One self-contained HTML page: the figures (plotly.js inlined once) and the table of every row."""
    rows = [upgrade_row(r) for r in rows]
    figs = sweep_figures(rows)
    parts = [fig.to_html(full_html=False, include_plotlyjs=(i == 0)) for i, fig in enumerate(figs)]
    head = "".join(f"<th>{c}</th>" for c in CSV_COLUMNS)
    body = []
    for r in rows:
        cells = []
        for c in CSV_COLUMNS:
            v = r.get(c, "")
            if c in ("median_s", "iqr_s") and v != "":
                v = f"{v * 1e3:.3f} ms"
            elif c == "peak_extra_bytes" and v != "":
                v = f"{v / 2**20:.1f} MiB"
            elif c == "speedup_vs_dense" and v != "":
                v = f"{v:.2f}x"
            cells.append(f"<td>{_html.escape(str(v if v is not None else ''))}</td>")
        body.append("<tr>" + "".join(cells) + "</tr>")
    meta_line = _html.escape(json.dumps(meta or {}))
    return ("<!doctype html><html><head><meta charset='utf-8'><title>sparse-attn benchmark</title>"
            "<style>body{font-family:sans-serif;margin:2em}table{border-collapse:collapse;font-size:12px}"
            "td,th{border:1px solid #ccc;padding:2px 6px}</style></head><body>"
            f"<h1>sparse-attn benchmark</h1><p>{meta_line}</p>" + "".join(parts) +
            f"<table><tr>{head}</tr>{''.join(body)}</table></body></html>")
