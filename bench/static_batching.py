"""transformers static batching, the baseline a continuous batcher is measured against, and
`Sample`, the timed pass every in-process system returns.

`StaticSystem` runs transformers `generate` the way a server without continuous batching would:
batches of up to `batch_size` prompts in workload order, left-padded with an attention mask,
greedy, every sequence of a batch run to the batch's longest max_tokens (`min_new_tokens` =
`max_new_tokens`). Only each request's own max_tokens count as output; the rest is reported as
padding. A request's TTFT is when its batch's prefill ended (the first call of the logits
processors), from the start of the run.
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from pathlib import Path

import torch

from bench.workloads import Workload


@dataclass
class Sample:
    """One timed pass of one system over one workload."""

    seconds: float  # wall time, first request in to last token out
    cpu_s: float  # CPU time of this process over the same span (all threads)
    ttft: list[float]  # per request, seconds from the start to its first token
    output_ids: list[list[int]]  # per request
    padded_output_tokens: int = 0  # static only: decode positions computed beyond max_tokens
    padded_prompt_tokens: int = 0  # static only: pad positions in the prompts


class FirstTokenClock:
    """A logits processor that only notes when `generate` first asks for the next token, i.e.
    when the batch's prefill is done."""

    def __init__(self) -> None:
        self.first_call: float | None = None

    def __call__(self, input_ids: torch.Tensor, scores: torch.Tensor) -> torch.Tensor:
        if self.first_call is None:
            self.first_call = time.perf_counter()
        return scores


class StaticSystem:
    """transformers `generate` on batches of up to `batch_size` requests in workload order."""

    name = "static"

    def __init__(self, model_dir: Path, dtype: str, batch_size: int, threads: int) -> None:
        from transformers import AutoModelForCausalLM

        model = AutoModelForCausalLM.from_pretrained(str(model_dir), dtype=getattr(torch, dtype))
        self.model = model.eval()
        self.batch_size = batch_size
        self.threads = threads
        pad_id = model.config.pad_token_id
        self.pad_id = pad_id if pad_id is not None else 0

    def run(self, workload: Workload) -> Sample:
        # set per run: a spindle engine built in this process leaves torch on one thread
        torch.set_num_threads(self.threads)
        sample = Sample(0.0, 0.0, [], [])
        start, cpu_start = time.perf_counter(), time.process_time()
        for first in range(0, len(workload.requests), self.batch_size):
            batch = workload.requests[first : first + self.batch_size]
            new_tokens = max(r.max_tokens for r in batch)
            prompts = [r.prompt_ids for r in batch]
            ids, first_token_at = self.generate(prompts, new_tokens)
            sample.ttft.extend([first_token_at - start] * len(batch))
            sample.output_ids.extend(
                ids[row, : r.max_tokens].tolist() for row, r in enumerate(batch)
            )
            sample.padded_output_tokens += sum(new_tokens - r.max_tokens for r in batch)
            sample.padded_prompt_tokens += sum(max(map(len, prompts)) - len(p) for p in prompts)
        sample.seconds = time.perf_counter() - start
        sample.cpu_s = time.process_time() - cpu_start
        return sample

    @torch.inference_mode()
    def generate(self, prompts: list[list[int]], new_tokens: int) -> tuple[torch.Tensor, float]:
        """Output ids [batch, new_tokens] (left padding, every row run to `new_tokens`) and the
        time of the first token."""
        from transformers import LogitsProcessorList

        input_ids, mask = left_padded(prompts, self.pad_id)
        clock = FirstTokenClock()
        output = self.model.generate(
            input_ids=input_ids,
            attention_mask=mask,
            max_new_tokens=new_tokens,
            min_new_tokens=new_tokens,
            do_sample=False,
            pad_token_id=self.pad_id,
            logits_processor=LogitsProcessorList([clock]),
        )
        return output[:, input_ids.shape[1] :], clock.first_call or time.perf_counter()


def left_padded(prompts: list[list[int]], pad_id: int) -> tuple[torch.Tensor, torch.Tensor]:
    width = max(len(p) for p in prompts)
    input_ids = torch.full((len(prompts), width), pad_id, dtype=torch.long)
    mask = torch.zeros((len(prompts), width), dtype=torch.long)
    for row, prompt in enumerate(prompts):
        input_ids[row, width - len(prompt) :] = torch.tensor(prompt)
        mask[row, width - len(prompt) :] = 1
    return input_ids, mask


def check_lengths(system: str, workload: Workload, sample: Sample) -> None:
    """A workload that ignores EOS must come back with exactly its output tokens."""
    produced = sum(map(len, sample.output_ids))
    if workload.ignore_eos and produced != workload.output_tokens:
        raise RuntimeError(
            f"{system} produced {produced} tokens on {workload.name}, "
            f"expected {workload.output_tokens}"
        )
