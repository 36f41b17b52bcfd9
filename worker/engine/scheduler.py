"""The continuous-batching scheduler: which sequences run how many tokens in the next step.

One rule drives it: each sequence's computed-token count catches up with its token count
(prompt + generated). Running sequences go first — decodes (one token each), then unfinished
prefill chunks — then waiting sequences are admitted in arrival order while the step's prefill
budget, the batch-size limit and the KV blocks allow. When blocks run out, the newest running
sequence is preempted: its blocks are freed and it is recomputed later (its generated tokens are
kept, so the client sees no difference).

`schedule()` and `update()` are the only state changes. Pure Python — no torch.
"""

from __future__ import annotations

from collections import deque
from collections.abc import Callable
from dataclasses import dataclass, field

from common.protocol import Event, FinishReason, TokenLogprob
from worker.engine.block_manager import BlockManager
from worker.engine.sequence import Request, Sequence, SequenceStatus


@dataclass(frozen=True)
class SchedulerConfig:
    max_batch_size: int = 64  # running sequences at most
    max_batch_prefill_tokens: int = 2048  # prompt tokens computed per step at most (decodes extra)
    max_total_tokens: int = 4096  # prompt + generated tokens of one sequence at most
    eos_token_ids: frozenset[int] = frozenset()


@dataclass
class ScheduledSequence:
    seq: Sequence
    start: int  # position of the first token computed this step (= computed tokens before it)
    num_tokens: int  # tokens computed this step: 1 for a decode, a chunk for a prefill
    sample: bool  # the chunk reaches the end of the sequence, so a token is sampled after it


@dataclass
class SchedulerOutput:
    scheduled: list[ScheduledSequence]  # decodes first, then prefill chunks, in batch order
    preempted: list[Sequence] = field(default_factory=list)  # freed this step, to recompute

    @property
    def num_batched_tokens(self) -> int:
        return sum(item.num_tokens for item in self.scheduled)

    @property
    def num_decodes(self) -> int:
        return sum(1 for item in self.scheduled if item.num_tokens == 1 and item.sample)

    def sampling(self) -> list[ScheduledSequence]:
        return [item for item in self.scheduled if item.sample]


@dataclass(frozen=True)
class SampledToken:
    token_id: int
    logprob: TokenLogprob | None = None


# Called with each sampled token and whether the sequence ends with it for a reason the token
# itself gives (EOS, a stop token, a length limit); returns the text delta to send and, when a
# stop string matched, "stop".
TokenSink = Callable[[Sequence, int, bool], tuple[str, FinishReason | None]]


