"""The gateway's settings: flags of `python -m gateway`, each with a `SPINDLE_...` twin."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

from common.settings import setting


@dataclass(frozen=True)
class GatewaySettings:
    """spindle gateway: OpenAI- and TGI-compatible HTTP API in front of Redis streams."""

    host: str = setting("0.0.0.0", "address to listen on")
    port: int = setting(8000, "port to listen on")
    redis_url: str = setting("redis://127.0.0.1:6379/0", "Redis that workers and gateways share")
    prefix: str = setting("spindle", "prefix of every Redis key")
    max_concurrent_requests: int = setting(
        512, "requests this process serves at once; past it, answer 429"
    )
    max_queue: int = setting(
        1024, "queued + running requests per model stream; past it, answer 429"
    )
    api_key: str | None = setting(None, "if set, clients must send 'Authorization: Bearer KEY'")
    request_timeout: float = setting(600.0, "seconds a request may take end to end; 0 = no limit")
    log_level: Literal["debug", "info", "warning", "error"] = setting("info", "log verbosity")
    access_log: bool = setting(
        True, "also log every HTTP request in uvicorn's access format (generations are logged)"
    )

    def __post_init__(self) -> None:
        if self.max_concurrent_requests < 1:
            raise ValueError(
                f"--max-concurrent-requests must be >= 1, got {self.max_concurrent_requests}"
            )
        if self.max_queue < 1:
            raise ValueError(f"--max-queue must be >= 1, got {self.max_queue}")
        if self.request_timeout < 0:
            raise ValueError(f"--request-timeout must be >= 0, got {self.request_timeout}")
