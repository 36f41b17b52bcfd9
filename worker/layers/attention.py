"""The attention layer models use: reshapes to heads and hands over to the step's backend.

The layer's KV cache tensor is bound once by the model runner when the cache is allocated; the
backend and its per-step metadata arrive with each forward call (`attn_meta`).
"""

from __future__ import annotations

import torch
from torch import nn

from worker.attention.base import AttentionMetadata


class Attention(nn.Module):
    def __init__(self, num_heads: int, num_kv_heads: int, head_dim: int, scale: float):
        super().__init__()
        self.num_heads = num_heads
        self.num_kv_heads = num_kv_heads
        self.head_dim = head_dim
        self.scale = scale
        self.kv_cache = torch.empty(0)  # K and V, in the backend's kv_cache_shape

    def forward(
        self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, attn_meta: AttentionMetadata
    ) -> torch.Tensor:
        tokens = q.shape[0]
        out = attn_meta.backend.forward(
            q.view(tokens, self.num_heads, self.head_dim),
            k.view(tokens, self.num_kv_heads, self.head_dim),
            v.view(tokens, self.num_kv_heads, self.head_dim),
            self.kv_cache,
            attn_meta,
            self.scale,
        )
        return out.reshape(tokens, self.num_heads * self.head_dim)

    def write_cache(self, k: torch.Tensor, v: torch.Tensor, attn_meta: AttentionMetadata) -> None:
        """Store K/V at the step's slots without attending (what `forward` does first)."""
        tokens = k.shape[0]
        attn_meta.backend.write_cache(
            self.kv_cache,
            k.view(tokens, self.num_kv_heads, self.head_dim),
            v.view(tokens, self.num_kv_heads, self.head_dim),
            attn_meta.slot_mapping,
        )
