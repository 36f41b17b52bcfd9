"""Scheduler on a real BlockManager with a fake model: the test chooses every sampled token.

Covers admission order and limits, chunked prefill, decode-first batching, preemption and
recomputation, every way a sequence finishes, abort, event numbering, the prefix cache as the
scheduler uses it, and `n > 1` siblings.
"""

from __future__ import annotations

import itertools
from collections.abc import Callable

from common.protocol import Event, FinishReason, SamplingParams, TokenLogprob, Usage
from worker.engine.block_manager import BlockManager
from worker.engine.scheduler import SampledToken, Scheduler, SchedulerConfig, SchedulerOutput
from worker.engine.sequence import Request, Sequence, SequenceStatus

_prompt_bases = itertools.count(1)

Token = int | Callable[[Sequence], int]
Sink = Callable[[Sequence, int, bool], tuple[str, FinishReason | None]]


def prompt(length: int) -> list[int]:
    """Token ids that no other prompt of the test shares, so the prefix cache stays out of the
    way of tests that are not about it."""
    base = next(_prompt_bases) * 10_000
    return list(range(base, base + length))


def make_request(
    request_id: str, prompt_ids: list[int], max_new_tokens: int = 16, **params: object
) -> Request:
    sampling_params = SamplingParams.make(max_new_tokens=max_new_tokens, **params)
    request = Request(request_id, list(prompt_ids), sampling_params, arrival=0.0)
    request.sequences = [Sequence(request, i) for i in range(sampling_params.sampling.n)]
    return request


def make_scheduler(
    num_blocks: int = 64, block_size: int = 16, prefix_caching: bool = True, **config: object
) -> Scheduler:
    blocks = BlockManager(num_blocks, block_size, enable_prefix_caching=prefix_caching)
    return Scheduler(SchedulerConfig(**config), blocks)  # type: ignore[arg-type]


def quiet(seq: Sequence, token_id: int, ending: bool) -> tuple[str, FinishReason | None]:
    return "", None


def step(
    scheduler: Scheduler, token: Token = 7, sink: Sink = quiet
) -> tuple[SchedulerOutput, list[Event]]:
    """One engine step: schedule, "run the model", sample `token` for every sampling entry."""
    output = scheduler.schedule()
    pick = token if callable(token) else (lambda seq: token)
    sampled = [SampledToken(pick(item.seq)) for item in output.sampling()]
    return output, scheduler.update(output, sampled, sink)


def name(seq: Sequence) -> str:
    rid = seq.request.request_id
    return rid if len(seq.request.sequences) == 1 else f"{rid}.{seq.index}"


def shape(output: SchedulerOutput) -> list[tuple[str, int, int, bool]]:
    """(sequence, start, tokens, samples) per scheduled entry, in batch order."""
    return [(name(i.seq), i.start, i.num_tokens, i.sample) for i in output.scheduled]


def run_to_end(
    scheduler: Scheduler, token: Token = 7, sink: Sink = quiet, max_steps: int = 2000
) -> list[Event]:
    events: list[Event] = []
    for _ in range(max_steps):
        if not scheduler.has_work:
            return events
        events += step(scheduler, token, sink)[1]
    raise AssertionError(f"still busy after {max_steps} steps: {scheduler.running}")


# -- admission ------------------------------------------------------------------------------


def test_admits_in_arrival_order_up_to_the_batch_size() -> None:
    scheduler = make_scheduler(max_batch_size=2)
    for rid in "abc":
        scheduler.add(make_request(rid, prompt(8), max_new_tokens=2))
    assert shape(step(scheduler)[0]) == [("a", 0, 8, True), ("b", 0, 8, True)]
    assert [name(s) for s in scheduler.waiting] == ["c"]
    assert shape(step(scheduler)[0]) == [("a", 8, 1, True), ("b", 8, 1, True)]  # both finish
    assert shape(step(scheduler)[0]) == [("c", 0, 8, True)]


