"""OpenAI-compatible routes: /v1/chat/completions, /v1/completions, /v1/models(/{id}).

Each generation route: find the model (404/503), build the Jobs (400), take an admission slot
and put the jobs on Redis (429/503), then either stream chunks or wait for the whole answer,
cancelling the jobs if the client leaves first.
"""

from __future__ import annotations

from typing import Any

from fastapi import APIRouter, Depends, Request
from fastapi.responses import JSONResponse, Response

from gateway.context import get_gateway, require_api_key
from gateway.generation import collect, start_generation, unless_disconnected
from gateway.jobs import plan_chat, plan_completion
from gateway.openai_format import (
    chat_chunks,
    chat_response,
    completion_chunks,
    completion_response,
    sse_error,
)
from gateway.schemas import ChatCompletionRequest, CompletionRequest
from gateway.streaming import sse_response

router = APIRouter(prefix="/v1", tags=["OpenAI"], dependencies=[Depends(require_api_key)])


@router.post("/chat/completions", summary="Create a chat completion (OpenAI)")
async def chat_completions(body: ChatCompletionRequest, request: Request) -> Response:
    gateway = get_gateway(request)
    model = await gateway.registry.get(body.model)
    plan = plan_chat(body, model, gateway.settings.request_timeout)
    top_logprobs = (body.top_logprobs or 0) if body.logprobs else None
    generation = await start_generation(gateway, plan)
    events = generation.relay.batches()
    if body.stream:
        include_usage = bool(body.stream_options and body.stream_options.include_usage)
        chunks = chat_chunks(plan, events, top_logprobs=top_logprobs, include_usage=include_usage)
        return sse_response(generation, chunks, sse_error)
    async with generation:
        result = await unless_disconnected(request, collect(plan, events))
    return JSONResponse(chat_response(plan, result, top_logprobs))


@router.post("/completions", summary="Create a completion (OpenAI, legacy)")
async def completions(body: CompletionRequest, request: Request) -> Response:
    gateway = get_gateway(request)
    model = await gateway.registry.get(body.model)
    plan = plan_completion(body, model, gateway.settings.request_timeout)
    generation = await start_generation(gateway, plan)
    events = generation.relay.batches()
    if body.stream:
        include_usage = bool(body.stream_options and body.stream_options.include_usage)
        chunks = completion_chunks(
            plan, events, logprobs=body.logprobs, include_usage=include_usage
        )
        return sse_response(generation, chunks, sse_error)
    async with generation:
        result = await unless_disconnected(request, collect(plan, events))
    return JSONResponse(completion_response(plan, result, body.logprobs))


def _model_entry(name: str, created: int) -> dict[str, Any]:
    return {"id": name, "object": "model", "created": created, "owned_by": "spindle", "root": name}


@router.get("/models", summary="List the served models (OpenAI)")
async def list_models(request: Request) -> dict[str, Any]:
    gateway = get_gateway(request)
    names = await gateway.registry.served_models()
    return {"object": "list", "data": [_model_entry(name, gateway.started) for name in names]}


@router.get("/models/{model_id:path}", summary="Describe one served model (OpenAI)")
async def retrieve_model(model_id: str, request: Request) -> dict[str, Any]:
    gateway = get_gateway(request)
    model = await gateway.registry.get(model_id)
    entry = _model_entry(model.name, gateway.started)
    return {**entry, "max_model_len": model.card.max_total_tokens}
