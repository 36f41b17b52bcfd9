"""The worker's admission: after an idle spell, jobs arriving close together are gathered into the
first batch (`--burst-window-ms`) and the gathering is bounded; a busy worker never waits, its
pulls ride on its publishes; a lone pulled job starts before its cancel check is answered."""

from __future__ import annotations

import time
from types import SimpleNamespace

from common.protocol import Event, Job
from worker.job_queue import Delivery, StepReply
from worker.service import BURST_WINDOWS, IDLE_BLOCK_MS, WorkerService
from worker.settings import WorkerSettings


class ScriptedQueue:
    """Answers each pull with the next scripted batch (then nothing), recording the calls."""

    def __init__(self, batches, forever: bool = False):
        self.batches = list(batches)
        self.forever = forever
        self.calls: list[tuple[int, int | None]] = []

    def publish(self, events, finished, pull=0):
        """Each publish's pull finds two jobs."""
        return StepReply({}, [f"p{i}" for i in range(min(pull, 2))])

    def pull(self, count: int, block_ms: int | None):
        self.calls.append((count, block_ms))
        if self.forever:
            time.sleep(0.001)
            return [f"job{len(self.calls)}"]
        return self.batches.pop(0)[:count] if self.batches else []


def service(queue, *, running: int = 0, window_ms: float = 4.0, batch: int = 8):
    engine = SimpleNamespace(
        has_unfinished=running > 0, stats=lambda: {"waiting": 0, "running": running}
    )
    settings = WorkerSettings(model="unused", max_batch_size=batch, burst_window_ms=window_ms)
    return WorkerService(settings, engine, queue)  # type: ignore[arg-type]


def test_an_idle_worker_gathers_a_burst_into_one_batch():
    queue = ScriptedQueue([["a"], ["b"], ["c", "d"], []])
    assert service(queue)._pull() == ["a", "b", "c", "d"]
    assert queue.calls == [(8, IDLE_BLOCK_MS), (7, None), (6, None), (4, None)]


def test_gathering_stops_at_the_batch_size():
    queue = ScriptedQueue([["a", "b"], ["c", "d", "e"], ["f", "g", "h", "i"]])
    assert service(queue, batch=5)._pull() == ["a", "b", "c", "d", "e"]
    assert queue.calls == [(5, IDLE_BLOCK_MS), (3, None)]


def test_a_busy_worker_asks_for_its_free_slots_in_the_steps_publish_not_itself():
    queue = ScriptedQueue([["a"], ["b"]])
    busy = service(queue, running=3)
    assert busy._pull() == []
    assert queue.calls == []  # no round trip of its own
    assert busy._busy_pull_size() == 5
    busy.stopping = True
    assert busy._busy_pull_size() == 0  # a stopping worker takes no more work
    assert service(queue)._busy_pull_size() == 0  # an idle one blocks in `_pull` instead


def test_no_second_pull_while_the_first_ones_jobs_are_not_admitted():
    busy = service(ScriptedQueue([]), running=3)
    busy.publisher.submit([], {}, pull=5)
    assert busy._busy_pull_size() == 0
    assert busy.publisher.flush(timeout_s=5)
    assert busy._busy_pull_size() == 0  # answered, not yet taken
    assert busy.publisher.take_pulled() == ["p0", "p1"]
    assert busy._busy_pull_size() == 5


def test_an_idle_worker_first_admits_what_its_last_publish_pulled():
    queue = ScriptedQueue([["a"]])
    idle = service(queue)
    idle.publisher.submit([], {}, pull=3)
    assert idle._pull() == ["p0", "p1"]
    assert queue.calls == []


def test_window_zero_turns_gathering_off_and_nothing_queued_means_no_gathering():
    queue = ScriptedQueue([["a"], ["b"]])
    assert service(queue, window_ms=0)._pull() == ["a"]
    assert queue.calls == [(8, IDLE_BLOCK_MS)]
    empty = ScriptedQueue([])
    assert service(empty)._pull() == []
    assert empty.calls == [(8, IDLE_BLOCK_MS)]


def test_a_steady_trickle_is_gathered_for_a_bounded_time():
    queue = ScriptedQueue([], forever=True)
    started = time.monotonic()
    pulled = service(queue, window_ms=2.0, batch=10_000)._pull()
    elapsed = time.monotonic() - started
    assert 2 <= len(pulled) < 10_000
    assert elapsed < 2.0 * BURST_WINDOWS / 1000 + 0.5  # the cap, plus slack for a busy machine


def test_windows_are_slept_out_by_the_worker_not_blocked_on_in_redis():
    # Redis ends a short BLOCK that finds nothing only at its next timer tick (up to 100 ms at
    # the default hz 10), so after the first job every read is a non-blocking one.
    queue = ScriptedQueue([["a"]])
    started = time.monotonic()
    assert service(queue, window_ms=3.0)._pull() == ["a"]
    assert queue.calls == [(8, IDLE_BLOCK_MS), (7, None)]
    assert time.monotonic() - started >= 0.003  # one window was waited out


class CheckingQueue(ScriptedQueue):
    """Records when cancel checks are asked and answered; every job asked about is cancelled."""

    def __init__(self, log: list[str]):
        super().__init__([])
        self.log = log

    def cancelled(self, request_ids):
        self.log.append(f"check {len(request_ids)} then wait")
        return set()

    def check_cancelled(self, request_ids):
        self.log.append("ask")
        log = self.log

        class Check:
            def answer(self):
                log.append("answer")
                return set(request_ids)

        return Check()


def test_a_lone_pulled_job_starts_while_its_cancel_check_travels():
    """The idle worker's one wait between a lone request's XADD and its prefill was the cancel
    check: now the question goes out, the job starts, and the answer is read after the step;
    a job found cancelled then ends with its terminal event."""
    log: list[str] = []
    engine = SimpleNamespace(
        has_unfinished=False,
        stats=lambda: {"waiting": 0, "running": 0},
        add_request=lambda request_id, *args, **kwargs: log.append(f"start {request_id}"),
        abort_request=lambda request_id: (
            log.append(f"abort {request_id}") or [Event(request_id, 1, finish="cancelled")]
        ),
    )
    settings = WorkerSettings(model="unused")
    worker = WorkerService(settings, engine, CheckingQueue(log))  # type: ignore[arg-type]
    lone = Delivery("1-0", Job(id="r1", model="m", prompt_ids=[1, 2]))
    check = worker._admit_pulled([lone])
    assert log == ["ask", "start r1"]  # started before any answer
    events = worker._cancelled_before_start(check)
    assert log == ["ask", "start r1", "answer", "abort r1"]
    assert [(e.id, e.finish) for e in events] == [("r1", "cancelled")]

    log.clear()
    two = [Delivery(f"{i}-0", Job(id=f"b{i}", model="m", prompt_ids=[1])) for i in (2, 3)]
    assert worker._admit_pulled(two) is None
    assert log == ["check 2 then wait", "start b2", "start b3"]  # a burst is checked first
    assert worker._cancelled_before_start(None) == []
