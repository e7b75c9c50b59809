"""q, k, v from a user's file: .npy, .npz or .safetensors, never unpickled.

Layouts:

- ``.npz`` / ``.safetensors``: arrays named ``q`` and ``k`` (and ``v``; without
  it v = k, which changes outputs but not attention weights), each 4-d
  (B, H, L, D) in SDPA layout. Optional token strings: a 1-d string array
  ``tokens`` in .npz, or a JSON list under the metadata key ``tokens`` in
  .safetensors; they must number Lk, or they are ignored (with a note).
- ``.npy``: one 5-d array (2 or 3, B, H, L, D) stacking q, k[, v]; or one 4-d
  array (B, H, L, D) used as q, k and v at once (self-similarity).

``np.load`` is never called. It reports a text file renamed ``.npy`` as
"pickled data" (it falls back to unpickling whatever lacks the magic bytes)
and trusts a zip directory's sizes, so each .npy header is read here (with
``ast.literal_eval``, as numpy does) and its claims are checked before an
array is built: the magic bytes, the dtype (object arrays would need
unpickling), the claimed size against the limit, the claimed size against
the bytes that are really there. A .npz member is unpacked only up to the size
its directory claims and must come out at exactly that size.

Every refusal is a SourceError whose code (``errors.ERROR_CODES``) says which
rule the file broke; its params are facts (name, shape, bytes), so the app can
word it in any language.
"""
from __future__ import annotations

import ast
import io
import json
import math
import os
import struct
import zipfile
import zlib
from pathlib import Path

import numpy as np
import torch

from .._checks import FLOAT_DTYPES, check_qkv
from .errors import Note, SourceError

__all__ = ["DEFAULT_MAX_BYTES", "FILE_SUFFIXES", "read_qkv_file"]

DEFAULT_MAX_BYTES = 256 * 2**20
FILE_SUFFIXES = (".npy", ".npz", ".safetensors")
NPY_MAGIC = b"\x93NUMPY"
# numpy's own bound on a header (np.load's max_header_size): a longer one is refused before it is parsed.
MAX_HEADER_BYTES = 10_000
ARRAY_NAMES = ("q", "k", "v")


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
    if data is not None and not isinstance(data, (bytes, bytearray)):
        raise TypeError(f"data must be bytes, got {type(data).__name__}")
    label = str(path) if path is not None else str(name or "")
    suffix = Path(label).suffix.lower()
    if suffix not in FILE_SUFFIXES:
        allowed = ", ".join(FILE_SUFFIXES)
        raise SourceError("bad_suffix", f"{label!r}: the file name must end in {allowed}", path=label, suffix=suffix,
                          allowed=allowed)
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
    arrays, tokens, notes = reader(label, bytes(data), max_bytes)
    q, k, v = (_check_array(label, n, arrays[n]) for n in ARRAY_NAMES)
    try:
        check_qkv(q, k, v)
    except (ValueError, TypeError) as e:
        raise SourceError("qkv_mismatch", f"{label!r}: q, k and v do not fit together: {e}", path=label,
                          shapes=[tuple(t.shape) for t in (q, k, v)], reason=str(e)) from e
    if tokens is not None and len(tokens) != k.shape[2]:
        notes.append(Note("tokens_ignored", f"{len(tokens)} tokens for {k.shape[2]} keys: tokens ignored",
                          {"count": len(tokens), "length": k.shape[2]}))
        tokens = None
    return q, k, v, tokens, notes


def _check_size(label: str, size: int, limit: int) -> None:
    if size > limit:
        raise SourceError("too_large", f"{label!r} is {size} bytes, over the limit of {limit}", path=label, size=size,
                          limit=limit)


def _at(label: str, name: str) -> str:
    return f"{label!r}" if not name else f"array {name!r} in {label!r}"


def _looks_like_pickle(data: bytes) -> bool:
    # Pickle protocols 2 to 5 open with PROTO (0x80) and the protocol number; older ones have no marker.
    return len(data) >= 2 and data[0] == 0x80 and 2 <= data[1] <= 5


