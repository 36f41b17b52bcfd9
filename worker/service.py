"""The worker service: the loop that ties the engine to Redis.

    admit jobs (only as many as can start soon) -> engine.step() -> take cancels -> publish

The running requests and their output bookkeeping live in worker/flights.py. Publishing is
handed to a background thread (worker/publisher.py) so the next step does not wait on Redis —
except after a request's first token, whose send the next step waits for (TTFT). An idle worker
blocks in XREADGROUP (no busy loop); a busy one asks for jobs in its step's publish and admits
what that brought back at the next pass, so its thread never waits on a round trip of its own
(one per step had cost ~0.4 ms of a 20 ms step, with the engine's second core spinning idle
meanwhile). Every job ends with exactly one terminal event: finished, cancelled, refused (bad
input), timed out, or failed — and is then XACKed and XDELed. Jobs of dead workers are claimed and
resumed from their progress lists; a job delivered `max_deliveries` times goes to the dead letters
with an error event to its client.
"""

from __future__ import annotations

import functools
import logging
import os
import signal
import socket
import time
import uuid
from dataclasses import dataclass, field
from importlib.metadata import PackageNotFoundError, version

import redis

from common.chat import ModelCard
from common.keys import Keys
from common.protocol import ErrorInfo, Event, Job, Usage
from worker.engine.engine import LLMEngine, RequestError
from worker.flights import Flights
from worker.job_queue import CancelledCheck, Delivery, JobQueue
from worker.metrics import WorkerMetrics
from worker.publisher import BackgroundPublisher
from worker.settings import WorkerSettings

log = logging.getLogger("spindle.worker")

IDLE_BLOCK_MS = 1000  # how long an idle worker waits in XREADGROUP before its housekeeping
BURST_WINDOWS = 10  # a burst is gathered for at most this many burst windows
ORPHAN_SCAN_S = 2.0
FIRST_TOKEN_SEND_S = 0.05  # the longest the next step waits for a first token's publish


