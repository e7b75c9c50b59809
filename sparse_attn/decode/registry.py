"""One decoder per registry method, called with a ``Config``, and what each reads per step without running it.

The names are ``sparse_attn.methods.METHODS`` keys, so the app, the
benchmarks and the notebooks say "nsa" or "quest" for decoding as they do
for the parallel forward. Settings are read from the same ``Config`` fields;
``Config.causal`` is not read: decoding is causal by nature.
"""
from __future__ import annotations

import math
from typing import Callable

import torch

from ..methods import Config, check_method
from ..ops.nsa.compression import num_compressed_blocks
from .cache import KVCache
from .dense import dense_decode
from .nsa import nsa_decode
from .quest import quest_decode
from .result import DecodeResult
from .streaming_llm import streaming_llm_decode
from .topk import topk_decode

__all__ = ["DECODERS", "EQUAL_GATES", "decode", "bytes_per_step"]

# The registry's NSA mixes its branches with equal gates; decoding uses the same.
EQUAL_GATES = (1 / 3, 1 / 3, 1 / 3)

DECODERS: dict[str, Callable[[torch.Tensor, KVCache, Config], DecodeResult]] = {
    "dense": lambda q, c, cfg: dense_decode(q, c, scale=cfg.scale),
    "topk": lambda q, c, cfg: topk_decode(q, c, cfg.top_k, scale=cfg.scale),
    "quest": lambda q, c, cfg: quest_decode(q, c, cfg.token_budget, page_size=cfg.page_size, scale=cfg.scale),
    "nsa": lambda q, c, cfg: nsa_decode(
        q, c, gates=EQUAL_GATES, sliding_window_size=cfg.sliding_window_size,
        selection_block_size=cfg.selection_block_size, num_selected_blocks=cfg.num_selected_blocks,
        compress_block_size=cfg.compress_block_size, compress_block_sliding_stride=cfg.compress_block_sliding_stride,
        num_initial_blocks=cfg.num_initial_blocks, num_local_blocks=cfg.num_local_blocks, scale=cfg.scale),
    "streaming_llm": lambda q, c, cfg: streaming_llm_decode(q, c, cfg.num_sink_tokens, cfg.sliding_window_size,
                                                            scale=cfg.scale),
}


def decode(method: str, q: torch.Tensor, cache: KVCache, cfg: Config = Config()) -> DecodeResult:
    """One decode step of ``method`` (a key of ``DECODERS``) under ``cfg``; bad settings raise as the parallel method's."""
    m = check_method(method, roles=("reference", "method"))
    if m.key not in DECODERS:
        raise ValueError(f"method must be one of {tuple(DECODERS)} (the methods with a decode step), got {method!r}")
    if m.validate is not None:
        m.validate(cfg)
    return DECODERS[m.key](q, cache, cfg)


def bytes_per_step(method: str, length: int, cfg: Config = Config(), *, batch_size: int = 1, num_heads: int = 1,
                   num_kv_heads: int = 1, head_dim: int = 128, value_dim: int | None = None,
                   itemsize: int = 2, query_heads_share_pages: bool = False) -> int:
    """Bytes of K and V one query step reads at cache ``length``, from the sizes alone (no tensors).

    Exact for dense, NSA and StreamingLLM while the selection fills its slots
    (NSA's selected blocks whole), an upper bound for top-k and Quest, whose
    group of query heads may pick overlapping rows: there each head's picks
    are counted as distinct (``query_heads_share_pages``: one Quest pick per group).
    NSA's compressed rows are counted at ``itemsize``.
    """
    if method not in DECODERS:
        raise ValueError(f"method must be one of {tuple(DECODERS)}, got {method!r}")
    L, Dv = length, head_dim if value_dim is None else value_dim
    G = num_heads // num_kv_heads
    row = head_dim + Dv
    if method == "dense":
        rows = L * row
    elif method == "topk":
        rows = L * head_dim + min(G * min(cfg.top_k, L), L) * Dv
    elif method == "quest":
        P = cfg.page_size
        pages = math.ceil(L / P)
        pickers = 1 if query_heads_share_pages else G
        picked = min(pickers * min(math.ceil(cfg.token_budget / P), pages) * P, L)
        rows = 2 * pages * head_dim + picked * row
    elif method == "nsa":
        stride = cfg.compress_block_sliding_stride or cfg.compress_block_size
        compressed = num_compressed_blocks(L, cfg.compress_block_size, stride)
        selected = min(cfg.num_selected_blocks, math.ceil(L / cfg.selection_block_size)) * cfg.selection_block_size
        rows = (compressed + min(selected, L) + min(cfg.sliding_window_size, L)) * row
    else:
        rows = min(L, cfg.num_sink_tokens + cfg.sliding_window_size) * row
    return batch_size * num_kv_heads * rows * itemsize

