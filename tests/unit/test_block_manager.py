"""BlockManager: all-or-nothing growth, reference counts, the LRU free list, and the prefix
cache's chained keys (only full computed blocks are registered, a match always leaves a token to
compute, a reused free block loses its key) — on its own, and under random traffic through a real
Scheduler with a fake model that records which token each KV slot holds, so a block that is
shared, reused or cached with the wrong contents shows up as a wrong token."""

from __future__ import annotations

from collections import Counter
from dataclasses import dataclass, field

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from common.protocol import Event, SamplingParams
from worker.engine.block_manager import BlockManager
from worker.engine.scheduler import SampledToken, Scheduler, SchedulerConfig, SchedulerOutput
from worker.engine.sequence import Request, Sequence, SequenceStatus


def make_seq(prompt_ids: list[int], output_ids: list[int] | None = None) -> Sequence:
    request = Request("r", list(prompt_ids), SamplingParams(), arrival=0.0)
    seq = Sequence(request, 0, output_ids=list(output_ids or []))
    request.sequences.append(seq)
    return seq


def compute_all(blocks: BlockManager, seq: Sequence, num_tokens: int | None = None) -> None:
    """Pretend the model ran `num_tokens` (default: all) tokens of `seq` into fresh blocks."""
    target = seq.num_tokens if num_tokens is None else num_tokens
    assert blocks.grow(seq, target)
    seq.num_computed_tokens = target
    blocks.commit(seq)


def test_needs_at_least_one_block() -> None:
    with pytest.raises(ValueError, match="got 0"):
        BlockManager(num_blocks=0, block_size=16)


def test_blocks_for_rounds_up() -> None:
    blocks = BlockManager(num_blocks=4, block_size=16)
    assert [blocks.blocks_for(n) for n in (0, 1, 16, 17, 32, 33)] == [0, 1, 1, 2, 2, 3]


def test_grow_is_all_or_nothing() -> None:
    blocks = BlockManager(num_blocks=4, block_size=4)
    seq = make_seq(list(range(20)))
    assert blocks.grow(seq, 8)
    assert len(seq.block_ids) == 2 and blocks.num_free_blocks == 2
    assert not blocks.grow(seq, 17)  # needs 5 blocks, 4 exist
    assert len(seq.block_ids) == 2 and blocks.num_free_blocks == 2
    assert blocks.grow(seq, 16) and blocks.num_free_blocks == 0
    assert blocks.grow(seq, 13)  # already holds enough: nothing to do
    assert len(seq.block_ids) == 4


def test_free_returns_every_block_for_the_next_sequence() -> None:
    blocks = BlockManager(num_blocks=6, block_size=4, enable_prefix_caching=False)
    seq = make_seq(list(range(12)))
    compute_all(blocks, seq)
    held = list(seq.block_ids)
    blocks.free(seq)
    assert blocks.num_free_blocks == 6 and blocks.num_used_blocks == 0
    assert seq.block_ids == [] and seq.num_computed_tokens == 0
    assert all(blocks._blocks[b].ref_count == 0 for b in held)
    other = make_seq(list(range(100, 124)))
    assert blocks.grow(other, 24)
    assert sorted(other.block_ids) == list(range(6))


def make_growing_seq(prompt_len: int, max_new_tokens: int) -> Sequence:
    params = SamplingParams(max_new_tokens=max_new_tokens)
    request = Request("r", list(range(prompt_len)), params, arrival=0.0)
    seq = Sequence(request, 0)
    request.sequences.append(seq)
    return seq


