"""Puts a request's Jobs on Redis and relays the worker's Events back, per DESIGN.md's contract.

Order of operations: SUBSCRIBE to every job's `spindle:out:{id}` and wait for the confirmations,
then XADD the jobs, so no event can be published before anyone listens. Events are put back in
`seq` order and duplicates dropped (a resumed job may repeat one). A job is over when each of its
`n` choices has finished, or at its first `cancelled`/`error` event. If the reader stops early (the
client went away, the request timed out), the unfinished jobs are cancelled: their ids go out on
`spindle:cancel` and into `spindle:cancelled:{id}` (with a TTL) for jobs no worker has picked up.

Every request shares the process's one pub/sub connection (`gateway/subscriber.py`). The relay
yields batches: all the events that arrived together, in order, so the response can send them in
one write. The deadline is one timer per request that fails the inbox with a 504.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import AsyncIterator, Awaitable, Sequence
from dataclasses import dataclass, field

import anyio
from prometheus_client import Histogram
from redis.asyncio import Redis
from redis.exceptions import RedisError

from common.keys import Keys
from common.protocol import Event, Job, ProtocolError
from gateway.errors import ApiError
from gateway.metrics import GatewayMetrics
from gateway.subscriber import Inbox, Message, Subscriber

logger = logging.getLogger("spindle.gateway")

CANCELLED_TTL_S = 3600  # long enough for a job to leave any queue it is waiting in
DEADLINE_GRACE_S = 5.0  # the worker ends a late job itself; wait a bit for its error event


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


EventBatch = list[tuple[int, Event]]  # (position of the job in the request, event), in order


class EventRelay:
    def __init__(
        self,
        redis: Redis,
        keys: Keys,
        subscriber: Subscriber,
        metrics: GatewayMetrics | None = None,
    ) -> None:
        self._redis = redis
        self._keys = keys
        self._subscriber = subscriber
        self._metrics = metrics or GatewayMetrics()

    async def run(self, jobs: Sequence[Job]) -> AsyncIterator[EventBatch]:
        """Yield batches of (position of the job in `jobs`, event) until every job is over.
        Close the generator (`contextlib.aclosing`) to stop early; that cancels what is
        unfinished."""
        orders = [SeqOrder(job.sampling.n) for job in jobs]
        channels = {
            self._keys.events(job.id).encode(): position for position, job in enumerate(jobs)
        }
        stats = RelayStats()
        token_gaps = self._metrics.token_gaps(jobs[0].model)
        inbox: Inbox | None = None
        timer: asyncio.TimerHandle | None = None
        try:
            inbox = await self._subscriber.subscribe(list(channels))
            timer = _deadline_timer(inbox, _wait_deadline(jobs))
            await self._enqueue(jobs)
            while not all(order.done for order in orders):
                batch = _in_order(await inbox.take(), channels, orders)
                if batch:
                    _observe_batch(batch, stats, token_gaps)
                    yield batch
            if stats.outcome == "incomplete":
                stats.outcome = "finished"
        finally:
            if timer is not None:
                timer.cancel()
            with anyio.CancelScope(shield=True):
                unfinished = [
                    job.id for job, order in zip(jobs, orders, strict=True) if not order.done
                ]
                await self._cancel(unfinished)
                if inbox is not None:
                    await self._subscriber.unsubscribe(inbox)
            _log_request(jobs, stats)
            self._observe_generation(jobs, stats)

    def _observe_generation(self, jobs: Sequence[Job], stats: RelayStats) -> None:
        self._metrics.observe_generation(
            jobs[0].model,
            outcome=stats.outcome,
            prompt_tokens=sum(len(job.prompt_ids) for job in jobs),
            completion_tokens=stats.completion_tokens,
            ttft_s=stats.first_event - stats.started if stats.first_event else None,
            total_s=time.monotonic() - stats.started,
        )

    async def _enqueue(self, jobs: Sequence[Job]) -> None:
        pipe = self._redis.pipeline(transaction=False)
        for job in jobs:
            pipe.xadd(self._keys.requests(job.model), {"job": job.to_json()})
        await pipe.execute()

    async def _cancel(self, job_ids: list[str]) -> None:
        if not job_ids:
            return
        pipe = self._redis.pipeline(transaction=False)
        for job_id in job_ids:
            pipe.set(self._keys.cancelled(job_id), "1", ex=CANCELLED_TTL_S)
            pipe.publish(self._keys.cancel, job_id)
        await _quietly(pipe.execute())


def _in_order(
    messages: list[Message], channels: dict[bytes, int], orders: list[SeqOrder]
) -> EventBatch:
    """The events that `messages` make ready, job by job in `seq` order; a job that is over
    takes no more events."""
    batch: EventBatch = []
    for channel, data in messages:
        position = channels[channel]
        order = orders[position]
        if order.done:
            continue
        try:
            event = Event.from_json(data)
        except ProtocolError as err:
            logger.warning("dropping a malformed event on %s: %s", channel.decode(), err)
            continue
        batch.extend((position, ready) for ready in order.push(event))
    return batch


def _observe_batch(batch: EventBatch, stats: RelayStats, token_gaps: Histogram) -> None:
    """Counts and latencies: the events of one batch arrived together, so the first token event
    carries the gap since the previous batch and the others a gap of zero."""
    now = time.monotonic()
    stats.first_event = stats.first_event or now
    for _, event in batch:
        if event.finish in ("cancelled", "error"):
            stats.outcome = event.finish  # the reader usually stops here
        if not event.token_ids:
            continue
        stats.completion_tokens += len(event.token_ids)
        if stats.last_token is not None:
            token_gaps.observe(now - stats.last_token)
        stats.last_token = now


def _deadline_timer(inbox: Inbox, deadline: float | None) -> asyncio.TimerHandle | None:
    """Past the deadline (unix seconds) the inbox fails with a 504."""
    if deadline is None:
        return None
    error = ApiError(504, "the request passed its deadline (--request-timeout) unfinished")
    return asyncio.get_running_loop().call_later(deadline - time.time(), inbox.fail, error)


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
