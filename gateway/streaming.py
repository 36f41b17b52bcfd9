"""Server-Sent Events responses (sse-starlette) that never end in a traceback.

The stream owns the request's admission slot and releases it when the stream ends however it
ends. An error after the headers went out cannot change the status any more, so it is sent as one
last `data:` message in the route's dialect. A client that disconnects cancels the stream; the
relay's clean-up then cancels the jobs on Redis.
"""

from __future__ import annotations

import contextlib
import logging
from collections.abc import AsyncIterator, Callable

from redis.exceptions import RedisError
from sse_starlette import EventSourceResponse
from starlette.types import Receive, Scope, Send

from gateway.admission import Slot
from gateway.errors import ApiError

logger = logging.getLogger("spindle.gateway")

PING_INTERVAL_S = 15  # keeps proxies from closing a stream that waits in a long queue


class _SlotEventSourceResponse(EventSourceResponse):
    """Also releases the slot when the response ends before the stream ever started (a client
    that left at once): an async generator that never ran does not run its `finally`."""

    def __init__(self, slot: Slot, content: AsyncIterator[str]) -> None:
        super().__init__(content, ping=PING_INTERVAL_S, sep="\n")
        self._slot = slot

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        try:
            await super().__call__(scope, receive, send)
        finally:
            self._slot.release()


def sse_response(
    slot: Slot, source: AsyncIterator[str], render_error: Callable[[ApiError], str]
) -> EventSourceResponse:
    return _SlotEventSourceResponse(slot, _guarded(slot, source, render_error))


async def _guarded(
    slot: Slot, source: AsyncIterator[str], render_error: Callable[[ApiError], str]
) -> AsyncIterator[str]:
    try:
        async with contextlib.aclosing(source):  # type: ignore[type-var]
            async for data in source:
                yield data
    except ApiError as error:
        yield render_error(error)
    except RedisError as err:
        logger.warning("redis failed during a stream: %s", err)
        yield render_error(ApiError(503, f"lost the connection to Redis: {err}"))
    except Exception as err:
        logger.exception("unexpected error in a stream")
        yield render_error(
            ApiError(500, f"internal error ({type(err).__name__}); see the gateway log")
        )
    finally:
        slot.release()
