"""The gateway's per-process objects, built once by `create_app` (the Redis pool, the one pub/sub
subscriber, registry, relay, admission, metrics), and the FastAPI dependencies that hand them to
routes (including the API-key check)."""

from __future__ import annotations

import secrets
from dataclasses import dataclass

from fastapi import Request
from redis.asyncio import Redis

from common.keys import Keys
from gateway.admission import Admission
from gateway.errors import ApiError
from gateway.metrics import GatewayMetrics
from gateway.registry import ModelRegistry
from gateway.relay import EventRelay
from gateway.settings import GatewaySettings
from gateway.subscriber import Subscriber


@dataclass(frozen=True)
class Gateway:
    settings: GatewaySettings
    redis: Redis
    keys: Keys
    registry: ModelRegistry
    subscriber: Subscriber
    relay: EventRelay
    admission: Admission
    metrics: GatewayMetrics
    started: int  # unix seconds; the `created` of /v1/models entries

    @classmethod
    def build(cls, settings: GatewaySettings, started: int) -> Gateway:
        # Connecting is lazy: the gateway starts without Redis and answers 503 until it is up.
        redis = Redis.from_url(
            settings.redis_url, socket_connect_timeout=2.0, socket_keepalive=True
        )
        keys = Keys(settings.prefix)
        metrics = GatewayMetrics()
        admission = Admission(
            metrics,
            max_concurrent=settings.max_concurrent_requests,
            max_queue=settings.max_queue,
        )
        subscriber = Subscriber(redis)
        return cls(
            settings,
            redis,
            keys,
            ModelRegistry(redis, keys),
            subscriber,
            EventRelay(redis, keys, subscriber, metrics),
            admission,
            metrics,
            started,
        )


def get_gateway(request: Request) -> Gateway:
    return request.app.state.gateway


async def require_api_key(request: Request) -> None:
    """With --api-key set, every API route needs `Authorization: Bearer <key>`. A coroutine so
    that FastAPI runs it on the event loop: a plain function dependency goes to the thread pool,
    one thread hop per request (a burst of 32 requests started 32 threads)."""
    expected = get_gateway(request).settings.api_key
    if not expected:
        return
    header = request.headers.get("authorization", "")
    scheme, _, token = header.partition(" ")
    if scheme.lower() != "bearer" or not secrets.compare_digest(
        token.strip().encode(), expected.encode()
    ):
        raise ApiError(
            401,
            "Incorrect API key provided. Send it as 'Authorization: Bearer <key>'.",
            type="invalid_request_error",
            code="invalid_api_key",
        )
