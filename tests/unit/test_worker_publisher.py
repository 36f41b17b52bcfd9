"""worker/publisher.py: the worker's events leave from a background thread in submission order,
their listener counts and pulled jobs come back on the next call, and a failed publish stops the
service's thread instead of vanishing."""

from __future__ import annotations

import threading

import pytest

from common.protocol import Event
from worker.job_queue import StepReply
from worker.publisher import BackgroundPublisher


class RecordingQueue:
    """Stands in for JobQueue.publish: records batches, optionally held at a gate or failing."""

    def __init__(self, gate: threading.Event | None = None, fail: bool = False):
        self.batches: list[tuple[list[str], dict[str, str]]] = []
        self.gate = gate
        self.fail = fail

    def publish(self, events, finished, pull=0):
        if self.gate is not None:
            self.gate.wait(5)
        if self.fail:
            raise ConnectionError("redis went away")
        self.batches.append(([e.id for e in events], dict(finished)))
        return StepReply({e.id: 1 for e in events}, [f"job{i}" for i in range(pull)])


def event(request_id: str, seq: int = 0) -> Event:
    return Event(id=request_id, seq=seq, token_ids=[seq], text="x")


def test_batches_are_sent_in_order_and_submit_does_not_wait_for_them():
    gate = threading.Event()
    job_queue = RecordingQueue(gate)
    publisher = BackgroundPublisher(job_queue)  # type: ignore[arg-type]
    publisher.submit([event("a", 0)], {})
    publisher.submit([event("a", 1), event("b", 0)], {"a": "1-0"})
    assert job_queue.batches == []  # both queued while the first send is held up
    assert publisher.flush(timeout_s=0.05) is False
    gate.set()
    assert publisher.flush(timeout_s=5) is True
    assert job_queue.batches == [(["a"], {}), (["a", "b"], {"a": "1-0"})]
    assert publisher.take_listeners() == {"a": 1, "b": 1}
    assert publisher.take_listeners() == {}  # each count is reported once
    publisher.close(timeout_s=5)


def test_pulled_jobs_are_handed_over_once_and_pulling_covers_them_until_taken():
    gate = threading.Event()
    publisher = BackgroundPublisher(RecordingQueue(gate))  # type: ignore[arg-type]
    assert publisher.pulling is False
    publisher.submit([event("a")], {}, pull=2)
    assert publisher.pulling is True  # unanswered
    assert publisher.take_pulled() == []
    gate.set()
    assert publisher.flush(timeout_s=5) is True
    assert publisher.pulling is True  # answered, but its jobs are not taken yet
    assert publisher.take_pulled() == ["job0", "job1"]
    assert publisher.pulling is False
    assert publisher.take_pulled() == []
    publisher.submit([event("a", 1)], {})  # no pull
    assert publisher.flush(timeout_s=5) is True
    assert publisher.pulling is False and publisher.take_pulled() == []
    publisher.close(timeout_s=5)


def test_a_failed_publish_is_raised_in_the_callers_thread():
    publisher = BackgroundPublisher(RecordingQueue(fail=True))  # type: ignore[arg-type]
    publisher.submit([event("a")], {})
    with pytest.raises(ConnectionError, match="redis went away"):
        publisher.flush(timeout_s=5)
    with pytest.raises(ConnectionError):
        publisher.submit([event("a", 1)], {})
    with pytest.raises(ConnectionError):
        publisher.take_listeners()