def test_sequences_growing_side_by_side_each_keep_their_blocks_in_a_row() -> None:
    # Decode attention reads a context block by block: blocks in a row are what the hardware
    # prefetcher can follow. Each sequence's first block starts a run as long as it may grow
    # to, held for it.
    blocks = BlockManager(num_blocks=64, block_size=4, enable_prefix_caching=False)
    first, second, third = (make_growing_seq(8, 16) for _ in range(3))  # 2 blocks, up to 6
    for seq in (first, second, third):
        assert blocks.grow(seq, 8)
    for tokens in range(9, 25):  # decode steps, interleaved
        for seq in (first, second, third):
            assert blocks.grow(seq, tokens)
    for seq in (first, second, third):
        start = seq.block_ids[0]
        assert seq.block_ids == list(range(start, start + 6))
    blocks.free(second)  # its run is open again, for a sequence that fits it
    fourth = make_growing_seq(4, 20)
    assert blocks.grow(fourth, 24)
    assert fourth.block_ids == list(range(6, 12))


def test_held_blocks_are_handed_out_when_nothing_else_is_free() -> None:
    blocks = BlockManager(num_blocks=8, block_size=4, enable_prefix_caching=False)
    long = make_growing_seq(4, 28)  # may grow to 8 blocks: holds all the rest
    assert blocks.grow(long, 4) and long.block_ids == [0]
    other = make_growing_seq(8, 0)
    assert blocks.grow(other, 8)
    assert len(set(other.block_ids) | {0}) == 3  # taken from the held run
    assert blocks.grow(long, 16)  # its run is broken: it goes on past the taken blocks
    assert len(set(long.block_ids) | set(other.block_ids)) == 6
    assert blocks.num_free_blocks == 2
    blocks.free(long)
    blocks.free(other)
    assert blocks.num_free_blocks == 8 and blocks._clean._holds == {}


def test_clean_blocks_go_before_cached_ones_which_go_oldest_freed_first() -> None:
    blocks = BlockManager(num_blocks=6, block_size=4)
    first, second = make_seq(list(range(8))), make_seq(list(range(50, 58)))
    compute_all(blocks, first)  # 2 full blocks, both cached
    compute_all(blocks, second)
    first_head, first_tail = first.block_ids
    blocks.free(first)
    blocks.free(second)
    assert len(blocks._cached) == 4 and blocks.num_free_blocks == 6
    newcomer = make_seq(list(range(100, 112)))
    assert blocks.grow(newcomer, 12)
    # the two never-used blocks first, then the oldest freed cached block: first's tail
    assert newcomer.block_ids[2] == first_tail
    assert first_head not in newcomer.block_ids and len(blocks._cached) == 3
    assert blocks.match_prefix(make_seq(list(range(9)))) == [first_head]


def test_commit_registers_only_full_computed_blocks() -> None:
    blocks = BlockManager(num_blocks=8, block_size=4)
    seq = make_seq(list(range(10)))
    compute_all(blocks, seq, num_tokens=7)
    assert len(blocks._cached) == 1  # block 0 full; block 1 holds 3 of 4 tokens
    assert blocks._blocks[seq.block_ids[0]].key is not None
    assert blocks._blocks[seq.block_ids[1]].key is None
    seq.num_computed_tokens = 10
    assert blocks.grow(seq, 10)
    blocks.commit(seq)
    assert len(blocks._cached) == 2 and len(seq.block_hashes) == 2


def test_prefix_match_leaves_at_least_one_token_to_compute() -> None:
    blocks = BlockManager(num_blocks=8, block_size=4)
    owner = make_seq(list(range(12)))
    compute_all(blocks, owner)
    same = make_seq(list(range(12)))  # every block cached, but the last token must be recomputed
    assert blocks.match_prefix(same) == owner.block_ids[:2]
    longer = make_seq(list(range(12)) + [99])
    assert blocks.match_prefix(longer) == owner.block_ids
    assert blocks.match_prefix(make_seq(list(range(4)))) == []


def test_keys_are_chained_so_a_block_matches_only_after_the_same_prefix() -> None:
    blocks = BlockManager(num_blocks=8, block_size=4)
    owner = make_seq([1, 2, 3, 4, 5, 6, 7, 8, 9])
    compute_all(blocks, owner)
    # Same second block, different first block: no hit at all.
    assert blocks.match_prefix(make_seq([0, 2, 3, 4, 5, 6, 7, 8, 9])) == []
    # Same first block, different second block: only the first block hits.
    assert blocks.match_prefix(make_seq([1, 2, 3, 4, 5, 6, 7, 0, 9])) == owner.block_ids[:1]


