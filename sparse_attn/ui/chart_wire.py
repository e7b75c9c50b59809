"""How a chart travels to the browser: a JSON head, then the figure's arrays as raw bytes.

    uint32 little-endian n | n bytes of UTF-8 JSON {"config", "failed", "figure", "blobs"} | the blobs

Each blob starts on an 8-byte boundary; ``blobs`` lists their byte lengths. Inside ``figure`` an
array is ``{"dtype", "blob", "shape"}``, and ``plot_assets/plot.js`` turns it into plotly.js's own
typed-array record (``{dtype, bdata, shape}`` with an ArrayBuffer). Raw bytes rather than plotly's
base64: the websocket deflates every message, and raw float32 maps whose low mantissa bits are zero
(``viz._compact``) deflate far better than their base64 text. The map figure at the defaults, L = 256:
1.1 MB of arrays deflate to 22 kB in 7 ms, where its base64 JSON (1.5 MB) took 21 ms for 132 kB
(zlib level 6 with a 4 KiB window, as the app's websocket negotiates; one process, this machine).

Only plain dicts (the ``viz`` map builders with ``plain=True``) are split this way, which also skips
plotly's object model and its encoder's deep copy. A ``go.Figure``, or a dict with a NaN outside an
array (JSON has none), goes as plotly's own JSON, arrays in base64.
"""
from __future__ import annotations

import base64
import functools
import json
import struct

import numpy as np
import plotly.io as pio

__all__ = ["pack", "unpack"]

# plotly.js's typed arrays, by numpy dtype.
TYPED = {"int8": "i1", "uint8": "u1", "int16": "i2", "uint16": "u2", "int32": "i4", "uint32": "u4",
         "float32": "f4", "float64": "f8"}
UNTYPED_KEYS = {"geojson", "layer", "layers", "range"}  # plotly.js wants plain lists under these (as plotly's encoder)
_SCALARS = (str, int, float, bool)
ALIGN = 8


@functools.cache
def _template() -> dict:
    return pio.templates[pio.templates.default].to_plotly_json()


def _split(obj, blobs: list[bytes], key=None):
    """``obj`` with each array replaced by a reference into ``blobs`` (appended to), and unset (None) values left out."""
    if isinstance(obj, dict):
        return {k: _split(v, blobs, k) for k, v in obj.items() if v is not None}
    if isinstance(obj, (list, tuple)):
        if all(type(v) in _SCALARS for v in obj):  # an axis's category labels: hundreds of strings, nothing inside
            return obj
        return [_split(v, blobs) for v in obj]
    if isinstance(obj, np.ndarray):
        if key in UNTYPED_KEYS or obj.size == 0 or str(obj.dtype) not in TYPED:
            return obj.tolist()
        blobs.append(np.ascontiguousarray(obj).tobytes())
        return {"dtype": TYPED[str(obj.dtype)], "blob": len(blobs) - 1, "shape": ",".join(map(str, obj.shape))}
    if isinstance(obj, np.generic):
        return obj.item()
    return obj


def _pad(n: int) -> int:
    return -n % ALIGN


def pack(fig, *, config: dict, failed: str) -> bytes:
    """The bytes ``plot.js`` draws: ``fig`` (a plain dict or a ``go.Figure``), plotly's ``config``, and the
    sentence shown if plotly.js cannot load."""
    blobs: list[bytes] = []
    figure = None
    if isinstance(fig, dict):
        fig = {**fig, "layout": {"template": _template(), **fig.get("layout", {})}}  # plotly's look, as a go.Figure
        try:
            figure = json.dumps(_split(fig, blobs), allow_nan=False, separators=(",", ":"))
        except ValueError:
            blobs = []
    if figure is None:
        figure = pio.to_json(fig, validate=False)
    head = (f'{{"config":{json.dumps(config)},"failed":{json.dumps(failed)},"blobs":{json.dumps([len(b) for b in blobs])},'
            f'"figure":{figure}}}').encode()
    parts = [struct.pack("<I", len(head)), head, b"\0" * _pad(4 + len(head))]
    for b in blobs:
        parts += [b, b"\0" * _pad(len(b))]
    return b"".join(parts)


def _join(obj, blobs: list[bytes]):
    if isinstance(obj, dict):
        if "blob" in obj and "dtype" in obj:
            spec = {"dtype": obj["dtype"], "bdata": base64.b64encode(blobs[obj["blob"]]).decode("ascii")}
            if "," in obj["shape"]:
                spec["shape"] = obj["shape"]
            return spec
        return {k: _join(v, blobs) for k, v in obj.items()}
    if isinstance(obj, list):
        return [_join(v, blobs) for v in obj]
    return obj


def unpack(payload: bytes) -> dict:
    """The head of ``pack``'s bytes, its figure as plotly's JSON would hold it (arrays in base64): for tests and
    the load drivers, which read what a student's browser was sent."""
    (n,) = struct.unpack_from("<I", payload)
    head = json.loads(payload[4:4 + n])
    blobs, at = [], 4 + n + _pad(4 + n)
    for length in head["blobs"]:
        blobs.append(payload[at:at + length])
        at += length + _pad(length)
    head["figure"] = _join(head["figure"], blobs)
    return head
