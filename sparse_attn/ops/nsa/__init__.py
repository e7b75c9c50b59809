"""NSA-style block-sparse attention, one file per stage: compress, select, attend to the selected blocks, gate.

See ``attention.py`` for how the three branches fit together.
"""
from .attention import NSAMaps, check_nsa_options, nsa_attention
from .compression import compress_kv, compressed_attention, compressed_visibility, mean_pool, num_compressed_blocks
from .selected import selected_block_attention
from .selection import (check_forcing, forced_blocks, importance_to_selection_blocks, random_block_indices, select_blocks,
                        selected_token_mask)
from ..sliding_window import sliding_window_attention, sliding_window_mask

__all__ = [
    "NSAMaps", "check_nsa_options", "nsa_attention",
    "compress_kv", "compressed_attention", "compressed_visibility", "mean_pool", "num_compressed_blocks",
    "selected_block_attention",
    "check_forcing", "forced_blocks", "importance_to_selection_blocks", "random_block_indices", "select_blocks",
    "selected_token_mask",
    "sliding_window_attention", "sliding_window_mask",
]
