"""One Redis pub/sub connection per gateway process, shared by every request it relays.

`Subscriber.subscribe(channels)` sends the SUBSCRIBE and returns an `Inbox` at once, and
`inbox.confirmed()` returns once Redis has confirmed every channel, so the caller may enqueue its
jobs knowing no event can be missed (DESIGN.md's rule). What the caller does in between (a
streamed response sends its headers) overlaps the confirmation's round trip, which an idle
gateway had waited out before doing anything else. One reader task owns
the connection's input: it parses replies as they arrive and appends each message to the inbox of
its channel. Whatever is already in the socket buffer is routed without waiting on the socket
again, and an inbox wakes its relay once per burst, so a relay takes everything that arrived
together in one `take()`.

If the connection drops, or stops confirming subscriptions (`CONFIRM_TIMEOUT_S`; the unconfirmed
inbox fails with a 503 `ApiError`), every open inbox fails with a redis `ConnectionError` (what
was published meanwhile is lost: pub/sub keeps nothing, so resubscribing could not make those
streams whole), and the next `subscribe` opens a new connection. The reader never waits on a
relay, so a slow client cannot hold up the others: its events wait in its inbox.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging

from redis.asyncio import Redis
from redis.asyncio.connection import AbstractConnection
from redis.exceptions import ConnectionError as RedisConnectionError
from redis.exceptions import RedisError

from gateway.errors import ApiError

logger = logging.getLogger("spindle.gateway")

CONFIRM_TIMEOUT_S = 5.0
CLIENT_NAME = "spindle-gateway-events"  # how the connection shows in CLIENT LIST
Message = tuple[bytes, bytes]  # (channel, data)


class Inbox:
    """The messages published on one request's channels, kept until its relay takes them."""

    def __init__(self, channels: list[bytes]) -> None:
        self.channels = channels
        self._messages: list[Message] = []
        self._waiter: asyncio.Future[None] | None = None
        self._error: BaseException | None = None
        self._unconfirmed = set(channels)
        self._confirmed = asyncio.get_running_loop().create_future()
        # set by the subscriber: fails the inbox if the confirmation takes too long
        self.confirm_timer: asyncio.TimerHandle | None = None

    def deliver(self, channel: bytes, data: bytes) -> None:
        self._messages.append((channel, data))
        self._wake()

    def confirm(self, channel: bytes) -> None:
        self._unconfirmed.discard(channel)
        if not self._unconfirmed and not self._confirmed.done():
            self._confirmed.set_result(None)
            self.stop_confirm_timer()

    def stop_confirm_timer(self) -> None:
        if self.confirm_timer is not None:
            self.confirm_timer.cancel()
            self.confirm_timer = None

    def fail(self, error: BaseException) -> None:
        """End the inbox: the next `take()` (or a pending one) raises `error`."""
        self._error = self._error or error
        self.stop_confirm_timer()
        if not self._confirmed.done():
            self._confirmed.set_result(None)
        self._wake()

    async def confirmed(self) -> None:
        """Returns once Redis confirmed every channel; raises the error the inbox failed with."""
        await self._confirmed
        if self._error is not None:
            raise self._error

    async def take(self) -> list[Message]:
        """Every message that arrived since the last call, oldest first; waits for at least one.
        Raises the error the inbox failed with, even if messages are still buffered."""
        while not self._messages and self._error is None:
            self._waiter = asyncio.get_running_loop().create_future()
            try:
                await self._waiter
            finally:
                self._waiter = None
        if self._error is not None:
            raise self._error
        messages, self._messages = self._messages, []
        return messages

    def _wake(self) -> None:
        if self._waiter is not None and not self._waiter.done():
            self._waiter.set_result(None)


