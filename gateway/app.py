"""The FastAPI application: `create_app(settings)` wires the routes, the error handlers, the
metrics middleware and the per-process objects (Redis pool, pub/sub subscriber, registry, relay,
admission)."""

from __future__ import annotations

import logging
import time
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager

from fastapi import FastAPI

from gateway import openai_api, ops_api, tgi_api
from gateway.context import Gateway
from gateway.errors import install_error_handlers
from gateway.metrics import RequestMetricsMiddleware
from gateway.settings import GatewaySettings
from gateway.tgi_api import spindle_version

logger = logging.getLogger("spindle.gateway")


def create_app(settings: GatewaySettings) -> FastAPI:
    gateway = Gateway.build(settings, started=int(time.time()))

    @asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        logger.info(
            "spindle gateway ready on http://%s:%d (redis %s, prefix %r)",
            settings.host,
            settings.port,
            _redacted(settings.redis_url),
            settings.prefix,
        )
        gateway.registry.start()
        yield
        await gateway.registry.stop()
        await gateway.subscriber.close()
        await gateway.redis.aclose()

    app = FastAPI(
        title="spindle",
        version=spindle_version(),
        summary="OpenAI- and TGI-compatible LLM serving over Redis streams",
        lifespan=lifespan,
    )
    app.state.gateway = gateway
    app.include_router(openai_api.router)
    app.include_router(tgi_api.router)
    app.include_router(ops_api.router)
    app.add_middleware(RequestMetricsMiddleware, metrics=gateway.metrics)
    install_error_handlers(app)
    return app


def _redacted(url: str) -> str:
    """The Redis URL without its password, for logs."""
    scheme, sep, rest = url.partition("://")
    if "@" not in rest:
        return url
    return f"{scheme}{sep}***@{rest.rsplit('@', 1)[1]}"
