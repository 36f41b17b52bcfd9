"""Operations routes: /health (for load balancers and orchestrators) and /metrics (Prometheus).
Neither needs the API key, so probes and scrapers work without it."""

from __future__ import annotations

from fastapi import APIRouter, Request
from fastapi.responses import JSONResponse, Response
from prometheus_client import CONTENT_TYPE_LATEST
from redis.exceptions import RedisError

from gateway.context import get_gateway

router = APIRouter(tags=["operations"])


@router.get("/health", summary="200 when Redis answers and a worker is alive, else 503")
async def health(request: Request) -> JSONResponse:
    gateway = get_gateway(request)
    try:
        await gateway.redis.ping()
        models = await gateway.registry.served_models()
        workers = len(await gateway.registry.live_workers())
    except RedisError as err:
        return JSONResponse(
            {"status": "unavailable", "reason": f"Redis is unreachable: {err}"}, 503
        )
    if not workers:
        return JSONResponse({"status": "unavailable", "reason": "no worker is alive"}, 503)
    return JSONResponse({"status": "ok", "models": models, "workers": workers})


@router.get("/metrics", summary="Prometheus metrics")
async def metrics(request: Request) -> Response:
    gateway = get_gateway(request)
    body = await gateway.metrics.exposition(gateway.redis, gateway.keys)
    return Response(body, media_type=CONTENT_TYPE_LATEST)
