"""The async in-process API: `AsyncLLM.stream` yields a request's events while the engine runs on
its own thread; results equal the synchronous API's, and leaving a stream early frees its blocks."""

from __future__ import annotations

import asyncio
import time

import pytest

from common.protocol import SamplingParams
from worker.engine.llm import LLM, AsyncLLM

GREEDY = SamplingParams.make(temperature=0, max_new_tokens=12, ignore_eos=True)


@pytest.fixture(scope="module")
def async_llm(tiny_models):
    llm = AsyncLLM(str(tiny_models["llama"]), dtype="float32", max_total_tokens=512)
    yield llm
    llm.shutdown()


def test_concurrent_streams_equal_the_sync_api(tiny_models, async_llm):
    prompts = [list(range(3, 3 + n)) for n in (1, 9, 30, 75)]
    expected = LLM(str(tiny_models["llama"]), dtype="float32", max_total_tokens=512).generate(
        prompts, GREEDY
    )

    async def collect(prompt):
        events = [event async for event in async_llm.stream(prompt, GREEDY)]
        return events

    async def main():
        return await asyncio.gather(*(collect(p) for p in prompts))

    streams = asyncio.run(main())
    for events, reference in zip(streams, expected, strict=True):
        assert [e.seq for e in events] == list(range(len(events)))
        assert [t for e in events for t in e.token_ids] == reference.token_ids
        assert "".join(e.text for e in events) == reference.text
        assert events[-1].finish == "length" and events[-1].usage.completion_tokens == 12


def test_leaving_a_stream_early_aborts_the_request(async_llm):
    long_run = SamplingParams.make(temperature=0, max_new_tokens=400, ignore_eos=True)

    async def take_three():
        stream = async_llm.stream(list(range(5, 50)), long_run)
        taken = []
        async for event in stream:
            taken.append(event)
            if len(taken) == 3:
                break
        await stream.aclose()
        return taken

    assert len(asyncio.run(take_three())) == 3
    blocks = async_llm.engine.scheduler.blocks
    deadline = time.time() + 10
    while blocks.num_free_blocks != blocks.num_blocks and time.time() < deadline:
        time.sleep(0.05)
    assert blocks.num_free_blocks == blocks.num_blocks
    assert not async_llm.engine.requests


def test_a_refused_request_raises_in_the_stream(async_llm):
    async def run():
        return [e async for e in async_llm.stream([], GREEDY)]

    with pytest.raises(ValueError, match="empty"):
        asyncio.run(run())