def _parse_npy(label: str, name: str, data: bytes, max_bytes: int) -> np.ndarray:
    """The array in the bytes of one .npy file (``name``: its member in a .npz, or ""), once its header's claims hold."""
    at = _at(label, name)
    where = {"path": label, "name": name}

    def bad_header(reason: str) -> SourceError:
        return SourceError("bad_header", f"{at}: the .npy header cannot be read ({reason})", reason=reason, **where)

    if not data.startswith(NPY_MAGIC):
        if _looks_like_pickle(data):
            raise SourceError("raw_pickle", f"{at} is a Python pickle, not a .npy array; pickles are never loaded",
                              **where)
        raise SourceError("not_npy", f"{at} is not a .npy array: it does not start with the .npy magic bytes", **where)
    major = data[6] if len(data) > 6 else None
    if major == 1:
        start, fmt = 10, "<H"
    elif major in (2, 3):
        start, fmt = 12, "<I"
    else:
        raise bad_header(f"version {major} is not a .npy version (1, 2 or 3)")
    if len(data) < start:
        raise bad_header("the file ends inside the header")
    (length,) = struct.unpack(fmt, data[8:start])
    if length > MAX_HEADER_BYTES:
        raise bad_header(f"a header of {length} bytes, over {MAX_HEADER_BYTES}")
    if len(data) < start + length:
        raise bad_header("the file ends inside the header")
    try:
        text = data[start : start + length].decode("utf-8" if major == 3 else "latin1")
        header = ast.literal_eval(text)  # literals only: the header can name no code
    except (ValueError, SyntaxError, TypeError, MemoryError, RecursionError) as e:
        raise bad_header(f"not a Python literal: {type(e).__name__}") from None
    if not isinstance(header, dict) or set(header) != {"descr", "fortran_order", "shape"}:
        raise bad_header("not a dict of descr, fortran_order and shape")
    shape, fortran = header["shape"], header["fortran_order"]
    if not isinstance(shape, tuple) or not all(type(n) is int and n >= 0 for n in shape) or type(fortran) is not bool:
        raise bad_header(f"shape {shape!r}, fortran_order {fortran!r}")
    try:
        dtype = np.lib.format.descr_to_dtype(header["descr"])
    except (TypeError, ValueError, KeyError, IndexError) as e:
        raise bad_header(f"dtype {header['descr']!r}: {e}") from None
    if dtype.hasobject:
        raise SourceError("pickle", f"{at} is an object array: reading it would mean unpickling, which is never done",
                          **where)
    if dtype.subdtype is not None or dtype.itemsize == 0:
        raise SourceError("bad_dtype", f"{at} has dtype {dtype}", dtype=str(dtype), **where)
    count = math.prod(shape)
    claimed = count * dtype.itemsize
    if claimed > max_bytes:
        raise SourceError("header_too_large", f"{at}: the header claims shape {shape}, {claimed} bytes, over the limit "
                          f"of {max_bytes}", shape=shape, claimed=claimed, limit=max_bytes, **where)
    body = memoryview(data)[start + length :]
    if len(body) != claimed:
        raise SourceError("truncated", f"{at}: the header's shape {shape} needs {claimed} bytes of data, the file holds "
                          f"{len(body)}", claimed=claimed, actual=len(body), **where)
    arr = np.frombuffer(body, dtype=dtype, count=count)
    arr = arr.reshape(shape[::-1]).T if fortran else arr.reshape(shape)
    # A writable copy in native byte order: torch takes neither read-only nor byte-swapped memory.
    return arr.astype(dtype.newbyteorder("="), order="C")


def _read_npy(label: str, data: bytes, max_bytes: int):
    arr = _parse_npy(label, "", data, max_bytes)
    if arr.ndim == 5 and arr.shape[0] in (2, 3):
        names = ARRAY_NAMES[: arr.shape[0]]
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
                          path=label, name="", shape=tuple(arr.shape), rule="stack",
                          reason="axis 0 of a 5-d array must be 2 or 3")
    _check_array(label, "", arr)  # raises the clear message for 2-d, 3-d, ... (dtype first)
    raise AssertionError("unreachable: _check_array rejects every non-4-d array")


def _read_npz(label: str, data: bytes, max_bytes: int):
    try:
        archive = zipfile.ZipFile(io.BytesIO(data))
        members = archive.infolist()
    except (zipfile.BadZipFile, zipfile.LargeZipFile, ValueError, OSError, EOFError, NotImplementedError,
            struct.error) as e:  # NotImplementedError: a "zip version" zipfile does not read
        raise SourceError("bad_format", f"{label!r} is not a .npz (zip) archive: {e}", path=label, format=".npz",
                          reason=str(e)) from e
    # np.savez stores array x as "x.npy"; a later entry of the same name wins, as in zipfile's own lookup.
    entries = {(m.filename[:-4] if m.filename.endswith(".npy") else m.filename): m for m in members}
    wanted = [n for n in (*ARRAY_NAMES, "tokens") if n in entries]
    # Compression can hide a huge array in a small file: bound what the directory says it unpacks to.
    unpacked = sum(entries[n].file_size for n in wanted)
    if unpacked > max_bytes:
        raise SourceError("unpacks_too_large", f"{label!r} unpacks to {unpacked} bytes, over the limit of {max_bytes}",
                          path=label, size=unpacked, limit=max_bytes)
    arrays = {n: _parse_npy(label, n, _unpack(label, archive, entries[n], n), max_bytes) for n in wanted}
    return _named(label, arrays, list(entries), _npz_tokens(arrays.pop("tokens", None)))


