"""Where q, k, v come from: the sidebar's settings turned into a ``sparse_attn.sources.Source``.

Sources are loaded on the CPU in float32 (``compute`` moves them to the chosen
device and dtype). The model is loaded once per server process and shared by
every session (``st.cache_resource``); it is read-only after loading.

The file uploader (``uploader``) speaks the reader's language and says what
became of a file the browser refused. Streamlit's uploader checks size and
type in the browser: a refused file never reaches the server, no rerun
happens, and the widget keeps returning the file it held before, so the page
would go on drawing that one. A few lines of JavaScript (a Streamlit
component) watch the uploader's input and report a file over the limit or of
another type; the refusal then stands in for the upload (``Refused``) until a
new file is accepted, and the panels show why in place of their pictures.
"""
from __future__ import annotations

import functools
from pathlib import Path
from typing import MutableMapping, NamedTuple

import streamlit as st

from sparse_attn.i18n import t
from sparse_attn.methods import SettingError
from sparse_attn.sources import DEFAULT_MAX_BYTES, FILE_SUFFIXES, PATTERNS, Source, SourceError, load, load_model

from .markup import code_span, size_text, size_texts

MAX_TEXT_CHARS = 2000   # the model reads at most 512 tokens; longer text gets a message, not a silent no-op
MAX_UPLOAD_BYTES = min(DEFAULT_MAX_BYTES, 64 * 2**20)  # also .streamlit/config.toml's maxUploadSize (in MiB)
SUFFIXES = tuple(s.lstrip(".") for s in FILE_SUFFIXES)
DEFAULT_TEXT = "The cat sat on the mat because it was warm, and the dog watched the cat from the door."

UPLOAD_KEY = "upload_file"      # the uploader widget (and its .st-key-upload_file element)
WATCH_KEY = "upload_watch"      # the component that reports refused files
REFUSED_KEY = "_upload_refused"  # session_state: (Refused, the uploader's file_id when it was refused)


def patterns() -> list[str]:
    return list(PATTERNS)


@st.cache_resource(show_spinner=False)
def model():
    """The default pretrained encoder, loaded once per process (about 3 s)."""
    return load_model()


class Refused(NamedTuple):
    """A file the browser refused before sending it: its name, its size in bytes, and why ("size" or "suffix")."""

    name: str
    size: int
    reason: str

    def error(self) -> SourceError:
        """The SourceError a server-side check of the same file would raise."""
        if self.reason == "suffix":
            allowed = ", ".join(FILE_SUFFIXES)
            return SourceError("bad_suffix", f"{self.name!r}: the file name must end in {allowed}", path=self.name,
                               suffix=Path(self.name).suffix.lower(), allowed=allowed)
        return SourceError("too_large", f"{self.name!r} is {self.size} bytes, over the limit of {MAX_UPLOAD_BYTES}",
                           path=self.name, size=self.size, limit=MAX_UPLOAD_BYTES)


def source(s: dict, upload: tuple[str, bytes] | Refused | None = None) -> Source:
    """The Source for these settings; ``upload`` is (file name, bytes) for the file source, or what was refused."""
    if s["source"] == "model":
        text = s.get("text", "")
        if len(text) > MAX_TEXT_CHARS:
            raise SettingError("text_too_long", f"text has {len(text)} characters; at most {MAX_TEXT_CHARS} are read",
                               count=len(text), limit=MAX_TEXT_CHARS)
        model()  # warm the shared model through the resource cache
        return Source.model(text, layer=s["layer"])
    if s["source"] == "file":
        if isinstance(upload, Refused):
            raise upload.error()
        name, data = upload if upload is not None else ("", None)
        if data is None:
            raise SettingError("no_upload", "upload a q/k/v file first")
        return Source.file(data=data, name=name, max_bytes=MAX_UPLOAD_BYTES)
    return Source.synthetic(s["pattern"], heads=s["H"], length=s["L"], head_dim=s["D"], seed=s["seed"])


def load_qkv(s: dict, upload=None):
    """(q, k, v, tokens, notes) for these settings, on the CPU."""
    qkv = load(source(s, upload))
    return qkv.q, qkv.k, qkv.v, qkv.tokens, list(qkv.notes)


# ---------------------------------------------------------------- the uploader

