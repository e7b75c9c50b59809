"""GPU kernels (Triton) behind the library's PyTorch reference ops.

Nothing here is needed on the CPU: an op dispatches to its kernel only when
``dispatch.use_triton`` says so (CUDA, Triton, no gradient, a kernel dtype, not
forced to the reference) and the kernel module's ``triton_supports`` agrees;
otherwise the op runs its PyTorch reference. Triton is imported lazily, so
``import sparse_attn`` works where Triton is missing.

Modules:
    dispatch        the one rule for when a kernel replaces its reference
    _triton         the Triton import and the launch helpers the kernels share
    topk_fused      exact top-k attention in two fused passes, no score matrix in memory
    selected_block  NSA's selected-block branch, one program per (query, KV group)
    compressed      NSA's compressed branch + group-summed selection-block importance,
                    one program per (query block, KV group)
    block_select    NSA's block selection (forced blocks, then top importance, lower index
                    among ties), one program per tile of whole importance rows
    gate_combine    NSA's gated sum of its three branch outputs, one pass
    sliding_band    the sliding window, one program per (query block, KV group): the group's
                    heads share each key tile of the band
    sliding_flex    the sliding window through PyTorch's FlexAttention (a block mask built
                    from its tiles, one compiled kernel per shape), for smaller groups
"""
