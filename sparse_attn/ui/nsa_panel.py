"""NSA branch by branch: the compressed, selected and sliding maps, the blocks picked, the gate mix.

``prepare`` runs inside the maps panel's cached computation and keeps only
what the view draws, for every head and both poolings, so switching head,
pooling, log scale or language redraws without recomputing attention.
``render`` draws one head from that dict.
"""
from __future__ import annotations

import math

import numpy as np
import pandas as pd
import streamlit as st
import torch

from sparse_attn import viz_nsa
from sparse_attn.i18n import t
from sparse_attn.viz import MAX_CELLS, Pooled, pool_map

from . import charts, guide

POOLS = ("max", "mean")
# The four branch maps for every head and both poolings, float16: about 17 MB at most (16 heads at 256 x 256,
# or 4 heads at 512 x 512). Cells per side halve until the maps fit, so a many-head view stays small.
MAP_BYTES = 24 * 2**20


def map_cells(H: int, Lq: int, Lk: int) -> int:
    """Cells per side for the branch maps: ``MAX_CELLS``, halved while four maps x H heads x 2 poolings exceed MAP_BYTES."""
    cells = MAX_CELLS
    while cells > 32 and 4 * H * len(POOLS) * min(Lq, cells) * min(Lk, cells) * 2 > MAP_BYTES:
        cells //= 2
    return cells


def _equal_gates(gates: torch.Tensor) -> bool:
    # 1/3 rounded to bfloat16 is 0.33398: a tolerance that half precision meets and a learned gate would not
    g = gates.float()
    return g.numel() > 0 and bool(torch.allclose(g, torch.full_like(g, 1 / 3), rtol=0, atol=2e-3))


def prepare(maps, dense_weights, cfg) -> dict:
    """Everything the NSA view draws, for every head and both poolings, small and picklable (cached).

    ``maps`` is the run's ``NSAMaps`` (CPU tensors), ``dense_weights`` the
    dense (B, H, Lq, Lk) weights, ``cfg`` the run's ``Config``. Pictures show
    batch 0; the numbers are means over batch and queries, per head.
    """
    B, H, Lq, Lk = maps.combined.shape
    Hs, Nsel = maps.block_indices.shape[1], maps.importance.shape[-1]
    cells = map_cells(H, Lq, Lk)
    branch_maps: dict[str, dict[str, np.ndarray]] = {pool: {} for pool in POOLS}
    steps = (1, 1)
    for b in viz_nsa.BRANCHES:
        m = getattr(maps, b)[0]
        for pool in POOLS:
            pooled = [pool_map(m[h], cells, pool) for h in range(H)]
            steps = (pooled[0].step_q, pooled[0].step_k)
            branch_maps[pool][b] = torch.from_numpy(np.stack([p.values for p in pooled])).half().numpy()
            if pooled[0].mode == "none":  # small enough to draw as is: both poolings share one array
                branch_maps["mean"][b] = branch_maps[pool][b]
                break
    grids = [viz_nsa.block_grid(maps.block_indices[0, s], maps.forced[0, s], Nsel, cfg.selection_block_size,
                                importance=maps.importance[0, s], max_cells=cells) for s in range(Hs)]
    shares = viz_nsa.branch_shares(maps)[0]
    mixes = [viz_nsa.row_mix(shares[h], maps.gates[0, h], cells) for h in range(H)]
    metrics = viz_nsa.branch_metrics(
        maps, dense_weights, causal=cfg.causal, sliding_window_size=cfg.sliding_window_size,
        selection_block_size=cfg.selection_block_size, compress_block_size=cfg.compress_block_size,
        compress_block_sliding_stride=cfg.compress_block_sliding_stride)
    return {
        "shape": (H, Lq, Lk),
        "maps": branch_maps,
        "map_steps": steps,
        "blocks": {
            "categories": np.stack([g.categories for g in grids]),
            "importance": np.stack([g.importance for g in grids]).astype(np.float16),
            "steps": (grids[0].step_q, grids[0].step_b),
            "shape": grids[0].shape,
        },
        "mix": {"values": np.stack([m.values for m in mixes]), "gates": np.stack([m.gates for m in mixes]),
                "step": mixes[0].step},
        "metrics": metrics,
        "settings": {
            "selection_block_size": cfg.selection_block_size, "num_selected_blocks": cfg.num_selected_blocks,
            "num_initial_blocks": cfg.num_initial_blocks, "num_local_blocks": cfg.num_local_blocks,
            "compress_block_size": cfg.compress_block_size, "sliding_window_size": cfg.sliding_window_size,
            "causal": cfg.causal, "selection_heads": Hs,
        },
        "equal_gates": _equal_gates(maps.gates),
    }


