"""nn.Module front doors with the seed's names: (B, L, dim) in, (B, L, dim) out."""
from __future__ import annotations

import torch
from einops import rearrange
from torch import nn

from ._checks import check_int
from .attention import topk_attention

__all__ = ["SparseAttentionWithImportanceSampling"]


class SparseAttentionWithImportanceSampling(nn.Module):
    """The seed's class, made correct: projections, per-head top-k attention, projection out.

    Despite the seed's name this is deterministic top-k selection, not
    sampling; ``sparse_attn.sampling`` holds real importance sampling. The
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
