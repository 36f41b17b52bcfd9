"""Server-Sent Events responses that never end in a traceback.

The source yields lists of `data:` payloads (single-line JSON, or `[DONE]`): everything that is
ready at once, usually the events of one relayed batch. Each list goes out as ONE body write, so
a burst of tokens costs one trip through the ASGI stack and one socket write, not one per token.
A comment line (`: ping`) goes out every `PING_INTERVAL_S` so proxies keep a quiet stream open.

The response owns the request's admission slot and releases it when the stream ends however it
ends. An error after the headers went out cannot change the status any more, so it is sent as one
last `data:` message in the route's dialect. A client that disconnects cancels the stream; the
relay's clean-up then cancels the jobs on Redis.
"""

from __future__ import annotations

import contextlib
import logging
from collections.abc import AsyncGenerator, AsyncIterator, Awaitable, Callable
from typing import Any

import anyio
from anyio.abc import TaskGroup
from redis.exceptions import RedisError
from starlette.responses import Response
from starlette.types import Receive, Scope, Send

from gateway.admission import Slot
from gateway.errors import ApiError

logger = logging.getLogger("spindle.gateway")

PING_INTERVAL_S = 15.0  # keeps proxies from closing a stream that waits in a long queue
_PING = b": ping\n\n"
_HEADERS = [
    (b"content-type", b"text/event-stream; charset=utf-8"),
    (b"cache-control", b"no-store"),
    (b"connection", b"keep-alive"),
    (b"x-accel-buffering", b"no"),  # nginx: pass each write on at once
]


def sse_frames(payloads: list[str]) -> bytes:
    """`data: <payload>\\n\\n` for each payload, as one buffer."""
    return "".join([f"data: {payload}\n\n" for payload in payloads]).encode()


class SseResponse(Response):
    """Streams `source` as SSE until it ends or the client leaves, whichever comes first."""

    media_type = "text/event-stream"

    def __init__(
        self,
        slot: Slot,
        source: AsyncIterator[list[str]],
        render_error: Callable[[ApiError], str],
        ping_interval_s: float = PING_INTERVAL_S,
    ) -> None:
        self.status_code = 200
        self.background = None
        self.raw_headers = list(_HEADERS)
        self._slot = slot
        self._source = source
        self._render_error = render_error
        self._ping_interval_s = ping_interval_s

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        try:
            await send({"type": "http.response.start", "status": 200, "headers": self.raw_headers})
            async with anyio.create_task_group() as group:
                group.start_soon(_then_stop, group, self._stream, send)
                group.start_soon(_then_stop, group, _until_disconnected, receive)
                group.start_soon(_then_stop, group, self._ping, send)
        finally:
            # The source is closed (running the relay's clean-up) even if it never started.
            with anyio.CancelScope(shield=True):
                await _aclose(self._source)
            self._slot.release()

    async def _stream(self, send: Send) -> None:
        batches = _guarded(self._source, self._render_error)
        # OSError: the client left while we wrote (ASGI 2.4 servers raise it; uvicorn does not).
        with contextlib.suppress(OSError):
            async with contextlib.aclosing(batches):
                async for payloads in batches:
                    body = sse_frames(payloads)
                    await send({"type": "http.response.body", "body": body, "more_body": True})
            await send({"type": "http.response.body", "body": b"", "more_body": False})

    async def _ping(self, send: Send) -> None:
        with contextlib.suppress(OSError):
            while True:
                await anyio.sleep(self._ping_interval_s)
                await send({"type": "http.response.body", "body": _PING, "more_body": True})


def sse_response(
    slot: Slot, source: AsyncIterator[list[str]], render_error: Callable[[ApiError], str]
) -> SseResponse:
    return SseResponse(slot, source, render_error)


async def _then_stop(
    group: TaskGroup, part: Callable[[Any], Awaitable[None]], channel: Send | Receive
) -> None:
    """Run one part of the response; when it ends, so do the others."""
    await part(channel)
    group.cancel_scope.cancel()


async def _until_disconnected(receive: Receive) -> None:
    # The route has read the body, so the next ASGI message can only be the disconnect.
    while (await receive())["type"] != "http.disconnect":
        pass


async def _aclose(source: AsyncIterator[list[str]]) -> None:
    aclose = getattr(source, "aclose", None)
    if aclose is not None:
        await aclose()


async def _guarded(
    source: AsyncIterator[list[str]], render_error: Callable[[ApiError], str]
) -> AsyncGenerator[list[str], None]:
    try:
        async with contextlib.aclosing(source):  # type: ignore[type-var]
            async for payloads in source:
                yield payloads
    except ApiError as error:
        yield [render_error(error)]
    except RedisError as err:
        logger.warning("redis failed during a stream: %s", err)
        yield [render_error(ApiError(503, f"lost the connection to Redis: {err}"))]
    except Exception as err:
        logger.exception("unexpected error in a stream")
        message = f"internal error ({type(err).__name__}); see the gateway log"
        yield [render_error(ApiError(500, message))]
