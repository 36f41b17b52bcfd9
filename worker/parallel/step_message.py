"""The typed message the driver sends its shard ranks once per engine step.

A step travels in two parts. The fixed-size `StepHeader` (kind + the lengths of every field) goes
down a pipe to each shard: a shard can block on a pipe for hours while the worker is idle, which a
collective cannot (gloo and NCCL time out), and the pipe's end-of-file tells a shard its driver is
gone. The step itself is one flat int64 tensor that rank 0 broadcasts with torch.distributed —
input ids, positions, slot mapping, logits indices, then query/context lengths and block tables —
so on CUDA it lands on each rank's GPU directly. No pickled objects, no method names.
"""

from __future__ import annotations

import struct
from dataclasses import dataclass
from enum import IntEnum

import torch
import torch.distributed as dist

from worker.attention.base import StepBatch

_HEADER = struct.Struct("<6q")


class MessageKind(IntEnum):
    STEP = 1  # a payload follows on the broadcast
    STOP = 2  # the group is closing: leave the loop, nothing follows


@dataclass(frozen=True)
class StepHeader:
    kind: MessageKind
    num_tokens: int = 0  # T: length of input_ids, positions and slot_mapping
    num_sequences: int = 0  # S: length of query_lens, context_lens and of the block tables list
    num_sampled: int = 0  # length of logits_indices
    num_decodes: int = 0  # StepBatch.num_decodes
    num_table_entries: int = 0  # total block ids over all block tables

    @property
    def payload_size(self) -> int:
        tokens, sequences = self.num_tokens, self.num_sequences
        return 3 * tokens + self.num_sampled + 3 * sequences + self.num_table_entries

    def to_bytes(self) -> bytes:
        return _HEADER.pack(
            int(self.kind),
            self.num_tokens,
            self.num_sequences,
            self.num_sampled,
            self.num_decodes,
            self.num_table_entries,
        )

    @classmethod
    def from_bytes(cls, data: bytes) -> StepHeader:
        if len(data) != _HEADER.size:
            raise ValueError(f"a step header has {_HEADER.size} bytes; got {len(data)}")
        kind, *sizes = _HEADER.unpack(data)
        return cls(MessageKind(kind), *sizes)


STOP = StepHeader(MessageKind.STOP)


@dataclass
class StepMessage:
    """Everything a rank needs to run one step's forward pass (what `ModelRunner._prepare`
    builds on the driver)."""

    input_ids: torch.Tensor  # [T] int64
    positions: torch.Tensor  # [T] int64
    slot_mapping: torch.Tensor  # [T] int64: flat KV-cache slot per token
    logits_indices: torch.Tensor  # [sampled] int64: rows of the hidden states that sample
    query_lens: list[int]  # per sequence, tokens computed this step
    context_lens: list[int]  # per sequence, tokens in the cache after this step
    block_tables: list[list[int]]  # per sequence, its KV block ids
    num_decodes: int  # the first num_decodes sequences are single-token decodes

    def header(self) -> StepHeader:
        return StepHeader(
            MessageKind.STEP,
            num_tokens=int(self.input_ids.numel()),
            num_sequences=len(self.query_lens),
            num_sampled=int(self.logits_indices.numel()),
            num_decodes=self.num_decodes,
            num_table_entries=sum(len(table) for table in self.block_tables),
        )

    def payload(self) -> torch.Tensor:
        """One flat int64 tensor on the device of `input_ids`."""
        lists = [*self.query_lens, *self.context_lens, *(len(t) for t in self.block_tables)]
        lists.extend(block for table in self.block_tables for block in table)
        tail = torch.tensor(lists, dtype=torch.long, device=self.input_ids.device)
        parts = [self.input_ids, self.positions, self.slot_mapping, self.logits_indices, tail]
        return torch.cat([part.to(torch.long) for part in parts])

    @classmethod
    def decode(cls, header: StepHeader, payload: torch.Tensor) -> StepMessage:
        if payload.numel() != header.payload_size:
            raise ValueError(
                f"step payload has {payload.numel()} values; the header announces "
                f"{header.payload_size}"
            )
        tokens, seqs, sampled = header.num_tokens, header.num_sequences, header.num_sampled
        input_ids, positions, slot_mapping, logits_indices, tail = payload.split(
            [tokens, tokens, tokens, sampled, payload.numel() - 3 * tokens - sampled]
        )
        ints: list[int] = tail.tolist()
        query_lens, context_lens = ints[:seqs], ints[seqs : 2 * seqs]
        table_lens, entries = ints[2 * seqs : 3 * seqs], ints[3 * seqs :]
        tables, start = [], 0
        for length in table_lens:
            tables.append(entries[start : start + length])
            start += length
        return cls(
            input_ids,
            positions,
            slot_mapping,
            logits_indices,
            query_lens,
            context_lens,
            tables,
            header.num_decodes,
        )

    def step_batch(self) -> StepBatch:
        return StepBatch(
            self.query_lens,
            self.context_lens,
            self.block_tables,
            self.num_decodes,
            self.slot_mapping,
        )

    def sampled_batch(self) -> StepBatch | None:
        """The sampling rows as a decode step: one query token per sampling sequence against
        the context it has after this step. None when every row samples (a decode step)."""
        if self.logits_indices.numel() == self.input_ids.numel():
            return None
        last_rows, end = [], 0
        for query_len in self.query_lens:
            end += query_len
            last_rows.append(end - 1)
        sampling = set(self.logits_indices.tolist())
        chosen = [i for i, row in enumerate(last_rows) if row in sampling]
        if len(chosen) != len(sampling):
            raise ValueError("a step may only sample the last row of a sequence")
        return StepBatch(
            [1] * len(chosen),
            [self.context_lens[i] for i in chosen],
            [self.block_tables[i] for i in chosen],
            len(chosen),
            self.slot_mapping[self.logits_indices],
        )


def broadcast_payload(header: StepHeader, payload: torch.Tensor | None, device) -> torch.Tensor:
    """Rank 0 passes its payload; the other ranks pass None and receive one."""
    if payload is None:
        payload = torch.empty(header.payload_size, dtype=torch.long, device=device)
    dist.broadcast(payload, src=0)
    return payload


def broadcast_int(value: int, device) -> int:
    """Every rank returns rank 0's `value` (e.g. the KV-cache block count, which must agree)."""
    tensor = torch.tensor([value], dtype=torch.long, device=device)
    dist.broadcast(tensor, src=0)
    return int(tensor.item())
