"""Prometheus metrics of one worker, served on `--metrics-port` as a scrape target of its own.

The service records at the points it already has: each engine step (`step()` context), each
finished or refused job (`finished()`), resumes, dead letters and generated tokens; the gauges
(running/waiting sequences, KV blocks, preemptions) are refreshed from `engine.stats()` once per
loop pass, so they fall back to zero when the worker is idle.

A step's composition (batch size, tokens, prefill or decode) is the engine's `last_step`, the
scheduler output it just ran; at debug level each step is also logged, with its start on
`time.perf_counter`'s clock (the same clock across processes on Linux, so a benchmark's
client times and the worker's steps line up).
"""

from __future__ import annotations

import logging
import time
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, start_http_server

log = logging.getLogger("spindle.worker")

_STEP_SECONDS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0)
_BATCH_SIZES = (1, 2, 4, 8, 16, 32, 64, 128, 256, 512)
_STEP_TOKENS = (1, 4, 16, 64, 256, 1024, 2048, 4096, 8192, 16384)
_QUEUE_SECONDS = (0.01, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 300.0)


class WorkerMetrics:
    """The worker's metrics on a registry of its own (several workers in one test process do
    not collide)."""

    def __init__(self) -> None:
        self.registry = CollectorRegistry()
        registry = self.registry
        self.running = Gauge(
            "spindle_worker_running_sequences", "sequences in the running batch", registry=registry
        )
        self.waiting = Gauge(
            "spindle_worker_waiting_sequences",
            "sequences admitted to the engine and waiting for KV blocks or a batch slot",
            registry=registry,
        )
        self.kv_used = Gauge(
            "spindle_worker_kv_blocks_used", "KV-cache blocks held by sequences", registry=registry
        )
        self.kv_total = Gauge(
            "spindle_worker_kv_blocks_total", "KV-cache blocks in the pool", registry=registry
        )
        self.preemptions = Counter(
            "spindle_worker_preemptions",
            "sequences preempted (blocks freed, recomputed later)",
            registry=registry,
        )
        self.batch_size = Histogram(
            "spindle_worker_batch_size",
            "sequences computed per engine step",
            buckets=_BATCH_SIZES,
            registry=registry,
        )
        self.batch_tokens = Histogram(
            "spindle_worker_batch_tokens",
            "tokens computed per engine step",
            buckets=_STEP_TOKENS,
            registry=registry,
        )
        self.step_seconds = Histogram(
            "spindle_worker_step_duration_seconds",
            "engine step time (schedule + forward + sample), by phase: prefill if any prompt "
            "tokens were computed, else decode",
            ["phase"],
            buckets=_STEP_SECONDS,
            registry=registry,
        )
        self._init_request_metrics()
        self._preemptions_seen = 0

    def _init_request_metrics(self) -> None:
        registry = self.registry
        self.requests = Counter(
            "spindle_worker_requests",
            "jobs ended by this worker, by finish reason",
            ["finish"],
            registry=registry,
        )
        self.cancellations = Counter(
            "spindle_worker_cancellations",
            "jobs ended as cancelled (client gone, or nobody listening)",
            registry=registry,
        )
        self.resumed_jobs = Counter(
            "spindle_worker_resumed_jobs",
            "jobs claimed from a dead worker (or handed back) and resumed",
            registry=registry,
        )
        self.dead_letters = Counter(
            "spindle_worker_dead_lettered_jobs",
            "jobs moved to the dead letters after --max-deliveries deliveries",
            registry=registry,
        )
        self.generated_tokens = Counter(
            "spindle_worker_generated_tokens",
            "tokens generated and published",
            registry=registry,
        )
        self.queue_seconds = Histogram(
            "spindle_worker_queue_duration_seconds",
            "time a job waited in the Redis stream before this worker admitted it",
            buckets=_QUEUE_SECONDS,
            registry=registry,
        )

    def serve(self, port: int) -> None:
        """Expose the registry over HTTP on `port` (a daemon thread)."""
        start_http_server(port, registry=self.registry)
        log.info("worker metrics on http://0.0.0.0:%d/metrics", port)

    @contextmanager
    def step(self, engine: Any) -> Iterator[None]:
        """Time one engine step and record what it computed (nothing if it raised or computed
        nothing)."""
        started = time.perf_counter()
        yield
        elapsed = time.perf_counter() - started
        output = engine.last_step
        if output is None or not output.scheduled:
            return
        self.batch_size.observe(len(output.scheduled))
        self.batch_tokens.observe(output.num_batched_tokens)
        prefill = any(item.num_tokens > 1 for item in output.scheduled)
        kind = "prefill" if prefill else "decode"
        self.step_seconds.labels(kind).observe(elapsed)
        # `--log-level debug` traces every step: how a served burst was scheduled, and how long
        # each step took, next to an in-process run of the same workload
        log.debug(
            "step at %.3f: %.1f ms, %s, %d sequences, %d tokens",
            started, 1000 * elapsed, kind, len(output.scheduled), output.num_batched_tokens,
        )  # fmt: skip

    def observe_engine(self, stats: dict[str, int], preemptions: int) -> None:
        """Refresh the gauges from `engine.stats()` and the scheduler's preemption count."""
        self.running.set(stats["running"])
        self.waiting.set(stats["waiting"])
        self.kv_used.set(stats["kv_used_blocks"])
        self.kv_total.set(stats["kv_total_blocks"])
        if preemptions > self._preemptions_seen:
            self.preemptions.inc(preemptions - self._preemptions_seen)
            self._preemptions_seen = preemptions

    def admitted(self, queued_s: float) -> None:
        self.queue_seconds.observe(max(0.0, queued_s))

    def finished(self, finish: str | None) -> None:
        self.requests.labels(finish or "unknown").inc()
        if finish == "cancelled":
            self.cancellations.inc()
