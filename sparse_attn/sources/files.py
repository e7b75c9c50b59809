"""q, k, v from a user's file: .npy, .npz or .safetensors, never unpickled.

Layouts:

- ``.npz`` / ``.safetensors``: arrays named ``q`` and ``k`` (and ``v``; without
  it v = k, which changes outputs but not attention weights), each 4-d
  (B, H, L, D) in SDPA layout. Optional token strings: a 1-d string array
  ``tokens`` in .npz, or a JSON list under the metadata key ``tokens`` in
  .safetensors; they must number Lk, or they are ignored (with a note).
- ``.npy``: one 5-d array (2 or 3, B, H, L, D) stacking q, k[, v]; or one 4-d
  array (B, H, L, D) used as q, k and v at once (self-similarity).

Checks, each a SourceError with its own code: the size limit (on disk and,
for .npz, uncompressed), no pickles or object arrays (``allow_pickle=False``;
safetensors cannot hold code), floating dtypes only (float16, bfloat16,
float32, float64), 4-d shapes that fit together as SDPA q/k/v with no empty
axis, and finite values.
"""
from __future__ import annotations

import io
import json
import os
import struct
import zipfile
from pathlib import Path

import numpy as np
import torch

from .._checks import FLOAT_DTYPES, check_qkv
from .errors import Note, SourceError

__all__ = ["DEFAULT_MAX_BYTES", "FILE_SUFFIXES", "read_qkv_file"]

DEFAULT_MAX_BYTES = 256 * 2**20
FILE_SUFFIXES = (".npy", ".npz", ".safetensors")


def read_qkv_file(
    path: str | os.PathLike | None = None,
    *,
    data: bytes | None = None,
    name: str | None = None,
    max_bytes: int = DEFAULT_MAX_BYTES,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, list[str] | None, list[Note]]:
    """Read and validate q, k, v (tensors in the file's floating dtype), tokens or None, and notes.

    Give either ``path`` or ``data`` (the bytes of an upload) with ``name``
    (its file name, for the format and for messages).
    """
    if (path is None) == (data is None):
        raise TypeError("give exactly one of path or data")
    label = str(path) if path is not None else str(name or "")
    suffix = Path(label).suffix.lower()
    if suffix not in FILE_SUFFIXES:
        raise SourceError("bad_format", f"{label!r}: the file must end in {', '.join(FILE_SUFFIXES)}", path=label, reason=f"suffix {suffix!r}")
    if path is not None:
        if not os.path.isfile(path):
            raise SourceError("missing_file", f"no file at {label!r}", path=label)
        size = os.path.getsize(path)
    else:
        size = len(data)
    _check_size(label, size, max_bytes)
    if path is not None:
        with open(path, "rb") as f:
            data = f.read(max_bytes + 1)
    reader = {".npy": _read_npy, ".npz": _read_npz, ".safetensors": _read_safetensors}[suffix]
    arrays, tokens, notes = reader(label, data, max_bytes)
    q, k, v = (_check_array(label, n, arrays[n]) for n in ("q", "k", "v"))
    try:
        check_qkv(q, k, v)
    except (ValueError, TypeError) as e:
        raise SourceError("bad_shape", f"{label!r}: q, k and v do not fit together: {e}", path=label, name="q/k/v",
                          shape=[tuple(t.shape) for t in (q, k, v)], reason=str(e)) from e
    if tokens is not None and len(tokens) != k.shape[2]:
        notes.append(Note("tokens_ignored", f"{len(tokens)} tokens for {k.shape[2]} keys: tokens ignored",
                          {"count": len(tokens), "length": k.shape[2]}))
        tokens = None
    return q, k, v, tokens, notes


def _check_size(label: str, size: int, limit: int) -> None:
    if size > limit:
        raise SourceError("too_large", f"{label!r} is {size} bytes, over the limit of {limit}", path=label, size=size, limit=limit)


def _np_load(label: str, raw) -> np.ndarray:
    try:
        return np.load(raw, allow_pickle=False)
    except ValueError as e:
        if "pickle" in str(e).lower():
            raise SourceError("pickle", f"{label!r} holds pickled or object data, which is never loaded", path=label, reason=str(e)) from e
        raise SourceError("bad_format", f"{label!r} is not a valid numpy file: {e}", path=label, reason=str(e)) from e
    except (OSError, EOFError, zipfile.BadZipFile) as e:
        raise SourceError("bad_format", f"{label!r} is not a valid numpy file: {e}", path=label, reason=str(e)) from e


def _read_npy(label: str, data: bytes, max_bytes: int):
    arr = _np_load(label, io.BytesIO(data))
    if not isinstance(arr, np.ndarray):
        raise SourceError("bad_format", f"{label!r} is not a .npy array", path=label, reason=type(arr).__name__)
    if arr.ndim == 5 and arr.shape[0] in (2, 3):
        names = ("q", "k", "v")[: arr.shape[0]]
        arrays = dict(zip(names, arr))
        notes = []
        if "v" not in arrays:
            arrays["v"] = arrays["k"].copy()
            notes.append(Note("v_from_k", "no v in the file: v = k (attention weights are unaffected)"))
        return arrays, None, notes
    if arr.ndim == 4:
        return {"q": arr, "k": arr.copy(), "v": arr.copy()}, None, [Note("shared_qkv", "one 4-d array: used as q, k and v")]
    if arr.ndim == 5:
        raise SourceError("bad_shape", f"{label!r}: a 5-d .npy must stack 2 or 3 arrays (q, k[, v]) on axis 0, got {arr.shape}",
                          path=label, name="q", shape=tuple(arr.shape), reason="axis 0 of a 5-d array must be 2 or 3")
    _check_array(label, "q", arr)  # raises the clear message for 2-d, 3-d, ... (dtype first)
    raise AssertionError("unreachable: _check_array rejects every non-4-d array")


