"""Errors and notes a user can be shown in any language.

The app translates by ``code`` and fills the message from ``params``; the
English ``str()`` is for logs, notebooks and tracebacks. Params hold facts
(a file name, a shape, a size in bytes, a rule's code), never English prose a
translation would have to carry along: ``reason`` where present is for logs only.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from .._checks import CodedError

__all__ = ["ERROR_CODES", "NOTE_CODES", "SHAPE_RULES", "Note", "SourceError"]

# Every code a SourceError can carry, with the params it always sets.
ERROR_CODES: dict[str, tuple[str, ...]] = {
    "bad_argument": ("name", "value", "allowed"),
    "unknown_pattern": ("pattern", "allowed"),
    "empty_text": (),
    "layer_out_of_range": ("layer", "num_layers"),
    "missing_model": ("path",),
    "unsupported_model": ("path", "reason"),
    "missing_file": ("path",),
    # The file's name does not end in a suffix the reader knows.
    "bad_suffix": ("path", "suffix", "allowed"),
    # The bytes are not the container the suffix names (a .npz that is no zip, a broken .safetensors).
    "bad_format": ("path", "format", "reason"),
    # A .npy (or a .npz member) without the .npy magic bytes at its start.
    "not_npy": ("path", "name"),
    # A raw Python pickle under an array suffix.
    "raw_pickle": ("path", "name"),
    # An object array: its bytes are a pickle, which is never loaded.
    "pickle": ("path", "name"),
    # The .npy magic is there but the header after it cannot be read.
    "bad_header": ("path", "name", "reason"),
    # The header claims an array larger than the limit: refused before anything is allocated.
    "header_too_large": ("path", "name", "shape", "claimed", "limit"),
    # The header's shape and dtype need ``claimed`` bytes of data; the file holds ``actual``.
    "truncated": ("path", "name", "claimed", "actual"),
    # A .npz whose zip directory disagrees with its data (sizes, checksum, compressed stream).
    "archive_mismatch": ("path", "name", "reason"),
    "too_large": ("path", "size", "limit"),
    # A .npz whose directory says its arrays unpack past the limit (a small file can hide a huge array).
    "unpacks_too_large": ("path", "size", "limit"),
    "missing_array": ("path", "name", "found"),
    "bad_shape": ("path", "name", "shape", "rule", "reason"),
    # Each array is fine on its own, but q, k and v do not make one SDPA call.
    "qkv_mismatch": ("path", "shapes", "reason"),
    "bad_dtype": ("path", "name", "dtype"),
    "non_finite": ("path", "name", "count"),
}

# ``rule`` of a bad_shape error: which shape rule the array broke (the app words each one).
SHAPE_RULES = ("two_d", "three_d", "not_4d", "empty_axis", "stack")

NOTE_CODES: dict[str, tuple[str, ...]] = {
    "truncated": ("kept", "total"),
    "v_from_k": (),
    "shared_qkv": (),
    "tokens_ignored": ("count", "length"),
    "unknown_tokens": ("share", "count", "total"),
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
