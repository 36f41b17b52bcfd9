"""Admission control: refuse work (429 + Retry-After) rather than queue it without bound.

Two limits, per DESIGN.md: this process's own in-flight requests (`--max-concurrent-requests`),
checked here without Redis, and the model stream's length (`--max-queue`; XLEN counts queued and
running jobs, since workers XDEL a job only when it finishes). The stream's length is checked
twice: here on the registry's view (refreshed every 0.5 s), so a full queue answers 429 before a
streamed response sends its 200; and by the relay's enqueue script in the same round trip as the
XADD (`gateway/relay.py`), so gateways sharing a stream cannot overshoot it between a check and
an add (a streamed request refused there gets its 429 as the stream's error message).
"""

from __future__ import annotations

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
    def __init__(self, metrics: GatewayMetrics, *, max_concurrent: int, max_queue: int) -> None:
        self._metrics = metrics
        self._max_concurrent = max_concurrent
        self.max_queue = max_queue  # enforced when the jobs are added (EventRelay.start)
        self.in_flight = 0

    def admit(self, model: str, queued: int | None) -> Slot:
        """A slot for one request to `model`, whose stream held `queued` jobs when last read
        (None: unknown), or a 429 saying which limit is full."""
        if self.in_flight >= self._max_concurrent:
            raise _too_many(
                f"this gateway is serving {self.in_flight:,} requests, its limit "
                f"(--max-concurrent-requests {self._max_concurrent:,}); retry shortly"
            )
        if queued is not None and queued >= self.max_queue:
            raise queue_full_error(model, queued, self.max_queue)
        self._take()
        return Slot(self)

    def _take(self) -> None:
        self.in_flight += 1
        self._metrics.in_flight.set(self.in_flight)

    def _release(self) -> None:
        self.in_flight -= 1
        self._metrics.in_flight.set(self.in_flight)


def queue_full_error(model: str, queued: int, max_queue: int) -> ApiError:
    return _too_many(
        f"the queue of '{model}' holds {queued:,} requests, its limit "
        f"(--max-queue {max_queue:,}); retry shortly"
    )


def _too_many(message: str) -> ApiError:
    return ApiError(
        429, message, code="rate_limit_exceeded", headers={"Retry-After": str(RETRY_AFTER_S)}
    )
