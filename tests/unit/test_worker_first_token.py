"""The worker's publish of a step: a request's first token is sent before the next step starts
(the step waits for it); later tokens go to the background publisher and the loop moves on."""

from __future__ import annotations

import threading
import time
from types import SimpleNamespace

from common.protocol import Event, Job
from worker.job_queue import Delivery, StepReply
from worker.service import FIRST_TOKEN_SEND_S, WorkerService
from worker.settings import WorkerSettings


class SlowQueue:
    """A publish takes `send_s`; `sent` is set when one has finished."""

    def __init__(self, send_s: float) -> None:
        self.send_s = send_s
        self.sent = threading.Event()

    def publish(self, events, finished, pull=0):
        time.sleep(self.send_s)
        self.sent.set()
        return StepReply({}, [])


def running_service(queue: SlowQueue) -> WorkerService:
    engine = SimpleNamespace(has_unfinished=True, stats=lambda: {"waiting": 0, "running": 1})
    worker = WorkerService(WorkerSettings(model="unused"), engine, queue)  # type: ignore[arg-type]
    job = Job(id="r1", model="m", prompt_ids=[1, 2, 3])
    worker.flights.start(Delivery("1-0", job), resumed_tokens=0)
    return worker


def test_a_first_token_is_sent_before_the_next_step():
    queue = SlowQueue(FIRST_TOKEN_SEND_S / 4)
    worker = running_service(queue)
    worker._publish_step([Event("r1", 0, token_ids=[7], text="a")])
    assert queue.sent.is_set()  # returned only once Redis had it
    assert worker.flights.running["r1"].first_token is not None


def test_later_tokens_do_not_hold_up_the_next_step():
    queue = SlowQueue(send_s=0.5)
    worker = running_service(queue)
    worker.flights.running["r1"].first_token = time.time()  # its first token went out a step ago
    start = time.perf_counter()
    worker._publish_step([Event("r1", 1, token_ids=[8], text="b")])
    assert time.perf_counter() - start < 0.25
    assert not queue.sent.is_set()  # still being sent by the publisher thread
    assert worker.publisher.flush(timeout_s=5)
    assert queue.sent.is_set()
