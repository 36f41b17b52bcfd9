"""From a validated OpenAI request to the `Job`s put on Redis: tokenization, chat template,
length limits, sampling defaults. Pure functions of the request and the served model (no Redis),
so they are unit-tested directly.

Defaults: knobs the request leaves out come from the model's generation_config.json when it sets
them (as vLLM does), else OpenAI's. `max_tokens` left out means "up to the context limit" for chat
and 16 for completions (OpenAI's defaults). A completions request with several prompts becomes
one Job per prompt; choice `i` of prompt `p` is answer index `p * n + i`, as OpenAI numbers them.
"""

from __future__ import annotations

import time
import uuid
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any, cast

from common.chat import ChatTemplateError, chat_prompt_ids
from common.protocol import Job, Sampling
from gateway.errors import bad_request
from gateway.registry import ServedModel
from gateway.schemas import ChatCompletionRequest, ChatMessage, CompletionRequest, SamplingFields

COMPLETIONS_DEFAULT_MAX_TOKENS = 16
_GENERATION_CONFIG_KNOBS = (
    "temperature",
    "top_p",
    "top_k",
    "min_p",
    "typical_p",
    "repetition_penalty",
)


@dataclass(frozen=True)
class Plan:
    """What one HTTP request becomes: its Jobs (one per prompt) and what the answer needs."""

    request_id: str
    model: ServedModel
    jobs: list[Job]
    n: int  # choices per prompt
    prompt_texts: list[str]  # per prompt, for echo / return_full_text
    created: int  # unix seconds, the `created` of every response object

    @property
    def choice_count(self) -> int:
        return self.n * len(self.jobs)

    @property
    def prompt_tokens(self) -> int:
        return sum(len(job.prompt_ids) for job in self.jobs)


def new_request_id(kind: str) -> str:
    """`chatcmpl-...`, `cmpl-...`, `gen-...`: the response id, also the Redis channel suffix."""
    return f"{kind}-{uuid.uuid4().hex}"


def check_token_ids(prompt_ids: Sequence[int], vocab_size: int, param: str) -> None:
    if not prompt_ids:
        raise bad_request(f"{param} is empty; send at least one token", param=param)
    for token_id in prompt_ids:
        if not 0 <= token_id < vocab_size:
            raise bad_request(
                f"token id {token_id} in {param} is out of range; the vocabulary has "
                f"{vocab_size:,} tokens (ids 0 to {vocab_size - 1:,})",
                param=param,
            )


def resolve_max_new_tokens(
    requested: int | None,
    prompt_len: int,
    model: ServedModel,
    *,
    default: int | None,
    param: str,
    name: str = "max_tokens",
) -> int:
    """Check the prompt against the model's limits and decide how many tokens to generate.
    `default` None means "as many as the context allows"."""
    card = model.card
    if prompt_len > card.max_input_tokens:
        raise bad_request(
            f"prompt has {prompt_len:,} tokens; this model accepts at most "
            f"{card.max_input_tokens:,} input tokens",
            param=param,
        )
    room = card.max_total_tokens - prompt_len
    if requested is None:
        if room < 1:
            raise bad_request(
                f"prompt has {prompt_len:,} tokens, which fills this model's context of "
                f"{card.max_total_tokens:,} tokens; no room is left to generate",
                param=param,
            )
        return room if default is None else min(default, room)
    if prompt_len + requested > card.max_total_tokens:
        raise bad_request(
            f"prompt has {prompt_len:,} tokens and {name} is {requested:,}: "
            f"{prompt_len + requested:,} in all, over this model's limit of "
            f"{card.max_total_tokens:,} tokens; lower {name} to at most {max(room, 0):,}",
            param=name,
        )
    return requested


def openai_sampling(body: SamplingFields, generation_config: Mapping[str, Any]) -> Sampling:
    n = body.n or 1
    if body.best_of is not None and body.best_of != n:
        raise bad_request(
            f"best_of={body.best_of} with n={n}: only best_of == n is supported for now",
            param="best_of",
        )
    knobs = {
        knob: getattr(body, knob)
        if getattr(body, knob) is not None
        else generation_config.get(knob)
        for knob in _GENERATION_CONFIG_KNOBS
    }
    return Sampling(
        temperature=_number(knobs["temperature"], 1.0),
        top_k=max(int(_number(knobs["top_k"], 0)), 0),  # vLLM spells "off" as -1
        top_p=_number(knobs["top_p"], 1.0),
        min_p=_number(knobs["min_p"], 0.0),
        typical_p=_number(knobs["typical_p"], 1.0),
        repetition_penalty=_number(knobs["repetition_penalty"], 1.0),
        frequency_penalty=body.frequency_penalty or 0.0,
        presence_penalty=body.presence_penalty or 0.0,
        seed=body.seed,
        n=n,
        best_of=body.best_of,
    )


def _number(value: Any, default: float) -> float:
    return default if value is None else float(value)