def pooled_maps(data: dict, head: int, pool: str) -> list[Pooled]:
    """The four branch maps of ``head`` as ``Pooled`` (compressed, selected, sliding, combined)."""
    _, Lq, Lk = data["shape"]
    sq, sk = data["map_steps"]
    mode = "none" if (sq, sk) == (1, 1) else pool
    return [Pooled(data["maps"][pool][b][head], sq, sk, mode, (Lq, Lk)) for b in viz_nsa.BRANCHES]


def selection_grid(data: dict, head: int) -> viz_nsa.BlockGrid:
    """The block grid query ``head`` reads: its KV group's, when the group's heads share one selection."""
    H = data["shape"][0]
    blocks = data["blocks"]
    s = head // (H // data["settings"]["selection_heads"])
    return viz_nsa.BlockGrid(blocks["categories"][s], blocks["importance"][s].astype(np.float32),
                             *blocks["steps"], blocks["shape"], data["settings"]["selection_block_size"])


def _count(x: float) -> str:
    return "—" if math.isnan(x) else f"{x:.1f}"


def _share(x: float) -> str:
    return "—" if math.isnan(x) else f"{x:.1%}"


COLUMNS = {  # column -> (formatter, catalog key of its header; the help text is the same key + "_help")
    "summaries": (_count, "nsa.col.summaries"),
    "tokens": (_count, "nsa.col.tokens"),
    "covered": (_count, "nsa.col.covered"),
    "mass_kept": (_share, "nsa.col.mass_kept"),
    "sparsity": (_share, "nsa.col.sparsity"),
    "total_variation": (lambda x: "—" if math.isnan(x) else f"{x:.3f}", "nsa.col.total_variation"),
}


def metrics_table(data: dict, head: int, lang: str) -> pd.DataFrame:
    """One row per branch (and the exact part, and the mix) for ``head``, formatted, with translated headers."""
    rows = []
    for row in viz_nsa.METRIC_ROWS:
        rec = data["metrics"][row]
        rows.append({t("nsa.col.branch", lang): t(f"nsa.row.{row}", lang),
                     **{t(key, lang): fmt(float(rec[col][head])) for col, (fmt, key) in COLUMNS.items()}})
    return pd.DataFrame(rows)


def _chart(fig, key: str) -> None:
    charts.show(fig, key)


def render(data: dict, *, head: int, pool: str, log: bool, tokens, lang: str) -> None:
    """Draw the NSA view for one head from ``prepare``'s dict."""
    if not data:
        return
    H = data["shape"][0]
    head = min(max(int(head), 0), H - 1)
    cfg = data["settings"]
    st.subheader(t("nsa.title", lang, h=head))
    st.markdown(t("nsa.intro", lang, n=cfg["num_selected_blocks"], size=cfg["selection_block_size"],
                  initial=cfg["num_initial_blocks"], local=cfg["num_local_blocks"], window=cfg["sliding_window_size"],
                  cmp=cfg["compress_block_size"]))

    _chart(viz_nsa.nsa_branch_maps(*pooled_maps(data, head, pool), log=log, tokens=tokens,
                                   title=t("nsa.maps_title_head", lang, h=head), lang=lang, plain=True), "nsa_branches")
    guide.note("nsa_branches", lang)

    table = metrics_table(data, head, lang)
    st.dataframe(table, hide_index=True, key="nsa_metrics",
                 column_config={t(key, lang): st.column_config.TextColumn(help=t(key + "_help", lang))
                                for _, key in COLUMNS.values()})
    st.caption(t("nsa.table_note", lang, h=head))

    grid = selection_grid(data, head)
    _chart(viz_nsa.block_selection_map(grid, tokens=tokens, title=t("nsa.blocks_title_head", lang, h=head), lang=lang,
                                       plain=True), "nsa_blocks")
    guide.note("nsa_blocks", lang)
    if cfg["selection_heads"] < H:
        st.caption(t("nsa.blocks_shared", lang, g=H // cfg["selection_heads"]))

    mix = data["mix"]
    rows = viz_nsa.RowMix(mix["values"][head], mix["gates"][head], mix["step"], data["shape"][1])
    _chart(viz_nsa.gate_mix(rows, equal_gates=data["equal_gates"], lang=lang), "nsa_gates")
    guide.note("nsa_gates", lang)
    if data["equal_gates"]:
        st.caption(t("nsa.gates_equal_note", lang))
