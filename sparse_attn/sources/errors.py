"""Errors and notes a user can be shown in any language.

The app translates by ``code`` and fills the message from ``params``; the
English ``str()`` is for logs, notebooks and tracebacks.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from .._checks import CodedError

__all__ = ["ERROR_CODES", "NOTE_CODES", "Note", "SourceError"]

# Every code a SourceError can carry, with the params it always sets.
ERROR_CODES: dict[str, tuple[str, ...]] = {
    "bad_argument": ("name", "value", "allowed"),
    "unknown_pattern": ("pattern", "allowed"),
    "empty_text": (),
    "layer_out_of_range": ("layer", "num_layers"),
    "missing_model": ("path",),
    "unsupported_model": ("path", "reason"),
    "missing_file": ("path",),
    "bad_format": ("path", "reason"),
    "pickle": ("path", "reason"),
    "too_large": ("path", "size", "limit"),
    "missing_array": ("path", "name", "found"),
    "bad_shape": ("path", "name", "shape", "reason"),
    "bad_dtype": ("path", "name", "dtype"),
    "non_finite": ("path", "name", "count"),
}

NOTE_CODES: dict[str, tuple[str, ...]] = {
    "truncated": ("kept", "total"),
    "v_from_k": (),
    "shared_qkv": (),
    "tokens_ignored": ("count", "length"),
    "weak_plant": ("pattern", "head_dim"),
}


class SourceError(CodedError):
    """Bad input to a source: ``code`` (a key of ERROR_CODES) and ``params`` say what, for translation."""


@dataclass(frozen=True)
class Note:
    """Something a user should know about loaded data (e.g. truncated text); translate by ``code``."""

    code: str
    message: str
    params: dict[str, Any] = field(default_factory=dict)

    def __str__(self) -> str:
        return self.message
