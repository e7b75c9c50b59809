"""Turn an exception into a message in the reader's language, shown in place of the panel it broke."""
from __future__ import annotations

import logging
import os

import streamlit as st

from sparse_attn.i18n import t
from sparse_attn.sources.errors import SourceError

from .state import widget_of

log = logging.getLogger("sparse_attn.app")

FAULT_ENV = "SPARSE_ATTN_FAULT"  # comma-separated panel names; set only by the fault-injection tests


def inject_fault(panel: str) -> None:
    """Raise midway through ``panel``'s computation when the server was started with it in ``SPARSE_ATTN_FAULT``.

    A test-only hook: it lets the served app's error handling be checked from
    a real browser, where nothing can be monkeypatched. Unset, it does nothing.
    """
    if panel in os.environ.get(FAULT_ENV, "").split(","):
        raise RuntimeError(f"injected fault in the {panel} panel")


def setting_label(name: str, lang: str) -> str:
    """The label of the widget that sets ``name`` (a Config field, or seq_len / heads / head_dim)."""
    return t(f"setting.{widget_of(name)}", lang)


def message(exc: BaseException, lang: str) -> str:
    code = getattr(exc, "code", None)
    params = dict(getattr(exc, "params", {}) or {})
    if code is not None:
        prefix = "err.source." if isinstance(exc, SourceError) else "err."
        try:
            if "setting" in params:  # name the widget (the slider to lower), in the reader's language
                params["setting"] = setting_label(params["setting"], lang)
            return t(prefix + code, lang, **params)
        except (KeyError, IndexError, ValueError):
            pass  # a code or param this catalog does not know yet: fall through to the generic text
    if isinstance(exc, (ValueError, TypeError)):
        return t("err.invalid", lang, detail=str(exc))
    return t("err.unexpected", lang, detail=f"{type(exc).__name__}: {exc}")


def show(exc: BaseException, lang: str) -> None:
    """An error box for this panel only; unexpected errors are also logged with their traceback."""
    if not isinstance(exc, (ValueError, TypeError)):
        log.exception("panel failed", exc_info=exc)
    st.error(message(exc, lang), icon="⚠️")