def test_generated_tokens_are_part_of_the_key() -> None:
    blocks = BlockManager(num_blocks=8, block_size=4)
    owner = make_seq([1, 2, 3, 4, 5, 6], output_ids=[7, 8, 9])
    compute_all(blocks, owner)
    assert blocks.match_prefix(make_seq([1, 2, 3, 4, 5, 6, 7, 8, 9, 10])) == owner.block_ids[:2]
    assert blocks.match_prefix(make_seq([1, 2, 3, 4, 5, 6, 7, 0, 9, 10])) == owner.block_ids[:1]


def test_admit_shares_hit_blocks_and_counts_cache_hits() -> None:
    blocks = BlockManager(num_blocks=8, block_size=4)
    owner = make_seq(list(range(9)))
    compute_all(blocks, owner)
    reader = make_seq(list(range(9)))
    hits = blocks.match_prefix(reader)
    assert blocks.num_blocks_to_admit(hits, 9) == 1  # hits are held already: one fresh block
    blocks.admit(reader, hits)
    assert reader.block_ids == owner.block_ids[:2]
    assert reader.block_hashes == owner.block_hashes[:2]
    assert reader.num_computed_tokens == 8 and blocks.num_cache_hit_tokens == 8
    assert [blocks._blocks[b].ref_count for b in owner.block_ids] == [2, 2, 1]
    blocks.free(owner)
    assert [blocks._blocks[b].ref_count for b in reader.block_ids] == [1, 1]
    assert blocks.num_free_blocks == 8 - 2


def test_cached_blocks_survive_in_the_free_list_until_reused() -> None:
    blocks = BlockManager(num_blocks=4, block_size=4)
    owner = make_seq(list(range(9)))
    compute_all(blocks, owner)
    cached_ids = owner.block_ids[:2]
    blocks.free(owner)
    assert blocks.num_free_blocks == 4 and len(blocks._cached) == 2
    reader = make_seq(list(range(9)))
    hits = blocks.match_prefix(reader)
    assert hits == cached_ids
    # Both hit blocks sit in the free list, so admitting takes them plus one fresh block.
    assert blocks.num_blocks_to_admit(hits, 9) == 3
    blocks.admit(reader, hits)
    assert blocks.num_free_blocks == 2
    assert all(blocks._blocks[b].ref_count == 1 for b in hits)


def test_reusing_a_cached_free_block_drops_its_key() -> None:
    blocks = BlockManager(num_blocks=2, block_size=4)
    owner = make_seq(list(range(9)))
    compute_all(blocks, owner, num_tokens=8)
    blocks.free(owner)
    assert len(blocks._cached) == 2
    stranger = make_seq(list(range(100, 108)))
    assert blocks.grow(stranger, 8)
    assert blocks._cached == {}
    assert all(blocks._blocks[b].key is None for b in stranger.block_ids)
    assert blocks.match_prefix(make_seq(list(range(9)))) == []


def test_a_second_copy_of_a_cached_block_is_not_registered() -> None:
    blocks = BlockManager(num_blocks=8, block_size=4)
    first, second = make_seq(list(range(5))), make_seq(list(range(5)))
    compute_all(blocks, first)
    compute_all(blocks, second)  # computed side by side, before either was cached
    assert len(blocks._cached) == 1
    assert blocks._blocks[second.block_ids[0]].key is None
    assert second.block_hashes == first.block_hashes  # the chain still continues for `second`


def test_prefix_caching_off_matches_nothing_and_registers_nothing() -> None:
    blocks = BlockManager(num_blocks=8, block_size=4, enable_prefix_caching=False)
    owner = make_seq(list(range(9)))
    compute_all(blocks, owner)
    assert blocks._cached == {}
    assert blocks.match_prefix(make_seq(list(range(9)))) == []


# -- random traffic through the scheduler ---------------------------------------------------

EOS = 0
SHARED_PREFIXES = [list(range(1000 * k, 1000 * k + 64)) for k in (1, 2, 3)]


