"""Puts a request's Jobs on Redis and relays the worker's Events back, per DESIGN.md's contract.

`EventRelay.start(jobs)` runs in the route, before any response exists: it sends the SUBSCRIBE to
every job's `spindle:out:{id}` (a Redis that cannot be reached is then a 503, not a message inside
a 200 stream). The `Relay` it returns, when its `batches()` is first iterated, waits for Redis to
confirm the subscriptions and then adds the jobs, with one script that checks the model stream's
length first (`--max-queue`; 429 when full), so no event can be published before anyone listens
and the check and the add are one round trip. A streamed response iterates only after its headers
went out: the confirmation's round trip overlaps them, and once the job is in the stream, the
gateway has nothing left to do until the first token, and does not take CPU from a worker sharing
its cores while that worker prefills (on the 2-core Xeon, the headers sent after the XADD cost a
lone request's prefill step ~2 ms). A Redis that takes the SUBSCRIBE but never confirms it
(`subscriber.CONFIRM_TIMEOUT_S`) fails the stream with a 503 message. The admission check before
(`Admission`, on the registry's view of the stream) keeps a full queue's 429 a status code but for
a race.

The relay yields batches: all the events that arrived together, in `seq` order with duplicates
dropped (a resumed job may repeat one), so the response can send them in one write. A job is over
when each of its `n` choices has finished, or at its first `cancelled`/`error` event.
`Relay.aclose()` (also at the end of `batches()`) cancels the unfinished jobs: their ids go out on
`spindle:cancel` and into `spindle:cancelled:{id}` (with a TTL) for jobs no worker has picked up.
Whoever starts a relay closes it, however the request ends (`generation.Generation`, held by the
route's `async with` or by the SSE response).

Every request shares the process's one pub/sub connection (`gateway/subscriber.py`). The deadline
is one timer per request that fails the inbox with a 504.
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
from gateway.admission import queue_full_error
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


# KEYS[1]: the model's request stream. ARGV[1]: the queue limit; ARGV[2..]: the jobs' JSON.
# Returns {added, queued}: the jobs go in only while the stream holds fewer than the limit.
_ENQUEUE_SCRIPT = """
local queued = redis.call('XLEN', KEYS[1])
if queued >= tonumber(ARGV[1]) then
  return {0, queued}
end
for i = 2, #ARGV do
  redis.call('XADD', KEYS[1], '*', 'job', ARGV[i])
end
return {1, queued}
"""
UNLIMITED_QUEUE = 2**62


class EventRelay:
    def __init__(
        self,
        redis: Redis,
        keys: Keys,
        subscriber: Subscriber,
        metrics: GatewayMetrics | None = None,
    ) -> None:
        self.redis = redis
        self.keys = keys
        self.subscriber = subscriber
        self.metrics = metrics or GatewayMetrics()
        self._enqueue_script = redis.register_script(_ENQUEUE_SCRIPT)

    async def start(self, jobs: Sequence[Job], max_queue: int = UNLIMITED_QUEUE) -> Relay:
        """Subscribe to the jobs' channels (sent, not yet confirmed); the relay enqueues them
        when first iterated, once Redis confirmed the subscriptions, unless the model's stream
        holds `max_queue` jobs then (429). The caller closes the relay."""
        relay = Relay(self, jobs, max_queue)
        try:
            relay.inbox = await self.subscriber.subscribe(list(relay.channels))
        except BaseException:
            await relay.aclose()
            raise
        relay.timer = _deadline_timer(relay.inbox, _wait_deadline(jobs))
        return relay

    async def enqueue(self, jobs: Sequence[Job], max_queue: int) -> None:
        added, queued = await self._enqueue_script(
            keys=[self.keys.requests(jobs[0].model)],
            args=[max_queue, *(job.to_json() for job in jobs)],
        )
        if not added:
            raise queue_full_error(jobs[0].model, int(queued), max_queue)

    async def cancel(self, job_ids: list[str]) -> None:
        if not job_ids:
            return
        pipe = self.redis.pipeline(transaction=False)
        for job_id in job_ids:
            pipe.set(self.keys.cancelled(job_id), "1", ex=CANCELLED_TTL_S)
            pipe.publish(self.keys.cancel, job_id)
        await _quietly(pipe.execute())


class Relay:
    """One request's jobs, enqueued, and their events on the way back (`EventRelay.start`)."""

    def __init__(self, relays: EventRelay, jobs: Sequence[Job], max_queue: int) -> None:
        self._relays = relays
        self.jobs = jobs
        self.max_queue = max_queue
        self.orders = [SeqOrder(job.sampling.n) for job in jobs]
        self.channels = {
            relays.keys.events(job.id).encode(): position for position, job in enumerate(jobs)
        }
        self.stats = RelayStats()
        self.inbox: Inbox | None = None
        self.timer: asyncio.TimerHandle | None = None
        self.enqueued = False  # the jobs may be in the stream: cancel the unfinished at close
        self._closed = False

    async def batches(self) -> AsyncIterator[EventBatch]:
        """Wait for the subscriptions, enqueue the jobs, then yield batches of (position of the
        job in `jobs`, event) until every job is over; the relay is closed when this generator
        ends or is closed (`contextlib.aclosing`)."""
        assert self.inbox is not None, "a relay yields events once started (EventRelay.start)"
        token_gaps = self._relays.metrics.token_gaps(self.jobs[0].model)
        try:
            await self.inbox.confirmed()
            self.enqueued = True  # a failure from here may leave the jobs in the stream
            try:
                await self._relays.enqueue(self.jobs, self.max_queue)
            except ApiError:
                self.enqueued = False  # refused: nothing was added
                raise
            while not all(order.done for order in self.orders):
                batch = _in_order(await self.inbox.take(), self.channels, self.orders)
                if batch:
                    _observe_batch(batch, self.stats, token_gaps)
                    yield batch
            if self.stats.outcome == "incomplete":
                self.stats.outcome = "finished"
        finally:
            await self.aclose()

    async def aclose(self) -> None:
        """Cancel the unfinished jobs, unsubscribe, log the request; once, shielded from
        cancellation (it runs while a disconnected client's task is being cancelled)."""
        if self._closed:
            return
        self._closed = True
        with anyio.CancelScope(shield=True):
            if self.timer is not None:
                self.timer.cancel()
            if self.enqueued:
                unfinished = [
                    job.id
                    for job, order in zip(self.jobs, self.orders, strict=True)
                    if not order.done
                ]
                await self._relays.cancel(unfinished)
            if self.inbox is not None:
                await self._relays.subscriber.unsubscribe(self.inbox)
        if self.enqueued:
            _log_request(self.jobs, self.stats)
            self._observe_generation()

    def _observe_generation(self) -> None:
        stats = self.stats
        self._relays.metrics.observe_generation(
            self.jobs[0].model,
            outcome=stats.outcome,
            prompt_tokens=sum(len(job.prompt_ids) for job in self.jobs),
            completion_tokens=stats.completion_tokens,
            ttft_s=stats.first_event - stats.started if stats.first_event else None,
            total_s=time.monotonic() - stats.started,
        )


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
