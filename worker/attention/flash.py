"""The CUDA attention backend: flash-attn's variable-length kernel reading the paged KV cache
directly through block tables (no gather). Chosen automatically when flash-attn imports and the
device is CUDA. flash-attn 2 requires pages of a multiple of 256 tokens, so this backend's
blocks are 256 tokens (the block manager takes the block size from the backend).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from worker.attention.base import AttentionBackend, AttentionMetadata, StepBatch


def _flash_varlen():
    from flash_attn import flash_attn_varlen_func

    return flash_attn_varlen_func


@dataclass
class FlashMetadata(AttentionMetadata):
    cu_query_lens: torch.Tensor  # [sequences + 1] int32
    cu_context_lens: torch.Tensor  # [sequences + 1] int32
    max_query_len: int
    max_context_len: int
    block_tables: torch.Tensor  # [sequences, max_blocks] int32


class FlashBackend(AttentionBackend):
    name = "flash"
    block_size = 256

    @classmethod
    def available(cls, device: torch.device) -> bool:
        if device.type != "cuda":
            return False
        try:
            _flash_varlen()
        except ImportError:
            return False
        return True

    def build_metadata(self, batch: StepBatch) -> FlashMetadata:
        def cumulative(lengths: list[int]) -> torch.Tensor:
            values = [0]
            for length in lengths:
                values.append(values[-1] + length)
            return torch.tensor(values, dtype=torch.int32, device=self.device)

        max_blocks = max(len(table) for table in batch.block_tables)
        tables = [table + [0] * (max_blocks - len(table)) for table in batch.block_tables]
        return FlashMetadata(
            backend=self,
            slot_mapping=batch.slot_mapping,
            cu_query_lens=cumulative(batch.query_lens),
            cu_context_lens=cumulative(batch.context_lens),
            max_query_len=max(batch.query_lens),
            max_context_len=max(batch.context_lens),
            block_tables=torch.tensor(tables, dtype=torch.int32, device=self.device),
        )

    def forward(self, q, k, v, kv_cache, meta, scale):
        assert isinstance(meta, FlashMetadata)
        self.write_cache(kv_cache, k, v, meta.slot_mapping)
        return _flash_varlen()(
            q,
            kv_cache[0],
            kv_cache[1],
            cu_seqlens_q=meta.cu_query_lens,
            cu_seqlens_k=meta.cu_context_lens,
            max_seqlen_q=meta.max_query_len,
            max_seqlen_k=meta.max_context_len,
            softmax_scale=scale,
            causal=True,
            block_table=meta.block_tables,
        )
