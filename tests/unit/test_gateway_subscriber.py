"""The subscriber's parts without a real Redis: the inbox that buffers one request's pub/sub
messages, and the subscriber against a fake server that never confirms a SUBSCRIBE (a connection
that stopped answering is dropped, and the next request opens a new one; a request released
before its confirmation leaves the connection alone)."""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator

import pytest
from redis.asyncio import Redis
from redis.exceptions import ConnectionError as RedisConnectionError

from gateway.errors import ApiError
from gateway.subscriber import Inbox, Subscriber


async def test_an_inbox_hands_over_everything_buffered_in_order() -> None:
    inbox = Inbox([b"a", b"b"])
    inbox.deliver(b"a", b"1")
    inbox.deliver(b"b", b"2")
    inbox.deliver(b"a", b"3")
    assert await inbox.take() == [(b"a", b"1"), (b"b", b"2"), (b"a", b"3")]
    waiting = asyncio.ensure_future(inbox.take())
    await asyncio.sleep(0)
    assert not waiting.done()
    inbox.deliver(b"b", b"4")
    assert await asyncio.wait_for(waiting, 1) == [(b"b", b"4")]


async def test_an_inbox_is_confirmed_once_every_channel_is() -> None:
    inbox = Inbox([b"a", b"b"])
    confirmed = asyncio.ensure_future(inbox.confirmed())
    inbox.confirm(b"a")
    await asyncio.sleep(0)
    assert not confirmed.done()
    inbox.confirm(b"b")
    await asyncio.wait_for(confirmed, 1)


async def test_a_failed_inbox_raises_at_once_and_to_a_waiting_reader() -> None:
    inbox = Inbox([b"a"])
    waiting = asyncio.ensure_future(inbox.take())
    await asyncio.sleep(0)
    inbox.fail(RedisConnectionError("lost"))
    with pytest.raises(RedisConnectionError, match="lost"):
        await asyncio.wait_for(waiting, 1)
    inbox.deliver(b"a", b"late")
    with pytest.raises(RedisConnectionError):
        await inbox.take()  # the error wins over what is still buffered
    with pytest.raises(RedisConnectionError):
        await inbox.confirmed()


# --- a server that accepts commands but never confirms a subscription --------------------------


class MuteServer:
    """Answers `+OK` to every command except SUBSCRIBE, which it ignores; counts connections."""

    def __init__(self) -> None:
        self.connections = 0
        self.closed = 0
        self.port = 0

    async def handle(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.connections += 1
        try:
            while command := await read_command(reader):
                if command[0].upper() != b"SUBSCRIBE":
                    writer.write(b"+OK\r\n")
                    await writer.drain()
        finally:
            self.closed += 1
            writer.close()


async def read_command(reader: asyncio.StreamReader) -> list[bytes]:
    """One RESP array of bulk strings; empty at end of stream."""
    header = await reader.readline()
    if not header:
        return []
    parts = []
    for _ in range(int(header[1:])):
        length = int((await reader.readline())[1:])
        parts.append((await reader.readexactly(length + 2))[:-2])
    return parts


@contextlib.asynccontextmanager
async def mute_server() -> AsyncIterator[MuteServer]:
    mute = MuteServer()
    server = await asyncio.start_server(mute.handle, "127.0.0.1", 0)
    mute.port = server.sockets[0].getsockname()[1]
    try:
        yield mute
    finally:
        server.close()


async def test_an_unconfirmed_subscription_is_a_503_and_drops_the_connection() -> None:
    async with mute_server() as mute:
        redis = Redis(port=mute.port)
        subscriber = Subscriber(redis, confirm_timeout_s=0.2)
        for attempt in (1, 2):
            inbox = await subscriber.subscribe([b"spindle:out:x"])  # sent, not yet confirmed
            assert subscriber.subscribed == 1
            with pytest.raises(ApiError) as caught:
                await asyncio.wait_for(inbox.confirmed(), 2)
            assert caught.value.status == 503 and "did not confirm" in caught.value.message
            assert mute.connections == attempt  # a fresh connection for each try
            assert subscriber.subscribed == 0
        await asyncio.sleep(0.05)
        assert mute.closed >= 1
        await subscriber.close()
        await redis.aclose()


async def test_a_subscription_released_unconfirmed_keeps_the_connection() -> None:
    """A request that ends before Redis confirmed it (its client left) must not make the
    confirmation's timeout drop the connection every other request shares."""
    async with mute_server() as mute:
        redis = Redis(port=mute.port)
        subscriber = Subscriber(redis, confirm_timeout_s=0.1)
        inbox = await subscriber.subscribe([b"spindle:out:x"])
        await subscriber.unsubscribe(inbox)
        other = await subscriber.subscribe([b"spindle:out:y"])
        await asyncio.sleep(0.05)
        await subscriber.unsubscribe(other)
        await asyncio.sleep(0.2)  # past both timeouts
        assert mute.connections == 1 and mute.closed == 0
        third = await subscriber.subscribe([b"spindle:out:z"])
        with pytest.raises(ApiError):
            await asyncio.wait_for(third.confirmed(), 2)  # still times out when it must
        await subscriber.close()
        await redis.aclose()
