"""OpenAI response shapes: chat.completion(.chunk), text_completion, logprobs, usage, errors in
a stream. Built from a finished `GenerationResult` or from the relayed events as they come.

Streams follow OpenAI: the first chat chunk of each choice carries delta.role = "assistant";
each choice ends with a chunk whose finish_reason is set; with stream_options.include_usage every
chunk has "usage": null and a last chunk with empty choices carries the usage; then `[DONE]`.
A failure mid-stream sends `data: {"error": {...}}` and ends the stream.
"""

from __future__ import annotations

import json
from collections.abc import AsyncIterator
from typing import Any

from common.protocol import Event, TokenLogprob
from gateway.errors import ApiError, openai_error_body
from gateway.generation import GenerationResult, UsageTally, choice_index, event_error
from gateway.jobs import Plan
from gateway.registry import ServedModel

_FINISH = {"stop": "stop", "eos_token": "stop", "length": "length"}


def openai_finish(reason: str | None) -> str | None:
    return None if reason is None else _FINISH.get(reason, reason)


def usage_body(usage: UsageTally) -> dict[str, int]:
    prompt, completion = usage.prompt_tokens, usage.completion_tokens
    return {
        "prompt_tokens": prompt,
        "completion_tokens": completion,
        "total_tokens": prompt + completion,
    }


def _token(model: ServedModel, token_id: int, logprob: float) -> dict[str, Any]:
    text = model.token_text(token_id)
    return {"token": text, "logprob": logprob, "bytes": list(text.encode("utf-8"))}


def chat_logprobs(model: ServedModel, logprobs: list[TokenLogprob], top: int) -> dict[str, Any]:
    return {
        "content": [
            {
                **_token(model, entry.token_id, entry.logprob),
                "top_logprobs": [_token(model, tid, lp) for tid, lp in entry.top[:top]],
            }
            for entry in logprobs
        ]
    }


def completion_logprobs(
    model: ServedModel, logprobs: list[TokenLogprob], top: int, text_offset: int
) -> dict[str, Any]:
    """OpenAI's legacy shape; `text_offset` is where the first token starts in the choice text."""
    tokens = [model.token_text(entry.token_id) for entry in logprobs]
    offsets = []
    for token in tokens:
        offsets.append(text_offset)
        text_offset += len(token)
    return {
        "tokens": tokens,
        "token_logprobs": [entry.logprob for entry in logprobs],
        "top_logprobs": [
            {model.token_text(tid): lp for tid, lp in entry.top[:top]} for entry in logprobs
        ],
        "text_offset": offsets,
    }


def chat_response(plan: Plan, result: GenerationResult, top_logprobs: int | None) -> dict[str, Any]:
    choices = [
        {
            "index": choice.index,
            "message": {"role": "assistant", "content": choice.text},
            "logprobs": None
            if top_logprobs is None
            else chat_logprobs(plan.model, choice.logprobs, top_logprobs),
            "finish_reason": openai_finish(choice.finish),
        }
        for choice in result.choices
    ]
    return {
        "id": plan.request_id,
        "object": "chat.completion",
        "created": plan.created,
        "model": plan.model.name,
        "choices": choices,
        "usage": usage_body(result.usage),
        "system_fingerprint": None,
    }


def completion_response(
    plan: Plan, result: GenerationResult, logprobs: int | None
) -> dict[str, Any]:
    choices = []
    for choice in result.choices:
        prefix = plan.prompt_texts[choice.index // plan.n]
        choices.append(
            {
                "index": choice.index,
                "text": prefix + choice.text,
                "logprobs": None
                if logprobs is None
                else completion_logprobs(plan.model, choice.logprobs, logprobs, len(prefix)),
                "finish_reason": openai_finish(choice.finish),
            }
        )
    return {
        "id": plan.request_id,
        "object": "text_completion",
        "created": plan.created,
        "model": plan.model.name,
        "choices": choices,
        "usage": usage_body(result.usage),
        "system_fingerprint": None,
    }


def sse_error(error: ApiError) -> str:
    return json.dumps(openai_error_body(error))


class _ChunkWriter:
    """The fields every chunk of one stream repeats."""

    def __init__(self, plan: Plan, obj: str, include_usage: bool) -> None:
        self._head = {
            "id": plan.request_id,
            "object": obj,
            "created": plan.created,
            "model": plan.model.name,
        }
        self._include_usage = include_usage

    def chunk(self, choices: list[dict[str, Any]], usage: dict[str, int] | None = None) -> str:
        body: dict[str, Any] = {**self._head, "choices": choices}
        if self._include_usage:
            body["usage"] = usage
        return json.dumps(body)


async def chat_chunks(
    plan: Plan,
    events: AsyncIterator[tuple[int, Event]],
    *,
    top_logprobs: int | None,
    include_usage: bool,
) -> AsyncIterator[str]:
    writer = _ChunkWriter(plan, "chat.completion.chunk", include_usage)
    usage = UsageTally(plan)
    for index in range(plan.choice_count):
        delta = {"role": "assistant", "content": ""}
        yield writer.chunk(
            [{"index": index, "delta": delta, "logprobs": None, "finish_reason": None}]
        )
    async for position, event in events:
        error = event_error(event)
        if error is not None:
            raise error
        usage.add(position, event)
        if not (event.text or event.logprobs or event.finish):
            continue  # a token whose text is held back (an incomplete UTF-8 sequence)
        choice = {
            "index": choice_index(plan, position, event),
            "delta": {"content": event.text} if event.text else {},
            "logprobs": None
            if top_logprobs is None or not event.logprobs
            else chat_logprobs(plan.model, event.logprobs, top_logprobs),
            "finish_reason": openai_finish(event.finish),
        }
        yield writer.chunk([choice])
    if include_usage:
        yield writer.chunk([], usage_body(usage))
    yield "[DONE]"


async def completion_chunks(
    plan: Plan,
    events: AsyncIterator[tuple[int, Event]],
    *,
    logprobs: int | None,
    include_usage: bool,
) -> AsyncIterator[str]:
    writer = _ChunkWriter(plan, "text_completion", include_usage)
    usage = UsageTally(plan)
    offsets = [len(plan.prompt_texts[index // plan.n]) for index in range(plan.choice_count)]
    for index, offset in enumerate(offsets):
        if offset:  # echo: the prompt comes first
            text = plan.prompt_texts[index // plan.n]
            yield writer.chunk(
                [{"index": index, "text": text, "logprobs": None, "finish_reason": None}]
            )
    async for position, event in events:
        error = event_error(event)
        if error is not None:
            raise error
        usage.add(position, event)
        if not (event.text or event.logprobs or event.finish):
            continue
        index = choice_index(plan, position, event)
        shape = None
        if logprobs is not None and event.logprobs:
            shape = completion_logprobs(plan.model, event.logprobs, logprobs, offsets[index])
        offsets[index] += len(event.text)
        choice = {
            "index": index,
            "text": event.text,
            "logprobs": shape,
            "finish_reason": openai_finish(event.finish),
        }
        yield writer.chunk([choice])
    if include_usage:
        yield writer.chunk([], usage_body(usage))
    yield "[DONE]"
