"""sparse-attn: sparse attention you can see and tune.

Data flows one way: sources -> attention / sampling / nsa -> metrics -> viz.
Importing this package never imports Streamlit (that lives in ``sparse_attn.ui``).
"""
from .attention import Selection, dense_attention, topk_attention
from .modules import SparseAttentionWithImportanceSampling
from .sources import QKV, Source, SourceError, load
from .topk import StreamingTopK, TopK, chunked_topk, merge_topk

__all__ = [
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