@dataclass
class Traffic:
    """A scheduler under test, the fake KV cache (block id -> token held by each slot) and
    every request with the events it produced."""

    scheduler: Scheduler
    kv: dict[int, list[int | None]]
    requests: list[Request] = field(default_factory=list)
    events: dict[str, list[Event]] = field(default_factory=dict)
    aborted: set[str] = field(default_factory=set)

    @property
    def capacity(self) -> int:
        return self.scheduler.blocks.num_blocks * self.scheduler.blocks.block_size


def make_traffic(config: dict) -> Traffic:
    blocks = BlockManager(config["num_blocks"], config["block_size"], config["prefix_caching"])
    capacity = blocks.num_blocks * blocks.block_size
    scheduler_config = SchedulerConfig(
        max_batch_size=config["max_batch_size"],
        max_batch_prefill_tokens=config["budget"],
        max_total_tokens=capacity,  # so that any one sequence fits the cache on its own
        eos_token_ids=frozenset({EOS}),
    )
    kv = {b: [None] * blocks.block_size for b in range(blocks.num_blocks)}
    return Traffic(Scheduler(scheduler_config, blocks), kv)


def arrive(
    traffic: Traffic, prefix: int, shared: int, unique: int, max_new: int, n: int, ignore_eos: bool
) -> None:
    number = len(traffic.requests)
    prompt_ids = SHARED_PREFIXES[prefix][:shared] + [5000 + 10 * number + i for i in range(unique)]
    prompt_ids = prompt_ids[: traffic.capacity - 1] or [5000 + 10 * number]
    params = SamplingParams.make(max_new_tokens=max_new, n=n, ignore_eos=ignore_eos)
    request = Request(f"r{number}", prompt_ids, params, arrival=float(number))
    request.sequences = [Sequence(request, i) for i in range(n)]
    traffic.requests.append(request)
    traffic.events[request.request_id] = []
    traffic.scheduler.add(request)


def abort(traffic: Traffic, pick: int) -> None:
    """Abort one unfinished request and make its terminal events the way the engine does."""
    live = [r for r in traffic.requests if not r.finished]
    if not live:
        return
    request = live[pick % len(live)]
    traffic.aborted.add(request.request_id)
    for seq in traffic.scheduler.abort(request.request_id):
        traffic.events[request.request_id].append(request.event(seq, [], ""))


def next_token(seq: Sequence) -> int:
    # The same for every choice of a request, so siblings also share generated blocks.
    return 500 + len(seq.output_ids) % 3


def run_step(traffic: Traffic, eos_pick: int | None, abort_pick: int | None) -> None:
    scheduler = traffic.scheduler
    running_before = list(scheduler.running)
    queue = [(seq, waits_for_first_choice(seq)) for seq in scheduler.waiting]
    output = scheduler.schedule()
    check_schedule(scheduler, output, running_before)
    check_batch_order(output, running_before, queue)
    run_fake_model(traffic, output)
    if abort_pick is not None:  # the client went away while the step ran
        abort(traffic, abort_pick)
    sampled = [
        SampledToken(EOS if i == eos_pick else next_token(item.seq))
        for i, item in enumerate(output.sampling())
    ]
    for event in scheduler.update(output, sampled, lambda seq, token, ending: ("", None)):
        traffic.events[event.id].append(event)
    check_books(traffic)


def check_schedule(
    scheduler: Scheduler, output: SchedulerOutput, running_before: list[Sequence]
) -> None:
    config, blocks = scheduler.config, scheduler.blocks
    items = output.scheduled
    assert len({id(item.seq) for item in items}) == len(items)
    assert sum(i.num_tokens for i in items if i.num_tokens > 1) <= config.max_batch_prefill_tokens
    assert len(scheduler.running) <= config.max_batch_size
    preempted = output.preempted
    assert preempted == running_before[::-1][: len(preempted)]  # newest first
    if preempted:  # no admissions in a step that preempted
        assert all(any(item.seq is seq for seq in running_before) for item in items)
    for seq in preempted:
        assert seq.status is SequenceStatus.WAITING and seq in scheduler.waiting
        assert seq.block_ids == [] and seq.num_computed_tokens == 0
    for item in items:
        seq = item.seq
        assert seq.status is SequenceStatus.RUNNING
        assert item.start == seq.num_computed_tokens
        assert 1 <= item.num_tokens <= seq.num_pending_tokens
        assert item.sample == (item.start + item.num_tokens == seq.num_tokens)
        assert len(seq.block_ids) >= blocks.blocks_for(item.start + item.num_tokens)


