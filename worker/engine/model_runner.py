"""Runs one engine step on the model: owns the device, the weights and the paged KV cache.

`execute(SchedulerOutput)` flattens the step's sequences into `input_ids[T]`, `positions[T]` and
the attention backend's metadata (slot mapping, block tables), runs the model once, and returns
float32 logits for the sequences that sample this step — nothing for mid-prompt chunks.
"""

from __future__ import annotations

import logging
import os
from typing import TYPE_CHECKING, cast

import torch

from common.settings import env_switch
from worker import kernels
from worker.attention import AttentionBackend, select_backend
from worker.attention.base import SampledRows
from worker.engine import host_memory
from worker.engine.config import EngineConfig
from worker.engine.decode_graphs import DecodeGraphs
from worker.engine.native_decoder import NativeDecoder
from worker.engine.scheduler import SchedulerOutput
from worker.layers.attention import Attention
from worker.layers.linear import pack_linear_weights
from worker.layers.parallel import SINGLE, ParallelContext
from worker.loader.dtype import resolve_dtype
from worker.loader.model_loader import build_model
from worker.loader.weights import iter_weights
from worker.parallel.step_message import StepMessage, broadcast_int

if TYPE_CHECKING:
    from worker.parallel.group import ShardGroup

log = logging.getLogger(__name__)


def resolve_device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(name)


