"""Decode steps replayed from CUDA graphs, so a GPU's decode step costs one launch, not ~1,500.

On a GPU a small model's decode step is bound by the host: measured on an H200, SmolLM2-135M in
bfloat16, a 32-row decode step took 22 ms eagerly — 1,486 kernel launches at ~6 us of CPU each
plus the Python around them — for ~3.4 ms of GPU work. A CUDA graph records the step's kernels
once and replays them with one call.

A graph has fixed shapes and fixed addresses, so each one is captured for a padded shape: the
batch rounded up to one of `batch_sizes` and the longest context rounded up to a power-of-two
count of KV blocks (capped at the longest a sequence may have). Graphs are captured lazily, the
first time a decode step needs that shape, and share one memory pool (safe: only one replays at a
time, and each replay's logits are copied out before the next). A step's inputs — token ids,
positions, cache slots, context lengths and block tables — go in one host-to-device copy into
the graph's static buffer; padding rows point at the runner's scratch KV block (which no
sequence owns), so they write and read nothing of anyone's.

Only steps where every scheduled sequence computes one token and samples it run here (steady
decoding); steps with prompt chunks run eagerly. Off on the CPU (no graphs there) and with
`enforce_eager`. With `capture=False` the same padded inputs run eagerly: the tests use that on
the CPU to check the padding against the eager path.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from dataclasses import dataclass

import torch

from worker.engine.scheduler import SchedulerOutput

log = logging.getLogger(__name__)


def padded_batch_sizes(max_batch_size: int) -> list[int]:
    """1, 2, 4, 8, then every multiple of 8 up to `max_batch_size` (itself included)."""
    sizes = [size for size in (1, 2, 4) if size < max_batch_size]
    sizes += list(range(8, max_batch_size, 8))
    return sorted({*sizes, max_batch_size})


def padded_block_counts(max_blocks: int) -> list[int]:
    """Powers of two from 8 (128 tokens at 16 a block), then `max_blocks` itself."""
    counts, count = [], 8
    while count < max_blocks:
        counts.append(count)
        count *= 2
    return [*counts, max_blocks]


def _round_up(value: int, choices: list[int]) -> int:
    return next(choice for choice in choices if choice >= value)


@dataclass
class StaticInputs:
    """One graph's inputs, views of one int64 buffer so a step loads them with one copy."""

    buffer: torch.Tensor  # [batch * 4 + batch * blocks]
    batch: int
    blocks: int

    @classmethod
    def allocate(cls, batch: int, blocks: int, device: torch.device) -> StaticInputs:
        return cls(
            torch.zeros(batch * (4 + blocks), dtype=torch.long, device=device), batch, blocks
        )

    def column(self, index: int) -> torch.Tensor:
        return self.buffer[index * self.batch : (index + 1) * self.batch]

    token_ids = property(lambda self: self.column(0))
    positions = property(lambda self: self.column(1))
    slot_mapping = property(lambda self: self.column(2))
    context_lens = property(lambda self: self.column(3))

    @property
    def block_tables(self) -> torch.Tensor:
        return self.buffer[4 * self.batch :].view(self.batch, self.blocks)


@dataclass
class DecodeGraph:
    inputs: StaticInputs
    run: Callable[[], torch.Tensor]  # the step's forward pass on `inputs`: logits [batch, vocab]
    graph: torch.cuda.CUDAGraph | None  # None: `run` is called eagerly (capture=False)
    logits: torch.Tensor | None  # the graph's output buffer

    def replay(self) -> torch.Tensor:
        if self.graph is None:
            return self.run()
        self.graph.replay()
        assert self.logits is not None
        return self.logits


