"""Puts a request's Jobs on Redis and relays the worker's Events back, per DESIGN.md's contract.

Order of operations: SUBSCRIBE to every job's `spindle:out:{id}` and wait for the confirmations,
then XADD the jobs, so no event can be published before anyone listens. Events are put back in
`seq` order and duplicates dropped (a resumed job may repeat one). A job is over when each of its
`n` choices has finished, or at its first `cancelled`/`error` event. If the reader stops early (the
client went away, the request timed out), the unfinished jobs are cancelled: their ids go out on
`spindle:cancel` and into `spindle:cancelled:{id}` (with a TTL) for jobs no worker has picked up.

One pub/sub connection per in-flight request, from the shared pool.
"""

from __future__ import annotations

import logging
import time
from collections.abc import AsyncIterator, Awaitable, Sequence
from dataclasses import dataclass, field

import anyio
from redis.asyncio import Redis
from redis.asyncio.client import PubSub
from redis.exceptions import RedisError

from common.keys import Keys
from common.protocol import Event, Job, ProtocolError
from gateway.errors import ApiError
from gateway.metrics import GatewayMetrics

logger = logging.getLogger("spindle.gateway")

CANCELLED_TTL_S = 3600  # long enough for a job to leave any queue it is waiting in
DEADLINE_GRACE_S = 5.0  # the worker ends a late job itself; wait a bit for its error event
SUBSCRIBE_TIMEOUT_S = 5.0
_POLL_S = 1.0


class SeqOrder:
    """One job's events in `seq` order, duplicates dropped, finished choices counted."""

    def __init__(self, n: int) -> None:
        self.n = n
        self.next_seq = 0
        self.pending: dict[int, Event] = {}
        self.finished: set[int] = set()
        self.failed = False

    @property
    def done(self) -> bool:
        return self.failed or len(self.finished) >= self.n

    def push(self, event: Event) -> list[Event]:
        """The events that are now ready, in order (usually just `event`)."""
        if event.seq < self.next_seq or event.seq in self.pending:
            return []
        self.pending[event.seq] = event
        ready = []
        while self.next_seq in self.pending:
            ready.append(self._release(self.pending.pop(self.next_seq)))
            self.next_seq += 1
        if self.pending and self._pending_would_finish():
            # A gap that can no longer fill (the terminal events are here): release the rest.
            for seq in sorted(self.pending):
                ready.append(self._release(self.pending.pop(seq)))
            self.next_seq = ready[-1].seq + 1
        return ready

    def _release(self, event: Event) -> Event:
        if event.finish in ("cancelled", "error"):
            self.failed = True
        elif event.finish is not None:
            self.finished.add(event.index)
        return event

    def _pending_would_finish(self) -> bool:
        finishing = {event.index for event in self.pending.values() if event.finish}
        failing = any(event.finish in ("cancelled", "error") for event in self.pending.values())
        return failing or len(self.finished | finishing) >= self.n


@dataclass
class RelayStats:
    """For the one log line per request."""

    started: float = field(default_factory=time.monotonic)
    first_event: float | None = None
    last_token: float | None = None  # when the latest token event arrived, for ITL
    completion_tokens: int = 0
    outcome: str = "incomplete"


