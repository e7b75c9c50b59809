"""sparse-attn: sparse attention you can see and tune.

Data flows one way: sources -> ops -> methods -> metrics -> viz -> ui
(docs/architecture.md). This top level gives the ops, ``Selection`` and the
``nn.Module`` front doors; sources, the method registry, the sweep, metrics
and figures are imported from their own modules. Importing this package never
imports Streamlit (that lives in ``sparse_attn.ui``).
"""
from .decode import KVCache
from .modules import SparseAttention, SparseAttentionWithImportanceSampling
from .ops.dense import dense_attention
from .ops.nsa import NSAMaps, nsa_attention, selected_block_attention
from .ops.quest import quest_attention
from .ops.sampling import sampled_attention
from .ops.sliding_window import sliding_window_attention
from .ops.streaming_llm import streaming_llm_attention
from .ops.topk import topk_attention
from .selection import Selection
from .topk import StreamingTopK, TopK, chunked_topk, merge_topk, stable_topk

__all__ = [
    "KVCache",
    "NSAMaps",
    "Selection",
    "SparseAttention",
    "SparseAttentionWithImportanceSampling",
    "StreamingTopK",
    "TopK",
    "chunked_topk",
    "dense_attention",
    "merge_topk",
    "nsa_attention",
    "quest_attention",
    "sampled_attention",
    "selected_block_attention",
    "sliding_window_attention",
    "stable_topk",
    "streaming_llm_attention",
    "topk_attention",
]
__version__ = "0.1.0"
