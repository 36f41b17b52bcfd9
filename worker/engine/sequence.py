"""Request state: a `Request` (one client request, `n` choices) owns `Sequence`s (one per choice).

A sequence's progress is one number, `num_computed_tokens`, catching up with `num_tokens`
(prompt + generated): that covers chunked prefill, decode and recomputation after preemption.
Pure Python — no torch — so the scheduler and its tests need no model.
"""

from __future__ import annotations

import enum
import itertools
from dataclasses import dataclass, field
from typing import Any

from common.protocol import ErrorInfo, Event, FinishReason, SamplingParams, TokenLogprob, Usage

_seq_ids = itertools.count()


class SequenceStatus(enum.Enum):
    WAITING = "waiting"  # queued, or preempted and waiting to be recomputed
    RUNNING = "running"  # holds KV blocks and is in the running batch
    FINISHED = "finished"


@dataclass(eq=False)
class Sequence:
    """One generated choice. Holds KV blocks while running."""

    request: Request
    index: int  # choice index within the request
    output_ids: list[int] = field(default_factory=list)
    num_computed_tokens: int = 0  # tokens whose K/V are in this sequence's blocks
    block_ids: list[int] = field(default_factory=list)
    block_hashes: list[int] = field(default_factory=list)  # prefix-cache keys of full blocks
    status: SequenceStatus = SequenceStatus.WAITING
    finish_reason: FinishReason | None = None
    num_preemptions: int = 0
    seq_id: int = field(default_factory=lambda: next(_seq_ids))
    # Engine-side helpers (detokenizer, torch.Generator) kept opaque to stay torch-free here.
    detokenizer: Any = None
    generator: Any = None

    @property
    def prompt_ids(self) -> list[int]:
        return self.request.prompt_ids

    @property
    def params(self) -> SamplingParams:
        return self.request.params

    @property
    def num_prompt_tokens(self) -> int:
        return len(self.request.prompt_ids)

    @property
    def num_tokens(self) -> int:
        return len(self.request.prompt_ids) + len(self.output_ids)

    @property
    def num_pending_tokens(self) -> int:
        """Tokens still to run through the model before the next token can be sampled."""
        return self.num_tokens - self.num_computed_tokens

    @property
    def is_finished(self) -> bool:
        return self.status is SequenceStatus.FINISHED

    def token_ids(self, start: int, end: int) -> list[int]:
        """Tokens [start, end) of prompt + output."""
        prompt = self.request.prompt_ids
        if end <= len(prompt):
            return prompt[start:end]
        if start >= len(prompt):
            return self.output_ids[start - len(prompt) : end - len(prompt)]
        return prompt[start:] + self.output_ids[: end - len(prompt)]


@dataclass(eq=False)
class Request:
    """One client request: its prompt, parameters and the event numbering shared by its choices."""

    request_id: str
    prompt_ids: list[int]
    params: SamplingParams
    arrival: float
    next_event_seq: int = 0  # Event.seq of the next event (continues across resumes)
    finishes_reported: int = 0  # choices whose finishing event has been made
    worker: str | None = None  # the worker id its events carry (None in-process)
    sequences: list[Sequence] = field(default_factory=list)

    @property
    def finished(self) -> bool:
        return all(seq.is_finished for seq in self.sequences)

    def usage(self) -> Usage:
        completion = sum(len(seq.output_ids) for seq in self.sequences)
        return Usage(prompt_tokens=len(self.prompt_ids), completion_tokens=completion)

    def event(
        self,
        seq: Sequence,
        token_ids: list[int],
        text: str,
        logprobs: list[TokenLogprob] | None = None,
        error: ErrorInfo | None = None,
    ) -> Event:
        """The next event of this request for choice `seq.index`; the request's last event
        (the finish of its last unfinished choice) carries usage."""
        if seq.finish_reason is not None:
            self.finishes_reported += 1
        last = self.finishes_reported == len(self.sequences)
        event = Event(
            id=self.request_id,
            seq=self.next_event_seq,
            index=seq.index,
            token_ids=token_ids,
            text=text,
            logprobs=logprobs,
            finish=seq.finish_reason,
            usage=self.usage() if last else None,
            error=error,
            worker=self.worker,
        )
        self.next_event_seq += 1
        return event
