"""TGI's native dialect: request parameters to a Job, and the /generate and /generate_stream
response shapes (text-generation-inference's router types).

Greedy unless `do_sample` or a sampling knob (temperature, top_k, top_p, typical_p) is set, as in
TGI. A sampled request without a seed gets a random one, reported in `details.seed`. The stream
sends one message per token; the last also carries `generated_text` (and `details` when asked).
"""

from __future__ import annotations

import contextlib
import json
import random
import time
from collections.abc import AsyncIterator
from typing import Any

from common.protocol import Event, Job, Sampling
from gateway.errors import ApiError, bad_request, tgi_error_body
from gateway.generation import GenerationResult, until_error
from gateway.jobs import Plan, check_token_ids, new_request_id, resolve_max_new_tokens
from gateway.registry import ServedModel
from gateway.relay import EventBatch
from gateway.schemas import TgiGenerateRequest, TgiParameters

TGI_DEFAULT_MAX_NEW_TOKENS = 100
MAX_STOP_SEQUENCES = 16
_FINISH = {"stop": "stop_sequence", "eos_token": "eos_token", "length": "length"}


def _reject_unsupported(params: TgiParameters) -> None:
    if params.watermark:
        raise bad_request("watermark is not supported", param="watermark")
    if params.decoder_input_details:
        raise bad_request("decoder_input_details is not supported", param="decoder_input_details")
    if params.best_of not in (None, 1):
        raise bad_request(f"best_of={params.best_of}: only best_of=1 is supported", param="best_of")
    if params.grammar is not None:
        raise bad_request("grammar is not supported", param="grammar")
    if len(params.stop) > MAX_STOP_SEQUENCES:
        raise bad_request(
            f"stop has {len(params.stop)} sequences; at most {MAX_STOP_SEQUENCES} are allowed",
            param="stop",
        )


def tgi_sampling(params: TgiParameters) -> Sampling:
    knobs_set = any(
        value is not None
        for value in (params.temperature, params.top_k, params.top_p, params.typical_p)
    )
    if not (params.do_sample or knobs_set):
        return Sampling(
            temperature=0.0,
            repetition_penalty=params.repetition_penalty or 1.0,
            frequency_penalty=params.frequency_penalty or 0.0,
        )
    return Sampling(
        temperature=params.temperature or 1.0,
        top_k=params.top_k or 0,
        top_p=params.top_p or 1.0,
        typical_p=params.typical_p or 1.0,
        repetition_penalty=params.repetition_penalty or 1.0,
        frequency_penalty=params.frequency_penalty or 0.0,
        seed=params.seed if params.seed is not None else random.randrange(2**63),
    )


def plan_generate(
    body: TgiGenerateRequest, model: ServedModel, timeout_s: float, *, stream: bool
) -> Plan:
    params = body.parameters
    _reject_unsupported(params)
    prompt_ids = model.tokenizer.encode(body.inputs, add_special_tokens=True)
    if params.truncate is not None:
        prompt_ids = prompt_ids[-params.truncate :]
    check_token_ids(prompt_ids, model.vocab_size, "inputs")
    max_new = resolve_max_new_tokens(
        params.max_new_tokens,
        len(prompt_ids),
        model,
        default=TGI_DEFAULT_MAX_NEW_TOKENS,
        param="inputs",
        name="max_new_tokens",
    )
    request_id = new_request_id("gen")
    wants_logprobs = stream or params.details
    created = time.time()
    job = Job(
        id=request_id,
        model=model.name,
        prompt_ids=prompt_ids,
        sampling=tgi_sampling(params),
        stop=[text for text in params.stop if text],
        max_new_tokens=max_new,
        logprobs=(params.top_n_tokens or 0) if wants_logprobs else None,
        stream=stream,
        created=created,
        deadline=created + timeout_s if timeout_s > 0 else None,
    )
    prefix = body.inputs if params.return_full_text else ""
    return Plan(request_id, model, [job], 1, [prefix], int(created))


def tgi_token(
    model: ServedModel, token_id: int, logprob: float | None, text: str | None = None
) -> dict[str, Any]:
    return {
        "id": token_id,
        "text": model.token_text(token_id) if text is None else text,
        "logprob": logprob,
        "special": token_id in model.special_ids,
    }


