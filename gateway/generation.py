"""The part of answering a request that both API dialects share: starting its jobs (an admission
slot, then the relay), turning the relayed events into choices (text, tokens, logprobs, finish)
and usage, mapping error events to HTTP errors, and cancelling a non-streamed request whose
client went away.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator, Awaitable
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, TypeVar

from starlette.requests import Request

from common.protocol import Event, TokenLogprob
from gateway.admission import Slot
from gateway.errors import ApiError, ClientDisconnected
from gateway.jobs import Plan
from gateway.relay import EventBatch, Relay

if TYPE_CHECKING:
    from gateway.context import Gateway

T = TypeVar("T")

# Worker error types that are the client's fault or the service's state, not a crash.
_ERROR_STATUS = {
    "invalid_request_error": 400,
    "validation": 400,
    "timeout": 504,
    "overloaded": 503,
}


class Generation:
    """What a generation request holds while it runs: its admission slot and its relay.
    `aclose()` closes the relay (cancelling what is unfinished), then frees the slot."""

    def __init__(self, slot: Slot, relay: Relay) -> None:
        self.slot = slot
        self.relay = relay

    async def aclose(self) -> None:
        try:
            await self.relay.aclose()
        finally:
            self.slot.release()

    async def __aenter__(self) -> Generation:
        return self

    async def __aexit__(self, *exc_info: object) -> None:
        await self.aclose()


async def start_generation(gateway: Gateway, plan: Plan) -> Generation:
    """Take an admission slot (429 when a limit is full) and subscribe to the plan's jobs (503
    when Redis cannot be reached); iterating `relay.batches()` enqueues them once Redis confirmed
    the subscriptions. The caller closes what it gets back."""
    name = plan.model.name
    slot = gateway.admission.admit(name, gateway.registry.queued(name))
    try:
        relay = await gateway.relay.start(plan.jobs, gateway.admission.max_queue)
    except BaseException:
        slot.release()
        raise
    return Generation(slot, relay)


@dataclass
class ChoiceResult:
    index: int
    text: str = ""
    token_ids: list[int] = field(default_factory=list)
    logprobs: list[TokenLogprob] = field(default_factory=list)
    finish: str | None = None  # the protocol's reason: stop | length | eos_token

    def add(self, event: Event) -> None:
        self.text += event.text
        self.token_ids.extend(event.token_ids)
        self.logprobs.extend(event.logprobs or [])
        self.finish = event.finish or self.finish


class UsageTally:
    """Usage summed over a request's jobs: each job's terminal event carries its own; a job
    whose worker sent none is counted from its prompt and the tokens relayed."""

    def __init__(self, plan: Plan) -> None:
        self._reported: dict[int, tuple[int, int]] = {}
        self._counted = [0] * len(plan.jobs)
        self._prompts = [len(job.prompt_ids) for job in plan.jobs]

    def add(self, position: int, event: Event) -> None:
        self._counted[position] += len(event.token_ids)
        if event.usage is not None:
            self._reported[position] = (event.usage.prompt_tokens, event.usage.completion_tokens)

    def _per_job(self) -> list[tuple[int, int]]:
        return [
            self._reported.get(position, (self._prompts[position], self._counted[position]))
            for position in range(len(self._prompts))
        ]

    @property
    def prompt_tokens(self) -> int:
        return sum(prompt for prompt, _ in self._per_job())

    @property
    def completion_tokens(self) -> int:
        return sum(completion for _, completion in self._per_job())


@dataclass
class GenerationResult:
    choices: list[ChoiceResult]
    usage: UsageTally


def choice_index(plan: Plan, position: int, event: Event) -> int:
    """OpenAI numbers the choices of several prompts prompt-major: prompt p, choice i -> p*n+i."""
    return position * plan.n + event.index


def event_error(event: Event) -> ApiError | None:
    """The HTTP error a cancelled or failed event stands for, else None."""
    if event.finish not in ("cancelled", "error"):
        return None
    if event.error is not None:
        status = _ERROR_STATUS.get(event.error.type, 503 if event.finish == "cancelled" else 500)
        return ApiError(status, event.error.message, type=event.error.type)
    if event.finish == "cancelled":
        return ApiError(503, "the request was cancelled by the worker before it finished")
    return ApiError(500, "the worker failed while generating this request")


def until_error(batch: EventBatch) -> tuple[EventBatch, ApiError | None]:
    """The events before the batch's first cancelled/failed one, and that one's error (None
    when every event is fine): what came before an error is still sent."""
    for at, (_, event) in enumerate(batch):
        error = event_error(event)
        if error is not None:
            return batch[:at], error
    return batch, None


async def collect(plan: Plan, batches: AsyncIterator[EventBatch]) -> GenerationResult:
    """Every choice's full answer; raises the ApiError of the first failed event."""
    choices = [ChoiceResult(index) for index in range(plan.choice_count)]
    usage = UsageTally(plan)
    async with contextlib.aclosing(batches):  # type: ignore[type-var]
        async for batch in batches:
            events, error = until_error(batch)
            for position, event in events:
                choices[choice_index(plan, position, event)].add(event)
                usage.add(position, event)
            if error is not None:
                raise error
    return GenerationResult(choices, usage)


async def unless_disconnected(request: Request, work: Awaitable[T]) -> T:
    """Await `work`, but cancel it (running its clean-up) if the client disconnects first."""
    work_task = asyncio.ensure_future(work)
    watch_task = asyncio.ensure_future(_wait_for_disconnect(request))
    try:
        await asyncio.wait({work_task, watch_task}, return_when=asyncio.FIRST_COMPLETED)
        if work_task.done():
            return work_task.result()
        raise ClientDisconnected()
    finally:
        for task in (watch_task, work_task):
            task.cancel()
        await asyncio.gather(work_task, watch_task, return_exceptions=True)


async def _wait_for_disconnect(request: Request) -> None:
    # The body has been read, so the next ASGI message can only be the disconnect.
    while (await request.receive())["type"] != "http.disconnect":
        pass