def test_running_batch_never_exceeds_the_batch_size() -> None:
    scheduler = make_scheduler(max_batch_size=3)
    requests = [make_request(f"r{i}", prompt(4), max_new_tokens=3 + i) for i in range(6)]
    for request in requests:
        scheduler.add(request)
    first_scheduled: dict[str, int] = {}
    for step_index in itertools.count():
        if not scheduler.has_work:
            break
        output, _ = step(scheduler)
        assert len(scheduler.running) <= 3 and len(output.scheduled) <= 3
        for item in output.scheduled:
            first_scheduled.setdefault(name(item.seq), step_index)
    assert list(first_scheduled) == [f"r{i}" for i in range(6)]  # FCFS
    assert all(len(r.sequences[0].output_ids) == 3 + i for i, r in enumerate(requests))


def test_long_prompt_is_prefilled_in_chunks_and_samples_once() -> None:
    scheduler = make_scheduler(max_batch_prefill_tokens=32)
    scheduler.add(make_request("a", prompt(100), max_new_tokens=2))
    shapes, events = [], []
    for _ in range(5):
        output, new_events = step(scheduler)
        shapes.append(shape(output))
        events.append(len(new_events))
    assert shapes == [
        [("a", 0, 32, False)],
        [("a", 32, 32, False)],
        [("a", 64, 32, False)],
        [("a", 96, 4, True)],
        [("a", 100, 1, True)],
    ]
    assert events == [0, 0, 0, 1, 1]
    assert not scheduler.has_work


def test_decodes_go_first_and_do_not_use_the_prefill_budget() -> None:
    scheduler = make_scheduler(max_batch_prefill_tokens=32)
    for rid in "abc":
        scheduler.add(make_request(rid, prompt(8), max_new_tokens=10))
    step(scheduler)
    scheduler.add(make_request("d", prompt(100)))
    output, _ = step(scheduler)
    assert shape(output) == [
        ("a", 8, 1, True),
        ("b", 8, 1, True),
        ("c", 8, 1, True),
        ("d", 0, 32, False),
    ]
    assert output.num_batched_tokens == 35 and output.num_decodes == 3


def test_a_running_prefill_continues_before_new_admissions() -> None:
    scheduler = make_scheduler(max_batch_prefill_tokens=32)
    scheduler.add(make_request("a", prompt(40)))
    scheduler.add(make_request("b", prompt(40)))
    assert shape(step(scheduler)[0]) == [("a", 0, 32, False)]
    assert shape(step(scheduler)[0]) == [("a", 32, 8, True), ("b", 0, 24, False)]
    assert shape(step(scheduler)[0]) == [("a", 40, 1, True), ("b", 24, 16, True)]


def test_a_request_that_does_not_fit_holds_back_later_ones_but_not_decodes() -> None:
    scheduler = make_scheduler(num_blocks=8, block_size=4, max_batch_prefill_tokens=64)
    scheduler.add(make_request("a", prompt(4), max_new_tokens=6))
    step(scheduler)
    scheduler.add(make_request("b", prompt(28), max_new_tokens=1))  # 7 blocks; 6 are free
    scheduler.add(make_request("c", prompt(4), max_new_tokens=1))  # 1 block: would fit
    for computed in range(4, 9):
        assert shape(step(scheduler)[0]) == [("a", computed, 1, True)]
    assert not scheduler.running and scheduler.blocks.num_free_blocks == 8
    assert [n for n, *_ in shape(step(scheduler)[0])] == ["b", "c"]


# -- preemption -----------------------------------------------------------------------------


def counting(seq: Sequence) -> int:
    """A different token at every position, so a re-generated token would show."""
    return 100 + len(seq.output_ids)


def three_requests(scheduler: Scheduler) -> list[Sequence]:
    """15-, 6- and 4-token prompts in 10 blocks of 4: the oldest runs out of blocks first."""
    requests = [
        make_request(rid, prompt(n), max_new_tokens=12)
        for rid, n in zip("abc", (15, 6, 4), strict=False)
    ]
    for request in requests:
        scheduler.add(request)
    return [request.sequences[0] for request in requests]


