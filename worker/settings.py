"""The worker process's settings: flags of `python -m worker`, each with a `SPINDLE_...`
environment twin, built once at start-up. `engine_config()` hands the engine only its part."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Literal

from common.settings import setting
from worker.engine.config import EngineConfig


@dataclass(frozen=True)
class WorkerSettings:
    """spindle worker: serves one model from its Redis stream with a continuous-batching engine."""

    model: str = setting("", "model: a local Hugging Face folder, a .gguf file or a Hub id")
    served_model_name: str | None = setting(None, "the name clients use; default: the folder name")
    redis_url: str = setting("redis://127.0.0.1:6379/0", "Redis to pull jobs from")
    prefix: str = setting("spindle", "prefix of every Redis key")
    worker_id: str | None = setting(None, "this worker's id; default: host-pid-random")
    dtype: str = setting("auto", "float32 | bfloat16 | float16 | auto")
    device: str = setting("auto", "cpu | cuda | cuda:N | auto")
    attention_backend: str = setting("auto", "auto | sdpa | flash")
    max_batch_size: int = setting(64, "running sequences at most")
    max_batch_prefill_tokens: int = setting(2048, "prompt tokens computed per step at most")
    max_input_tokens: int | None = setting(None, "longest prompt; default: max_total_tokens - 1")
    max_total_tokens: int | None = setting(None, "prompt + generated tokens at most per request")
    max_batch_total_tokens: int | None = setting(None, "KV cache capacity in tokens")
    kv_cache_memory_fraction: float = setting(0.9, "share of free GPU memory for the KV cache")
    enable_prefix_caching: bool = setting(True, "reuse KV blocks of shared prefixes")
    num_threads: int | None = setting(None, "CPU threads for torch")
    num_shard: int = setting(1, "tensor-parallel ranks (processes) in this worker group")
    enforce_eager: bool = setting(False, "on a GPU, run decode steps eagerly (no CUDA graphs)")
    burst_window_ms: float = setting(
        0.0, "after an idle spell, keep pulling while jobs arrive this close together (0 = off)"
    )
    heartbeat_ttl: float = setting(10.0, "seconds after its last heartbeat a worker counts as dead")
    max_deliveries: int = setting(3, "deliveries of one job before it goes to the dead letters")
    shutdown_timeout: float = setting(30.0, "on SIGTERM, seconds to finish running requests")
    log_file: Path | None = setting(None, "also log to this file")
    log_level: Literal["debug", "info", "warning", "error"] = setting("info", "log verbosity")
    metrics_port: int | None = setting(None, "serve Prometheus metrics on this port; none = off")

    def __post_init__(self) -> None:
        if not self.model:
            raise ValueError("--model (or SPINDLE_MODEL) is required")

    def engine_config(self) -> EngineConfig:
        return EngineConfig(
            model=self.model,
            dtype=self.dtype,
            device=self.device,
            attention_backend=self.attention_backend,
            max_batch_size=self.max_batch_size,
            max_batch_prefill_tokens=self.max_batch_prefill_tokens,
            max_input_tokens=self.max_input_tokens,
            max_total_tokens=self.max_total_tokens,
            max_batch_total_tokens=self.max_batch_total_tokens,
            kv_cache_memory_fraction=self.kv_cache_memory_fraction,
            enable_prefix_caching=self.enable_prefix_caching,
            num_threads=self.num_threads,
            num_shard=self.num_shard,
            enforce_eager=self.enforce_eager,
        )

    def model_name(self) -> str:
        return self.served_model_name or Path(self.model.rstrip("/")).name.removesuffix(".gguf")
