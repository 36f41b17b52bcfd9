"""Redis key names of the spindle contract (see DESIGN.md, "The Redis contract").

One `Keys` object per process, built from the configured prefix; nothing else spells a key.
"""

from __future__ import annotations

from dataclasses import dataclass

WORKER_GROUP = "workers"  # the consumer group every worker joins on each request stream


@dataclass(frozen=True)
class Keys:
    prefix: str = "spindle"

    def requests(self, model: str) -> str:
        """Stream of Jobs for one model (consumer group `workers`)."""
        return f"{self.prefix}:req:{model}"

    def events(self, request_id: str) -> str:
        """Pub/sub channel carrying one request's Events."""
        return f"{self.prefix}:out:{request_id}"

    @property
    def cancel(self) -> str:
        """Pub/sub channel of request ids to drop."""
        return f"{self.prefix}:cancel"

    def cancelled(self, request_id: str) -> str:
        """String with a TTL: the request was cancelled before a worker picked it up."""
        return f"{self.prefix}:cancelled:{request_id}"

    def progress(self, request_id: str) -> str:
        """List (TTL) of token ids generated so far, for resuming after a worker dies."""
        return f"{self.prefix}:progress:{request_id}"

    def model(self, model: str) -> str:
        """Hash: tokenizer.json, tokenizer config / chat template, limits."""
        return f"{self.prefix}:model:{model}"

    def worker(self, worker_id: str) -> str:
        """String JSON with a TTL heartbeat: the worker's model, device, load."""
        return f"{self.prefix}:worker:{worker_id}"

    def dead(self, model: str) -> str:
        """Stream of requests that failed `max_deliveries` times."""
        return f"{self.prefix}:dead:{model}"

    def worker_pattern(self) -> str:
        return f"{self.prefix}:worker:*"

    def model_pattern(self) -> str:
        return f"{self.prefix}:model:*"
