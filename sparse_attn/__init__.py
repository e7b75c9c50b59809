"""sparse-attn: sparse attention you can see and tune.

Data flows one way: sources -> attention / sampling / nsa -> metrics -> viz.
Importing this package never imports Streamlit (that lives in ``sparse_attn.ui``).
"""
from .attention import Selection, dense_attention, topk_attention
from .metrics import kl_divergence, mass_kept, relative_error, summarize, topk_recall, total_variation
from .modules import SparseAttention, SparseAttentionWithImportanceSampling
from .nsa import NSAMaps, nsa_attention, selected_block_attention, sliding_window_attention
from .sampling import sampled_attention
from .sources import QKV, Source, SourceError, load
from .sweep import budget_sweep
from .topk import StreamingTopK, TopK, chunked_topk, merge_topk

__all__ = [
    "NSAMaps",
    "SparseAttention",
    "nsa_attention",
    "selected_block_attention",
    "sliding_window_attention",
    "budget_sweep",
    "kl_divergence",
    "mass_kept",
    "relative_error",
    "sampled_attention",
    "summarize",
    "topk_recall",
    "total_variation",
    "QKV",
    "Source",
    "SourceError",
    "load",
    "Selection",
    "SparseAttentionWithImportanceSampling",
    "StreamingTopK",
    "TopK",
    "chunked_topk",
    "dense_attention",
    "merge_topk",
    "topk_attention",
]
__version__ = "0.1.0"