class EventRelay:
    def __init__(self, redis: Redis, keys: Keys, metrics: GatewayMetrics | None = None) -> None:
        self._redis = redis
        self._keys = keys
        self._metrics = metrics or GatewayMetrics()

    async def run(self, jobs: Sequence[Job]) -> AsyncIterator[tuple[int, Event]]:
        """Yield (position of the job in `jobs`, event) until every job is over. Close the
        generator (`contextlib.aclosing`) to stop early; that cancels what is unfinished."""
        pubsub = self._redis.pubsub()
        orders = [SeqOrder(job.sampling.n) for job in jobs]
        channels = {self._keys.events(job.id): position for position, job in enumerate(jobs)}
        stats = RelayStats()
        try:
            await self._subscribe(pubsub, list(channels))
            await self._enqueue(jobs)
            async for position, event in self._read(pubsub, channels, orders, _wait_deadline(jobs)):
                stats.first_event = stats.first_event or time.monotonic()
                stats.completion_tokens += len(event.token_ids)
                self._observe_token_event(jobs[0].model, stats, bool(event.token_ids))
                if event.finish in ("cancelled", "error"):
                    stats.outcome = event.finish  # the reader usually stops here
                yield position, event
            if stats.outcome == "incomplete":
                stats.outcome = "finished"
        finally:
            with anyio.CancelScope(shield=True):
                unfinished = [
                    job.id for job, order in zip(jobs, orders, strict=True) if not order.done
                ]
                await self._cancel(unfinished)
                await _quietly(pubsub.aclose())
            _log_request(jobs, stats)
            self._observe_generation(jobs, stats)

    def _observe_token_event(self, model: str, stats: RelayStats, has_tokens: bool) -> None:
        if not has_tokens:
            return
        now = time.monotonic()
        if stats.last_token is not None:
            self._metrics.observe_token_gap(model, now - stats.last_token)
        stats.last_token = now

    def _observe_generation(self, jobs: Sequence[Job], stats: RelayStats) -> None:
        self._metrics.observe_generation(
            jobs[0].model,
            outcome=stats.outcome,
            prompt_tokens=sum(len(job.prompt_ids) for job in jobs),
            completion_tokens=stats.completion_tokens,
            ttft_s=stats.first_event - stats.started if stats.first_event else None,
            total_s=time.monotonic() - stats.started,
        )

    async def _subscribe(self, pubsub: PubSub, channels: list[str]) -> None:
        await pubsub.subscribe(*channels)
        confirmed = 0
        with anyio.move_on_after(SUBSCRIBE_TIMEOUT_S):
            while confirmed < len(channels):
                message = await pubsub.get_message(timeout=_POLL_S)
                if message is not None and message["type"] == "subscribe":
                    confirmed += 1
        if confirmed < len(channels):
            raise ApiError(
                503, f"Redis did not confirm the subscription in {SUBSCRIBE_TIMEOUT_S:g} s"
            )

    async def _enqueue(self, jobs: Sequence[Job]) -> None:
        pipe = self._redis.pipeline(transaction=False)
        for job in jobs:
            pipe.xadd(self._keys.requests(job.model), {"job": job.to_json()})
        await pipe.execute()

    async def _read(
        self,
        pubsub: PubSub,
        channels: dict[str, int],
        orders: list[SeqOrder],
        deadline: float | None,
    ) -> AsyncIterator[tuple[int, Event]]:
        while not all(order.done for order in orders):
            if deadline is not None and time.time() > deadline:
                raise ApiError(
                    504, "the request passed its deadline (--request-timeout) unfinished"
                )
            message = await pubsub.get_message(ignore_subscribe_messages=True, timeout=_POLL_S)
            if message is None or message["type"] != "message":
                continue
            channel = message["channel"]
            position = channels[channel.decode() if isinstance(channel, bytes) else channel]
            try:
                event = Event.from_json(message["data"])
            except ProtocolError as err:
                logger.warning("dropping a malformed event on %s: %s", channel, err)
                continue
            for ready in orders[position].push(event):
                yield position, ready

    async def _cancel(self, job_ids: list[str]) -> None:
        if not job_ids:
            return
        pipe = self._redis.pipeline(transaction=False)
        for job_id in job_ids:
            pipe.set(self._keys.cancelled(job_id), "1", ex=CANCELLED_TTL_S)
            pipe.publish(self._keys.cancel, job_id)
        await _quietly(pipe.execute())


def _wait_deadline(jobs: Sequence[Job]) -> float | None:
    deadlines = [job.deadline for job in jobs if job.deadline is not None]
    return max(deadlines) + DEADLINE_GRACE_S if deadlines else None


async def _quietly(awaitable: Awaitable[object]) -> None:
    """Clean-up must not hide the error that caused it."""
    try:
        await awaitable
    except (RedisError, OSError) as err:
        logger.warning("redis clean-up failed: %s", err)


def _log_request(jobs: Sequence[Job], stats: RelayStats) -> None:
    now = time.monotonic()
    ttft = f"{stats.first_event - stats.started:.3f}s" if stats.first_event else "-"
    logger.info(
        "request %s model=%s prompt_tokens=%d completion_tokens=%d ttft=%s total=%.3fs outcome=%s",
        jobs[0].id,
        jobs[0].model,
        sum(len(job.prompt_ids) for job in jobs),
        stats.completion_tokens,
        ttft,
        now - stats.started,
        stats.outcome,
    )
