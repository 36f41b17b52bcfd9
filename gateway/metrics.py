"""Prometheus metrics of one gateway (served at /metrics).

Each app has its own registry, so several apps in one process (tests) do not collide. The
request counter is labelled with the route template, not the raw path, to bound its cardinality.

Three sources: the HTTP middleware (requests by route and status, their duration, 429/503
refusals), the relay (per generation: time to first token, inter-token latency, end-to-end
latency, prompt and generated tokens), and `QueueCollector`, which exports what Redis holds per
model (stream length, jobs in flight, dead letters, live workers) as read just before each scrape
— so one scrape of any gateway shows the whole queue.
"""

from __future__ import annotations

import json
import logging
import time
from collections.abc import Iterator
from dataclasses import dataclass

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest
from prometheus_client.core import GaugeMetricFamily, Metric
from prometheus_client.registry import Collector
from redis.asyncio import Redis
from redis.exceptions import RedisError
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from common.keys import WORKER_GROUP, Keys

logger = logging.getLogger("spindle.gateway")

_LATENCY_SECONDS = (0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 120.0, 300.0, 600.0)
_TTFT_SECONDS = (0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0)
_ITL_SECONDS = (0.001, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0)
_TOKEN_COUNTS = (1, 8, 32, 64, 128, 256, 512, 1024, 2048, 4096, 8192, 16384, 32768)
REFUSAL_STATUSES = (429, 503)


class GatewayMetrics:
    def __init__(self) -> None:
        self.registry = CollectorRegistry()
        self.queue = QueueCollector()
        self.registry.register(self.queue)
        self._init_http_metrics()
        self._init_generation_metrics()

    def _init_http_metrics(self) -> None:
        registry = self.registry
        self.requests = Counter(
            "spindle_gateway_requests",
            "HTTP requests answered, by route and status",
            ["route", "status"],
            registry=registry,
        )
        self.request_seconds = Histogram(
            "spindle_gateway_request_duration_seconds",
            "HTTP request time, headers in to last byte out (a whole stream for SSE)",
            ["route"],
            buckets=_LATENCY_SECONDS,
            registry=registry,
        )
        self.refusals = Counter(
            "spindle_gateway_refused_requests",
            "requests refused with 429 (over a limit) or 503 (Redis or workers unavailable)",
            ["status"],
            registry=registry,
        )
        for status in REFUSAL_STATUSES:  # exported as 0 before the first refusal, for alerts
            self.refusals.labels(str(status))
        self.in_flight = Gauge(
            "spindle_gateway_requests_in_flight",
            "generation requests admitted and not yet finished",
            registry=registry,
        )

    def _init_generation_metrics(self) -> None:
        registry = self.registry
        self.generations = Counter(
            "spindle_gateway_generations",
            "generation requests relayed, by model and outcome (finished, error, cancelled, "
            "incomplete = the client left or the deadline passed)",
            ["model", "outcome"],
            registry=registry,
        )
        self.ttft = Histogram(
            "spindle_gateway_time_to_first_token_seconds",
            "time from enqueueing a request to its first event (queue wait + prefill)",
            ["model"],
            buckets=_TTFT_SECONDS,
            registry=registry,
        )
        self.itl = Histogram(
            "spindle_gateway_inter_token_latency_seconds",
            "time between consecutive token events of one request",
            ["model"],
            buckets=_ITL_SECONDS,
            registry=registry,
        )
        self.e2e = Histogram(
            "spindle_gateway_e2e_request_latency_seconds",
            "time from enqueueing a request to its last event",
            ["model"],
            buckets=_LATENCY_SECONDS,
            registry=registry,
        )
        self.prompt_tokens = Histogram(
            "spindle_gateway_prompt_tokens",
            "prompt tokens per generation request",
            ["model"],
            buckets=_TOKEN_COUNTS,
            registry=registry,
        )
        self.generated_tokens = Histogram(
            "spindle_gateway_generated_tokens",
            "tokens generated per generation request",
            ["model"],
            buckets=_TOKEN_COUNTS,
            registry=registry,
        )

    def token_gaps(self, model: str) -> Histogram:
        """The inter-token latency histogram of one model: a relay looks it up once and observes
        the gap between consecutive token events on it (no label lookup per token)."""
        return self.itl.labels(model)

    def observe_generation(
        self,
        model: str,
        *,
        outcome: str,
        prompt_tokens: int,
        completion_tokens: int,
        ttft_s: float | None,
        total_s: float,
    ) -> None:
        """Record one relayed request, once, when its relay ends however it ends."""
        self.generations.labels(model, outcome).inc()
        self.e2e.labels(model).observe(total_s)
        self.prompt_tokens.labels(model).observe(prompt_tokens)
        self.generated_tokens.labels(model).observe(completion_tokens)
        if ttft_s is not None:
            self.ttft.labels(model).observe(ttft_s)

    async def exposition(self, redis: Redis, keys: Keys) -> bytes:
        """The text a scrape returns, with the queue read from Redis now."""
        await self.queue.refresh(redis, keys)
        return generate_latest(self.registry)


