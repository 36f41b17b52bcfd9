"""The worker's side of Redis (worker/job_queue.py) against a real redis-server: a step's events
published in one round trip, with each job's progress list kept (and kept alive) for resumption
and dropped when the job ends, and new jobs pulled in the same round trip."""

from __future__ import annotations

import pytest
import redis

from common.keys import Keys
from common.protocol import Event, Job, Usage
from worker import job_queue
from worker.job_queue import PROGRESS_TTL_S, JobQueue


def make_queue(redis_server, prefix: str) -> tuple[JobQueue, redis.Redis]:
    client = redis.Redis.from_url(redis_server.url)
    return JobQueue(client, Keys(prefix), "m", "w1"), client


def test_progress_lists_keep_every_token_with_a_ttl_set_once_per_half_ttl(
    redis_server, unique_prefix, monkeypatch
):
    queue, client = make_queue(redis_server, unique_prefix)
    keys = Keys(unique_prefix)
    progress = keys.progress("r1")
    expires = []
    real_refresh = queue._refresh_progress_ttl

    def counting_refresh(pipe, request_id, now):
        before = len(pipe)
        real_refresh(pipe, request_id, now)
        expires.extend(range(len(pipe) - before))

    monkeypatch.setattr(queue, "_refresh_progress_ttl", counting_refresh)
    for seq, token in enumerate([11, 12, 13]):
        queue.publish([Event(id="r1", seq=seq, token_ids=[token], text="x")], {})
    assert [int(t) for t in client.lrange(progress, 0, -1)] == [11, 12, 13]
    assert 0 < client.ttl(progress) <= PROGRESS_TTL_S
    assert len(expires) == 1  # the first step's EXPIRE, not one per token

    clock = [0.0]
    monkeypatch.setattr(job_queue.time, "monotonic", lambda: clock[0] + 10 * PROGRESS_TTL_S)
    client.persist(progress)
    queue.publish([Event(id="r1", seq=3, token_ids=[14], text="x")], {})
    assert client.ttl(progress) > 0  # refreshed once half the TTL had passed
    assert len(expires) == 2


def test_a_finished_job_is_acked_deleted_and_its_progress_dropped(redis_server, unique_prefix):
    queue, client = make_queue(redis_server, unique_prefix)
    keys = Keys(unique_prefix)
    message_id = client.xadd(queue.stream, {"job": "{}"}).decode()
    client.xreadgroup(job_queue.WORKER_GROUP, "w1", {queue.stream: ">"}, count=1)
    queue.publish([Event(id="r2", seq=0, token_ids=[5], text="a")], {})
    pubsub = client.pubsub()
    pubsub.subscribe(keys.events("r2"))
    pubsub.get_message(timeout=1)  # the subscription's confirmation
    usage = Usage(prompt_tokens=3, completion_tokens=1)
    reply = queue.publish([Event(id="r2", seq=1, finish="length", usage=usage)], {"r2": message_id})
    assert reply.listeners == {"r2": 1} and reply.pulled == []
    assert client.exists(keys.progress("r2")) == 0
    assert client.xlen(queue.stream) == 0
    assert "r2" not in queue._progress_ttl_set
    message = pubsub.get_message(timeout=1)
    assert message is not None and Event.from_json(message["data"]).finish == "length"
    pubsub.close()


def test_a_publish_can_pull_new_jobs_in_the_same_round_trip(redis_server, unique_prefix):
    queue, client = make_queue(redis_server, unique_prefix)
    jobs = [Job(id=f"j{i}", model="m", prompt_ids=[1, 2, i]) for i in range(3)]
    for job in jobs:
        client.xadd(queue.stream, {"job": job.to_json()})
    client.xadd(queue.stream, {"job": "not json"})  # dead-lettered, not delivered

    reply = queue.publish([Event(id="r3", seq=0, token_ids=[5], text="a")], {}, pull=2)
    assert [d.job for d in reply.pulled] == jobs[:2]
    assert all(d.deliveries == 1 and d.message_id for d in reply.pulled)
    assert [int(t) for t in client.lrange(Keys(unique_prefix).progress("r3"), 0, -1)] == [5]

    rest = queue.publish([], {}, pull=5)
    assert [d.job for d in rest.pulled] == jobs[2:] and rest.listeners == {}
    assert client.xlen(Keys(unique_prefix).dead("m")) == 1
    assert queue.publish([], {}, pull=5).pulled == []
    pending = client.xpending(queue.stream, job_queue.WORKER_GROUP)["pending"]
    assert pending == 3  # the three jobs are this worker's until it acknowledges them


def test_an_error_reply_is_raised_and_the_next_publish_starts_clean(redis_server, unique_prefix):
    queue, client = make_queue(redis_server, unique_prefix)
    keys = Keys(unique_prefix)
    client.set(keys.progress("r4"), "not a list")  # RPUSH onto it is a WRONGTYPE error
    with pytest.raises(redis.ResponseError, match="WRONGTYPE"):
        queue.publish([Event(id="r4", seq=0, token_ids=[5], text="a")], {})
    client.delete(keys.progress("r4"))
    reply = queue.publish([Event(id="r4", seq=1, token_ids=[6], text="b")], {})
    assert reply.listeners == {"r4": 0}  # the replies are this publish's, not the last one's
    assert client.lrange(keys.progress("r4"), 0, -1) == [b"6"]


def test_a_cancel_check_is_asked_now_and_answered_later(redis_server, unique_prefix):
    """`check_cancelled` sends its question at once and reads the reply when asked, while the
    worker meanwhile uses Redis for other things (the publisher's own connection)."""
    queue, client = make_queue(redis_server, unique_prefix)
    keys = Keys(unique_prefix)
    client.set(keys.cancelled("gone"), "1")
    in_use = set(client.connection_pool._in_use_connections)  # the cancel subscription's
    check = queue.check_cancelled(["gone", "here"])
    queue.publish([Event(id="here", seq=0, token_ids=[5], text="a")], {})  # meanwhile
    assert check.answer() == {"gone"}
    with pytest.raises(RuntimeError):
        check.answer()  # one answer per question
    client.set(keys.cancelled("here"), "1")
    assert queue.cancelled(["gone", "here", "new"]) == {"gone", "here"}
    assert queue.check_cancelled([]).answer() == set()
    assert client.connection_pool._in_use_connections == in_use  # every connection given back