# Runs in the page. It only watches: Streamlit's uploader still does its own checks (and sends nothing
# it refuses). A refused file's error chip, which Streamlit words in English only, is removed once the
# server has been told, so the sidebar keeps showing what is loaded.
WATCH_JS = """
export default function (component) {
  const { data, setTriggerValue } = component;
  const root = () => document.querySelector(".st-key-" + data.key);
  const reported = new Set();
  const verdict = (file) => {
    const lower = file.name.toLowerCase();
    if (!data.suffixes.some((s) => lower.endsWith(s))) return "suffix";
    return file.size > data.limit ? "size" : null;
  };
  const dropChips = (tries) => {
    const r = root();
    for (const chip of r ? r.querySelectorAll('[data-testid="stFileChip"][aria-invalid="true"]') : []) {
      const name = chip.querySelector('[data-testid="stFileChipName"]');
      const remove = chip.querySelector('[data-testid="stFileChipDeleteBtn"] button');
      if (name && remove && reported.has(name.getAttribute("title"))) remove.click();
    }
    if (tries > 0) setTimeout(() => dropChips(tries - 1), 50);
  };
  const check = (target, files) => {
    const r = root();
    if (!r || !r.contains(target) || !files || !files.length) return;
    const file = files[0];  // a single-file uploader keeps the first
    const why = verdict(file);
    if (!why) return;
    reported.add(file.name);
    setTriggerValue("refused", { name: file.name, size: file.size, reason: why });
    dropChips(40);
  };
  const onChange = (e) => { if (e.target && e.target.type === "file") check(e.target, e.target.files); };
  const onDrop = (e) => check(e.target, e.dataTransfer && e.dataTransfer.files);
  document.addEventListener("change", onChange, true);
  document.addEventListener("drop", onDrop, true);
  return () => {
    document.removeEventListener("change", onChange, true);
    document.removeEventListener("drop", onDrop, true);
  };
}
"""


@functools.cache
def _watcher():
    return st.components.v2.component("sparse_attn_upload_watch", js=WATCH_JS)


def _css_string(text: str) -> str:
    """``text`` as a CSS string literal (for ``content:``)."""
    return '"' + "".join(c if c.isalnum() or c in " .,;:()·、，。" else f"\\{ord(c):x} " for c in text) + '"'


def uploader_css(lang: str) -> str:
    """Streamlit's uploader in ``lang``: its English button and drop hint replaced, its sizes (in "MB") hidden.

    The limit and the formats are said in our own caption below the uploader instead.
    """
    box = f".st-key-{UPLOAD_KEY} [data-testid='stFileUploaderDropzone']"
    button = f"{box} button[data-testid='stBaseButton-secondary'] [data-testid='stMarkdownContainer'] p"
    overlay = f"{box} > div:not([data-testid]) > span"  # shown only while a file is dragged over
    return "\n".join([
        f".st-key-{WATCH_KEY} {{ display: none; }}",
        f"{box} [data-testid='stFileUploaderDropzoneInstructions'] {{ display: none; }}",
        f"{box} [data-testid='stFileChipName'] + div {{ display: none; }}",
        f"{button}, {overlay} {{ font-size: 0; }}",
        f"{button}::after {{ content: {_css_string(t('io.upload_button', lang))}; font-size: 0.875rem; }}",
        f"{overlay}::after {{ content: {_css_string(t('io.drop_here', lang))}; font-size: 0.875rem; }}",
    ])


def track_refusal(store: MutableMapping, reported, file_id: str | None) -> Refused | None:
    """The refusal that stands for the upload on this run, or None.

    ``reported``: what the page sent on this run (None on most runs). A
    refusal lasts while the uploader holds the file it held when the refusal
    came: a newly accepted file, or removing the old one, ends it. The report
    comes from the browser, so only a well-formed one counts.
    """
    if isinstance(reported, dict):
        name, size, reason = reported.get("name"), reported.get("size"), reported.get("reason")
        if isinstance(name, str) and type(size) is int and size >= 0 and reason in ("size", "suffix"):
            store[REFUSED_KEY] = (Refused(name[:255], size, reason), file_id)
    held = store.get(REFUSED_KEY)
    if held is None:
        return None
    refused, held_for = held
    if held_for != file_id:
        del store[REFUSED_KEY]
        return None
    return refused


def refusal_caption(refused: Refused, lang: str) -> str:
    """One line under the uploader: which file was not loaded and why (the panels say more)."""
    if refused.reason == "suffix":
        return t("io.refused_suffix", lang, path=code_span(refused.name))
    size, limit = size_texts(refused.size, MAX_UPLOAD_BYTES)
    return t("io.refused_size", lang, path=code_span(refused.name), size=size, limit=limit)


def uploader(container, lang: str) -> tuple[str, bytes] | Refused | None:
    """The file uploader in ``container`` (the sidebar), in ``lang``; returns what the panels should read.

    (file name, bytes) for an accepted file, a ``Refused`` while the last file
    picked was refused in the browser, None before any file.
    """
    container.html(f"<style>{uploader_css(lang)}</style>")
    f = container.file_uploader(t("setting.file", lang), type=list(SUFFIXES), key=UPLOAD_KEY, help=t("help.file", lang))
    with container:
        seen = _watcher()(key=WATCH_KEY, data={"key": UPLOAD_KEY, "limit": MAX_UPLOAD_BYTES, "suffixes": list(FILE_SUFFIXES)},
                          on_refused_change=lambda: None)
    refused = track_refusal(st.session_state, getattr(seen, "refused", None), None if f is None else f.file_id)
    container.caption(t("io.upload_hint", lang, limit=size_text(MAX_UPLOAD_BYTES)))
    if refused is not None:
        container.caption(refusal_caption(refused, lang))
        return refused
    return None if f is None else (f.name, f.getvalue())
