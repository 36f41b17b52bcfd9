"""The worker's admission: after an idle spell, jobs arriving close together are gathered into the
first batch (`--burst-window-ms`) and the gathering is bounded; a busy worker never waits, its
pulls ride on its publishes."""

from __future__ import annotations

import time
from types import SimpleNamespace

from worker.job_queue import StepReply
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
