"""The gateway's model registry against a real redis-server: its background refresh keeps the
view (workers, stream lengths, model hashes) in memory so a request reads no Redis, and a model
the view lacks is looked up at once."""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import time
import uuid
from collections.abc import AsyncIterator, Callable

import pytest
from redis.asyncio import Redis

from common.keys import Keys
from gateway.errors import ApiError
from gateway.registry import MISSING_MODEL_REREAD_S, ModelRegistry
from tests.integration.conftest import RedisServer
from tests.integration.fake_worker import FakeWorker, tiny_model_card


@contextlib.asynccontextmanager
async def registered(redis_url: str, prefix: str, name: str = "tiny") -> AsyncIterator[None]:
    """A fake worker (taking no jobs) serving `name`, for the duration."""
    card = dataclasses.replace(tiny_model_card(), name=name)
    worker = FakeWorker(redis_url, prefix=prefix, card=card, consume=False)
    task = asyncio.create_task(worker.run())
    try:
        deadline = time.monotonic() + 5
        while not await worker.redis.exists(worker.keys.worker(worker.worker_id)):
            assert time.monotonic() < deadline, "the fake worker did not register"
            await asyncio.sleep(0.01)
        yield
    finally:
        task.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await task


async def eventually(check: Callable[[], bool], timeout_s: float = 5.0) -> None:
    deadline = time.monotonic() + timeout_s
    while not check():
        assert time.monotonic() < deadline, "the registry's view did not change"
        await asyncio.sleep(0.01)


@contextlib.asynccontextmanager
async def running_registry(
    redis_url: str, workers_ttl_s: float, refresh_s: float
) -> AsyncIterator[tuple[ModelRegistry, Redis, Keys]]:
    """A started registry on the test's own loop, with a fresh key prefix."""
    client = Redis.from_url(redis_url)
    keys = Keys(f"t{uuid.uuid4().hex[:10]}")
    registry = ModelRegistry(client, keys, workers_ttl_s=workers_ttl_s, refresh_s=refresh_s)
    registry.start()
    try:
        yield registry, client, keys
    finally:
        await registry.stop()
        await client.aclose()


async def test_the_refresh_follows_workers_and_queues_and_requests_read_memory(
    redis_server: RedisServer,
) -> None:
    async with running_registry(redis_server.url, 0.05, 0.1) as (registry, redis_client, keys):
        assert registry.queued("tiny") is None  # nothing read yet
        async with registered(redis_server.url, keys.prefix):
            await eventually(lambda: registry.queued("tiny") == 0)  # no request asked
            await redis_client.xadd(keys.requests("tiny"), {"job": "{}"})
            await eventually(lambda: registry.queued("tiny") == 1)
            await registry.get("tiny")  # builds the tokenizer once
            reads = count_calls(registry, "_read_workers", "_fingerprint", "_rebuild")
            for _ in range(20):
                assert (await registry.get("tiny")).name == "tiny"
            assert reads == {"_read_workers": 0, "_fingerprint": 0, "_rebuild": 0}
            await redis_client.hset(keys.model("tiny"), "max_total_tokens", "80")
            await asyncio.sleep(0.3)  # a few refreshes
            assert reads["_rebuild"] == 1  # the refresh saw the hash change
            assert (await registry.get("tiny")).card.max_total_tokens == 80


async def test_a_model_the_view_lacks_is_read_at_once_and_an_unknown_one_is_404(
    redis_server: RedisServer,
) -> None:
    async with (
        running_registry(redis_server.url, 30, 30) as (registry, _, keys),  # next read: 30 s
        registered(redis_server.url, keys.prefix, "tiny"),
    ):
        await asyncio.sleep(MISSING_MODEL_REREAD_S)
        assert (await registry.get("tiny")).name == "tiny"
        async with registered(redis_server.url, keys.prefix, "other"):
            await asyncio.sleep(MISSING_MODEL_REREAD_S)
            assert (await registry.get("other")).name == "other"
            with pytest.raises(ApiError) as caught:
                await registry.get("missing")
            assert caught.value.status == 404
            assert "Served models: other, tiny." in caught.value.message


def count_calls(registry: ModelRegistry, *names: str) -> dict[str, int]:
    """Wrap the registry's Redis-reading methods to count their calls from now on."""
    counts = dict.fromkeys(names, 0)
    for name in names:
        original = getattr(registry, name)

        async def counted(*args, _name=name, _original=original, **kwargs):
            counts[_name] += 1
            return await _original(*args, **kwargs)

        setattr(registry, name, counted)
    return counts
