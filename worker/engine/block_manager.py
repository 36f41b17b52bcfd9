"""The KV-block manager: fixed-size blocks, reference counts, an LRU free list and a prefix cache.

A full block whose K/V have been computed is registered under a key chained from its parent's
key and its tokens, so a later sequence with the same prefix (a shared system prompt, the other
choices of an `n > 1` request, a preempted sequence coming back) reuses it instead of recomputing.
Freed blocks keep their key until they are handed out again, oldest-freed first.
Pure Python — no torch.
"""

from __future__ import annotations

from collections import OrderedDict
from dataclasses import dataclass

from worker.engine.sequence import Sequence


@dataclass(eq=False)
class Block:
    block_id: int
    ref_count: int = 0
    key: tuple[int, tuple[int, ...]] | None = None  # prefix-cache key while it holds full K/V


class BlockManager:
    def __init__(self, num_blocks: int, block_size: int, enable_prefix_caching: bool = True):
        if num_blocks < 1:
            raise ValueError(f"the KV cache needs at least 1 block; got {num_blocks}")
        self.block_size = block_size
        self.num_blocks = num_blocks
        self.enable_prefix_caching = enable_prefix_caching
        self._blocks = [Block(i) for i in range(num_blocks)]
        self._clean: list[int] = list(reversed(range(num_blocks)))  # a stack: block 0 on top
        self._free: OrderedDict[int, None] = OrderedDict()  # free cached blocks, oldest first
        self._cached: dict[tuple[int, tuple[int, ...]], int] = {}
        self.num_cache_hit_tokens = 0  # tokens served from the prefix cache since start

    @property
    def num_free_blocks(self) -> int:
        return len(self._clean) + len(self._free)

    @property
    def num_used_blocks(self) -> int:
        return self.num_blocks - self.num_free_blocks

    def blocks_for(self, num_tokens: int) -> int:
        return -(-num_tokens // self.block_size)

    # -- prefix cache -------------------------------------------------------------------------

    def match_prefix(self, seq: Sequence) -> list[int]:
        """Cached blocks holding the longest computed prefix of `seq`. At least one token is left
        uncached, so the step that completes the prefix still yields logits to sample from."""
        if not self.enable_prefix_caching:
            return []
        hits: list[int] = []
        parent = 0
        for block_index in range((seq.num_tokens - 1) // self.block_size):
            key = self._key(seq, block_index, parent)
            block_id = self._cached.get(key)
            if block_id is None:
                break
            hits.append(block_id)
            parent = hash(key)
        return hits

    def num_blocks_to_admit(self, hits: list[int], num_tokens: int) -> int:
        """Free-list blocks that admitting a sequence with these cache hits up to `num_tokens`
        computed tokens takes (hit blocks sitting in the free list count too)."""
        reused_free = sum(1 for block_id in hits if self._blocks[block_id].ref_count == 0)
        return reused_free + max(0, self.blocks_for(num_tokens) - len(hits))

    def admit(self, seq: Sequence, hits: list[int]) -> None:
        """Give `seq` the cached blocks `hits`; its computed-token count starts after them."""
        for block_id in hits:
            self._take(block_id)
        seq.block_ids = list(hits)
        seq.block_hashes = []
        parent = 0
        for block_index in range(len(hits)):
            key = self._key(seq, block_index, parent)
            parent = hash(key)
            seq.block_hashes.append(parent)
        seq.num_computed_tokens = len(hits) * self.block_size
        self.num_cache_hit_tokens += seq.num_computed_tokens

    def reset_prefix_cache(self) -> None:
        """Forget every cached prefix (benchmarks measuring cold prompts; tests)."""
        for block_id in self._free:  # oldest first: the most recently freed ends on top
            self._blocks[block_id].key = None
            self._clean.append(block_id)
        self._free.clear()
        self._cached = {key: i for key, i in self._cached.items() if self._blocks[i].key == key}

    def commit(self, seq: Sequence) -> None:
        """Register the full, computed blocks of `seq` in the prefix cache."""
        if not self.enable_prefix_caching:
            return
        num_full = seq.num_computed_tokens // self.block_size
        for block_index in range(len(seq.block_hashes), num_full):
            parent = seq.block_hashes[-1] if seq.block_hashes else 0
            key = self._key(seq, block_index, parent)
            block = self._blocks[seq.block_ids[block_index]]
            if key not in self._cached and block.key is None:
                block.key = key
                self._cached[key] = block.block_id
            seq.block_hashes.append(hash(key))

    # -- allocation ---------------------------------------------------------------------------

    def grow(self, seq: Sequence, num_tokens: int) -> bool:
        """Make `seq` hold blocks for `num_tokens` tokens. All or nothing: False, and nothing
        allocated, when the free list is too short."""
        missing = self.blocks_for(num_tokens) - len(seq.block_ids)
        if missing <= 0:
            return True
        if missing > self.num_free_blocks:
            return False
        for _ in range(missing):
            seq.block_ids.append(self._allocate_fresh())
        return True

    def free(self, seq: Sequence) -> None:
        """Release every block of `seq`, tail first: a cached tail is then evicted before the
        shareable head of its prefix, and clean blocks go back on their stack head on top, so
        the next sequence gets them in order (contiguous K/V rows for the attention kernels)."""
        for block_id in reversed(seq.block_ids):
            block = self._blocks[block_id]
            block.ref_count -= 1
            if block.ref_count == 0:
                if block.key is None:
                    self._clean.append(block_id)
                else:
                    self._free[block_id] = None
        seq.block_ids = []
        seq.block_hashes = []
        seq.num_computed_tokens = 0

    def _take(self, block_id: int) -> None:
        block = self._blocks[block_id]
        if block.ref_count == 0:
            del self._free[block_id]
        block.ref_count += 1

    def _allocate_fresh(self) -> int:
        if self._clean:
            block_id = self._clean.pop()
        else:
            block_id, _ = self._free.popitem(last=False)
        block = self._blocks[block_id]
        if block.key is not None:
            del self._cached[block.key]
            block.key = None
        block.ref_count = 1
        return block_id

    def _key(self, seq: Sequence, block_index: int, parent: int) -> tuple[int, tuple[int, ...]]:
        start = block_index * self.block_size
        return parent, tuple(seq.token_ids(start, start + self.block_size))