def _read_npz(label: str, data: bytes, max_bytes: int):
    try:
        members = zipfile.ZipFile(io.BytesIO(data)).infolist()
    except zipfile.BadZipFile as e:
        raise SourceError("bad_format", f"{label!r} is not a valid .npz (zip) file", path=label, reason=str(e)) from e
    # Compression could hide a huge array in a small file: bound what it unpacks to.
    _check_size(label, sum(m.file_size for m in members), max_bytes)
    npz = _np_load(label, io.BytesIO(data))
    with npz:
        found = list(npz.files)
        arrays = {}
        for n in ("q", "k", "v", "tokens"):
            if n in found:
                try:
                    arrays[n] = npz[n]
                except ValueError as e:
                    raise SourceError("pickle", f"{label!r}: array {n!r} holds pickled or object data, which is never loaded",
                                      path=label, reason=str(e)) from e
    return _named(label, arrays, found, _npz_tokens(arrays.pop("tokens", None)))


def _npz_tokens(arr) -> list[str] | None:
    if arr is None or arr.ndim != 1 or arr.dtype.kind not in "US":
        return None
    return [x.decode() if isinstance(x, bytes) else str(x) for x in arr.tolist()]


def _read_safetensors(label: str, data: bytes, max_bytes: int):
    from safetensors import SafetensorError
    from safetensors.torch import load

    try:
        (n,) = struct.unpack("<Q", data[:8])
        header = json.loads(data[8 : 8 + n])
        tensors = load(data)
    except (SafetensorError, struct.error, ValueError, RuntimeError, TypeError) as e:
        raise SourceError("bad_format", f"{label!r} is not a valid .safetensors file: {e}", path=label, reason=str(e)) from e
    tokens = None
    meta = header.get("__metadata__") if isinstance(header, dict) else None
    if isinstance(meta, dict) and "tokens" in meta:
        try:
            parsed = json.loads(meta["tokens"])
        except (TypeError, ValueError):
            parsed = None
        if isinstance(parsed, list) and all(isinstance(t, str) for t in parsed):
            tokens = parsed
    return _named(label, tensors, list(tensors), tokens)


def _named(label: str, arrays: dict, found: list[str], tokens):
    for n in ("q", "k"):
        if n not in arrays:
            raise SourceError("missing_array", f"{label!r} has no array named {n!r} (found: {', '.join(found) or 'none'})",
                              path=label, name=n, found=found)
    notes = []
    if "v" not in arrays:
        arrays["v"] = arrays["k"].clone() if isinstance(arrays["k"], torch.Tensor) else arrays["k"].copy()
        notes.append(Note("v_from_k", "no v in the file: v = k (attention weights are unaffected)"))
    return arrays, tokens, notes


def _check_array(label: str, name: str, arr) -> torch.Tensor:
    """One array -> a 4-d, floating, finite torch tensor, or a SourceError saying which rule it broke."""
    if isinstance(arr, np.ndarray):
        if arr.dtype.hasobject:
            raise SourceError("pickle", f"{label!r}: {name} is an object array, which is never loaded", path=label, reason="object dtype")
        if arr.dtype.kind != "f" or arr.dtype.itemsize > 8:
            raise SourceError("bad_dtype", f"{label!r}: {name} has dtype {arr.dtype}; allowed: float16, float32, float64",
                              path=label, name=name, dtype=str(arr.dtype))
        t = torch.from_numpy(np.ascontiguousarray(arr))
    else:
        t = arr
        if t.dtype not in FLOAT_DTYPES:
            raise SourceError("bad_dtype", f"{label!r}: {name} has dtype {t.dtype}; allowed: float16, bfloat16, float32, float64",
                              path=label, name=name, dtype=str(t.dtype).removeprefix("torch."))
    shape = tuple(t.shape)
    if t.dim() != 4:
        hint = {
            2: "a 2-d (L, D) array needs batch and head axes: save x[None, None], shape (1, 1, L, D)",
            3: "a 3-d (H, L, D) array needs a batch axis: save x[None], shape (1, H, L, D)",
        }.get(t.dim(), "expected 4-d (B, H, L, D)")
        raise SourceError("bad_shape", f"{label!r}: {name} must be 4-d (B, H, L, D), got shape {shape}; {hint}",
                          path=label, name=name, shape=shape, reason=hint)
    if 0 in shape:
        raise SourceError("bad_shape", f"{label!r}: {name} has an empty axis, shape {shape}", path=label, name=name,
                          shape=shape, reason="every axis must be >= 1")
    bad = int((~torch.isfinite(t)).sum())
    if bad:
        raise SourceError("non_finite", f"{label!r}: {name} holds {bad} NaN or infinite values", path=label, name=name, count=bad)
    return t
