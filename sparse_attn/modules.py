"""nn.Module front doors with the seed's names: (B, L, dim) in, (B, L, dim) out."""
from __future__ import annotations

import torch
from einops import rearrange
from torch import nn

from ._checks import check_int
from .ops.nsa import check_nsa_options, nsa_attention
from .ops.topk import topk_attention

__all__ = ["BlockCompress", "SparseAttention", "SparseAttentionWithImportanceSampling"]


class SparseAttentionWithImportanceSampling(nn.Module):
    """The seed's class, made correct: projections, per-head top-k attention, projection out.

    Despite the seed's name this is deterministic top-k selection, not
    sampling; ``sparse_attn.ops.sampling`` holds real importance sampling. The
    name stays so the seed's callers keep working.

    Args:
        dim: model width; must be divisible by ``num_heads``.
        num_heads: query heads.
        k: keys each query attends to (>= 1); more than the key length means all keys.
        kv_heads: key/value heads (grouped-query attention); default ``num_heads``;
            must divide ``num_heads``.
        causal: SDPA's ``is_causal``.
        chunk_size: stream over key chunks of this size (see ``topk_attention``).

    ``attn(x)`` is self-attention; ``attn(q_tokens, k_tokens, v_tokens)`` takes
    (B, Lq, dim), (B, Lk, dim), (B, Lk, dim) as in the seed.
    """

    def __init__(self, dim: int, num_heads: int, k: int = 32, *, kv_heads: int | None = None,
                 causal: bool = False, chunk_size: int | None = None):
        super().__init__()
        check_int(dim, "dim", minimum=1)
        check_int(num_heads, "num_heads", minimum=1)
        check_int(k, "k", minimum=1)
        kv_heads = num_heads if kv_heads is None else check_int(kv_heads, "kv_heads", minimum=1)
        check_int(chunk_size, "chunk_size", minimum=1, allow_none=True)
        if dim % num_heads:
            raise ValueError(f"dim ({dim}) must be divisible by num_heads ({num_heads})")
        if num_heads % kv_heads:
            raise ValueError(f"num_heads ({num_heads}) must be a multiple of kv_heads ({kv_heads})")
        self.dim, self.num_heads, self.kv_heads = dim, num_heads, kv_heads
        self.head_dim = dim // num_heads
        self.k, self.causal, self.chunk_size = k, causal, chunk_size
        self.wq = nn.Linear(dim, dim)
        self.wk = nn.Linear(dim, kv_heads * self.head_dim)
        self.wv = nn.Linear(dim, kv_heads * self.head_dim)
        self.wo = nn.Linear(dim, dim)

    def forward(self, q: torch.Tensor, k: torch.Tensor | None = None, v: torch.Tensor | None = None) -> torch.Tensor:
        k = q if k is None else k
        v = k if v is None else v
        for name, t in (("q", q), ("k", k), ("v", v)):
            if not isinstance(t, torch.Tensor) or t.dim() != 3:
                raise ValueError(f"{name} must be a (B, L, dim) tensor, got {getattr(t, 'shape', type(t).__name__)}")
            if t.shape[-1] != self.dim:
                raise ValueError(f"{name}'s last dimension must be dim={self.dim}, got {t.shape[-1]}")
        if k.shape[:2] != v.shape[:2] or q.shape[0] != k.shape[0]:
            raise ValueError(f"batch/length mismatch: q {tuple(q.shape)}, k {tuple(k.shape)}, v {tuple(v.shape)}")
        heads = lambda t, h: rearrange(t, "b l (h d) -> b h l d", h=h)  # noqa: E731
        out = topk_attention(
            heads(self.wq(q), self.num_heads),
            heads(self.wk(k), self.kv_heads),
            heads(self.wv(v), self.kv_heads),
            self.k,
            causal=self.causal,
            chunk_size=self.chunk_size,
        )
        return self.wo(rearrange(out, "b h l d -> b l (h d)"))


class BlockCompress(nn.Module):
    """Learned pooling of a block of tokens into one: (B, Hkv, Nc, block, D) -> (B, Hkv, Nc, D).

    A linear map of the flattened block, shared by all heads, that starts as
    mean pooling: at initialisation the compressed branch (and its drawn map)
    is exactly NSA with mean-pooled keys and values.
    """

    def __init__(self, block_size: int, head_dim: int):
        super().__init__()
        self.block_size, self.head_dim = block_size, head_dim
        self.proj = nn.Linear(block_size * head_dim, head_dim)
        with torch.no_grad():
            eye = torch.eye(head_dim) / block_size
            self.proj.weight.copy_(torch.cat([eye] * block_size, dim=1))
            self.proj.bias.zero_()

    def forward(self, blocks: torch.Tensor) -> torch.Tensor:
        return self.proj(rearrange(blocks, "b h n w d -> b h n (w d)"))