class Scheduler:
    def __init__(self, config: SchedulerConfig, blocks: BlockManager):
        self.config = config
        self.blocks = blocks
        self.waiting: deque[Sequence] = deque()
        self.running: list[Sequence] = []  # in admission order: the last is preempted first
        self.num_preemptions = 0  # since start, for metrics and tests

    @property
    def has_work(self) -> bool:
        return bool(self.waiting or self.running)

    def add(self, request: Request) -> None:
        for seq in request.sequences:
            if not seq.is_finished:
                self.waiting.append(seq)

    def abort(self, request_id: str) -> list[Sequence]:
        """Drop a request's unfinished sequences, freeing their blocks at once."""
        dropped = [s for s in [*self.running, *self.waiting] if s.request.request_id == request_id]
        for seq in dropped:
            self._finish(seq, "cancelled")
        return dropped

    # -- schedule -----------------------------------------------------------------------------

    def schedule(self) -> SchedulerOutput:
        output = SchedulerOutput(scheduled=[])
        budget = self.config.max_batch_prefill_tokens
        decodes = [s for s in self.running if s.num_pending_tokens == 1]
        prefills = [s for s in self.running if s.num_pending_tokens > 1]
        for seq in [*decodes, *prefills]:
            if seq.status is not SequenceStatus.RUNNING:
                continue  # preempted earlier in this loop
            budget -= self._schedule_running(seq, budget, output)
        if not output.preempted:
            self._admit_waiting(budget, output)
        return output

    def _schedule_running(self, seq: Sequence, budget: int, output: SchedulerOutput) -> int:
        pending = seq.num_pending_tokens
        chunk = 1 if pending == 1 else min(pending, budget)
        if chunk == 0:
            return 0
        while not self.blocks.grow(seq, seq.num_computed_tokens + chunk):
            victim = self.running[-1]
            self._preempt(victim, output)
            if victim is seq:
                return 0
        output.scheduled.append(
            ScheduledSequence(seq, seq.num_computed_tokens, chunk, chunk == pending)
        )
        return 0 if pending == 1 else chunk

    def _admit_waiting(self, budget: int, output: SchedulerOutput) -> None:
        for seq in list(self.waiting):
            if budget <= 0 or len(self.running) >= self.config.max_batch_size:
                return
            if self._waits_for_sibling(seq):
                continue
            hits = self.blocks.match_prefix(seq)
            cached = len(hits) * self.blocks.block_size
            chunk = min(seq.num_tokens - cached, budget)
            if self.blocks.num_blocks_to_admit(hits, cached + chunk) > self.blocks.num_free_blocks:
                return  # first come, first served: nobody overtakes a sequence that does not fit
            self.waiting.remove(seq)
            self.blocks.admit(seq, hits)
            seq.status = SequenceStatus.RUNNING
            self.running.append(seq)
            self.blocks.grow(seq, cached + chunk)
            sample = cached + chunk == seq.num_tokens
            output.scheduled.append(ScheduledSequence(seq, cached, chunk, sample))
            budget -= chunk

    def _waits_for_sibling(self, seq: Sequence) -> bool:
        """Choices after the first wait until the first has computed the prompt, so they share
        its blocks through the prefix cache instead of computing the prompt again."""
        first = seq.request.sequences[0]
        return (
            seq is not first
            and not seq.output_ids
            and not first.is_finished
            and first.num_computed_tokens < first.num_prompt_tokens
        )

    def _preempt(self, seq: Sequence, output: SchedulerOutput) -> None:
        self.running.remove(seq)
        output.scheduled = [item for item in output.scheduled if item.seq is not seq]
        self.blocks.free(seq)
        seq.status = SequenceStatus.WAITING
        seq.num_preemptions += 1
        self.num_preemptions += 1
        self.waiting.appendleft(seq)
        output.preempted.append(seq)

    # -- update -------------------------------------------------------------------------------

    def update(
        self, output: SchedulerOutput, sampled: list[SampledToken], sink: TokenSink
    ) -> list[Event]:
        """Advance computed-token counts, append the sampled tokens (one per sampling entry,
        in `output.sampling()` order), finish sequences and return their events."""
        for item in output.scheduled:
            if item.seq.status is SequenceStatus.RUNNING:
                item.seq.num_computed_tokens += item.num_tokens
                self.blocks.commit(item.seq)
        events = []
        for item, token in zip(output.sampling(), sampled, strict=True):
            seq = item.seq
            if seq.status is not SequenceStatus.RUNNING:
                continue  # aborted while the step ran
            seq.output_ids.append(token.token_id)
            finish = self._token_finish(seq, token.token_id)
            text, text_finish = sink(seq, token.token_id, finish is not None)
            finish = text_finish or finish
            if finish is not None:
                self._finish(seq, finish)
            logprobs = [token.logprob] if token.logprob is not None else None
            events.append(seq.request.event(seq, [token.token_id], text, logprobs))
        return events

    def _token_finish(self, seq: Sequence, token_id: int) -> FinishReason | None:
        params = seq.params
        if token_id in params.stop_token_ids:
            return "stop"
        if not params.ignore_eos and token_id in self.config.eos_token_ids:
            return "eos_token"
        if len(seq.output_ids) >= params.max_new_tokens:
            return "length"
        if seq.num_tokens >= self.config.max_total_tokens:
            return "length"
        return None

    def _finish(self, seq: Sequence, reason: FinishReason) -> None:
        if seq.status is SequenceStatus.RUNNING:
            self.running.remove(seq)
        elif seq.status is SequenceStatus.WAITING:
            self.waiting.remove(seq)
        self.blocks.free(seq)
        seq.status = SequenceStatus.FINISHED
        seq.finish_reason = reason
