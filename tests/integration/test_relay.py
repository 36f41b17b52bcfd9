"""The relay against a real redis-server: many requests on the one shared pub/sub connection,
events reordered within a batch, the deadline, the queue limit checked in the enqueue, and a lost connection (a waiting relay fails
cleanly, the next request reconnects; through HTTP, a stream ends with a 503 message)."""

from __future__ import annotations

import asyncio
import contextlib
import json
import time
import uuid
from collections.abc import AsyncIterator, Iterator
from typing import Any

import httpx
import pytest
import redis
from redis.asyncio import Redis
from redis.exceptions import ConnectionError as RedisConnectionError

from common.keys import Keys
from common.protocol import Event, Job, Sampling, Usage
from gateway.errors import ApiError
from gateway.relay import DEADLINE_GRACE_S, EventBatch, EventRelay
from gateway.subscriber import CLIENT_NAME, Subscriber
from tests.integration.conftest import (
    BackgroundLoop,
    RedisServer,
    start_gateway,
    start_worker,
)

MODEL = "tiny"


class Relay:
    """A Subscriber + EventRelay on the test's loop, with a connection name of its own."""

    def __init__(self, redis_url: str, prefix: str) -> None:
        self.redis = Redis.from_url(redis_url)
        self.keys = Keys(prefix)
        self.client_name = f"relay-test-{prefix}"
        self.subscriber = Subscriber(self.redis, client_name=self.client_name)
        self.relay = EventRelay(self.redis, self.keys, self.subscriber)

    async def named_clients(self) -> list[dict[str, Any]]:
        clients = await self.redis.client_list()
        return [c for c in clients if c["name"] == self.client_name]

    async def kill_pubsub_connection(self) -> None:
        for client in await self.named_clients():
            await self.redis.execute_command("CLIENT", "KILL", "ID", client["id"])

    async def wait_queued(self, count: int) -> None:
        """Until `count` jobs are in the stream: their relays have subscribed."""
        deadline = time.monotonic() + 5
        while await self.redis.xlen(self.keys.requests(MODEL)) < count:
            assert time.monotonic() < deadline, "the jobs were not enqueued"
            await asyncio.sleep(0.01)

    async def close(self) -> None:
        await self.subscriber.close()
        await self.redis.aclose()


@contextlib.asynccontextmanager
async def open_relay(redis_server: RedisServer) -> AsyncIterator[Relay]:
    """Opened and closed on the test's own event loop (connections belong to one loop)."""
    relay = Relay(redis_server.url, f"t{uuid.uuid4().hex[:10]}")
    try:
        yield relay
    finally:
        await relay.close()


def job(max_new_tokens: int, deadline: float | None = None) -> Job:
    return Job(
        id=f"cmpl-{uuid.uuid4().hex}",
        model=MODEL,
        prompt_ids=[5, 6],
        sampling=Sampling(temperature=0.0),
        max_new_tokens=max_new_tokens,
        created=time.time(),
        deadline=deadline,
    )


def events_for(job: Job) -> list[Event]:
    """One token per event, texts naming the job and the position; the last one finishes."""
    last = job.max_new_tokens - 1
    return [
        Event(
            job.id,
            seq,
            token_ids=[7],
            text=f"{job.id[-4:]}:{seq} ",
            finish="length" if seq == last else None,
            usage=Usage(2, job.max_new_tokens) if seq == last else None,
        )
        for seq in range(job.max_new_tokens)
    ]


async def publish_shuffled(relay: Relay, jobs: list[Job]) -> None:
    """Every job's events in one pipeline, each adjacent pair swapped and seq 0 sent twice, so
    one relay batch holds events out of order and a duplicate."""
    pipe = relay.redis.pipeline(transaction=False)
    for one in jobs:
        events = events_for(one)
        for at in range(0, len(events) - 1, 2):
            events[at], events[at + 1] = events[at + 1], events[at]
        for event in [*events[:2], events_for(one)[0], *events[2:]]:
            pipe.publish(relay.keys.events(one.id), event.to_json())
    await pipe.execute()


async def relayed(relay: Relay, one: Job) -> list[Event]:
    return [event for batch in await relayed_batches(relay, one) for event in batch]


async def relayed_batches(relay: Relay, one: Job) -> list[list[Event]]:
    started = await relay.relay.start([one])
    return [[event for _, event in batch] async for batch in started.batches()]


async def test_many_requests_share_one_connection_and_each_gets_its_own_events_in_order(
    redis_server: RedisServer,
) -> None:
    async with open_relay(redis_server) as relay:
        jobs = [job(max_new_tokens=9) for _ in range(20)]
        runs = [asyncio.ensure_future(relayed_batches(relay, one)) for one in jobs]
        await relay.wait_queued(len(jobs))
        (connection,) = await relay.named_clients()
        assert int(connection["sub"]) == len(jobs)
        await publish_shuffled(relay, jobs)
        batches = await asyncio.wait_for(asyncio.gather(*runs), 5)
        assert any(len(batch) > 1 for run in batches for batch in run)  # bursts stay together
        for one, run in zip(jobs, batches, strict=True):
            events = [event for batch in run for event in batch]
            assert [event.text for event in events] == [event.text for event in events_for(one)]
            assert [event.seq for event in events] == list(range(9))
            assert events[-1].finish == "length"
        assert relay.subscriber.subscribed == 0
        (connection,) = await relay.named_clients()  # still the one connection, now idle
        assert int(connection["sub"]) == 0