def test_newest_sequence_is_preempted_freed_and_recomputed_with_its_tokens() -> None:
    # Without prefix caching the victim recomputes from 0; the 4-token budget keeps its first
    # recompute chunk small enough to fit in the blocks it gave back.
    scheduler = make_scheduler(10, 4, prefix_caching=False, max_batch_prefill_tokens=4)
    a, b, c = three_requests(scheduler)
    for _ in range(100):
        held = len(a.block_ids)
        output, _ = step(scheduler, counting)
        if output.preempted:
            break
    assert len(a.block_ids) == held + 1  # the oldest needed a block ...
    assert output.preempted == [c] and scheduler.num_preemptions == 1  # ... the newest paid
    assert [n for n, *_ in shape(output)] == ["a", "b"]
    assert c.status is SequenceStatus.WAITING and c.num_preemptions == 1
    assert c.block_ids == [] and c.num_computed_tokens == 0
    assert scheduler.blocks.num_used_blocks == len(a.block_ids) + len(b.block_ids)
    kept = list(c.output_ids)
    assert kept == [100, 101, 102, 103] and list(scheduler.waiting) == [c]
    # Its first chunk would fit now, yet nothing is admitted in the step that preempted.
    assert scheduler.blocks.blocks_for(4) <= scheduler.blocks.num_free_blocks
    assert ("c", 0, 4, False) in shape(step(scheduler, counting)[0])
    chunks: list[tuple[int, int, bool]] = []
    while len(c.output_ids) == len(kept):
        output, _ = step(scheduler, counting)
        chunks += [(i.start, i.num_tokens, i.sample) for i in output.scheduled if i.seq is c]
    last_chunks = chunks[max(i for i, chunk in enumerate(chunks) if chunk[0] == 0) :]
    ends = [start + num for start, num, _ in last_chunks]
    assert [start for start, *_ in last_chunks] == [0, *ends[:-1]]
    assert ends[-1] == 4 + len(kept)  # the generated tokens are recomputed too
    assert [sample for *_, sample in last_chunks] == [False] * (len(last_chunks) - 1) + [True]
    run_to_end(scheduler, counting)
    assert [s.output_ids for s in (a, b, c)] == [list(range(100, 112))] * 3
    assert scheduler.blocks.num_free_blocks == 10


def test_preempted_sequence_comes_back_through_its_own_cached_blocks() -> None:
    scheduler = make_scheduler(10, 4, max_batch_prefill_tokens=4)
    _, b, _ = three_requests(scheduler)
    while b.num_preemptions == 0:
        step(scheduler, counting)
    hits_before = scheduler.blocks.num_cache_hit_tokens
    output = scheduler.schedule()
    while b not in [item.seq for item in output.scheduled]:
        scheduler.update(output, [SampledToken(counting(i.seq)) for i in output.sampling()], quiet)
        output = scheduler.schedule()
    (item,) = [item for item in output.scheduled if item.seq is b]
    assert b.num_tokens == 6 + 8
    assert (item.start, item.num_tokens, item.sample) == (12, 2, True)  # 3 blocks were cached
    assert scheduler.blocks.num_cache_hit_tokens == hits_before + 12
    scheduler.update(output, [SampledToken(counting(i.seq)) for i in output.sampling()], quiet)
    run_to_end(scheduler, counting)
    assert b.output_ids == list(range(100, 112)) and scheduler.blocks.num_free_blocks == 10


# -- finishing ------------------------------------------------------------------------------


def tokens(*ids: int) -> Callable[[Sequence], int]:
    stream = iter(ids)
    return lambda seq: next(stream)


def finish_of(scheduler: Scheduler, request: Request, token: Token) -> tuple[list[int], str]:
    scheduler.add(request)
    events = run_to_end(scheduler, token)
    assert scheduler.blocks.num_free_blocks == scheduler.blocks.num_blocks
    seq = request.sequences[0]
    assert [t for e in events for t in e.token_ids] == seq.output_ids
    assert [e.finish for e in events[:-1]] == [None] * (len(events) - 1)
    assert events[-1].finish == seq.finish_reason
    return seq.output_ids, str(seq.finish_reason)


def test_finishes_at_max_new_tokens() -> None:
    request = make_request("a", prompt(4), max_new_tokens=3)
    assert finish_of(make_scheduler(), request, 5) == ([5, 5, 5], "length")


def test_finishes_at_eos_unless_ignored() -> None:
    scheduler = make_scheduler(eos_token_ids=frozenset({2}))
    request = make_request("a", prompt(4), max_new_tokens=9)
    assert finish_of(scheduler, request, tokens(5, 5, 2)) == ([5, 5, 2], "eos_token")
    request = make_request("b", prompt(4), max_new_tokens=3, ignore_eos=True)
    assert finish_of(scheduler, request, 2) == ([2, 2, 2], "length")


