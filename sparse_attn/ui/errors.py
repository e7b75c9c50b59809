"""Turn an exception into a message in the reader's language, shown in place of the panel it broke.

Messages are Markdown (``st.error`` renders it), and some of their values come
from the user: a file's name, the array names inside it, a value typed into a
URL. Those go in as inline code (``markup.code_span``), where Markdown draws no
image, link, emoji or formula; free text from an exception is escaped. Sizes
are written in binary units (KiB, MiB, GiB), the units the limits are set in.
"""
from __future__ import annotations

import logging
import os

import streamlit as st

from sparse_attn.i18n import t
from sparse_attn.sources.errors import SourceError

from .markup import code_span, escape_markdown, join_list, size_texts
from .state import widget_of

log = logging.getLogger("sparse_attn.app")

FAULT_ENV = "SPARSE_ATTN_FAULT"  # comma-separated panel names; set only by the fault-injection tests

# Params that hold what a user typed, named or uploaded: shown as inline code, never as Markdown.
VERBATIM = ("path", "name", "dtype", "suffix", "pattern", "value")
# Params that hold byte counts.
SIZES = ("size", "limit", "claimed", "actual")


def inject_fault(panel: str) -> None:
    """Raise midway through ``panel``'s computation when the server was started with it in ``SPARSE_ATTN_FAULT``.

    A test-only hook: it lets the served app's error handling be checked from
    a real browser, where nothing can be monkeypatched. Unset, it does nothing.
    """
    if panel in os.environ.get(FAULT_ENV, "").split(","):
        raise RuntimeError(f"injected fault in the {panel} panel")


def _sizes(params: dict) -> None:
    present = [k for k in SIZES if type(params.get(k)) is int]
    params.update(zip(present, size_texts(*(params[k] for k in present))))


def _shape(shape) -> str:
    if isinstance(shape, (list, tuple)) and shape and all(isinstance(s, (list, tuple)) for s in shape):
        return ", ".join(_shape(s) for s in shape)
    if isinstance(shape, (list, tuple)):
        return "(" + ", ".join(str(n) for n in shape) + ("," if len(shape) == 1 else "") + ")"
    return str(shape)


def setting_label(name: str, lang: str) -> str:
    """The label of the widget that sets ``name`` (a Config field, or seq_len / heads / head_dim)."""
    return t(f"setting.{widget_of(name)}", lang)


def _source_params(params: dict, lang: str) -> dict:
    """A SourceError's params worded for ``lang``: where in the file, which shape rule, sizes and names."""
    if "rule" in params:
        params["rule"] = t(f"io.shape_rule.{params['rule']}", lang)
    if "shape" in params:
        params["shape"] = _shape(params["shape"])
    if "shapes" in params:
        params["shapes"] = _shape(params["shapes"])
    if "found" in params:
        found = [code_span(n) for n in params["found"]]
        params["found"] = join_list(found, lang) if found else t("io.none_found", lang)
    _sizes(params)
    return params


def message(exc: BaseException, lang: str) -> str:
    """The Markdown message for ``exc`` in ``lang`` (user-given values as inline code)."""
    code = getattr(exc, "code", None)
    params = dict(getattr(exc, "params", {}) or {})
    if code is not None:
        source = isinstance(exc, SourceError)
        prefix = "err.source." if source else "err."
        try:
            if "setting" in params:  # name the widget (the slider to lower), in the reader's language
                params["setting"] = setting_label(params["setting"], lang)
            if source:
                params = _source_params(params, lang)
            for key in VERBATIM:
                if key in params and isinstance(params[key], str) and params[key]:
                    params[key] = code_span(params[key])
            if source and "path" in params:
                # The array inside the file, when there is one: "array `q` in `x.npz`", else the file itself.
                params["where"] = t("io.where_member", lang, name=params["name"], path=params["path"]) \
                    if params.get("name") else params["path"]
            return t(prefix + code, lang, **params)
        except (KeyError, IndexError, ValueError):
            pass  # a code or param this catalog does not know yet: fall through to the generic text
    if isinstance(exc, (ValueError, TypeError)):
        return t("err.invalid", lang, detail=escape_markdown(exc))
    return t("err.unexpected", lang, detail=escape_markdown(f"{type(exc).__name__}: {exc}"))


def show(exc: BaseException, lang: str) -> None:
    """An error box for this panel only; unexpected errors are also logged with their traceback."""
    if not isinstance(exc, (ValueError, TypeError)):
        log.exception("panel failed", exc_info=exc)
    st.error(message(exc, lang), icon="⚠️")
