"""Where q, k and v come from: synthetic patterns, a real model on the user's text, or a file.

One entry point for the app and the notebooks::

    from sparse_attn.sources import Source, load

    qkv = load(Source.synthetic("sink_local", length=1024, seed=1))
    qkv = load(Source.model("The cat sat on the mat.", layer=3))
    qkv = load(Source.file("my_qkv.npz"))
    out = dense_attention(qkv.q, qkv.k, qkv.v, causal=qkv.causal, scale=qkv.scale)

``load`` returns a ``QKV``: q (B, H, Lq, D), k (B, Hkv, Lk, D), v (B, Hkv, Lk, Dv)
in SDPA layout, float32 unless asked otherwise, plus token strings when the
source has them, a label and notes. Bad input raises ``SourceError`` (a
ValueError) whose ``code`` and ``params`` let the app say it in any language.
"""
from __future__ import annotations

import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal, get_args

import torch

from .._checks import FLOAT_DTYPES
from .errors import ERROR_CODES, NOTE_CODES, Note, SourceError
from .files import DEFAULT_MAX_BYTES, FILE_SUFFIXES, read_qkv_file
from .model import default_model_dir, load_model, model_qkv
from .synthetic import CLEAN_HEAD_DIM, PATTERNS, pattern_params, synthetic_qkv

__all__ = [
    "DEFAULT_MAX_BYTES",
    "ERROR_CODES",
    "FILE_SUFFIXES",
    "KINDS",
    "NOTE_CODES",
    "PATTERNS",
    "QKV",
    "Note",
    "Source",
    "SourceError",
    "default_model_dir",
    "load",
    "load_model",
    "model_info",
    "model_qkv",
    "pattern_params",
    "read_qkv_file",
    "synthetic_qkv",
]

Kind = Literal["synthetic", "model", "file"]
KINDS: tuple[str, ...] = get_args(Kind)  # the kinds of Source, in the order the app lists them


@dataclass(frozen=True)
class Source:
    """What to load; hashable, so it can key a cache. Build it with the classmethods.

    Only the fields of its ``kind`` matter: synthetic (pattern .. params),
    model (text .. max_tokens), file (path .. max_bytes). ``dtype`` None keeps
    the source's own floating dtype; ``device`` is where the tensors go.
    """

    kind: Kind
    pattern: str = "random"
    batch: int = 1
    heads: int = 4
    kv_heads: int | None = None
    length: int = 256
    head_dim: int = 64
    seed: int = 0
    params: tuple[tuple[str, Any], ...] = ()
    text: str = ""
    layer: int = 0
    model_dir: str | None = None
    max_tokens: int | None = None
    path: str | None = None
    data: bytes | None = field(default=None, repr=False)
    name: str | None = None
    max_bytes: int = DEFAULT_MAX_BYTES
    dtype: torch.dtype | None = torch.float32
    device: str = "cpu"

    def __post_init__(self) -> None:
        if self.kind not in KINDS:
            raise SourceError("bad_argument", f"kind must be one of {', '.join(KINDS)}, got {self.kind!r}",
                              name="kind", value=self.kind, allowed=", ".join(KINDS))
        if isinstance(self.params, dict):
            object.__setattr__(self, "params", tuple(sorted(self.params.items())))

    @classmethod
    def synthetic(cls, pattern: str = "random", *, batch: int = 1, heads: int = 4, kv_heads: int | None = None,
                  length: int = 256, head_dim: int = 64, seed: int = 0, dtype: torch.dtype | None = torch.float32,
                  device: str = "cpu", **params) -> "Source":
        """A planted pattern (see ``PATTERNS`` and ``pattern_params``); params are the pattern's own."""
        return cls("synthetic", pattern=pattern, batch=batch, heads=heads, kv_heads=kv_heads, length=length,
                   head_dim=head_dim, seed=seed, params=tuple(sorted(params.items())), dtype=dtype, device=device)

    @classmethod
    def model(cls, text: str, *, layer: int = 0, model_dir: str | os.PathLike | None = None,
              max_tokens: int | None = None, dtype: torch.dtype | None = torch.float32, device: str = "cpu") -> "Source":
        """One layer of a local pretrained encoder (default all-MiniLM-L6-v2) reading ``text``."""
        return cls("model", text=text, layer=layer, model_dir=None if model_dir is None else str(model_dir),
                   max_tokens=max_tokens, dtype=dtype, device=device)

    @classmethod
    def file(cls, path: str | os.PathLike | None = None, *, data: bytes | None = None, name: str | None = None,
             max_bytes: int = DEFAULT_MAX_BYTES, dtype: torch.dtype | None = torch.float32, device: str = "cpu") -> "Source":
        """A .npy / .npz / .safetensors file by path, or its bytes (an upload) with its file name."""
        return cls("file", path=None if path is None else str(path), data=data, name=name, max_bytes=max_bytes,
                   dtype=dtype, device=device)