def test_finishes_at_a_stop_token() -> None:
    scheduler = make_scheduler(eos_token_ids=frozenset({2}))
    request = make_request("a", prompt(4), max_new_tokens=9, stop_token_ids=[8], ignore_eos=True)
    assert finish_of(scheduler, request, tokens(2, 5, 8)) == ([2, 5, 8], "stop")


def test_finishes_at_max_total_tokens() -> None:
    scheduler = make_scheduler(max_total_tokens=10)
    request = make_request("a", prompt(7), max_new_tokens=100)
    assert finish_of(scheduler, request, 5) == ([5, 5, 5], "length")


def test_sink_stop_string_ends_the_sequence_and_sees_the_ending_flag() -> None:
    calls: list[tuple[int, bool]] = []

    def sink(seq: Sequence, token_id: int, ending: bool) -> tuple[str, FinishReason | None]:
        calls.append((token_id, ending))
        return f"<{token_id}>", ("stop" if token_id == 6 else None)

    scheduler = make_scheduler(eos_token_ids=frozenset({2}))
    scheduler.add(make_request("a", prompt(4), max_new_tokens=9))
    scheduler.add(make_request("b", prompt(4), max_new_tokens=2))
    scheduler.add(make_request("c", prompt(4), max_new_tokens=9))
    picks = {"a": iter([5, 6]), "b": iter([5, 5]), "c": iter([5, 2])}
    events = run_to_end(scheduler, lambda seq: next(picks[name(seq)]), sink)
    finishes = {e.id: (e.finish, e.text) for e in events if e.finish}
    assert finishes == {"a": ("stop", "<6>"), "b": ("length", "<5>"), "c": ("eos_token", "<2>")}
    assert calls == [(5, False)] * 3 + [(6, False), (5, True), (2, True)]


# -- abort ----------------------------------------------------------------------------------


def test_abort_frees_running_waiting_and_half_prefilled_sequences_at_once() -> None:
    scheduler = make_scheduler(max_batch_size=2, max_batch_prefill_tokens=32)
    scheduler.add(make_request("decoding", prompt(8)))
    scheduler.add(make_request("prefilling", prompt(100)))
    scheduler.add(make_request("waiting", prompt(8)))
    step(scheduler)
    step(scheduler)
    assert scheduler.blocks.num_used_blocks == 1 + 4
    for rid in ("prefilling", "waiting", "decoding"):
        (dropped,) = scheduler.abort(rid)
        assert dropped.status is SequenceStatus.FINISHED and dropped.finish_reason == "cancelled"
        assert dropped.block_ids == []
    assert scheduler.blocks.num_free_blocks == 64 and not scheduler.has_work
    assert scheduler.abort("decoding") == [] and scheduler.abort("nobody") == []


def test_abort_while_the_step_runs_drops_that_sequence_only() -> None:
    scheduler = make_scheduler()
    scheduler.add(make_request("a", prompt(8)))
    scheduler.add(make_request("b", prompt(8), n=2))
    step(scheduler)
    output = scheduler.schedule()
    assert [n for n, *_ in shape(output)] == ["a", "b.0", "b.1"]
    assert len(scheduler.abort("b")) == 2
    events = scheduler.update(output, [SampledToken(7)] * 3, quiet)
    assert [(e.id, e.token_ids) for e in events] == [("a", [7])]
    assert scheduler.blocks.num_used_blocks == len(scheduler.running[0].block_ids) == 1


# -- events ---------------------------------------------------------------------------------


def test_events_are_numbered_per_request_and_the_last_carries_usage() -> None:
    scheduler = make_scheduler()
    request = make_request("a", prompt(8), max_new_tokens=3, n=2, logprobs=1)
    scheduler.add(request)
    scheduler.add(make_request("b", prompt(5), max_new_tokens=2))
    logprob = TokenLogprob(9, -0.5, [(9, -0.5)])
    events: list[Event] = []
    while scheduler.has_work:
        output = scheduler.schedule()
        sampled = [SampledToken(9, logprob) for _ in output.sampling()]
        events += scheduler.update(output, sampled, quiet)
    mine = [e for e in events if e.id == "a"]
    assert [e.seq for e in mine] == list(range(6))
    assert sorted(e.index for e in mine) == [0, 0, 0, 1, 1, 1]
    assert [e.seq for e in events if e.id == "b"] == [0, 1]
    assert all(e.logprobs == [logprob] for e in events)
    assert [e.usage for e in mine] == [None] * 5 + [Usage(prompt_tokens=8, completion_tokens=6)]
    assert sum(e.finish == "length" for e in mine) == 2 and mine[-1].finish == "length"
    assert [e.usage for e in events if e.id == "b"] == [None, Usage(5, 2)]