def generate_response(
    plan: Plan, result: GenerationResult, params: TgiParameters
) -> dict[str, Any]:
    choice = result.choices[0]
    body: dict[str, Any] = {"generated_text": plan.prompt_texts[0] + choice.text}
    if not params.details:
        return body
    logprobs = {index: entry for index, entry in enumerate(choice.logprobs)}
    details: dict[str, Any] = {
        "finish_reason": _FINISH.get(choice.finish or "", choice.finish),
        "generated_tokens": len(choice.token_ids),
        "seed": plan.jobs[0].sampling.seed,
        "prefill": [],
        "tokens": [
            tgi_token(plan.model, token_id, logprobs[i].logprob if i in logprobs else None)
            for i, token_id in enumerate(choice.token_ids)
        ],
    }
    if params.top_n_tokens:
        details["top_tokens"] = [
            [tgi_token(plan.model, tid, lp) for tid, lp in entry.top] for entry in choice.logprobs
        ]
    body["details"] = details
    return body


def sse_error(error: ApiError) -> str:
    return json.dumps(tgi_error_body(error))


def _event_tokens(model: ServedModel, event: Event, top_n: int | None) -> list[dict[str, Any]]:
    """One stream message per token; the event's text goes with its last token, so the tokens'
    texts always add up to generated_text."""
    logprobs = event.logprobs or []
    messages = []
    for position, token_id in enumerate(event.token_ids):
        last = position == len(event.token_ids) - 1
        entry = logprobs[position] if position < len(logprobs) else None
        token = tgi_token(
            model, token_id, entry.logprob if entry else None, event.text if last else ""
        )
        top = [tgi_token(model, tid, lp) for tid, lp in entry.top] if entry and top_n else None
        messages.append(
            {"token": token, "top_tokens": top, "generated_text": None, "details": None}
        )
    return messages


async def generate_stream_messages(
    plan: Plan, batches: AsyncIterator[EventBatch], params: TgiParameters
) -> AsyncIterator[list[str]]:
    """The `data:` payloads of /generate_stream, one list per relayed batch."""
    stream = _TgiStream(plan, params)
    async with contextlib.aclosing(batches):  # type: ignore[type-var]
        async for batch in batches:
            events, error = until_error(batch)
            payloads = [payload for _, event in events for payload in stream.add(event)]
            if payloads:
                yield payloads
            if error is not None:
                raise error
            if stream.finished:
                return


class _TgiStream:
    """One message per token. The newest token is held until the next event shows whether it
    is the last: the last message also carries `generated_text` (and `details`)."""

    def __init__(self, plan: Plan, params: TgiParameters) -> None:
        self._plan = plan
        self._params = params
        self._text = plan.prompt_texts[0]
        self._generated = 0
        self._sent = 0
        self._held: dict[str, Any] | None = None
        self.finished = False

    def add(self, event: Event) -> list[str]:
        """The payloads this event releases (none once the stream has finished)."""
        if self.finished:
            return []
        self._text += event.text
        self._generated += len(event.token_ids)
        messages = _event_tokens(self._plan.model, event, self._params.top_n_tokens)
        payloads = []
        if not messages and self._held is not None:
            self._held["token"]["text"] += event.text
        if messages:
            for message in ([self._held] if self._held else []) + messages[:-1]:
                payloads.append(self._message(message))
            self._held = messages[-1]
        if event.finish is not None:
            payloads.append(self._final(event))
        return payloads

    def _message(self, message: dict[str, Any]) -> str:
        self._sent += 1
        return json.dumps({"index": self._sent, **message})

    def _final(self, event: Event) -> str:
        self.finished = True
        held = self._held or _empty_final_token(self._plan.model)
        held["generated_text"] = self._text
        held["details"] = (
            _stream_details(self._plan, event, self._generated) if self._params.details else None
        )
        return self._message(held)


def _empty_final_token(model: ServedModel) -> dict[str, Any]:
    """A request that ended without a token still ends with one message; TGI's clients expect a
    token in it, so it is the end-of-sequence token with no text."""
    eos = model.card.eos_token_ids[0] if model.card.eos_token_ids else 0
    return {"token": tgi_token(model, eos, None, ""), "top_tokens": None}


def _stream_details(plan: Plan, event: Event, generated: int) -> dict[str, Any]:
    return {
        "finish_reason": _FINISH.get(event.finish or "", event.finish),
        "generated_tokens": generated,
        "seed": plan.jobs[0].sampling.seed,
        "input_length": len(plan.jobs[0].prompt_ids),
    }
