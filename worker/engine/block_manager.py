"""The KV-block manager: fixed-size blocks, reference counts, an LRU free list and a prefix cache.

A full block whose K/V have been computed is registered under a key chained from its parent's
key and its tokens, so a later sequence with the same prefix (a shared system prompt, the other
choices of an `n > 1` request, a preempted sequence coming back) reuses it instead of recomputing.
Freed blocks keep their key until they are handed out again, oldest-freed first.

Blocks that hold no cached prefix ("clean") are handed out so that each sequence's blocks sit next
to each other in the cache (`CleanBlocks`): the attention kernels read a context block by block,
and scattered blocks cost them memory latency the hardware prefetcher cannot hide.
Pure Python — no torch.
"""

from __future__ import annotations

from collections import OrderedDict
from dataclasses import dataclass

from worker.engine.sequence import Sequence


class CleanBlocks:
    """The free blocks without a cached prefix, as a map of the cache, handed out so that each
    sequence's blocks sit in a row. A sequence's first block starts a run of free blocks as long
    as it may grow to (or half that, ... when there is none); the rest of the run is held for it,
    and its next block is the one right after its last while that is free and not held for
    another. Holds are soft: with no other free block left, a held one is handed out.
    Measured on the decode kernel (2-core EPYC, 32 contexts of ~400 tokens over 30 layers'
    caches): 0.30 ms a layer with contiguous blocks, 0.40-0.45 ms with them shuffled (bf16; fp32
    0.51 / 0.73-0.83) - where a stack of freed blocks drifts over a server's life."""

    NOBODY = -1

    def __init__(self, num_blocks: int) -> None:
        self._free = bytearray(b"\x01") * num_blocks
        self._open = bytearray(b"\x01") * num_blocks  # free and held for nobody
        self._holder = [self.NOBODY] * num_blocks
        self._holds: dict[int, list[range]] = {}  # owner -> the runs held for it
        self._count = num_blocks

    def __len__(self) -> int:
        return self._count

    def __contains__(self, block_id: int) -> bool:
        return bool(self._free[block_id])

    def put(self, block_id: int) -> None:
        self._free[block_id] = self._open[block_id] = 1
        self._count += 1

    def take(self, owner: int, after: int | None, run: int) -> int:
        """A free block (there must be one) for `owner`, whose last block is `after` and which
        may take `run` blocks more, this one included."""
        following = -1 if after is None else after + 1
        if (
            0 <= following < len(self._free)
            and self._free[following]
            and (self._holder[following] in (self.NOBODY, owner))
        ):
            block_id = following
        else:
            block_id, length = self._open_run(run)
            if block_id >= 0:
                self._hold(owner, range(block_id + 1, block_id + length))
            else:
                block_id = self._free.index(1)  # only held blocks are left
        self._free[block_id] = self._open[block_id] = 0
        self._holder[block_id] = self.NOBODY
        self._count -= 1
        return block_id

    def release(self, owner: int) -> None:
        """Drop what is held for `owner` (its sequence was freed)."""
        for held in self._holds.pop(owner, []):
            for block_id in held:
                if self._holder[block_id] == owner:
                    self._holder[block_id] = self.NOBODY
                    self._open[block_id] = self._free[block_id]

    def _open_run(self, run: int) -> tuple[int, int]:
        """The start and length of the first run of `run` open blocks, or of half as many, ...;
        (-1, 0) when no block is open."""
        while run >= 1:
            start = self._open.find(b"\x01" * run)
            if start >= 0:
                return start, run
            run //= 2
        return -1, 0

    def _hold(self, owner: int, blocks: range) -> None:
        for block_id in blocks:
            self._open[block_id] = 0
            self._holder[block_id] = owner
        if blocks:
            self._holds.setdefault(owner, []).append(blocks)


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
        self._clean = CleanBlocks(num_blocks)
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
        for block_id in self._free:
            self._blocks[block_id].key = None
            self._clean.put(block_id)
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
        most = self.blocks_for(seq.num_prompt_tokens + seq.params.max_new_tokens)
        for _ in range(missing):
            after = seq.block_ids[-1] if seq.block_ids else None
            seq.block_ids.append(self._allocate_fresh(seq, after, most - len(seq.block_ids)))
        return True

    def free(self, seq: Sequence) -> None:
        """Release every block of `seq`, tail first: a cached tail is then evicted before the
        shareable head of its prefix."""
        for block_id in reversed(seq.block_ids):
            block = self._blocks[block_id]
            block.ref_count -= 1
            if block.ref_count == 0:
                if block.key is None:
                    self._clean.put(block_id)
                else:
                    self._free[block_id] = None
        self._clean.release(seq.seq_id)
        seq.block_ids = []
        seq.block_hashes = []
        seq.num_computed_tokens = 0

    def _take(self, block_id: int) -> None:
        block = self._blocks[block_id]
        if block.ref_count == 0:
            del self._free[block_id]
        block.ref_count += 1

    def _allocate_fresh(self, seq: Sequence, after: int | None, run: int) -> int:
        """A block for `seq`, whose last block is `after` and which may take `run` more: a clean
        one placed by `CleanBlocks.take`, else the oldest-freed cached one."""
        if self._clean:
            block_id = self._clean.take(seq.seq_id, after, run)
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