class SparseAttention(nn.Module):
    """Native-Sparse-Attention-style block-sparse self-attention: (B, L, dim) -> (B, L, dim).

    Projects to heads, runs ``sparse_attn.ops.nsa.nsa_attention`` (compressed,
    selected and sliding branches) and mixes the branches with per-token,
    per-head gates ``sigmoid(to_gates(x))``: output column ``3 * h + s`` of
    ``to_gates`` is the gate of head h for branch s (0 compressed, 1 selected,
    2 sliding), i.e. ``rearrange(..., "b l (h s) -> b h l s", s=3)``. Keys and
    values are compressed by separate ``BlockCompress`` modules (mean pooling
    at initialisation).

    Args:
        dim: model width. dim_head: width of one head. heads: query heads.
        kv_heads: key/value heads, must divide ``heads``; default ``heads``.
        causal: no branch sees later tokens.
        sliding_window_size, compress_block_size, compress_block_sliding_stride,
        selection_block_size, num_selected_blocks, num_initial_blocks, num_local_blocks,
        query_heads_share_selected_kv, interpolated_importance_score, use_diff_topk:
            as in ``nsa_attention`` (forced blocks default to NSA's 1 initial and
            2 local); ``num_selected_blocks=0`` turns the selected branch off.

    ``forward(x, return_maps=True)`` also returns ``NSAMaps`` (per-branch
    (B, heads, L, L) maps, picked blocks and gates) for drawing.
    """

    def __init__(self, dim: int, dim_head: int, heads: int, *, kv_heads: int | None = None, causal: bool = False,
                 sliding_window_size: int, compress_block_size: int, compress_block_sliding_stride: int | None = None,
                 selection_block_size: int, num_selected_blocks: int, num_initial_blocks: int = 1,
                 num_local_blocks: int = 2, use_diff_topk: bool = False,
                 query_heads_share_selected_kv: bool = True, interpolated_importance_score: bool = False):
        super().__init__()
        check_int(dim, "dim", minimum=1)
        check_int(dim_head, "dim_head", minimum=1)
        check_int(heads, "heads", minimum=1)
        kv_heads = heads if kv_heads is None else check_int(kv_heads, "kv_heads", minimum=1)
        if heads % kv_heads:
            raise ValueError(f"heads ({heads}) must be a multiple of kv_heads ({kv_heads})")
        stride = check_nsa_options(sliding_window_size, compress_block_size, compress_block_sliding_stride,
                                   selection_block_size, num_selected_blocks, num_initial_blocks=num_initial_blocks,
                                   num_local_blocks=num_local_blocks)
        self.dim, self.dim_head, self.heads, self.kv_heads = dim, dim_head, heads, kv_heads
        self.options = dict(
            causal=bool(causal), sliding_window_size=sliding_window_size, compress_block_size=compress_block_size,
            compress_block_sliding_stride=stride, selection_block_size=selection_block_size,
            num_selected_blocks=num_selected_blocks, num_initial_blocks=num_initial_blocks,
            num_local_blocks=num_local_blocks, use_diff_topk=bool(use_diff_topk),
            query_heads_share_selected_kv=bool(query_heads_share_selected_kv),
            interpolated_importance_score=bool(interpolated_importance_score),
        )
        self.to_q = nn.Linear(dim, heads * dim_head, bias=False)
        self.to_k = nn.Linear(dim, kv_heads * dim_head, bias=False)
        self.to_v = nn.Linear(dim, kv_heads * dim_head, bias=False)
        self.k_compress = BlockCompress(compress_block_size, dim_head)
        self.v_compress = BlockCompress(compress_block_size, dim_head)
        self.to_gates = nn.Linear(dim, heads * 3)
        self.to_out = nn.Linear(heads * dim_head, dim, bias=False)

    def forward(self, x: torch.Tensor, *, return_maps: bool = False):
        if not isinstance(x, torch.Tensor) or x.dim() != 3:
            raise ValueError(f"x must be a (B, L, dim) tensor, got {getattr(x, 'shape', type(x).__name__)}")
        if x.shape[-1] != self.dim:
            raise ValueError(f"x's last dimension must be dim={self.dim}, got {x.shape[-1]}")
        heads = lambda t, h: rearrange(t, "b l (h d) -> b h l d", h=h)  # noqa: E731
        gates = rearrange(torch.sigmoid(self.to_gates(x)), "b l (h s) -> b h l s", s=3)
        res = nsa_attention(
            heads(self.to_q(x), self.heads), heads(self.to_k(x), self.kv_heads), heads(self.to_v(x), self.kv_heads),
            gates=gates, compress_fn=(self.k_compress, self.v_compress), return_maps=return_maps, **self.options,
        )
        out, maps = res if return_maps else (res, None)
        out = self.to_out(rearrange(out, "b h l d -> b l (h d)"))
        return (out, maps) if return_maps else out
