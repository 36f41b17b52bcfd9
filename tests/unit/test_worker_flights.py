"""The worker's bookkeeping of its running requests: a pass's events become one publish of the
events of requests it runs (first tokens counted, finished requests XACKed and forgotten), and a
request nobody listens to is named for cancelling after SILENT_STEPS_BEFORE_CANCEL steps."""

from __future__ import annotations

from common.protocol import Event, Job, Usage
from worker.flights import SILENT_STEPS_BEFORE_CANCEL, Flights
from worker.job_queue import Delivery
from worker.metrics import WorkerMetrics


class RecordingPublisher:
    def __init__(self) -> None:
        self.submitted: list[tuple[list[Event], dict[str, str], int]] = []

    def submit(self, events, finished, pull=0):
        self.submitted.append((events, finished, pull))


def flights_running(*request_ids: str) -> tuple[Flights, RecordingPublisher]:
    publisher = RecordingPublisher()
    flights = Flights(publisher, WorkerMetrics())  # type: ignore[arg-type]
    for number, request_id in enumerate(request_ids):
        job = Job(id=request_id, model="m", prompt_ids=[1, 2, 3])
        flights.start(Delivery(f"{number}-0", job), resumed_tokens=0)
    return flights, publisher


def test_a_publish_counts_first_tokens_and_forgets_finished_requests():
    flights, publisher = flights_running("a", "b")
    events = [
        Event("a", 0, token_ids=[5], text="x"),
        Event("b", 0, token_ids=[6], text="y", finish="length", usage=Usage(3, 1)),
        Event("gone", 4, token_ids=[7]),  # a request this worker no longer runs
    ]
    assert flights.publish(events) == 2
    sent, finished, pull = publisher.submitted[-1]
    assert [event.id for event in sent] == ["a", "b"]
    assert finished == {"b": "1-0"} and pull == 0
    assert list(flights.running) == ["a"]
    assert flights.publish([Event("a", 1, token_ids=[8], text="z")]) == 0  # not its first
    assert flights.running["a"].tokens == 2


def test_an_empty_pass_publishes_only_when_it_pulls():
    flights, publisher = flights_running("a")
    assert flights.publish([]) == 0 and publisher.submitted == []
    flights.publish([], pull=3)
    assert publisher.submitted == [([], {}, 3)]


def test_a_request_nobody_hears_is_named_after_the_silent_steps():
    flights, _ = flights_running("heard", "silent")
    for _ in range(SILENT_STEPS_BEFORE_CANCEL - 1):
        assert flights.unheard({"heard": 1, "silent": 0}) == []
    assert flights.unheard({"heard": 0, "silent": 0, "gone": 0}) == ["silent"]
    assert flights.unheard({"heard": 1}) == []  # a listener back resets the count
    assert flights.running["heard"].silent_steps == 0
