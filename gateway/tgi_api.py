"""TGI-compatible routes: /generate, /generate_stream, /info, /tokenize.

TGI serves one model per server, so these routes have no model field in TGI. spindle accepts an
optional top-level `model` (an extension); without it they use the first served model by name,
and with several models /info describes that one and lists all of them in `served_models`.
"""

from __future__ import annotations

from importlib import metadata
from typing import Any

from fastapi import APIRouter, Depends, Request
from fastapi.responses import JSONResponse, Response

from gateway.context import Gateway, get_gateway, require_api_key
from gateway.generation import collect, start_generation, unless_disconnected
from gateway.registry import ServedModel
from gateway.schemas import TgiGenerateRequest, TgiTokenizeRequest
from gateway.streaming import sse_response
from gateway.tgi_format import (
    MAX_STOP_SEQUENCES,
    generate_response,
    generate_stream_messages,
    plan_generate,
    sse_error,
)

router = APIRouter(tags=["TGI"], dependencies=[Depends(require_api_key)])


def spindle_version() -> str:
    try:
        return metadata.version("spindle")
    except metadata.PackageNotFoundError:
        return "unknown"


async def _model(gateway: Gateway, name: str | None) -> ServedModel:
    if name:
        return await gateway.registry.get(name)
    return await gateway.registry.default_model()


@router.post("/generate", summary="Generate text (TGI)")
async def generate(body: TgiGenerateRequest, request: Request) -> Response:
    gateway = get_gateway(request)
    model = await _model(gateway, body.model)
    plan = plan_generate(body, model, gateway.settings.request_timeout, stream=False)
    async with await start_generation(gateway, plan) as generation:
        events = generation.relay.batches()
        result = await unless_disconnected(request, collect(plan, events))
    return JSONResponse(generate_response(plan, result, body.parameters))


@router.post("/generate_stream", summary="Generate text as Server-Sent Events (TGI)")
async def generate_stream(body: TgiGenerateRequest, request: Request) -> Response:
    gateway = get_gateway(request)
    model = await _model(gateway, body.model)
    plan = plan_generate(body, model, gateway.settings.request_timeout, stream=True)
    generation = await start_generation(gateway, plan)
    messages = generate_stream_messages(plan, generation.relay.batches(), body.parameters)
    return sse_response(generation, messages, sse_error)


@router.get("/info", summary="Describe the served model (TGI)")
async def info(request: Request) -> dict[str, Any]:
    gateway = get_gateway(request)
    model = await gateway.registry.default_model(max_age_s=0)
    workers = [w for w in await gateway.registry.live_workers(0) if w.model == model.name]
    first = workers[0] if workers else None
    card = model.card
    kv_tokens = sum(w.kv_total_blocks for w in workers) * 16  # the block size (DESIGN.md)
    return {
        "model_id": model.name,
        "model_sha": None,
        "model_dtype": first.dtype if first else None,
        "model_device_type": first.device if first else None,
        "model_pipeline_tag": "text-generation",
        "max_concurrent_requests": gateway.settings.max_concurrent_requests,
        "max_best_of": 1,
        "max_stop_sequences": MAX_STOP_SEQUENCES,
        "max_input_tokens": card.max_input_tokens,
        "max_input_length": card.max_input_tokens,  # the pre-2.0 name
        "max_total_tokens": card.max_total_tokens,
        "waiting_served_ratio": 0.0,
        "max_batch_total_tokens": kv_tokens or card.max_total_tokens,
        "max_waiting_tokens": 0,
        "max_batch_size": None,
        "validation_workers": 1,
        "max_client_batch_size": 1,
        "router": "spindle-gateway",
        "version": spindle_version(),
        "sha": None,
        "docker_label": None,
        "served_models": await gateway.registry.served_models(),
        "workers": len(workers),
    }


@router.post("/tokenize", summary="Tokenize a text (TGI)")
async def tokenize(body: TgiTokenizeRequest, request: Request) -> JSONResponse:
    model = await _model(get_gateway(request), body.model)
    encoding = model.tokenizer(body.inputs, add_special_tokens=True, return_offsets_mapping=True)
    tokens = [
        {"id": token_id, "text": body.inputs[start:stop], "start": start, "stop": stop}
        for token_id, (start, stop) in zip(
            encoding["input_ids"], encoding["offset_mapping"], strict=True
        )
    ]
    return JSONResponse(tokens)
