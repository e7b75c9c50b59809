"""GPU kernels (Triton) behind the library's PyTorch reference functions.

Nothing here is needed on the CPU: the reference functions dispatch to these
kernels only for CUDA tensors, and fall back to PyTorch otherwise. Triton is
imported lazily, so ``import sparse_attn`` works where Triton is missing.

Modules:
    selected_block  NSA's selected-block branch, one program per (query, KV group)
    topk_prefilter  exact top-k attention that ranks key segments by their maximum first
    topk_fused      exact top-k attention in two fused passes, no score matrix in memory
    compressed      NSA's compressed branch + group-summed selection-block importance,
                    one program per (query block, KV group)
"""
