"""Where q, k, v come from: the sidebar's settings turned into a ``sparse_attn.sources.Source``.

Sources are loaded on the CPU in float32 (``compute`` moves them to the chosen
device and dtype). The model is loaded once per server process and shared by
every session (``st.cache_resource``); it is read-only after loading.
"""
from __future__ import annotations

import streamlit as st

from sparse_attn.methods import SettingError
from sparse_attn.sources import DEFAULT_MAX_BYTES, FILE_SUFFIXES, PATTERNS, Source, load, load_model

MAX_TEXT_CHARS = 2000   # the model reads at most 512 tokens; longer text gets a message, not a silent no-op
MAX_UPLOAD_BYTES = min(DEFAULT_MAX_BYTES, 64 * 2**20)  # also .streamlit/config.toml's maxUploadSize
SUFFIXES = tuple(s.lstrip(".") for s in FILE_SUFFIXES)
DEFAULT_TEXT = "The cat sat on the mat because it was warm, and the dog watched the cat from the door."


def patterns() -> list[str]:
    return list(PATTERNS)


@st.cache_resource(show_spinner=False)
def model():
    """The default pretrained encoder, loaded once per process (about 3 s)."""
    return load_model()


def source(s: dict, upload: tuple[str, bytes] | None = None) -> Source:
    """The Source for these settings; ``upload`` is (file name, bytes) for the file source."""
    if s["source"] == "model":
        text = s.get("text", "")
        if len(text) > MAX_TEXT_CHARS:
            raise SettingError("text_too_long", f"text has {len(text)} characters; at most {MAX_TEXT_CHARS} are read",
                               count=len(text), limit=MAX_TEXT_CHARS)
        model()  # warm the shared model through the resource cache
        return Source.model(text, layer=s["layer"])
    if s["source"] == "file":
        name, data = upload if upload is not None else ("", None)
        if data is None:
            raise SettingError("no_upload", "upload a q/k/v file first")
        return Source.file(data=data, name=name, max_bytes=MAX_UPLOAD_BYTES)
    return Source.synthetic(s["pattern"], heads=s["H"], length=s["L"], head_dim=s["D"], seed=s["seed"])


def load_qkv(s: dict, upload=None):
    """(q, k, v, tokens, notes) for these settings, on the CPU."""
    qkv = load(source(s, upload))
    return qkv.q, qkv.k, qkv.v, qkv.tokens, list(qkv.notes)
