"""Server-Sent Events responses that never end in a traceback, on sse-starlette.

The source yields lists of `data:` payloads (single-line JSON, or `[DONE]`): everything that is
ready at once, usually the events of one relayed batch. Each list is framed here into ONE `bytes`
buffer, which sse-starlette's `EventSourceResponse` sends as it is (it passes bytes through), so a
burst of tokens costs one trip through the ASGI stack and one socket write, not one per token.
A comment line (`: ping`) goes out every `PING_INTERVAL_S` so proxies keep a quiet stream open,
and a stream in flight when the gateway stops gets `SHUTDOWN_GRACE_S` to finish.

The response owns what the request holds (its admission slot and relay: `generation.Generation`)
and closes it when the stream ends however it ends, even if the stream never started (a HEAD, a
client gone before the headers): the unfinished jobs are cancelled and the slot freed. An error after
the headers went out cannot change the status any more, so it is sent as one last `data:` message
in the route's dialect. A client that disconnects cancels the stream; the source is then closed,
so the relay's clean-up cancels the jobs on Redis.
"""

from __future__ import annotations

import contextlib
import logging
from collections.abc import AsyncGenerator, AsyncIterator, Callable
from typing import Protocol

import anyio
from redis.exceptions import RedisError
from sse_starlette import EventSourceResponse, ServerSentEvent
from starlette.types import Receive, Scope, Send

from gateway.errors import ApiError

logger = logging.getLogger("spindle.gateway")

PING_INTERVAL_S = 15.0  # keeps proxies from closing a stream that waits in a long queue
# When the gateway stops, a stream has this long to finish before it is cut (sse-starlette would
# cut it at once); under uvicorn's own timeout_graceful_shutdown (5 s, gateway/__main__.py), so
# the stream ends here, its clean-up run, before uvicorn cancels what is left.
SHUTDOWN_GRACE_S = 4.0
LINE_END = "\n"  # what sse_frames writes; pings use it too, so the stream has one line ending


class Held(Protocol):
    """What a streamed request holds until its response ends (`generation.Generation`)."""

    async def aclose(self) -> None: ...


def sse_frames(payloads: list[str]) -> bytes:
    """`data: <payload>\\n\\n` for each payload, as one buffer."""
    return "".join([f"data: {payload}\n\n" for payload in payloads]).encode()


def ping_comment() -> ServerSentEvent:
    """`: ping\\n\\n`, a comment line: SSE clients ignore it, proxies see traffic."""
    return ServerSentEvent(comment="ping", sep=LINE_END)


class SseResponse(EventSourceResponse):
    """Streams `source` as SSE until it ends or the client leaves, whichever comes first."""

    def __init__(
        self,
        held: Held,
        source: AsyncIterator[list[str]],
        render_error: Callable[[ApiError], str],
        ping_interval_s: float = PING_INTERVAL_S,
    ) -> None:
        super().__init__(
            _framed(source, render_error),
            ping=ping_interval_s,
            sep=LINE_END,
            ping_message_factory=ping_comment,
            shutdown_grace_period=SHUTDOWN_GRACE_S,
        )
        self._held = held
        self._source = source

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        try:
            # OSError: the client left while we wrote (ASGI 2.4 servers raise it; uvicorn does not).
            with contextlib.suppress(OSError):
                await super().__call__(scope, receive, send)
        finally:
            # Close the framing, then the source itself: a source that never started is not
            # closed by closing a framing that never started either.
            with anyio.CancelScope(shield=True):
                await _aclose(self.body_iterator)
                await _aclose(self._source)
                await self._held.aclose()


def sse_response(
    held: Held, source: AsyncIterator[list[str]], render_error: Callable[[ApiError], str]
) -> SseResponse:
    return SseResponse(held, source, render_error)


async def _aclose(source: object) -> None:
    aclose = getattr(source, "aclose", None)
    if aclose is not None:
        await aclose()


async def _framed(
    source: AsyncIterator[list[str]], render_error: Callable[[ApiError], str]
) -> AsyncGenerator[bytes, None]:
    """Each batch of payloads as one SSE buffer; a failure as one last message."""
    try:
        async with contextlib.aclosing(source):  # type: ignore[type-var]
            async for payloads in source:
                yield sse_frames(payloads)
    except ApiError as error:
        yield sse_frames([render_error(error)])
    except RedisError as err:
        logger.warning("redis failed during a stream: %s", err)
        yield sse_frames([render_error(ApiError(503, f"lost the connection to Redis: {err}"))])
    except Exception as err:
        logger.exception("unexpected error in a stream")
        message = f"internal error ({type(err).__name__}); see the gateway log"
        yield sse_frames([render_error(ApiError(500, message))])
