"""Tab 1: dense and sparse attention maps side by side, with the numbers next to them."""
from __future__ import annotations

import pandas as pd
import streamlit as st

from sparse_attn import viz
from sparse_attn.i18n import t

from . import charts, compute, errors, guide, lessons, model_panel, nsa_panel, state


def _si(x: float, unit: str = "") -> str:
    for factor, prefix in ((1e12, "T"), (1e9, "G"), (1e6, "M"), (1e3, "k")):
        if abs(x) >= factor:
            return f"{x / factor:.3g} {prefix}{unit}"
    return f"{x:.3g} {unit}".strip()


def _bytes(x: float) -> str:
    for factor, name in ((2**30, "GiB"), (2**20, "MiB"), (2**10, "KiB")):
        if x >= factor:
            return f"{x / factor:.3g} {name}"
    return f"{x:.0f} B"


def metrics_table(data: dict, lang: str) -> pd.DataFrame:
    """Per-head metrics with translated column names, for the table and the CSV."""
    ph = data["per_head"]
    return pd.DataFrame({
        t("metric.head", lang): list(range(len(ph["mass_kept"]))),
        t("metric.mass_kept", lang): ph["mass_kept"],
        t("metric.relative_error", lang): ph["relative_error"],
        t("metric.error_vs_uniform", lang): ph["error_vs_uniform"],
        t("metric.total_variation", lang): ph["total_variation"],
    })


def render(s: dict, lang: str) -> None:
    _panel(s, lang)


# A fragment: head, log scale and pooling rerun this panel only (the sidebar, the lesson banner and the
# other tabs are neither rerun nor sent again). A change in the sidebar reruns the whole page, this included.
@st.fragment
def _panel(s: dict, lang: str) -> None:
    ss = st.session_state
    # What a full run does around the panel, for a run of the panel alone: the link follows the view,
    # and a lesson whose settings were left (or restored) redraws its banner.
    state.write_query_params(state.specs())
    if lessons.drift_changed():
        st.rerun(scope="app")
    controls = st.container()  # filled once the data says how many heads there are
    try:
        data = compute.view({k: s[k] for k in compute.COMPUTE_KEYS}, s["upload"])
    except Exception as exc:  # a bad setting or input breaks this panel only
        errors.show(exc, lang)
        return
    H = data["shape"][0]
    view = compute.pick(data, ss["head"], ss["pool"])
    if ss["head"] != view["head"]:
        ss["head"] = view["head"]
    c1, c2, c3 = controls.columns(3)
    if H > 1:
        c1.slider(t("setting.head", lang), 0, H - 1, key="head")
    c2.toggle(t("setting.log", lang), key="log", help=t("help.log", lang))
    c3.radio(t("setting.pool", lang), ("max", "mean"), key="pool", horizontal=True,
             format_func=lambda p: t(f"viz.pool_{p}", lang), help=t("help.pool", lang))
    for code, params in data["notes"]:
        try:
            st.info(t(f"note.{code}", lang, **params))
        except (KeyError, IndexError):
            pass
    if note := state.text_link_note(lang):
        st.caption(note)
    m = data["metrics"]
    maps = view["maps"]
    fig = viz.attention_maps(maps["dense"], maps["sparse"], maps["mask"], diff=maps["diff"], log=ss["log"],
                             mask_exact=maps.get("exact"),
                             tokens=data["tokens"], method_name=t(f"method.{s['method']}", lang),
                             title=t("viz.maps_title_head", lang, h=view["head"]), lang=lang, plain=True)
    left, right = st.columns([3, 1])
    charts.show(fig, "maps_chart", filename="attention_maps", container=left)
    guide.note("maps", lang, left)
    with right:
        st.metric(t("metric.mass_kept", lang), f"{m['mass_kept']:.1%}", help=t("help.mass_kept", lang))
        # One tile for both errors: the error against zeros, and below it the error against uniform attention.
        st.metric(t("metric.relative_error", lang), f"{m['relative_error']:.3g}",
                  t("metric.vs_uniform", lang, value=f"{m['error_vs_uniform']:.3g}"), delta_color="off",
                  delta_arrow="off", help=t("help.relative_error", lang))
        st.metric(t("metric.sparsity", lang), f"{m['sparsity']:.1%}", help=t("help.sparsity", lang))
        st.metric(t("metric.keys_scored", lang), f"{m['keys_scored']:.1f}")
        st.metric(t("metric.keys_attended", lang), f"{m['keys_attended']:.1f}")
        st.metric(t("metric.flops", lang), _si(m["flops"]),
                  t("metric.vs_dense", lang, value=_si(m["flops_dense"])), delta_color="off", delta_arrow="off")
        st.metric(t("metric.memory", lang), _bytes(m["memory"]),
                  t("metric.vs_dense", lang, value=_bytes(m["memory_dense"])), delta_color="off", delta_arrow="off")
        st.caption(t("maps.error_note", lang, ref=f"{data['norms']['ref']:.3g}", v=f"{data['norms']['v']:.3g}"))
    if "nsa" in data:  # NSA's one map mixes three branches: draw each, and the blocks it picked
        nsa_panel.render(data["nsa"], head=view["head"], pool=ss["pool"], log=ss["log"], tokens=data["tokens"],
                         lang=lang)
    if s["source"] == "model":
        model_panel.render(s, lang)
    table = metrics_table(data, lang)
    st.subheader(t("maps.heads", lang))
    charts.show(viz.head_grid(view["grid"], log=ss["log"], lang=lang, plain=True), "grid_chart",
                filename="attention_heads")
    guide.note("heads", lang)
    st.dataframe(table, hide_index=True)
    summary = pd.DataFrame([{t(f"metric.{k}", lang): v for k, v in m.items()}])
    charts.save_hint(lang)
    e2, e3 = st.columns(2)
    # Written on every rerun (about 2 ms), not deferred to the click: a deferred download has no address until the
    # browser asks, and a class behind nginx is tested by fetching each page's file through its own worker.
    e2.download_button(t("export.csv_metrics", lang), summary.to_csv(index=False).encode(),
                       file_name="metrics.csv", mime="text/csv", key="csv_metrics", on_click="ignore")
    e3.download_button(t("export.csv_heads", lang), table.to_csv(index=False).encode(),
                       file_name="metrics_per_head.csv", mime="text/csv", key="csv_heads", on_click="ignore")
