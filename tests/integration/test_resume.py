"""Two real workers on one model stream: both take work (pull-based load balancing), and when one
is killed with SIGKILL mid-generation the other claims its jobs once its heartbeat expires and
resumes them from their progress lists — every client still gets exactly the text it would have
got from one worker alone, with no duplicated or missing piece (DESIGN.md, the Redis contract).
"""

from __future__ import annotations

import asyncio
import os
import re
import signal
import uuid
from collections.abc import Iterator
from pathlib import Path

import pytest

from common.keys import WORKER_GROUP
from common.protocol import Job
from tests.integration.conftest import RedisServer
from tests.integration.service_fixtures import (  # noqa: F401 (an autouse fixture)
    DEMO_MODEL_NAME,
    ServiceStack,
    service_logs_on_failure,
    service_stack,
)

pytestmark = pytest.mark.slow  # loads the demo model

LONG_ANSWER_TOKENS = 48
STREAMED_CHUNKS_BEFORE_KILL = 4
RESUMED_LINE = re.compile(r"resuming (\S+) after (\d+) tokens")


@pytest.fixture(scope="module")
def pair(
    redis_server: RedisServer, demo_model_dir: Path, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[ServiceStack]:
    prefix = f"resume{uuid.uuid4().hex[:8]}"
    log_dir = tmp_path_factory.mktemp("resume-logs")
    worker_ids = [f"{prefix}-a", f"{prefix}-b"]
    with service_stack(redis_server.url, prefix, demo_model_dir, log_dir, worker_ids) as stack:
        yield stack


async def test_both_workers_take_work(pair):
    pair.wait_idle()
    client = pair.async_openai()
    replies = await asyncio.gather(
        *(
            client.completions.create(
                model=DEMO_MODEL_NAME, prompt=f"Rule number {i} of good cooking:", max_tokens=6
            )
            for i in range(12)
        )
    )
    await client.close()
    request_ids = {reply.id for reply in replies}
    taken = [set(worker.finished_requests()) & request_ids for worker in pair.workers]
    assert all(taken), [len(ids) for ids in taken]
    assert sum(len(ids) for ids in taken) == len(request_ids) == 12


async def test_jobs_of_a_killed_worker_resume_without_duplicates(pair):
    pair.wait_idle()
    client = pair.async_openai()
    prompts = [
        "The history of the printing press",
        "A recipe for tomato soup:",
        "Ten facts about octopuses:",
    ]
    request = {
        "model": DEMO_MODEL_NAME,
        "max_tokens": LONG_ANSWER_TOKENS,
        "temperature": 0,
        "extra_body": {"ignore_eos": True},
    }
    references = []
    for prompt in prompts:  # one at a time: each alone in its worker's batch
        reply = await client.completions.create(prompt=prompt, **request)
        references.append(reply.choices[0].text)

    received: list[list[str]] = [[] for _ in prompts]
    ids: list[str] = ["" for _ in prompts]

    async def stream(position: int) -> tuple[str | None, int]:
        chunks = await client.completions.create(
            prompt=prompts[position],
            stream=True,
            stream_options={"include_usage": True},
            **request,
        )
        finish, completion_tokens = None, 0
        async for chunk in chunks:
            ids[position] = chunk.id
            if chunk.choices:
                received[position].append(chunk.choices[0].text)
                finish = chunk.choices[0].finish_reason or finish
            if chunk.usage is not None:
                completion_tokens = chunk.usage.completion_tokens
        return finish, completion_tokens

    tasks = [asyncio.create_task(stream(position)) for position in range(len(prompts))]
    while min(len(chunks) for chunks in received) < STREAMED_CHUNKS_BEFORE_KILL:
        assert not any(task.done() for task in tasks), [task.result() for task in tasks]
        await asyncio.sleep(0.05)
    pending = pair.client.xpending_range(pair.stream, WORKER_GROUP, "-", "+", count=100)
    owners = [entry["consumer"].decode() for entry in pending]
    victim = max(pair.workers, key=lambda worker: owners.count(worker.worker_id))
    [survivor] = [worker for worker in pair.workers if worker is not victim]
    orphans = {  # request ids of the jobs the victim holds
        Job.from_json(
            pair.client.xrange(pair.stream, entry["message_id"], entry["message_id"])[0][1][b"job"]
        ).id
        for entry in pending
        if entry["consumer"].decode() == victim.worker_id
    }
    os.kill(victim.pid, signal.SIGKILL)
    victim.wait_exit(10)

    outcomes = await asyncio.wait_for(asyncio.gather(*tasks), 180)
    await client.close()
    for position, (finish, completion_tokens) in enumerate(outcomes):
        assert "".join(received[position]) == references[position], prompts[position]
        assert (finish, completion_tokens) == ("length", LONG_ANSWER_TOKENS)
    finished_on_survivor = survivor.finished_requests()
    assert all(finished_on_survivor[request_id]["finish"] == "length" for request_id in orphans)
    resumed = dict(RESUMED_LINE.findall(survivor.log_text()))
    assert set(resumed) == orphans
    assert all(int(tokens) >= 1 for tokens in resumed.values()), resumed
    assert not pair.client.exists(pair.keys.worker(victim.worker_id))
    assert pair.client.xlen(pair.stream) == 0
