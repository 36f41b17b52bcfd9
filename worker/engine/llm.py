"""The in-process API: `LLM(model).generate(prompts, params)` for scripts, tests and benchmarks,
and `AsyncLLM` whose `stream()` yields a request's events as they are generated (the engine runs
in a thread of its own, so the event loop never blocks on a forward pass)."""

from __future__ import annotations

import asyncio
import itertools
import queue
import threading
from collections.abc import AsyncIterator, Sequence
from dataclasses import dataclass, field, replace
from typing import cast

from common.protocol import Event, FinishReason, SamplingParams, TokenLogprob, Usage
from worker.engine.config import EngineConfig
from worker.engine.engine import LLMEngine

Prompt = str | Sequence[int]


@dataclass
class Choice:
    index: int
    token_ids: list[int] = field(default_factory=list)
    text: str = ""
    logprobs: list[TokenLogprob] = field(default_factory=list)
    finish_reason: FinishReason | None = None


@dataclass
class Completion:
    request_id: str
    prompt_ids: list[int]
    choices: list[Choice]
    usage: Usage | None = None

    @property
    def text(self) -> str:
        return self.choices[0].text

    @property
    def token_ids(self) -> list[int]:
        return self.choices[0].token_ids

    def apply(self, event: Event) -> None:
        choice = self.choices[event.index]
        choice.token_ids.extend(event.token_ids)
        choice.text += event.text
        choice.logprobs.extend(event.logprobs or [])
        choice.finish_reason = event.finish or choice.finish_reason
        self.usage = event.usage or self.usage

    @property
    def finished(self) -> bool:
        return self.usage is not None


class LLM:
    def __init__(self, model: str, **engine_options):
        self.engine = LLMEngine(EngineConfig(model=model, **engine_options))
        self._ids = itertools.count()

    def encode(self, prompt: Prompt) -> list[int]:
        if isinstance(prompt, str):
            return self.engine.tokenizer.encode(prompt).ids
        return list(prompt)

    def generate(
        self,
        prompts: Prompt | Sequence[Prompt],
        params: SamplingParams | Sequence[SamplingParams] | None = None,
    ) -> list[Completion]:
        """Run the prompts together in one continuous batch; results in prompt order."""
        batch = _prompt_list(prompts)
        params_list = _broadcast(params or SamplingParams(), len(batch))
        completions = {}
        for prompt, prompt_params in zip(batch, params_list, strict=True):
            request_id = f"llm-{next(self._ids)}"
            prompt_ids = self.encode(prompt)
            self.engine.add_request(request_id, prompt_ids, prompt_params)
            choices = [Choice(i) for i in range(prompt_params.sampling.n)]
            completions[request_id] = Completion(request_id, prompt_ids, choices)
        while self.engine.has_unfinished:
            for event in self.engine.step():
                completions[event.id].apply(event)
        return list(completions.values())


def _prompt_list(prompts: Prompt | Sequence[Prompt]) -> list[Prompt]:
    """One prompt (text or token ids) or several, as a list of prompts."""
    if isinstance(prompts, str) or (prompts and isinstance(prompts[0], int)):
        return [cast(Prompt, prompts)]
    return list(cast(Sequence[Prompt], prompts))


def _broadcast(params, count: int) -> list[SamplingParams]:
    if isinstance(params, SamplingParams):
        return [params] * count
    if len(params) != count:
        raise ValueError(f"{count} prompts but {len(params)} parameter sets")
    return list(params)


class AsyncLLM:
    """The engine on its own thread; requests and aborts reach it through a queue."""

    def __init__(self, model: str, **engine_options):
        self.engine = LLMEngine(EngineConfig(model=model, **engine_options))
        self._commands: queue.Queue = queue.Queue()
        self._listeners: dict[str, tuple[asyncio.AbstractEventLoop, asyncio.Queue]] = {}
        self._ids = itertools.count()
        self._stopped = threading.Event()
        self._thread = threading.Thread(target=self._run, name="spindle-engine", daemon=True)
        self._thread.start()

    async def stream(
        self, prompt: Prompt, params: SamplingParams | None = None
    ) -> AsyncIterator[Event]:
        params = params or SamplingParams()
        request_id = f"async-{next(self._ids)}"
        prompt_ids = (
            self.engine.tokenizer.encode(prompt).ids if isinstance(prompt, str) else list(prompt)
        )
        events: asyncio.Queue = asyncio.Queue()
        self._listeners[request_id] = (asyncio.get_running_loop(), events)
        self._commands.put(("add", request_id, prompt_ids, params))
        try:
            while True:
                event = await events.get()
                if isinstance(event, Exception):
                    raise event
                yield event
                if event.usage is not None:
                    return
        finally:
            self._listeners.pop(request_id, None)
            self._commands.put(("abort", request_id))

    async def generate(self, prompt: Prompt, params: SamplingParams | None = None) -> Completion:
        params = params or SamplingParams()
        completion = Completion("", [], [Choice(i) for i in range(params.sampling.n)])
        async for event in self.stream(prompt, params):
            completion = replace(completion, request_id=event.id)
            completion.apply(event)
        return completion

    def shutdown(self) -> None:
        self._stopped.set()
        self._commands.put(("stop",))
        self._thread.join(timeout=30)

    def _run(self) -> None:
        while not self._stopped.is_set():
            block = not self.engine.has_unfinished
            self._drain_commands(block)
            for event in self.engine.step():
                self._deliver(event.id, event)

    def _drain_commands(self, block: bool) -> None:
        try:
            command = self._commands.get(block=block)
            while True:
                self._apply(command)
                command = self._commands.get_nowait()
        except queue.Empty:
            return

    def _apply(self, command: tuple) -> None:
        if command[0] == "add":
            _, request_id, prompt_ids, params = command
            try:
                self.engine.add_request(request_id, prompt_ids, params)
            except ValueError as err:
                self._deliver(request_id, err)
        elif command[0] == "abort":
            self.engine.abort_request(command[1])

    def _deliver(self, request_id: str, item: Event | Exception) -> None:
        listener = self._listeners.get(request_id)
        if listener is not None:
            loop, events = listener
            loop.call_soon_threadsafe(events.put_nowait, item)