class ModelRunner:
    def __init__(
        self,
        config: EngineConfig,
        hf_config,
        files,
        max_positions: int,
        parallel: ParallelContext = SINGLE,
        shards: ShardGroup | None = None,  # on the driver of a group: where steps are sent
    ):
        self.shards = shards
        self.device = resolve_device(config.device)
        self.dtype = resolve_dtype(config.dtype, self.device)
        if self.device.type == "cpu":
            kernels.use_threads(config.num_threads)
        self.backend: AttentionBackend = select_backend(config.attention_backend, self.device)
        self.block_size = self.backend.block_size
        self.model = build_model(
            hf_config, iter_weights(files), self.dtype, self.device, parallel, max_positions
        )
        self.num_packed_weights = pack_linear_weights(cast(torch.nn.Module, self.model))
        self.vocab_size = hf_config.vocab_size
        self.attention_layers = [m for m in self.model.modules() if isinstance(m, Attention)]
        self.num_blocks = self._num_blocks(config, max_positions)
        if parallel.world_size > 1:  # every rank's cache must hold the blocks rank 0 hands out
            self.num_blocks = broadcast_int(self.num_blocks, self.device)
        self.scratch_block = self.num_blocks  # one block past the scheduler's: see _allocate
        self._allocate_kv_cache()
        self.decode_graphs = self._decode_graphs(config, parallel, max_positions)
        self.native_decoder = NativeDecoder.build(self.model, self.backend)  # CPU kernels only
        self.trim_last_layer = env_switch("SPINDLE_TRIM_LAST_LAYER")  # see _sampled_rows
        log.info(
            "model ready: %s on %s (%s), attention %s, %d packed weights, "
            "KV cache %d blocks x %d tokens",
            type(self.model).__name__,
            self.device,
            self.dtype,
            self.backend.name,
            self.num_packed_weights,
            self.num_blocks,
            self.block_size,
        )

    # -- KV cache -----------------------------------------------------------------------------

    def _bytes_per_block(self) -> int:
        layer = self.attention_layers[0]
        element = torch.empty(0, dtype=self.dtype).element_size()
        per_layer = 2 * self.block_size * layer.num_kv_heads * layer.head_dim * element
        return per_layer * len(self.attention_layers)

    def _num_blocks(self, config: EngineConfig, max_positions: int) -> int:
        if config.max_batch_total_tokens is not None:
            tokens = config.max_batch_total_tokens
        elif self.device.type == "cuda":
            free, _ = torch.cuda.mem_get_info(self.device)
            budget = int(free * config.kv_cache_memory_fraction)
            tokens = budget // self._bytes_per_block() * self.block_size
        else:
            # Enough for a full batch of long sequences, capped at a quarter of free RAM.
            tokens = config.max_batch_size * max_positions
            ram_cap = _available_ram() // 4 // self._bytes_per_block() * self.block_size
            tokens = min(tokens, max(ram_cap, max_positions))
        blocks = -(-tokens // self.block_size)
        if blocks * self.block_size < max_positions:
            raise ValueError(
                f"the KV cache holds {blocks * self.block_size} tokens, fewer than one sequence "
                f"may use ({max_positions} total tokens): raise --max-batch-total-tokens or "
                f"lower --max-total-tokens"
            )
        return blocks

    def _allocate_kv_cache(self) -> None:
        """Each layer's cache, with one block more than the scheduler hands out: the scratch
        block, where the padding rows of a graphed decode step write and read."""
        shapes = [
            self.backend.kv_cache_shape(self.num_blocks + 1, layer.num_kv_heads, layer.head_dim)
            for layer in self.attention_layers
        ]
        if self.device.type == "cpu":  # on huge pages: see worker/engine/host_memory.py
            caches = host_memory.zeros(shapes, self.dtype)
        else:
            caches = [torch.zeros(shape, dtype=self.dtype, device=self.device) for shape in shapes]
        for layer, cache in zip(self.attention_layers, caches, strict=True):
            layer.kv_cache = cache

    def _decode_graphs(
        self, config: EngineConfig, parallel: ParallelContext, max_positions: int
    ) -> DecodeGraphs | None:
        """CUDA graphs for decode steps: on a GPU, one process, a backend that supports them,
        unless `enforce_eager`."""
        if config.enforce_eager or self.device.type != "cuda" or parallel.world_size > 1:
            return None
        if not self.backend.supports_decode_graphs:
            return None
        return DecodeGraphs(self, config.max_batch_size, max_positions)

    # -- one step -----------------------------------------------------------------------------

    @torch.inference_mode()
    def execute(self, output: SchedulerOutput) -> torch.Tensor:
        """Logits [sampling sequences, vocab] in float32, in `output.sampling()` order."""
        if self.decode_graphs is not None and self.decode_graphs.handles(output):
            logits = self.decode_graphs.execute(output)
            if logits is not None:
                return logits
        message = self._prepare(output)
        if self.shards is None:
            return self.forward(message)
        try:
            self.shards.send_step(message)
            return self.forward(message)
        except Exception:
            self.shards.fail_if_rank_died()  # a dead rank ends the group; else re-raise
            raise

    @torch.inference_mode()
    def forward(self, message: StepMessage) -> torch.Tensor:
        """The forward pass of one step; every rank of a group runs it on the same message."""
        meta = self.backend.build_metadata(message.step_batch())
        sampled = self._sampled_rows(message)
        if self.native_decoder is not None and self.native_decoder.handles(meta):
            hidden = self.native_decoder(message.input_ids, message.positions, meta, sampled)
        else:
            hidden = self.model(message.input_ids, message.positions, meta, sampled)
        if sampled is None:  # the model returned every row
            hidden = hidden[message.logits_indices]
        logits = self.model.compute_logits(hidden)
        return logits[:, : self.vocab_size].float()

    def _sampled_rows(self, message: StepMessage) -> SampledRows | None:
        """Where some rows do not sample (prompt chunks), the rows that do: the model's last
        layer runs on them alone past its K/V projection and it returns only their hidden
        states. On SmolLM2-135M that layer is 1/30 of a prompt step's work."""
        if not self.trim_last_layer:
            return None
        batch = message.sampled_batch()
        if batch is None:
            return None
        meta = self.backend.build_metadata(batch) if batch.query_lens else None
        return SampledRows(message.logits_indices, meta)

    def _prepare(self, output: SchedulerOutput) -> StepMessage:
        token_ids: list[int] = []
        positions: list[int] = []
        slots: list[int] = []
        query_lens, context_lens, tables, logits_indices = [], [], [], []
        block_size = self.block_size
        for item in output.scheduled:
            seq, start, end = item.seq, item.start, item.start + item.num_tokens
            token_ids.extend(seq.token_ids(start, end))
            positions.extend(range(start, end))
            blocks = seq.block_ids
            slots.extend(
                blocks[p // block_size] * block_size + p % block_size for p in range(start, end)
            )
            query_lens.append(item.num_tokens)
            context_lens.append(end)
            tables.append(blocks)
            if item.sample:
                logits_indices.append(len(token_ids) - 1)
        num_decodes = 0
        while num_decodes < len(query_lens) and query_lens[num_decodes] == 1:
            num_decodes += 1
        device = self.device
        return StepMessage(
            input_ids=torch.tensor(token_ids, dtype=torch.long, device=device),
            positions=torch.tensor(positions, dtype=torch.long, device=device),
            slot_mapping=torch.tensor(slots, dtype=torch.long, device=device),
            logits_indices=torch.tensor(logits_indices, dtype=torch.long, device=device),
            query_lens=query_lens,
            context_lens=context_lens,
            block_tables=tables,
            num_decodes=num_decodes,
        )


def _available_ram() -> int:
    try:
        with open("/proc/meminfo") as meminfo:
            for line in meminfo:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