@dataclass(frozen=True, eq=False)
class QKV:
    """Loaded tensors in SDPA layout, ready for every attention function in the library.

    q (B, H, Lq, D), k (B, Hkv, Lk, D), v (B, Hkv, Lk, Dv). ``tokens`` has one
    string per key (None when the source has none). ``causal`` and ``scale``
    are what the source's attention used (pass them on). ``notes`` say what
    was changed on the way (e.g. truncation); ``meta`` holds facts such as a
    model's ``num_layers``.
    """

    q: torch.Tensor
    k: torch.Tensor
    v: torch.Tensor
    tokens: list[str] | None
    label: str
    notes: tuple[Note, ...] = ()
    causal: bool = False
    scale: float | None = None
    source: Source | None = None
    meta: dict[str, Any] = field(default_factory=dict)


def model_info(model_dir: str | os.PathLike | None = None) -> dict[str, Any]:
    """name, num_layers, num_heads, head_dim and max_tokens of a model (loads it once)."""
    m = load_model(model_dir)
    return {"name": m.name, "num_layers": m.num_layers, "num_heads": m.num_heads, "head_dim": m.head_dim, "max_tokens": m.max_tokens}


def load(source: Source) -> QKV:
    """Load ``source`` into a QKV; every bad input is a SourceError with a ``code``."""
    if not isinstance(source, Source):
        raise TypeError(f"source must be a Source, got {type(source).__name__}")
    if source.dtype is not None and source.dtype not in FLOAT_DTYPES:
        allowed = "float16, bfloat16, float32, float64 or None"
        raise SourceError("bad_argument", f"dtype must be {allowed}, got {source.dtype!r}", name="dtype", value=str(source.dtype), allowed=allowed)
    notes: list[Note] = []
    tokens, causal, scale, meta = None, False, None, {}
    if source.kind == "synthetic":
        params = dict(source.params)
        q, k, v = synthetic_qkv(source.pattern, batch=source.batch, heads=source.heads, kv_heads=source.kv_heads,
                                length=source.length, head_dim=source.head_dim, seed=source.seed, **params)
        if source.head_dim < CLEAN_HEAD_DIM and source.pattern not in ("random", "flat"):
            notes.append(Note("weak_plant", f"head_dim {source.head_dim} < {CLEAN_HEAD_DIM}: the {source.pattern} structure is noisier",
                              {"pattern": source.pattern, "head_dim": source.head_dim}))
        causal = bool(params.get("causal", False))
        label = f"{source.pattern} (L={source.length}, H={source.heads}, D={source.head_dim}, seed={source.seed})"
        meta = {"pattern": source.pattern, "params": {**pattern_params(source.pattern), **params}}
    elif source.kind == "model":
        q, k, v, tokens, model_notes, loaded = model_qkv(source.text, layer=source.layer, model_dir=source.model_dir,
                                                         max_tokens=source.max_tokens)
        notes += model_notes
        scale = loaded.scale
        label = f"{loaded.name}, layer {source.layer}"
        meta = {"model": loaded.name, "layer": source.layer, "num_layers": loaded.num_layers,
                "num_heads": loaded.num_heads, "max_tokens": loaded.max_tokens}
    else:
        q, k, v, tokens, file_notes = read_qkv_file(source.path, data=source.data, name=source.name, max_bytes=source.max_bytes)
        notes += file_notes
        label = Path(source.path if source.path is not None else source.name or "").name
    try:
        device = torch.device(source.device)
        q, k, v = (t.to(device=device, dtype=source.dtype or t.dtype).contiguous() for t in (q, k, v))
    except (RuntimeError, AssertionError, TypeError) as e:
        raise SourceError("bad_argument", f"device {source.device!r} is not available: {e}", name="device",
                          value=str(source.device), allowed="cpu, or an available accelerator") from e
    return QKV(q, k, v, tokens, label, tuple(notes), causal, scale, source, meta)
