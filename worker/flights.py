"""The requests a worker is running, and the bookkeeping of their output.

`Flights.publish` turns a pass's events into one publish: it keeps only the events of requests
this worker runs, stamps each request's first token (the service sends a publish that carries one
before its next step), counts tokens for the metrics, hands each finished request's stream message
id to the publisher (its XACK follows the terminal event) and writes the request's log line.
`Flights.unheard` counts the steps a request's events found no listener, so the service can cancel
what nobody reads any more (its gateway died).
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass, field

from common.protocol import Event
from worker.job_queue import Delivery
from worker.metrics import WorkerMetrics
from worker.publisher import BackgroundPublisher

log = logging.getLogger("spindle.worker")

SILENT_STEPS_BEFORE_CANCEL = 3  # steps with no listener before a streamed request is dropped


@dataclass
class InFlight:
    """A job this worker runs: where it came from and its timings for the request log line."""

    delivery: Delivery
    admitted: float
    first_token: float | None = None
    silent_steps: int = 0
    tokens: int = 0
    finish: str | None = None


@dataclass
class Flights:
    """This worker's running requests by id, and what their events do once stepped."""

    publisher: BackgroundPublisher
    metrics: WorkerMetrics
    running: dict[str, InFlight] = field(default_factory=dict)

    def start(self, delivery: Delivery, resumed_tokens: int) -> None:
        self.running[delivery.job.id] = InFlight(delivery, time.time(), tokens=resumed_tokens)

    def publish(self, events: list[Event], pull: int = 0) -> int:
        """Hand the events to the publisher; returns how many requests got their first token."""
        if not events and not pull:
            return 0
        first_tokens = 0
        now = time.time()
        finished: dict[str, str] = {}
        known = []
        for event in events:
            flight = self.running.get(event.id)
            if flight is None:
                continue
            known.append(event)
            if event.token_ids:
                first_tokens += flight.first_token is None
                flight.first_token = flight.first_token or now
                flight.tokens += len(event.token_ids)
                self.metrics.generated_tokens.inc(len(event.token_ids))
            if event.usage is not None:
                finished[event.id] = flight.delivery.message_id
                flight.finish = event.finish
        self.publisher.submit(known, finished, pull)
        for request_id in finished:
            self._log_finished(self.running.pop(request_id), now)
        return first_tokens

    def unheard(self, listeners: dict[str, int]) -> list[str]:
        """The requests whose events nobody heard for SILENT_STEPS_BEFORE_CANCEL steps in a row
        (`listeners`: what the publishes sent since the last pass reported, once per pass)."""
        unheard = []
        for request_id, count in listeners.items():
            flight = self.running.get(request_id)
            if flight is None:
                continue
            flight.silent_steps = 0 if count else flight.silent_steps + 1
            if flight.silent_steps >= SILENT_STEPS_BEFORE_CANCEL:
                unheard.append(request_id)
        return unheard

    def _log_finished(self, flight: InFlight, now: float) -> None:
        job = flight.delivery.job
        self.metrics.finished(flight.finish)
        queue_s = max(0.0, flight.admitted - job.created) if job.created else 0.0
        ttft = (flight.first_token - flight.admitted) if flight.first_token else None
        log.info(
            "request id=%s model=%s prompt_tokens=%d completion_tokens=%d finish=%s "
            "queue=%.3fs ttft=%s total=%.3fs",
            job.id,
            job.model,
            len(job.prompt_ids),
            flight.tokens,
            flight.finish,
            queue_s,
            f"{ttft:.3f}s" if ttft is not None else "-",
            now - flight.admitted,
        )