@dataclass
class WorkerService:
    settings: WorkerSettings
    engine: LLMEngine
    queue: JobQueue
    metrics: WorkerMetrics = field(default_factory=WorkerMetrics)
    stopping: bool = False
    _last_heartbeat: float = 0.0
    _last_orphan_scan: float = 0.0
    publisher: BackgroundPublisher = field(init=False)
    flights: Flights = field(init=False)  # the requests this worker runs

    def __post_init__(self) -> None:
        self.publisher = BackgroundPublisher(self.queue)
        self.flights = Flights(self.publisher, self.metrics)

    @classmethod
    def start(cls, settings: WorkerSettings) -> WorkerService:
        worker_id = (
            settings.worker_id or f"{socket.gethostname()}-{os.getpid()}-{uuid.uuid4().hex[:6]}"
        )
        engine = LLMEngine(settings.engine_config(), worker_id)
        client = redis.Redis.from_url(settings.redis_url)
        queue = JobQueue(client, Keys(settings.prefix), settings.model_name(), worker_id)
        card = ModelCard.from_folder(
            settings.model_name(),
            engine.files.root,
            max_input_tokens=engine.max_input_tokens,
            max_total_tokens=engine.max_total_tokens,
            eos_token_ids=engine.eos_token_ids,
        )
        queue.register(card)
        service = cls(settings, engine, queue)
        if settings.metrics_port is not None:
            service.metrics.serve(settings.metrics_port)
        return service

    # -- the loop -----------------------------------------------------------------------------

    def run(self) -> None:
        signal.signal(signal.SIGTERM, self._on_sigterm)
        signal.signal(signal.SIGINT, self._on_sigterm)
        self._heartbeat(force=True)
        log.info("worker %s serving %s", self.queue.worker_id, self.queue.model)
        deadline = None
        while True:
            if self.stopping:
                deadline = deadline or time.time() + self.settings.shutdown_timeout
                if not self.flights.running or time.time() > deadline:
                    break
            self.iterate()
        self._hand_back()

    def iterate(self) -> None:
        """One pass: housekeeping, admissions, one engine step, then one publish of the step's
        events and of the requests cancelled meanwhile (with a pull when busy)."""
        self._expire_deadlines()
        pulled = self.publisher.take_pulled()  # this worker's already: admitted when stopping
        if self.stopping:
            self._admit(pulled)
            lone_check = None
        else:
            self._admit(pulled + self._claim_orphans())
            lone_check = self._admit_pulled(self._pull())
        events = self._step()
        # Cancels are read here, before the publisher thread starts on this pass's send: the
        # read releases the GIL, and a busy publisher would then keep it for its whole send
        # (read first thing in the next pass, it waited 0.4-0.5 ms a pass).
        events += self._cancelled()
        events += self._cancelled_before_start(lone_check)
        self._publish_step(events)
        self._drop_abandoned(self.publisher.take_listeners())
        self._heartbeat()

    def _step(self) -> list[Event]:
        if not self.engine.has_unfinished:
            return []
        try:
            with self.metrics.step(self.engine):
                return self.engine.step()
        except Exception as err:  # a failed step must end its requests, not the worker
            log.exception("engine step failed; ending the running requests with an error")
            error = ErrorInfo(
                f"internal error in the worker: {type(err).__name__}", "internal_error"
            )
            return self.engine.abort_all("error", error)

    def _on_sigterm(self, signum, frame) -> None:
        log.info(
            "signal %d: taking no more work, finishing %d requests",
            signum,
            len(self.flights.running),
        )
        self.stopping = True

    # -- admission ----------------------------------------------------------------------------

    def _capacity(self) -> int:
        """How many new jobs to take: free batch slots, but none while sequences already wait
        (what cannot start soon stays in the stream for other workers)."""
        stats = self.engine.stats()
        if stats["waiting"]:
            return 0
        return max(0, self.settings.max_batch_size - stats["running"])

    def _pull(self) -> list[Delivery]:
        """New jobs for an idle worker, waiting up to IDLE_BLOCK_MS for the first one."""
        if self.engine.has_unfinished:
            return []  # a busy worker's pulls ride on its publishes (`_busy_pull_size`)
        self.publisher.flush()  # the last publish may have pulled: those come first
        if pulled := self.publisher.take_pulled():
            return pulled
        capacity = self._capacity()
        if capacity == 0:
            return []
        deliveries = self.queue.pull(capacity, IDLE_BLOCK_MS)
        if not deliveries:
            return []
        return deliveries + self._gather_burst(capacity - len(deliveries))

    def _gather_burst(self, capacity: int) -> list[Delivery]:
        """The jobs that follow the first one after an idle spell, while they keep arriving
        within `burst_window_ms` of each other (for at most BURST_WINDOWS windows). A burst of
        clients then starts in one batch instead of behind the first job's prefill step. Off by
        default: the burst's prefill work is the same either way, and on the 2-core EPYC the
        window cost a lone request far more than its length (a process that sleeps 2 ms wakes
        late; `single` TTFT end to end 45-58 ms with a 2 ms window, 41-45 ms without, in-process
        40 ms) while mixed-32 lost nothing without it (TTFT p99 2.49-2.56 s against 2.52-2.63 s,
        tok/s within noise; alternating runs).

        The worker sleeps out each window itself and then reads without blocking: a server-side
        `XREADGROUP BLOCK 4` that finds nothing returns only at Redis' next timer tick (`hz` 10:
        up to 100 ms; measured 94 ms), which a lone request paid in full as TTFT."""
        window_s = self.settings.burst_window_ms / 1000
        gathered: list[Delivery] = []
        if window_s <= 0:
            return gathered
        deadline = time.monotonic() + window_s * BURST_WINDOWS
        while len(gathered) < capacity and time.monotonic() < deadline:
            time.sleep(window_s)
            more = self.queue.pull(capacity - len(gathered), None)
            if not more:
                break
            gathered += more
        return gathered

    def _busy_pull_size(self) -> int:
        """How many jobs the step's publish should ask for: a busy worker's free slots, unless
        an earlier pull's jobs have not been admitted yet (they would be taken twice over)."""
        if self.stopping or not self.engine.has_unfinished or self.publisher.pulling:
            return 0
        return self._capacity()

    def _claim_orphans(self) -> list[Delivery]:
        now = time.time()
        if now - self._last_orphan_scan < ORPHAN_SCAN_S:
            return []
        capacity = self._capacity()
        if capacity == 0:
            return []
        self._last_orphan_scan = now
        min_idle_ms = int(self.settings.heartbeat_ttl * 1000)
        return self.queue.claim_orphans(min_idle_ms, capacity)

    def _admit_pulled(self, deliveries: list[Delivery]) -> CancelledCheck | None:
        """Admit what the idle pull brought. A lone job starts at once and its cancel check
        travels while it prefills (`_cancelled_before_start` reads it after the step): the
        check's round trip had been the worker's one wait between the XADD and the prefill of a
        lone request. More jobs are checked first, so a backlog of cancelled jobs (a worker
        starting behind a queue whose clients left) is not prefilled for nothing."""
        if len(deliveries) != 1:
            self._admit(deliveries)
            return None
        check = self.queue.check_cancelled([deliveries[0].job.id])
        self._admit(deliveries, set())
        return check

    def _cancelled_before_start(self, check: CancelledCheck | None) -> list[Event]:
        """The terminal events of the admitted requests that `check` found cancelled (their
        first step ran: its events go out before these, to nobody, as the gateway left)."""
        if check is None:
            return []
        events = []
        for request_id in check.answer():
            if request_id in self.flights.running:
                log.info("request %s was cancelled before it started: ending it", request_id)
                events += self.engine.abort_request(request_id)
        return events

    def _admit(self, deliveries: list[Delivery], cancelled: set[str] | None = None) -> None:
        """Start the deliveries, or end those that cannot run with their terminal event;
        `cancelled` is asked of Redis unless the caller knows it."""
        if cancelled is None:
            cancelled = self.queue.cancelled([d.job.id for d in deliveries])
        for delivery in deliveries:
            job = delivery.job
            if job.id in cancelled:
                self._refuse(delivery, "cancelled", None)
            elif job.deadline is not None and time.time() > job.deadline:
                self._refuse(
                    delivery, "error", ErrorInfo("the request timed out in the queue", "timeout")
                )
            elif delivery.deliveries > self.settings.max_deliveries:
                self._dead_letter(delivery)
            else:
                self._start(delivery)

    def _start(self, delivery: Delivery) -> None:
        job = delivery.job
        resumed = self.queue.progress(job.id) if delivery.deliveries > 1 else []
        try:
            self.engine.add_request(
                job.id,
                job.prompt_ids,
                job.params(),
                resume_output_ids=resumed,
                first_event_seq=len(resumed),
            )
        except RequestError as err:
            self._refuse(delivery, "error", ErrorInfo(str(err), "invalid_request_error"))
            return
        self.metrics.admitted(time.time() - job.created if job.created else 0.0)
        if resumed or delivery.deliveries > 1:
            self.metrics.resumed_jobs.inc()
            log.info(
                "resuming %s after %d tokens (delivery %d)",
                job.id,
                len(resumed),
                delivery.deliveries,
            )
        self.flights.start(delivery, len(resumed))

    def _refuse(self, delivery: Delivery, finish, error: ErrorInfo | None) -> None:
        """End a job that never entered the engine with its one terminal event."""
        job = delivery.job
        seq = job.resume_from
        events = [
            Event(
                id=job.id,
                seq=seq + i,
                index=i,
                finish=finish,
                error=error,
                usage=_empty_usage(job) if i == job.sampling.n - 1 else None,
                worker=self.queue.worker_id,
            )
            for i in range(job.sampling.n)
        ]
        self.publisher.submit(events, {job.id: delivery.message_id})
        self.metrics.finished(finish)
        log.info(
            "request %s ended before running: %s %s", job.id, finish, error.message if error else ""
        )

    def _dead_letter(self, delivery: Delivery) -> None:
        error = ErrorInfo(
            f"the request was abandoned by {delivery.deliveries - 1} workers that died running "
            f"it; it is kept in the dead letters",
            "dead_letter",
        )
        self.queue.dead_letter(delivery, error)
        self.metrics.dead_letters.inc()
        self._refuse(delivery, "error", error)

    # -- cancellation and deadlines -----------------------------------------------------------

    def _cancelled(self) -> list[Event]:
        """The terminal events of this worker's requests that a gateway cancelled."""
        return [
            event
            for request_id in self.queue.poll_cancels()
            if request_id in self.flights.running
            for event in self.engine.abort_request(request_id)
        ]

    def _expire_deadlines(self) -> None:
        now = time.time()
        for request_id, flight in list(self.flights.running.items()):
            deadline = flight.delivery.job.deadline
            if deadline is not None and now > deadline:
                error = ErrorInfo("the request timed out", "timeout")
                self.flights.publish(self.engine.abort_request(request_id, "error", error))

    # -- output -------------------------------------------------------------------------------

    def _publish_step(self, events: list[Event]) -> None:
        """A pass's publish; one that carries a request's first token is sent before the next
        step takes the cores (one round trip per request; `single` TTFT -3.6 ms, README)."""
        if self.flights.publish(events, pull=self._busy_pull_size()):
            self.publisher.flush(FIRST_TOKEN_SEND_S)

    def _drop_abandoned(self, listeners: dict[str, int]) -> None:
        """Cancel the requests nobody hears any more (their gateway died)."""
        for request_id in self.flights.unheard(listeners):
            log.info("request %s has no listener: cancelling", request_id)
            self.flights.publish(self.engine.abort_request(request_id))

    def _heartbeat(self, force: bool = False) -> None:
        stats = self.engine.stats()
        self.metrics.observe_engine(stats, self.engine.scheduler.num_preemptions)
        now = time.time()
        if not force and now - self._last_heartbeat < self.settings.heartbeat_ttl / 4:
            return
        self._last_heartbeat = now
        runner = self.engine.runner
        status = {
            **stats,
            "device": str(runner.device),
            "dtype": str(runner.dtype).removeprefix("torch."),
            "shards": self.engine.config.num_shard,
            "version": _version(),
            "stopping": self.stopping,
        }
        self.queue.heartbeat(status, self.settings.heartbeat_ttl)

    def _hand_back(self) -> None:
        """On shutdown, unfinished jobs stay pending in the stream; removing the heartbeat lets
        another worker claim and resume them at once."""
        self.publisher.close(timeout_s=10)
        if self.flights.running:
            log.info("handing back %d unfinished requests", len(self.flights.running))
        self.queue.unregister()
        self.queue.close()


def _empty_usage(job: Job) -> Usage:
    return Usage(prompt_tokens=len(job.prompt_ids), completion_tokens=job.resume_from)


@functools.cache
def _version() -> str:
    try:
        return version("spindle")
    except PackageNotFoundError:
        return "0+unknown"
