"""Every chart of the app through one call: one plotly div per chart, updated in place, and PNG export in the browser.

Why not ``st.plotly_chart``: it hashes the whole figure into the element's id, so every new figure
mounts a new chart, and its frontend re-serialises the figure twice more for its theme. At L=4096 a
pooling toggle spent about 0.7 s in the browser on that, against about 0.25 s for plotly's own
drawing. The ``plot`` component (``plot_assets/plot.js``) keeps the div for as long as its key
lives and hands each new figure to ``Plotly.react``, which redraws only what changed.

plotly.js comes from the installed plotly package (the version its figures are written for),
copied next to ``plot.js`` and served by the app itself: nothing is fetched from elsewhere.
The camera button of plotly's toolbar draws the PNG in the student's browser, so the server starts
no browser of its own and holds no export lock for a classroom to queue behind.
"""
from __future__ import annotations

import os
import weakref
from pathlib import Path

import plotly
import streamlit as st
from streamlit.components.v2.get_bidi_component_manager import get_bidi_component_manager
from streamlit.errors import StreamlitAPIException

from sparse_attn.i18n import t

from . import chart_wire

PNG_SCALE = 2  # twice the on-screen pixels: sharp in slides and handouts
ASSETS = Path(__file__).with_name("plot_assets")


def _install_plotly_js() -> None:
    """Copy the installed plotly's plotly.min.js next to plot.js, unless the same file is there already."""
    src = Path(plotly.__file__).parent / "package_data" / "plotly.min.js"
    dst = ASSETS / "plotly.min.js"
    new = src.read_bytes()
    if dst.is_file() and dst.read_bytes() == new:
        return
    tmp = dst.with_name(f".plotly.{os.getpid()}.tmp")  # several servers may start at once: replace atomically
    try:
        tmp.write_bytes(new)
        os.replace(tmp, dst)
    except OSError as exc:  # a read-only install: keep the copy made when it was installed, if there is one
        if not dst.is_file():
            raise RuntimeError(f"cannot write {dst.name} into {ASSETS}: the charts need it there ({exc})") from exc


NAME = "sparse-attn.plot"
_renderers: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()


def _component():
    # Registered on first use in each Streamlit runtime (a server has one; tests start many): the runtime
    # reads the package's component manifest (pyproject.toml, ``[tool.streamlit.component]``) as it starts.
    registry = get_bidi_component_manager()
    if registry not in _renderers:
        _install_plotly_js()
        try:
            _renderers[registry] = st.components.v2.component(NAME, js="plot.js", isolate_styles=False)
        except StreamlitAPIException as exc:  # the app was started from a checkout that was never installed
            raise RuntimeError("the charts are a component of the installed package: run `pip install -e .` "
                               "in the project's folder, then start the app again") from exc
    return _renderers[registry]


def config(filename: str) -> dict:
    return {"displaylogo": False,
            "toImageButtonOptions": {"format": "png", "filename": filename, "scale": PNG_SCALE}}


def show(fig, key: str, *, filename: str | None = None, container=None) -> None:
    """Draw ``fig`` under the Streamlit ``key``; its camera button saves ``filename``.png (default: the key)."""
    lang = st.session_state.get("lang", "en")
    # Bytes (``chart_wire``), not a dict: a dict would be JSON-encoded again and then parsed and re-sorted by
    # Streamlit to hash it; and the arrays go raw, which the websocket's deflate compresses far better.
    payload = chart_wire.pack(fig, config=config(filename or key), failed=t("chart.failed", lang))
    with container if container is not None else st.container():
        _component()(key=key, data=payload)


def elements(at) -> list:
    """The charts of an AppTest run, in page order (other components, such as the upload watch, left out)."""
    return [e for e in at.get("bidi_component") if e.proto.component_name == NAME]


def spec(element) -> dict:
    """The figure a chart element carries (an AppTest element, or a ``BidiComponent`` proto from the socket)."""
    proto = getattr(element, "proto", element)
    return chart_wire.unpack(proto.bytes)["figure"]


def save_hint(lang: str, container=None) -> None:
    """Where the PNG is: a student looking for a download button finds the toolbar's camera instead."""
    (container or st).caption(t("export.png_hint", lang))
