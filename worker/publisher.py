"""The worker's outbox: a step's events go to Redis from a background thread, so the engine's
next step starts without waiting on the round trip (the pipelined PUBLISH/RPUSH/XACK of
`JobQueue.publish`, which also wakes Redis, the gateway and the client on this machine's cores).

One thread sends everything, in the order it was submitted, so a request's events keep their
order and its terminal event precedes its XACK. What each publish reports (the listener count per
request) is picked up by the service a step later, which its abandoned-request check allows for;
so are the jobs a publish pulled for a busy worker (`pull`): the engine's thread then never waits
on Redis while it has work.
A failed publish (Redis gone) is raised in the service's thread at its next call, as it was when
the service published itself: the worker stops and its jobs are claimed by another.
"""

from __future__ import annotations

import queue
import threading

from common.protocol import Event
from worker.job_queue import Delivery, JobQueue

Batch = tuple[list[Event], dict[str, str], int]  # events, finished request id -> message id, pull


class BackgroundPublisher:
    def __init__(self, job_queue: JobQueue) -> None:
        self._job_queue = job_queue
        self._batches: queue.SimpleQueue[Batch | None] = queue.SimpleQueue()
        self._state = threading.Condition()
        self._unsent = 0  # batches submitted and not yet sent (guarded by _state)
        self._listeners: dict[str, int] = {}  # reported since the last `take_listeners()`
        self._pulled: list[Delivery] = []  # jobs pulled since the last `take_pulled()`
        self._unanswered_pulls = 0  # submitted with pull > 0 and not yet sent
        self._error: BaseException | None = None
        self._thread = threading.Thread(target=self._run, name="spindle-publisher", daemon=True)
        self._thread.start()

    def submit(self, events: list[Event], finished: dict[str, str], pull: int = 0) -> None:
        """Queue one publish (that also takes up to `pull` new jobs); returns at once."""
        self._raise_if_failed()
        with self._state:
            self._unsent += 1
            self._unanswered_pulls += pull > 0
        self._batches.put((events, finished, pull))

    @property
    def pulling(self) -> bool:
        """Whether a submitted pull is unanswered, or its jobs not yet taken."""
        with self._state:
            return self._unanswered_pulls > 0 or bool(self._pulled)

    def take_pulled(self) -> list[Delivery]:
        """The jobs that publishes pulled since the previous call (now this worker's to run)."""
        self._raise_if_failed()
        with self._state:
            pulled, self._pulled = self._pulled, []
        return pulled

    def take_listeners(self) -> dict[str, int]:
        """Per request, the listener count of its last PUBLISH sent since the previous call."""
        self._raise_if_failed()
        with self._state:
            listeners, self._listeners = self._listeners, {}
        return listeners

    def flush(self, timeout_s: float | None = None) -> bool:
        """Wait until everything submitted has been sent; False if `timeout_s` ran out."""
        with self._state:
            done = self._state.wait_for(
                lambda: self._unsent == 0 or self._error is not None, timeout_s
            )
        self._raise_if_failed()
        return done

    def close(self, timeout_s: float | None = None) -> None:
        """Send what is queued, then stop the thread."""
        try:
            self.flush(timeout_s)
        finally:
            self._batches.put(None)
            self._thread.join(timeout_s)

    def _raise_if_failed(self) -> None:
        if self._error is not None:
            raise self._error

    def _run(self) -> None:
        while (batch := self._batches.get()) is not None:
            try:
                reply = self._job_queue.publish(*batch)
            except BaseException as err:  # handed to the service's thread, which stops
                with self._state:
                    self._error = err
                    self._state.notify_all()
                return
            with self._state:
                self._listeners.update(reply.listeners)
                self._pulled += reply.pulled
                self._unanswered_pulls -= batch[2] > 0
                self._unsent -= 1
                self._state.notify_all()
