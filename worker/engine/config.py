"""The engine's settings: one frozen object, built once (by the CLI, the worker service or a
caller of the in-process API) and read by the engine's parts."""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class EngineConfig:
    model: str  # local HF folder, .gguf file or Hub id
    revision: str | None = None
    dtype: str = "auto"  # float32 | bfloat16 | float16 | auto
    device: str = "auto"  # cpu | cuda | cuda:N | auto (cuda when available)
    attention_backend: str = "auto"  # auto | sdpa | flash
    max_batch_size: int = 64  # running sequences at most
    max_batch_prefill_tokens: int = 2048  # prompt tokens per step at most
    max_input_tokens: int | None = None  # default: max_total_tokens - 1
    max_total_tokens: int | None = None  # prompt + generated; default: the model's context length
    max_batch_total_tokens: int | None = None  # KV cache capacity in tokens; default: from memory
    kv_cache_memory_fraction: float = 0.9  # of free device memory after the weights (CUDA)
    enable_prefix_caching: bool = True
    num_threads: int | None = None  # CPU threads for torch; default: torch's choice
    num_shard: int = 1  # tensor-parallel ranks (processes); the driver spawns ranks 1..N-1
    enforce_eager: bool = False  # on CUDA: no decode graphs (worker/engine/decode_graphs.py)
