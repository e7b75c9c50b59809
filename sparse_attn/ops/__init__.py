"""The attention ops, PyTorch references with SDPA's shapes and argument names; kernels take over on CUDA."""
from .dense import causal_mask, dense_attention
from .nsa import NSAMaps, nsa_attention, selected_block_attention
from .quest import quest_attention
from .sampling import PROPOSALS, sampled_attention
from .sliding_window import sliding_window_attention
from .streaming_llm import streaming_llm_attention
from .topk import topk_attention

__all__ = ["PROPOSALS", "NSAMaps", "causal_mask", "dense_attention", "nsa_attention", "quest_attention",
           "sampled_attention", "selected_block_attention", "sliding_window_attention", "streaming_llm_attention",
           "topk_attention"]