async def test_a_lost_connection_fails_waiting_relays_and_the_next_request_reconnects(
    redis_server: RedisServer,
) -> None:
    async with open_relay(redis_server) as relay:
        waiting = [job(max_new_tokens=4) for _ in range(3)]
        runs = [asyncio.ensure_future(relayed(relay, one)) for one in waiting]
        await relay.wait_queued(len(waiting))
        await relay.kill_pubsub_connection()
        for run in runs:
            with pytest.raises(RedisConnectionError, match="lost the pub/sub connection"):
                await asyncio.wait_for(run, 5)
        for one in waiting:  # the relay's clean-up cancelled the jobs it gave up on
            assert await relay.redis.exists(relay.keys.cancelled(one.id))
        fresh = job(max_new_tokens=3)
        run = asyncio.ensure_future(relayed(relay, fresh))
        await relay.wait_queued(len(waiting) + 1)
        await publish_shuffled(relay, [fresh])
        assert len(await asyncio.wait_for(run, 5)) == 3


async def test_the_deadline_ends_a_relay_with_a_504(redis_server: RedisServer) -> None:
    async with open_relay(redis_server) as relay:
        late = job(max_new_tokens=4, deadline=time.time() - DEADLINE_GRACE_S + 0.1)
        with pytest.raises(ApiError) as caught:
            await asyncio.wait_for(relayed(relay, late), 5)
        assert caught.value.status == 504
        assert await relay.redis.exists(relay.keys.cancelled(late.id))
        assert relay.subscriber.subscribed == 0


async def test_the_enqueue_refuses_a_full_queue_in_one_step_and_adds_nothing(
    redis_server: RedisServer,
) -> None:
    async with open_relay(redis_server) as relay:
        stream = relay.keys.requests(MODEL)
        await relay.redis.xadd(stream, {"job": "{}"})  # one job nobody takes
        started = await relay.relay.start([job(max_new_tokens=2)], max_queue=1)
        with pytest.raises(ApiError) as caught:
            await anext(started.batches())
        assert caught.value.status == 429
        assert "holds 1 requests, its limit (--max-queue 1)" in caught.value.message
        assert await relay.redis.xlen(stream) == 1  # the refused job was not added
        assert relay.subscriber.subscribed == 0  # and its relay closed
        # below the limit, a request's jobs go in together
        pair = [job(max_new_tokens=3), job(max_new_tokens=3)]
        started = await relay.relay.start(pair, max_queue=3)
        collecting = asyncio.ensure_future(collect_events(started.batches()))
        await relay.wait_queued(3)
        await publish_shuffled(relay, pair)
        events = await asyncio.wait_for(collecting, 5)
        assert [(position, event.seq) for position, event in events if position == 0] == [
            (0, 0), (0, 1), (0, 2)
        ]  # fmt: skip
        assert [event.seq for position, event in events if position == 1] == [0, 1, 2]


async def collect_events(batches: AsyncIterator[EventBatch]) -> EventBatch:
    return [item async for batch in batches for item in batch]


# --- through HTTP --------------------------------------------------------------------------------


@pytest.fixture
def slow_stack(
    redis_server: RedisServer, background_loop: BackgroundLoop, unique_prefix: str
) -> Iterator[str]:
    worker = start_worker(background_loop, redis_server.url, unique_prefix)
    gateway = start_gateway(redis_server.url, unique_prefix)
    yield gateway.url
    gateway.stop()
    worker.stop()


def test_a_stream_ends_with_a_503_message_when_the_pubsub_connection_drops(
    redis_server: RedisServer, slow_stack: str
) -> None:
    admin = redis.Redis.from_url(redis_server.url)
    body = {"model": MODEL, "prompt": "slow one two three four five six", "stream": True}
    with (
        httpx.Client(base_url=slow_stack, timeout=10) as http,
        http.stream("POST", "/v1/completions", json=body) as response,
    ):
        lines = response.iter_lines()
        assert next(line for line in lines if line.startswith("data: "))  # generating now
        for client in admin.client_list(_type="pubsub"):
            if client["name"] == CLIENT_NAME:
                admin.execute_command("CLIENT", "KILL", "ID", client["id"])
        data = [line[len("data: ") :] for line in lines if line.startswith("data: ")]
    error = json.loads(data[-1])["error"]
    assert (
        error["type"] == "service_unavailable"
        and "lost the connection to Redis" in (error["message"])
    )
    assert "[DONE]" not in data
    with httpx.Client(base_url=slow_stack, timeout=10) as http:  # the gateway reconnects
        answer = http.post("/v1/completions", json={"model": MODEL, "prompt": "one two"})
        assert answer.status_code == 200 and answer.json()["choices"][0]["text"] == "two one"
    admin.close()