def make_job(
    job_id: str,
    model: ServedModel,
    prompt_ids: list[int],
    body: SamplingFields,
    *,
    max_new_tokens: int,
    logprobs: int | None,
    timeout_s: float,
) -> Job:
    created = time.time()
    stop = [body.stop] if isinstance(body.stop, str) else list(body.stop or [])
    return Job(
        id=job_id,
        model=model.name,
        prompt_ids=prompt_ids,
        sampling=openai_sampling(body, model.card.generation_config),
        stop=[text for text in stop if text],
        stop_token_ids=list(body.stop_token_ids or []),
        max_new_tokens=max_new_tokens,
        ignore_eos=bool(body.ignore_eos),
        logprobs=logprobs,
        skip_special_tokens=body.skip_special_tokens is not False,
        stream=bool(body.stream),
        created=created,
        deadline=created + timeout_s if timeout_s > 0 else None,
    )


def chat_messages(messages: Sequence[ChatMessage]) -> list[dict[str, Any]]:
    """Messages as chat templates expect them: text content only, `developer` read as `system`."""
    rendered = []
    for position, message in enumerate(messages):
        content = message.content
        if isinstance(content, list):
            content = _text_parts(content, f"messages[{position}].content")
        entry: dict[str, Any] = {
            "role": "system" if message.role == "developer" else message.role,
            "content": content or "",
        }
        if message.name:
            entry["name"] = message.name
        rendered.append(entry)
    return rendered


def _text_parts(parts: list[dict[str, Any]], param: str) -> str:
    texts = []
    for position, part in enumerate(parts):
        if part.get("type") != "text" or not isinstance(part.get("text"), str):
            raise bad_request(
                f"{param}[{position}]: only text parts are supported (got type {part.get('type')!r})",
                param=param,
            )
        texts.append(part["text"])
    return "\n".join(texts)


def plan_chat(body: ChatCompletionRequest, model: ServedModel, timeout_s: float) -> Plan:
    if body.top_logprobs and not body.logprobs:
        raise bad_request("top_logprobs requires logprobs=true", param="top_logprobs")
    try:
        prompt_ids = chat_prompt_ids(model.tokenizer, chat_messages(body.messages))
    except ChatTemplateError as err:
        raise bad_request(str(err), param="messages") from err
    check_token_ids(prompt_ids, model.vocab_size, "messages")
    requested = body.max_completion_tokens or body.max_tokens
    name = "max_completion_tokens" if body.max_completion_tokens else "max_tokens"
    max_new = resolve_max_new_tokens(
        requested, len(prompt_ids), model, default=None, param="messages", name=name
    )
    request_id = new_request_id("chatcmpl")
    logprobs = (body.top_logprobs or 0) if body.logprobs else None
    job = make_job(
        request_id,
        model,
        prompt_ids,
        body,
        max_new_tokens=max_new,
        logprobs=logprobs,
        timeout_s=timeout_s,
    )
    return Plan(request_id, model, [job], body.n or 1, [""], int(job.created))


def completion_prompts(body: CompletionRequest, model: ServedModel) -> list[tuple[list[int], str]]:
    """The prompt field, in any of its four OpenAI forms, as (token ids, text) pairs; the text
    of a token-id prompt is its decoding (what `echo` shows)."""
    items = _prompt_items(body.prompt)
    if not items:
        raise bad_request("prompt is empty", param="prompt")
    prompts = []
    for position, item in enumerate(items):
        param = "prompt" if len(items) == 1 else f"prompt[{position}]"
        if isinstance(item, str):
            if not item:
                raise bad_request(f"{param} is empty", param="prompt")
            ids = model.tokenizer.encode(item, add_special_tokens=True)
            check_token_ids(ids, model.vocab_size, param)
            prompts.append((ids, item))
        else:
            check_token_ids(item, model.vocab_size, param)
            prompts.append((item, str(model.tokenizer.decode(item)) if body.echo else ""))
    return prompts


def _prompt_items(prompt: str | list[str] | list[int] | list[list[int]]) -> list[str | list[int]]:
    """One entry per prompt: a string or a list of token ids."""
    if isinstance(prompt, str):
        return [prompt]
    if prompt and isinstance(prompt[0], int):
        return [cast(list[int], prompt)]
    return cast(list[str | list[int]], list(prompt))


def plan_completion(body: CompletionRequest, model: ServedModel, timeout_s: float) -> Plan:
    if body.echo and body.logprobs is not None:
        raise bad_request("echo with logprobs is not supported (no prompt logprobs)", param="echo")
    prompts = completion_prompts(body, model)
    request_id = new_request_id("cmpl")
    jobs = []
    for position, (prompt_ids, _) in enumerate(prompts):
        max_new = resolve_max_new_tokens(
            body.max_tokens,
            len(prompt_ids),
            model,
            default=COMPLETIONS_DEFAULT_MAX_TOKENS,
            param="prompt",
        )
        job_id = request_id if len(prompts) == 1 else f"{request_id}-{position}"
        jobs.append(
            make_job(
                job_id,
                model,
                prompt_ids,
                body,
                max_new_tokens=max_new,
                logprobs=body.logprobs,
                timeout_s=timeout_s,
            )
        )
    texts = [text if body.echo else "" for _, text in prompts]
    return Plan(request_id, model, jobs, body.n or 1, texts, int(jobs[0].created))
