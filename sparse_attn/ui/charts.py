"""Every chart of the app through one call: the same plotly config, and PNG export in the student's browser.

The camera button of plotly's toolbar draws the PNG in the browser that shows the
chart (plotly.js's own image export), so the server starts no browser of its own,
holds no export lock for a classroom to queue behind, and can reach no network.
"""
from __future__ import annotations

import streamlit as st

from sparse_attn.i18n import t

PNG_SCALE = 2  # twice the on-screen pixels: sharp in slides and handouts


def config(filename: str) -> dict:
    return {"displaylogo": False,
            "toImageButtonOptions": {"format": "png", "filename": filename, "scale": PNG_SCALE}}


def show(fig, key: str, *, filename: str | None = None, container=None) -> None:
    """Draw ``fig`` under the Streamlit ``key``; its camera button saves ``filename``.png (default: the key)."""
    (container or st).plotly_chart(fig, key=key, config=config(filename or key))


def save_hint(lang: str, container=None) -> None:
    """Where the PNG is: a student looking for a download button finds the toolbar's camera instead."""
    (container or st).caption(t("export.png_hint", lang))
