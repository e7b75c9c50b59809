"""Decoding: new queries, one token (or a few) at a time, against a KV cache that grows by append.

Where sparse attention pays in generation: a step's cost is the bytes of K
and V it reads, so each decoder returns its output, what it selected and
``BytesRead``. ``KVCache`` keeps what the sparse methods read instead of the
keys (NSA's compressed blocks, Quest's page bounds) as tokens arrive. Every
decoder equals the last rows of its parallel causal method on the same
tokens (tests/test_decode.py).

    cache = KVCache.for_config(cfg, B, Hkv, capacity, D)
    cache.append(k_new, v_new)                 # (B, Hkv, 1, D) each
    r = decode("nsa", q_new, cache, cfg)        # q_new (B, H, 1, D)
    r.output, r.selection, r.bytes_read.total
"""
from .cache import KVCache
from .dense import dense_decode, sdpa_decode
from .nsa import nsa_decode
from .quest import quest_decode
from .registry import DECODERS, EQUAL_GATES, bytes_per_step, decode
from .result import BytesRead, DecodeResult, DecodeSelection
from .streaming_llm import streaming_llm_decode
from .topk import topk_decode

__all__ = [
    "KVCache", "BytesRead", "DecodeResult", "DecodeSelection", "DECODERS", "EQUAL_GATES", "decode", "bytes_per_step",
    "dense_decode", "sdpa_decode", "topk_decode", "quest_decode", "nsa_decode", "streaming_llm_decode",
]
