"""Admission control: refuse work (429 + Retry-After) rather than queue it without bound.

Two limits, per DESIGN.md: this process's own in-flight requests (`--max-concurrent-requests`),
and the model stream's length (`--max-queue`; XLEN counts queued and running jobs, since workers
XDEL a job only when it finishes).
"""

from __future__ import annotations

from redis.asyncio import Redis

from common.keys import Keys
from gateway.errors import ApiError
from gateway.metrics import GatewayMetrics

RETRY_AFTER_S = 1


class Slot:
    """One admitted request's place; `release()` is idempotent."""

    def __init__(self, admission: Admission) -> None:
        self._admission = admission
        self._held = True

    def release(self) -> None:
        if self._held:
            self._held = False
            self._admission._release()

    def __enter__(self) -> Slot:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.release()


class Admission:
    def __init__(
        self,
        redis: Redis,
        keys: Keys,
        metrics: GatewayMetrics,
        *,
        max_concurrent: int,
        max_queue: int,
    ) -> None:
        self._redis = redis
        self._keys = keys
        self._metrics = metrics
        self._max_concurrent = max_concurrent
        self._max_queue = max_queue
        self.in_flight = 0

    async def admit(self, model: str) -> Slot:
        """A slot for one request to `model`, or a 429 saying which limit is full."""
        if self.in_flight >= self._max_concurrent:
            raise _too_many(
                f"this gateway is serving {self.in_flight:,} requests, its limit "
                f"(--max-concurrent-requests {self._max_concurrent:,}); retry shortly"
            )
        # Count this request before awaiting Redis, so concurrent arrivals cannot overshoot.
        self._take()
        try:
            queued = await self._redis.xlen(self._keys.requests(model))
        except BaseException:
            self._release()
            raise
        if queued >= self._max_queue:
            self._release()
            raise _too_many(
                f"the queue of '{model}' holds {queued:,} requests, its limit "
                f"(--max-queue {self._max_queue:,}); retry shortly"
            )
        return Slot(self)

    def _take(self) -> None:
        self.in_flight += 1
        self._metrics.in_flight.set(self.in_flight)

    def _release(self) -> None:
        self.in_flight -= 1
        self._metrics.in_flight.set(self.in_flight)


def _too_many(message: str) -> ApiError:
    return ApiError(
        429, message, code="rate_limit_exceeded", headers={"Retry-After": str(RETRY_AFTER_S)}
    )