def _unpack(label: str, archive: zipfile.ZipFile, info: zipfile.ZipInfo, name: str) -> bytes:
    """One member's bytes, exactly as many as the directory claims (never more: reading stops there)."""
    if info.flag_bits & 0x1:
        raise SourceError("bad_format", f"{label!r}: entry {name!r} is encrypted", path=label, format=".npz",
                          reason="encrypted entry")
    try:
        with archive.open(info) as f:
            raw = f.read(info.file_size + 1)
    except NotImplementedError as e:  # a compression method zipfile does not have
        raise SourceError("bad_format", f"{label!r}: entry {name!r}: {e}", path=label, format=".npz", reason=str(e)) from e
    except (zipfile.BadZipFile, EOFError, zlib.error, OSError, ValueError, RuntimeError) as e:
        # Bad CRC, a stream that ends early, a local header that names another file: the directory lies.
        raise SourceError("archive_mismatch", f"{label!r}: entry {name!r} does not match the zip directory: {e}",
                          path=label, name=name, reason=str(e)) from e
    if len(raw) != info.file_size:
        raise SourceError("archive_mismatch", f"{label!r}: the zip directory gives entry {name!r} {info.file_size} "
                          f"bytes, its data unpacks to {len(raw)}", path=label, name=name,
                          reason=f"{info.file_size} claimed, {len(raw)} found")
    return raw


def _npz_tokens(arr) -> list[str] | None:
    if arr is None or arr.ndim != 1 or arr.dtype.kind not in "US":
        return None
    return [x.decode("utf-8", "replace") if isinstance(x, bytes) else str(x) for x in arr.tolist()]


def _read_safetensors(label: str, data: bytes, max_bytes: int):
    from safetensors import SafetensorError
    from safetensors.torch import load

    try:
        tensors = load(data)  # checks the header's offsets and shapes against the buffer
        (n,) = struct.unpack("<Q", data[:8])
        header = json.loads(data[8 : 8 + n])
    except (SafetensorError, struct.error, ValueError, RuntimeError, TypeError, RecursionError, OverflowError) as e:
        raise SourceError("bad_format", f"{label!r} is not a valid .safetensors file: {e}", path=label,
                          format=".safetensors", reason=str(e)) from e
    tokens = None
    meta = header.get("__metadata__") if isinstance(header, dict) else None
    if isinstance(meta, dict) and "tokens" in meta:
        try:
            parsed = json.loads(meta["tokens"])
        except (TypeError, ValueError, RecursionError):
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


SHAPE_HINTS = {
    2: ("two_d", "a 2-d (L, D) array needs batch and head axes: save x[None, None], shape (1, 1, L, D)"),
    3: ("three_d", "a 3-d (H, L, D) array needs a batch axis: save x[None], shape (1, H, L, D)"),
}


def _check_array(label: str, name: str, arr) -> torch.Tensor:
    """One array -> a 4-d, floating, finite torch tensor, or a SourceError saying which rule it broke.

    ``name``: the array's name in the file ("" for the one array of a .npy).
    """
    at = _at(label, name)
    if isinstance(arr, np.ndarray):
        if arr.dtype.hasobject:
            raise SourceError("pickle", f"{at} is an object array, which is never loaded", path=label, name=name)
        if arr.dtype.kind != "f" or arr.dtype.itemsize > 8:
            raise SourceError("bad_dtype", f"{at} has dtype {arr.dtype}; allowed: float16, float32, float64",
                              path=label, name=name, dtype=str(arr.dtype))
        t = torch.from_numpy(np.ascontiguousarray(arr))
    else:
        t = arr
        if t.dtype not in FLOAT_DTYPES:
            raise SourceError("bad_dtype", f"{at} has dtype {t.dtype}; allowed: float16, bfloat16, float32, float64",
                              path=label, name=name, dtype=str(t.dtype).removeprefix("torch."))
    shape = tuple(t.shape)
    if t.dim() != 4:
        rule, hint = SHAPE_HINTS.get(t.dim(), ("not_4d", "expected 4-d (B, H, L, D)"))
        raise SourceError("bad_shape", f"{at} must be 4-d (B, H, L, D), got shape {shape}; {hint}",
                          path=label, name=name, shape=shape, rule=rule, reason=hint)
    if 0 in shape:
        raise SourceError("bad_shape", f"{at} has an empty axis, shape {shape}", path=label, name=name,
                          shape=shape, rule="empty_axis", reason="every axis must be >= 1")
    bad = int((~torch.isfinite(t)).sum())
    if bad:
        raise SourceError("non_finite", f"{at} holds {bad} NaN or infinite values", path=label, name=name, count=bad)
    return t
