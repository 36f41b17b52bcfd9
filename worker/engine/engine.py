"""The engine: requests in, `Event`s out, one forward pass per `step()`.

    step = schedule -> execute -> sample -> update

It owns the scheduler (what runs), the model runner (the forward pass), the sampler and the
tokenizer (detokenisation). It is synchronous and single-threaded; `worker.engine.llm` wraps it
for callers, and the worker service drives it from its Redis loop.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Sequence as Seq

from tokenizers import Tokenizer

from common.model_files import eos_token_ids, resolve_model
from common.protocol import ErrorInfo, Event, FinishReason, SamplingParams
from worker.engine.block_manager import BlockManager
from worker.engine.config import EngineConfig
from worker.engine.detokenizer import IncrementalDetokenizer
from worker.engine.model_runner import ModelRunner
from worker.engine.sampler import Sampler, SamplingRow, make_generator
from worker.engine.scheduler import SampledToken, Scheduler, SchedulerConfig, SchedulerOutput
from worker.engine.sequence import Request, Sequence
from worker.parallel.group import ShardGroup

log = logging.getLogger(__name__)


class RequestError(ValueError):
    """A request the engine refuses (too long, bad parameters); the message has the numbers."""


class LLMEngine:
    def __init__(self, config: EngineConfig, worker_id: str | None = None):
        self.config = config
        self.worker_id = worker_id  # stamped on every event (the worker service's id)
        self.files = resolve_model(config.model, revision=config.revision)
        self.hf_config = self.files.load_config()
        if self.files.tokenizer_path is None:
            raise ValueError(f"{self.files.root} has no tokenizer.json")
        self.tokenizer = Tokenizer.from_file(str(self.files.tokenizer_path))
        self.max_total_tokens, self.max_input_tokens = self._limits()
        self.shard_group = self._launch_shards() if config.num_shard > 1 else None
        self.runner = self._make_runner()
        self.eos_token_ids = eos_token_ids(self.files.root)
        scheduler_config = SchedulerConfig(
            max_batch_size=config.max_batch_size,
            max_batch_prefill_tokens=config.max_batch_prefill_tokens,
            max_total_tokens=self.max_total_tokens,
            eos_token_ids=frozenset(self.eos_token_ids),
        )
        blocks = BlockManager(
            self.runner.num_blocks, self.runner.block_size, config.enable_prefix_caching
        )
        self.scheduler = Scheduler(scheduler_config, blocks)
        self.sampler = Sampler()
        self.requests: dict[str, Request] = {}
        self.last_step: SchedulerOutput | None = None  # what the last step ran (for metrics)

    def _launch_shards(self) -> ShardGroup:
        return ShardGroup.launch(
            self.config, self.hf_config, self.files.root, self.max_total_tokens
        )

    def _make_runner(self) -> ModelRunner:
        group = self.shard_group
        if group is None:
            return ModelRunner(self.config, self.hf_config, self.files, self.max_total_tokens)
        return ModelRunner(
            group.driver_config,
            self.hf_config,
            self.files,
            self.max_total_tokens,
            group.parallel,
            group,
        )

    def close(self) -> None:
        """Stop the shard ranks of a tensor-parallel group (nothing to do with one rank)."""
        if self.shard_group is not None:
            self.shard_group.close()

    # -- limits -------------------------------------------------------------------------------

    def _limits(self) -> tuple[int, int]:
        context = getattr(self.hf_config, "max_position_embeddings", None) or 4096
        total = self.config.max_total_tokens or context
        if total > context:
            raise ValueError(
                f"--max-total-tokens {total} exceeds the model's context length {context}"
            )
        max_input = self.config.max_input_tokens or total - 1
        if max_input >= total:
            raise ValueError(
                f"--max-input-tokens {max_input} must be below --max-total-tokens {total}"
            )
        return total, max_input

    # -- requests -----------------------------------------------------------------------------

    def add_request(
        self,
        request_id: str,
        prompt_ids: Seq[int],
        params: SamplingParams,
        *,
        resume_output_ids: Seq[int] = (),
        first_event_seq: int = 0,
    ) -> None:
        """Queue a request. `resume_output_ids` (single-choice requests) are tokens a previous
        worker already generated and delivered: they are kept, not sent again, and event
        numbering continues from `first_event_seq`."""
        self._validate(request_id, prompt_ids, params, resume_output_ids)
        request = Request(
            request_id,
            list(prompt_ids),
            params,
            time.time(),
            first_event_seq,
            worker=self.worker_id,
        )
        for index in range(params.sampling.n):
            seq = Sequence(request, index, output_ids=list(resume_output_ids))
            seq.detokenizer = IncrementalDetokenizer(
                self.tokenizer,
                request.prompt_ids,
                skip_special_tokens=params.skip_special_tokens,
                stop=params.stop,
                include_stop_str_in_output=params.include_stop_str_in_output,
                initial_output_ids=resume_output_ids,
            )
            if params.sampling.seed is not None:
                seq.generator = make_generator(params.sampling.seed + index, self.runner.device)
            request.sequences.append(seq)
        self.requests[request_id] = request
        self.scheduler.add(request)

    def _validate(self, request_id, prompt_ids, params: SamplingParams, resumed) -> None:
        if request_id in self.requests:
            raise RequestError(f"request id {request_id!r} is already in use")
        if not prompt_ids:
            raise RequestError("the prompt is empty")
        if len(prompt_ids) > self.max_input_tokens:
            raise RequestError(
                f"prompt has {len(prompt_ids):,} tokens; this model accepts at most "
                f"{self.max_input_tokens:,}"
            )
        vocab = self.runner.vocab_size
        if not all(isinstance(token, int) for token in prompt_ids):
            raise RequestError("prompt token ids must be integers")
        if min(prompt_ids) < 0 or max(prompt_ids) >= vocab:
            raise RequestError(f"prompt token ids must be in [0, {vocab}); got {max(prompt_ids)}")
        if params.max_new_tokens < 1:
            raise RequestError(f"max_new_tokens must be at least 1; got {params.max_new_tokens}")
        if params.sampling.n < 1:
            raise RequestError(f"n must be at least 1; got {params.sampling.n}")
        if resumed and params.sampling.n != 1:
            raise RequestError("only single-choice requests can be resumed")

    def abort_request(
        self, request_id: str, reason: FinishReason = "cancelled", error: ErrorInfo | None = None
    ) -> list[Event]:
        """End a request now: its blocks are freed and each unfinished choice gets its
        terminal event."""
        request = self.requests.pop(request_id, None)
        if request is None:
            return []
        dropped = self.scheduler.abort(request_id)
        events = []
        for seq in dropped:
            seq.finish_reason = reason
            events.append(request.event(seq, [], "", error=error))
        return events

    def abort_all(self, reason: FinishReason, error: ErrorInfo | None = None) -> list[Event]:
        return [e for rid in list(self.requests) for e in self.abort_request(rid, reason, error)]

    def reset_prefix_cache(self) -> None:
        self.scheduler.blocks.reset_prefix_cache()

    @property
    def has_unfinished(self) -> bool:
        return self.scheduler.has_work

    # -- the step -----------------------------------------------------------------------------

    def step(self) -> list[Event]:
        output = self.last_step = self.scheduler.schedule()
        if not output.scheduled:
            return []
        logits = self.runner.execute(output)
        sampled = self._sample(output, logits)
        events = self.scheduler.update(output, sampled, self._detokenize)
        for event in events:
            if event.usage is not None:
                self.requests.pop(event.id, None)
        return events

    def _sample(self, output: SchedulerOutput, logits) -> list[SampledToken]:
        rows = [
            SamplingRow(
                sampling=item.seq.params.sampling,
                prompt_ids=item.seq.prompt_ids,
                output_ids=item.seq.output_ids,
                generator=item.seq.generator,
                num_logprobs=item.seq.params.logprobs,
            )
            for item in output.sampling()
        ]
        result = self.sampler(logits, rows)
        return [
            SampledToken(token_id, logprob)
            for token_id, logprob in zip(result.token_ids, result.logprobs, strict=True)
        ]

    @staticmethod
    def _detokenize(seq: Sequence, token_id: int, ending: bool) -> tuple[str, FinishReason | None]:
        step = seq.detokenizer.push(token_id)
        if step.stopped:
            return step.text, "stop"
        if ending:
            return step.text + seq.detokenizer.flush(), None
        return step.text, None

    # -- status -------------------------------------------------------------------------------

    def stats(self) -> dict[str, int]:
        blocks = self.scheduler.blocks
        return {
            "running": len(self.scheduler.running),
            "waiting": len(self.scheduler.waiting),
            "kv_used_blocks": blocks.num_used_blocks,
            "kv_total_blocks": blocks.num_blocks,
        }
