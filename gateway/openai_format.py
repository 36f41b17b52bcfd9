"""OpenAI response shapes: chat.completion(.chunk), text_completion, logprobs, usage, errors in
a stream. Built from a finished `GenerationResult` or from the relayed events as they come.

Streams follow OpenAI: the first chat chunk of each choice carries delta.role = "assistant";
each choice ends with a chunk whose finish_reason is set; with stream_options.include_usage every
chunk has "usage": null and a last chunk with empty choices carries the usage; then `[DONE]`.
A failure mid-stream sends `data: {"error": {...}}` and ends the stream.
"""

from __future__ import annotations

import contextlib
import json
from collections.abc import AsyncGenerator, AsyncIterator, Callable
from typing import Any

from common.protocol import Event, TokenLogprob
from gateway.errors import ApiError, openai_error_body
from gateway.generation import GenerationResult, UsageTally, choice_index, until_error
from gateway.jobs import Plan
from gateway.registry import ServedModel
from gateway.relay import EventBatch

_FINISH = {"stop": "stop", "eos_token": "stop", "length": "length"}
_ROLE_DELTA = '{"role": "assistant", "content": ""}'


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
    """The fields every chunk of one stream repeats, rendered once: a chunk is that text with
    its choice spliced in. The text is exactly what `json.dumps` gives for the whole object."""

    def __init__(self, plan: Plan, obj: str, include_usage: bool) -> None:
        head = {"id": plan.request_id, "object": obj, "created": plan.created}
        self._prefix = json.dumps({**head, "model": plan.model.name})[:-1] + ', "choices": ['
        self._suffix = '], "usage": null}' if include_usage else "]}"

    def chunk(self, choice_json: str) -> str:
        """A chunk with one choice, given as JSON text."""
        return self._prefix + choice_json + self._suffix

    def usage_chunk(self, usage: UsageTally) -> str:
        return self._prefix + '], "usage": ' + json.dumps(usage_body(usage)) + "}"


def _choice_json(index: int, field: str, value: str, logprobs: str, finish: str | None) -> str:
    """A stream choice as `json.dumps` writes it, built by hand: this runs once per token, and
    the generic encoder costs several times more than formatting four known fields."""
    finish_json = "null" if finish is None else json.dumps(finish)
    return (
        f'{{"index": {index}, "{field}": {value}, "logprobs": {logprobs}, '
        f'"finish_reason": {finish_json}}}'
    )


def _chat_choice(plan: Plan, position: int, event: Event, top_logprobs: int | None) -> str:
    delta = f'{{"content": {json.dumps(event.text)}}}' if event.text else "{}"
    logprobs = "null"
    if top_logprobs is not None and event.logprobs:
        logprobs = json.dumps(chat_logprobs(plan.model, event.logprobs, top_logprobs))
    index = choice_index(plan, position, event)
    return _choice_json(index, "delta", delta, logprobs, openai_finish(event.finish))


def _stream_end(writer: _ChunkWriter, usage: UsageTally, include_usage: bool) -> list[str]:
    return [writer.usage_chunk(usage), "[DONE]"] if include_usage else ["[DONE]"]


def _has_content(event: Event) -> bool:
    """False for a token whose text is held back (an incomplete UTF-8 sequence)."""
    return bool(event.text or event.logprobs or event.finish)


async def chat_chunks(
    plan: Plan,
    batches: AsyncIterator[EventBatch],
    *,
    top_logprobs: int | None,
    include_usage: bool,
) -> AsyncIterator[list[str]]:
    """The `data:` payloads of a chat stream, one list per relayed batch."""
    writer = _ChunkWriter(plan, "chat.completion.chunk", include_usage)
    usage = UsageTally(plan)
    yield [
        writer.chunk(_choice_json(index, "delta", _ROLE_DELTA, "null", None))
        for index in range(plan.choice_count)
    ]

    def render(position: int, event: Event) -> str:
        return writer.chunk(_chat_choice(plan, position, event, top_logprobs))

    async with contextlib.aclosing(_payloads(batches, usage, render)) as payload_batches:
        async for payloads in payload_batches:
            yield payloads
    yield _stream_end(writer, usage, include_usage)


async def completion_chunks(
    plan: Plan,
    batches: AsyncIterator[EventBatch],
    *,
    logprobs: int | None,
    include_usage: bool,
) -> AsyncIterator[list[str]]:
    """The `data:` payloads of a completions stream, one list per relayed batch."""
    writer = _ChunkWriter(plan, "text_completion", include_usage)
    usage = UsageTally(plan)
    prompts = [plan.prompt_texts[index // plan.n] for index in range(plan.choice_count)]
    offsets = [len(prompt) for prompt in prompts]
    echoes = [  # echo: the prompt comes first
        writer.chunk(_choice_json(index, "text", json.dumps(prompt), "null", None))
        for index, prompt in enumerate(prompts)
        if prompt
    ]
    if echoes:
        yield echoes

    def render(position: int, event: Event) -> str:
        return writer.chunk(_text_choice(plan, position, event, logprobs, offsets))

    async with contextlib.aclosing(_payloads(batches, usage, render)) as payload_batches:
        async for payloads in payload_batches:
            yield payloads
    yield _stream_end(writer, usage, include_usage)


async def _payloads(
    batches: AsyncIterator[EventBatch], usage: UsageTally, render: Callable[[int, Event], str]
) -> AsyncGenerator[list[str], None]:
    """One list of rendered chunks per relayed batch, usage counted; a failed event ends the
    stream with its error, after the chunks that came before it."""
    async with contextlib.aclosing(batches):  # type: ignore[type-var]
        async for batch in batches:
            events, error = until_error(batch)
            payloads = []
            for position, event in events:
                usage.add(position, event)
                if _has_content(event):
                    payloads.append(render(position, event))
            if payloads:
                yield payloads
            if error is not None:
                raise error


def _text_choice(
    plan: Plan, position: int, event: Event, logprobs: int | None, offsets: list[int]
) -> str:
    """One completions choice; advances the choice's text offset in `offsets`."""
    index = choice_index(plan, position, event)
    shape = "null"
    if logprobs is not None and event.logprobs:
        shape = json.dumps(
            completion_logprobs(plan.model, event.logprobs, logprobs, offsets[index])
        )
    offsets[index] += len(event.text)
    return _choice_json(index, "text", json.dumps(event.text), shape, openai_finish(event.finish))
