"""The attention ops, PyTorch references with SDPA's shapes and argument names; kernels take over on CUDA."""
from .dense import causal_mask, dense_attention
from .nsa import NSAMaps, nsa_attention, selected_block_attention
from .sampling import PROPOSALS, sampled_attention
from .sliding_window import sliding_window_attention
from .topk import topk_attention

__all__ = ["PROPOSALS", "NSAMaps", "causal_mask", "dense_attention", "nsa_attention", "sampled_attention",
           "selected_block_attention", "sliding_window_attention", "topk_attention"]