def waits_for_first_choice(seq: Sequence) -> bool:
    first = seq.request.sequences[0]
    return (
        seq.index > 0
        and not seq.output_ids
        and not first.is_finished
        and first.num_computed_tokens < first.num_prompt_tokens
    )


def check_batch_order(
    output: SchedulerOutput, running_before: list[Sequence], queue: list[tuple[Sequence, bool]]
) -> None:
    """Decodes, then running prefills, then admissions. Admissions follow the queue (first come,
    first served) and skip only choices that were waiting for their request's first choice."""
    pending = {id(seq): seq.num_pending_tokens for seq in running_before}
    kinds = [
        2 if id(item.seq) not in pending else 0 if pending[id(item.seq)] == 1 else 1
        for item in output.scheduled
    ]
    assert kinds == sorted(kinds)
    admitted = [item.seq for item in output.scheduled if id(item.seq) not in pending]
    expected = []
    for seq, waits in queue:
        if any(seq is other for other in admitted):
            expected.append(seq)
        elif not waits:
            break  # nobody overtakes the first sequence that did not fit
    assert admitted == expected


def run_fake_model(traffic: Traffic, output: SchedulerOutput) -> None:
    """Attention reads the context from the blocks and writes the new tokens' K/V into them."""
    blocks, size = traffic.scheduler.blocks, traffic.scheduler.blocks.block_size
    for item in output.scheduled:
        seq, end = item.seq, item.start + item.num_tokens
        tokens = seq.token_ids(0, end)
        context = [traffic.kv[seq.block_ids[p // size]][p % size] for p in range(item.start)]
        assert context == tokens[: item.start], f"{seq.request.request_id} reads corrupt K/V"
        for position in range(item.start, end):
            block = blocks._blocks[seq.block_ids[position // size]]
            assert block.ref_count == 1 and block.key is None, "writes into a shared block"
            traffic.kv[block.block_id][position % size] = tokens[position]


def check_books(traffic: Traffic) -> None:
    scheduler, blocks = traffic.scheduler, traffic.scheduler.blocks
    holders = Counter(b for seq in scheduler.running for b in seq.block_ids)
    for block in blocks._blocks:
        assert block.ref_count == holders[block.block_id]
        free = block.block_id in blocks._free or block.block_id in blocks._clean
        assert (block.ref_count == 0) == free
        if free:
            assert (block.block_id in blocks._free) == (block.key is not None)
        if block.ref_count > 1:
            assert block.key is not None  # only full cached blocks are shared
    used = sum(1 for block in blocks._blocks if block.ref_count > 0)
    assert blocks.num_free_blocks + used == blocks.num_blocks
    for seq in scheduler.running:
        assert seq.status is SequenceStatus.RUNNING
        assert len(set(seq.block_ids)) == len(seq.block_ids)
        assert len(seq.block_ids) >= blocks.blocks_for(seq.num_computed_tokens)
    for seq in scheduler.waiting:
        assert seq.status is SequenceStatus.WAITING
        assert seq.block_ids == [] and seq.num_computed_tokens == 0
    for key, block_id in blocks._cached.items():
        assert blocks._blocks[block_id].key == key
        assert traffic.kv[block_id] == list(key[1])  # a cached block holds what its key says
    assert sum(block.key is not None for block in blocks._blocks) == len(blocks._cached)


def check_outcome(traffic: Traffic) -> None:
    blocks = traffic.scheduler.blocks
    assert blocks.num_free_blocks == blocks.num_blocks  # nothing leaked
    assert all(block.ref_count == 0 for block in blocks._blocks)
    for request in traffic.requests:
        events = traffic.events[request.request_id]
        assert [e.seq for e in events] == list(range(len(events)))
        assert sum(e.finish is not None for e in events) == len(request.sequences)
        assert [e.usage is not None for e in events] == [False] * (len(events) - 1) + [True]
        assert events[-1].usage == request.usage()
        params = request.params
        for seq in request.sequences:
            streamed = [t for e in events if e.index == seq.index for t in e.token_ids]
            assert streamed == seq.output_ids
            assert len(seq.output_ids) <= params.max_new_tokens
            if seq.finish_reason == "length":
                assert params.max_new_tokens == len(seq.output_ids) or (
                    seq.num_tokens == traffic.capacity
                )
            elif seq.finish_reason == "eos_token":
                assert seq.output_ids[-1] == EOS and not params.ignore_eos
            else:
                assert seq.finish_reason == "cancelled" and request.request_id in traffic.aborted


configs = st.fixed_dictionaries(
    {
        "block_size": st.sampled_from([1, 2, 4]),
        "num_blocks": st.integers(2, 12),
        "budget": st.integers(1, 24),
        "max_batch_size": st.integers(1, 5),
        "prefix_caching": st.booleans(),
    }
)
arrivals = st.tuples(
    st.just("arrive"),
    st.integers(0, 2),  # which shared prefix
    st.integers(0, 30),  # shared tokens
    st.integers(0, 3),  # unique tokens after them
    st.integers(1, 10),  # max_new_tokens
    st.integers(1, 3),  # n
    st.booleans(),  # ignore_eos
)


def one_in(odds: int, values: st.SearchStrategy[int]) -> st.SearchStrategy[int | None]:
    return st.tuples(st.integers(1, odds), values).map(
        lambda drawn: drawn[1] if drawn[0] == 1 else None
    )


steps = st.tuples(
    st.just("step"),
    one_in(4, st.integers(0, 4)),  # which sampling entry gets EOS
    one_in(10, st.integers(0, 20)),  # which request the client abandons mid-step
)
aborts = st.tuples(st.just("abort"), st.integers(0, 20))
# Mostly steps, often arrivals, now and then an abort between steps.
operations = st.sampled_from(["step"] * 6 + ["arrive"] * 3 + ["abort"]).flatmap(
    {"step": steps, "arrive": arrivals, "abort": aborts}.__getitem__
)


@settings(max_examples=150, deadline=None)
@given(configs, st.lists(operations, min_size=20, max_size=60))
def test_random_traffic_keeps_the_books_and_the_kv_contents_right(
    config: dict, ops: list[tuple]
) -> None:
    traffic = make_traffic(config)
    for op, *args in ops:
        if op == "arrive":
            arrive(traffic, *args)
        elif op == "step":
            run_step(traffic, *args)
        else:
            abort(traffic, *args)
            check_books(traffic)
    for _ in range(5000):
        if not traffic.scheduler.has_work:
            break
        run_step(traffic, None, None)
    assert not traffic.scheduler.has_work, "the scheduler stopped making progress"
    check_outcome(traffic)


def test_reset_prefix_cache_forgets_free_blocks_but_keeps_held_ones():
    blocks = BlockManager(num_blocks=8, block_size=4)
    request = Request("r", list(range(1, 14)), SamplingParams(), 0.0)
    held, freed = Sequence(request, 0), Sequence(request, 1)
    for seq in (held, freed):
        assert blocks.grow(seq, 13)
        seq.num_computed_tokens = 13
        blocks.commit(seq)
    blocks.free(freed)
    blocks.reset_prefix_cache()
    probe = Sequence(Request("p", list(range(1, 14)), SamplingParams(), 0.0), 0)
    assert blocks.match_prefix(probe) == held.block_ids[:3]  # only the held blocks stay cached
    blocks.free(held)
    blocks.reset_prefix_cache()
    assert blocks.match_prefix(probe) == []