class Subscriber:
    """The process's pub/sub connection: opened on first use, reopened after a loss."""

    def __init__(
        self,
        redis: Redis,
        *,
        client_name: str = CLIENT_NAME,
        confirm_timeout_s: float = CONFIRM_TIMEOUT_S,
    ) -> None:
        if redis.connection_pool.connection_kwargs.get("decode_responses"):
            raise ValueError("the subscriber needs a Redis client that returns bytes")
        self._redis = redis
        self._client_name = client_name
        self._confirm_timeout_s = confirm_timeout_s
        self._inboxes: dict[bytes, Inbox] = {}
        self._connection: AbstractConnection | None = None
        self._reader: asyncio.Task[None] | None = None
        self._connecting = asyncio.Lock()
        self._closing: set[asyncio.Future[None]] = set()  # disconnects under way (held, not lost)

    @property
    def subscribed(self) -> int:
        """Channels routed now (for tests and debugging)."""
        return len(self._inboxes)

    async def subscribe(self, channels: list[bytes]) -> Inbox:
        """An inbox for `channels`, returned once the SUBSCRIBE is sent; `inbox.confirmed()`
        waits for Redis to confirm it (and fails with a 503 if Redis did not within the
        timeout). Raises redis' ConnectionError if Redis cannot be reached."""
        connection = await self._connected()
        inbox = Inbox(channels)
        for channel in channels:
            self._inboxes[channel] = inbox
        try:
            await connection.send_command("SUBSCRIBE", *channels, check_health=False)
        except BaseException:
            await asyncio.shield(self._release(inbox))
            raise
        inbox.confirm_timer = asyncio.get_running_loop().call_later(
            self._confirm_timeout_s, self._unconfirmed, inbox, connection
        )
        return inbox

    async def unsubscribe(self, inbox: Inbox) -> None:
        """Stop routing the inbox's channels; Redis errors are logged, not raised."""
        await self._release(inbox)

    async def close(self) -> None:
        """Fail what is open and close the connection (at shutdown)."""
        if self._reader is not None:
            self._reader.cancel()
        connection, self._connection = self._connection, None
        self._fail_all(RedisConnectionError("the gateway is shutting down"))
        if connection is not None:
            await self._disconnect(connection)

    def _unconfirmed(self, inbox: Inbox, connection: AbstractConnection) -> None:
        """The confirmation did not come in time. A connection that no longer answers (a
        half-open TCP link) would fail every later request the same way: drop it, and the next
        request opens a fresh one."""
        message = f"Redis did not confirm the subscription in {self._confirm_timeout_s:g} s"
        inbox.fail(ApiError(503, message))
        self._drop(connection, message)
        closing = asyncio.ensure_future(self._disconnect(connection))
        self._closing.add(closing)
        closing.add_done_callback(self._closing.discard)

    @staticmethod
    async def _disconnect(connection: AbstractConnection) -> None:
        with contextlib.suppress(RedisError, OSError):
            await connection.disconnect(nowait=True)

    async def _release(self, inbox: Inbox) -> None:
        inbox.stop_confirm_timer()  # released unconfirmed: no reason to doubt the connection
        routed = [channel for channel in inbox.channels if self._inboxes.get(channel) is inbox]
        for channel in routed:
            del self._inboxes[channel]
        connection = self._connection
        if connection is None or not routed:
            return  # a lost connection took its subscriptions with it
        try:
            await connection.send_command("UNSUBSCRIBE", *inbox.channels, check_health=False)
        except (RedisError, OSError) as err:
            logger.warning("redis: unsubscribing failed: %s", err)

    async def _connected(self) -> AbstractConnection:
        if self._connection is not None:
            return self._connection
        async with self._connecting:
            if self._connection is None:
                pool = self._redis.connection_pool
                connection = pool.connection_class(
                    **{**pool.connection_kwargs, "client_name": self._client_name}
                )
                await connection.connect()
                self._connection = connection
                self._reader = asyncio.create_task(self._read(connection))
            return self._connection

    async def _read(self, connection: AbstractConnection) -> None:
        try:
            while True:
                self._route(await connection.read_response())
        except asyncio.CancelledError:
            raise
        except Exception as err:
            logger.warning("redis: the pub/sub connection was lost: %s", err)
            await self._lost(connection, err)

    def _route(self, reply: list[bytes]) -> None:
        kind, channel = reply[0], reply[1]
        inbox = self._inboxes.get(channel)
        if inbox is None:
            return  # a late message for a request that already ended, or an unsubscribe reply
        if kind == b"message":
            inbox.deliver(channel, reply[2])
        elif kind == b"subscribe":
            inbox.confirm(channel)

    async def _lost(self, connection: AbstractConnection, error: Exception) -> None:
        self._drop(connection, error)
        await self._disconnect(connection)

    def _drop(self, connection: AbstractConnection, why: object) -> None:
        """Stop using `connection` if it is the current one, failing every open inbox."""
        if self._connection is connection:
            self._connection = None
            self._fail_all(RedisConnectionError(f"lost the pub/sub connection to Redis: {why}"))

    def _fail_all(self, error: BaseException) -> None:
        inboxes = {id(inbox): inbox for inbox in self._inboxes.values()}
        self._inboxes.clear()
        for inbox in inboxes.values():
            inbox.fail(error)