# -- prefix cache ---------------------------------------------------------------------------


def test_second_request_with_the_same_prefix_hits_the_cache() -> None:
    scheduler = make_scheduler()
    shared = prompt(64)
    first = make_request("a", shared + prompt(8), max_new_tokens=4)
    scheduler.add(first)
    step(scheduler)
    first_blocks = list(first.sequences[0].block_ids)
    run_to_end(scheduler)
    # Its blocks went back to the free list but keep their keys.
    assert scheduler.blocks.num_free_blocks == 64 and len(scheduler.blocks._cached) >= 4
    second = make_request("b", shared + prompt(8))
    scheduler.add(second)
    assert shape(step(scheduler)[0]) == [("b", 64, 8, True)]
    assert second.sequences[0].block_ids[:4] == first_blocks[:4]
    assert scheduler.blocks.num_cache_hit_tokens == 64
    # A prompt that is exactly the cached prefix still computes its last block to sample from.
    scheduler.add(make_request("c", shared))
    assert shape(step(scheduler)[0]) == [("b", 72, 1, True), ("c", 48, 16, True)]


def test_reused_cached_blocks_lose_their_keys() -> None:
    scheduler = make_scheduler(num_blocks=8, block_size=4)
    old = prompt(8)
    scheduler.add(make_request("a", old, max_new_tokens=1))
    run_to_end(scheduler)
    assert len(scheduler.blocks._cached) == 2
    scheduler.add(make_request("big", prompt(32), max_new_tokens=1))  # takes every block
    run_to_end(scheduler)
    assert all(tuple(old[:4]) != key[1] for key in scheduler.blocks._cached)
    scheduler.add(make_request("again", old + [1]))
    assert shape(step(scheduler)[0]) == [("again", 0, 9, True)]


def test_a_block_still_being_written_is_never_a_cache_hit() -> None:
    scheduler = make_scheduler(max_batch_prefill_tokens=24)
    shared = prompt(40)
    writer = make_request("a", shared)
    scheduler.add(writer)
    step(scheduler)  # 24 tokens: block 0 is full, block 1 is half written
    reader = make_request("b", shared)
    scheduler.add(reader)
    assert shape(step(scheduler)[0]) == [("a", 24, 16, True), ("b", 16, 8, False)]
    a_blocks, b_blocks = writer.sequences[0].block_ids, reader.sequences[0].block_ids
    assert b_blocks[0] == a_blocks[0] and b_blocks[1] != a_blocks[1]


def test_siblings_wait_for_the_first_choice_then_share_its_prompt_blocks() -> None:
    scheduler = make_scheduler(max_batch_prefill_tokens=72)
    request = make_request("a", prompt(64), max_new_tokens=3, n=3)
    scheduler.add(request)
    scheduler.add(make_request("x", prompt(8), max_new_tokens=5))
    # Siblings wait, but they do not hold back the request behind them.
    assert shape(step(scheduler)[0]) == [("a.0", 0, 64, True), ("x", 0, 8, True)]
    assert shape(step(scheduler)[0]) == [
        ("a.0", 64, 1, True),
        ("x", 8, 1, True),
        ("a.1", 48, 16, True),
        ("a.2", 48, 16, True),
    ]
    first, *siblings = request.sequences
    for sibling in siblings:
        assert sibling.block_ids[:3] == first.block_ids[:3]
        assert sibling.block_ids[3] not in first.block_ids
    assert [scheduler.blocks._blocks[b].ref_count for b in first.block_ids[:3]] == [3, 3, 3]
    assert scheduler.blocks.num_cache_hit_tokens == 2 * 48
    run_to_end(scheduler)
    assert [len(s.output_ids) for s in request.sequences] == [3, 3, 3]
    assert scheduler.blocks.num_free_blocks == 64