@dataclass(frozen=True)
class ModelQueue:
    model: str
    length: int  # XLEN: queued + in flight (finished jobs are XDELed)
    in_flight: int  # XPENDING: delivered to a worker, not yet acknowledged
    dead_letters: int
    workers: int


class QueueCollector(Collector):
    """Per-model queue state, as read by the last `refresh()` (the /metrics route calls it just
    before collecting, so the numbers are the scrape's own)."""

    def __init__(self) -> None:
        self._queues: list[ModelQueue] = []
        self._redis_up = 0

    async def refresh(self, redis: Redis, keys: Keys) -> None:
        try:
            self._queues = await _read_queues(redis, keys)
            self._redis_up = 1
        except (RedisError, OSError) as err:
            logger.warning("metrics: cannot read the queues from Redis: %s", err)
            self._queues, self._redis_up = [], 0

    def collect(self) -> Iterator[Metric]:
        redis_up = _gauge("spindle_redis_up", "1 if the gateway read Redis at this scrape", ())
        redis_up.add_metric([], self._redis_up)
        yield redis_up
        yield from self._families()

    def _families(self) -> Iterator[Metric]:
        families = {
            "length": _gauge(
                "spindle_queue_length", "jobs in the model's stream (queued + in flight)"
            ),
            "in_flight": _gauge(
                "spindle_queue_in_flight", "jobs delivered to a worker and not yet finished"
            ),
            "waiting": _gauge("spindle_queue_waiting", "jobs no worker has picked up yet"),
            "dead_letters": _gauge("spindle_queue_dead_letters", "jobs in the dead letters"),
            "workers": _gauge("spindle_workers_live", "workers with an unexpired heartbeat"),
        }
        for queue in self._queues:
            values = {
                "length": queue.length,
                "in_flight": queue.in_flight,
                "waiting": max(0, queue.length - queue.in_flight),
                "dead_letters": queue.dead_letters,
                "workers": queue.workers,
            }
            for name, family in families.items():
                family.add_metric([queue.model], values[name])
        yield from families.values()

    def describe(self) -> Iterator[Metric]:
        return iter(())  # the families depend on Redis: collected at scrape time only


def _gauge(
    name: str, documentation: str, labels: tuple[str, ...] = ("model",)
) -> GaugeMetricFamily:
    return GaugeMetricFamily(name, documentation, labels=list(labels))


async def _read_queues(redis: Redis, keys: Keys) -> list[ModelQueue]:
    streams = [_text(key) async for key in redis.scan_iter(match=keys.requests("*"), count=500)]
    models = {stream[len(keys.requests("")) :] for stream in streams}
    workers_by_model: dict[str, int] = {}
    worker_keys = [key async for key in redis.scan_iter(match=keys.worker_pattern(), count=500)]
    for raw in await redis.mget(worker_keys) if worker_keys else []:
        model = _heartbeat_model(raw)
        if model is not None:
            workers_by_model[model] = workers_by_model.get(model, 0) + 1
    ordered = sorted(models | set(workers_by_model))
    pipe = redis.pipeline(transaction=False)
    for model in ordered:
        pipe.xlen(keys.requests(model))
        pipe.xpending(keys.requests(model), WORKER_GROUP)
        pipe.xlen(keys.dead(model))
    results = await pipe.execute(raise_on_error=False)
    queues = []
    for position, model in enumerate(ordered):
        length, pending, dead = results[3 * position : 3 * position + 3]
        in_flight = pending["pending"] if isinstance(pending, dict) else 0  # no group yet: 0
        queues.append(
            ModelQueue(
                model, _count(length), in_flight, _count(dead), workers_by_model.get(model, 0)
            )
        )
    return queues


def _heartbeat_model(raw: bytes | None) -> str | None:
    try:
        return str(json.loads(raw)["model"]) if raw is not None else None
    except (ValueError, KeyError, TypeError):
        return None


def _count(value: object) -> int:
    return value if isinstance(value, int) else 0


def _text(value: bytes | str) -> str:
    return value.decode() if isinstance(value, bytes) else value


class RequestMetricsMiddleware:
    """Counts and times every HTTP response by route template and status (pure ASGI, so
    streaming responses and disconnect detection pass through untouched)."""

    def __init__(self, app: ASGIApp, metrics: GatewayMetrics) -> None:
        self._app = app
        self._metrics = metrics

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self._app(scope, receive, send)
            return
        status = 500
        started = time.monotonic()

        async def remember_status(message: Message) -> None:
            nonlocal status
            if message["type"] == "http.response.start":
                status = message["status"]
            await send(message)

        try:
            await self._app(scope, receive, remember_status)
        finally:
            route = scope.get("route")
            template = getattr(route, "path", None) or "unmatched"
            self._metrics.requests.labels(template, str(status)).inc()
            self._metrics.request_seconds.labels(template).observe(time.monotonic() - started)
            if status in REFUSAL_STATUSES:
                self._metrics.refusals.labels(str(status)).inc()