class DecodeGraphs:
    """The runner's decode graphs, keyed by padded (batch, blocks)."""

    def __init__(self, runner, max_batch_size: int, max_positions: int, capture: bool = True):
        self.runner = runner  # a ModelRunner: model, backend, device, block size, scratch block
        self.capture = capture
        self.batch_sizes = padded_batch_sizes(max_batch_size)
        self.block_counts = padded_block_counts(-(-max_positions // runner.block_size))
        self.graphs: dict[tuple[int, int], DecodeGraph] = {}
        self.pool = torch.cuda.graph_pool_handle() if capture else None
        self.replays = 0
        self.disabled = False  # set when a capture failed: every step runs eagerly from then on

    def handles(self, output: SchedulerOutput) -> bool:
        """Whether this step is steady decoding that fits the largest graph shape."""
        items = output.scheduled
        return (
            not self.disabled
            and 0 < len(items) <= self.batch_sizes[-1]
            and all(item.num_tokens == 1 and item.sample for item in items)
        )

    def execute(self, output: SchedulerOutput) -> torch.Tensor | None:
        """Logits [rows, vocab] in float32 (a copy), or None when the graph could not be
        captured (the caller then runs the step eagerly)."""
        items = output.scheduled
        block_size = self.runner.block_size
        blocks = -(-max(item.start + 1 for item in items) // block_size)
        key = (_round_up(len(items), self.batch_sizes), _round_up(blocks, self.block_counts))
        graph = self.graphs.get(key) or self._capture(*key)
        if graph is None:
            return None
        graph.inputs.buffer.copy_(self._pack(output, graph.inputs))
        logits = graph.replay()
        self.replays += 1
        return logits[: len(items), : self.runner.vocab_size].to(torch.float32, copy=True)

    def _pack(self, output: SchedulerOutput, inputs: StaticInputs) -> torch.Tensor:
        """The step's inputs laid out as `inputs.buffer` is, padding rows included."""
        block_size, scratch = self.runner.block_size, self.runner.scratch_block
        pad = inputs.batch - len(output.scheduled)
        token_ids, positions, slots, lengths, tables = [], [], [], [], []
        for item in output.scheduled:
            seq, position = item.seq, item.start
            token_ids.extend(seq.token_ids(position, position + 1))
            positions.append(position)
            table = seq.block_ids[: position // block_size + 1]
            slots.append(table[-1] * block_size + position % block_size)
            lengths.append(position + 1)
            tables.extend(table)
            tables.extend([scratch] * (inputs.blocks - len(table)))
        packed = [
            *token_ids, *[0] * pad,
            *positions, *[0] * pad,
            *slots, *[scratch * block_size] * pad,
            *lengths, *[1] * pad,
            *tables, *[scratch] * (pad * inputs.blocks),
        ]  # fmt: skip
        return torch.tensor(packed, dtype=torch.long)

    def _capture(self, batch: int, blocks: int) -> DecodeGraph | None:
        runner = self.runner
        inputs = StaticInputs.allocate(batch, blocks, runner.device)
        inputs.buffer.copy_(self._pack(SchedulerOutput([]), inputs))  # every row padding

        def run() -> torch.Tensor:
            meta = runner.backend.decode_graph_metadata(
                inputs.slot_mapping, inputs.block_tables, inputs.context_lens
            )
            hidden = runner.model(inputs.token_ids, inputs.positions, meta)
            return runner.model.compute_logits(hidden)

        if not self.capture:
            graph = self.graphs[batch, blocks] = DecodeGraph(inputs, run, None, None)
            return graph
        try:
            graph = self.graphs[batch, blocks] = self._record(inputs, run)
        except Exception as err:  # out of memory, an op that cannot be captured: run eagerly
            log.warning("CUDA graph capture failed, decoding eagerly from now on: %s", err)
            self.disabled = True
            return None
        log.info("captured the decode graph for %d rows x %d KV blocks", batch, blocks)
        return graph

    def _record(self, inputs: StaticInputs, run: Callable[[], torch.Tensor]) -> DecodeGraph:
        device = self.runner.device
        side = torch.cuda.Stream(device)
        side.wait_stream(torch.cuda.current_stream(device))
        with torch.cuda.stream(side):  # a first eager run loads kernels and sizes workspaces
            run()
        torch.cuda.current_stream(device).wait_stream(side)
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph, pool=self.pool):
            logits = run()
        return DecodeGraph(inputs, run, graph, logits)
