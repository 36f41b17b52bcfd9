"""The attention-backend interface: how one layer's attention reads and writes the paged KV cache.

A backend turns a step's `StepBatch` (which tokens belong to which sequence, where their K/V go)
into its own metadata once per step, then serves every layer's `forward` with it. The KV cache of
one layer is one tensor, K then V on its first dimension, in the layout the backend's
`kv_cache_shape` gives (the model runner allocates it; only the backend reads or writes it).
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from dataclasses import dataclass

import torch


@dataclass
class StepBatch:
    """One step's sequences in batch order: decodes (one query token each) come first."""

    query_lens: list[int]  # tokens computed this step, per sequence
    context_lens: list[int]  # tokens in the cache after this step (earlier + this step's)
    block_tables: list[list[int]]  # KV block ids per sequence, in position order
    num_decodes: int  # the first `num_decodes` sequences have one query token and prior context
    slot_mapping: torch.Tensor  # [tokens]: flat cache slot (block * block_size + offset) per token


@dataclass
class AttentionMetadata:
    backend: AttentionBackend
    slot_mapping: torch.Tensor


@dataclass
class SampledRows:
    """The rows of a step that sample (each sampling sequence's last token), for a step where
    others do not: the models run their last layer past its K/V projection on these rows only,
    since no later layer reads the others' outputs and no logits are taken from them. `meta`
    describes the rows as one-token queries, each against its whole sequence's cache (a decode
    step's metadata), so any backend serves that layer's attention."""

    rows: torch.Tensor  # [sampled]: indices into the step's tokens (`logits_indices`)
    meta: AttentionMetadata | None  # None when no row samples (only mid-prompt chunks)


class AttentionBackend(ABC):
    name: str = ""
    block_size: int = 16

    def __init__(self, device: torch.device):
        self.device = device

    @classmethod
    def available(cls, device: torch.device) -> bool:
        return True

    def kv_cache_shape(self, num_blocks: int, num_kv_heads: int, head_dim: int) -> tuple[int, ...]:
        """Token-major pages, [2, blocks, block_size, kv_heads, head_dim]: what paged kernels
        such as flash-attn's read through a block table."""
        return (2, num_blocks, self.block_size, num_kv_heads, head_dim)

    @abstractmethod
    def build_metadata(self, batch: StepBatch) -> AttentionMetadata: ...

    supports_decode_graphs = False

    def decode_graph_metadata(
        self, slot_mapping: torch.Tensor, block_tables: torch.Tensor, context_lens: torch.Tensor
    ) -> AttentionMetadata:
        """Metadata for a decode-only step whose inputs are fixed-shape device tensors (one row
        per sequence; `block_tables` padded to a fixed width), computing anything it derives
        from them with device ops, so the step can be captured as a CUDA graph (see
        worker/engine/decode_graphs.py). Backends that set `supports_decode_graphs` implement it."""
        raise NotImplementedError

    @abstractmethod
    def forward(
        self,
        q: torch.Tensor,  # [tokens, heads, head_dim]
        k: torch.Tensor,  # [tokens, kv_heads, head_dim]
        v: torch.Tensor,
        kv_cache: torch.Tensor,
        meta: AttentionMetadata,
        scale: float,
    ) -> torch.Tensor:  # [tokens, heads, head_dim]
        ...

    def write_cache(
        self, kv_cache: torch.Tensor, k: torch.Tensor, v: torch.Tensor, slot_mapping: torch.Tensor
    ) -> None:
        """Store this step's K/V ([tokens, kv_heads, head_dim]) at their flat slots."""
        num_kv_heads, head_dim = k.shape[-2:]
        kv_cache[0].view(-1, num_kv_heads, head_dim).index_copy_(0, slot_mapping, k)
        kv_cache[1].view(-1, num_kv_heads, head_dim).index_copy_(0, slot_mapping, v)
