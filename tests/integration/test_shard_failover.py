"""A tensor-parallel worker group whose shard rank dies mid-generation: the whole group ends at
once (its driver logs the dead rank and exits with code 75), its heartbeat expires, and a plain
worker on the same stream resumes every one of its jobs from the progress lists — each client gets
exactly the greedy tokens and text it would have got from one worker alone, its event `seq`
numbers contiguous across the two workers, and one terminal event, finish "length".

The group serves a tiny random Llama (4 heads, 2 KV heads: it splits over 2 ranks, which the
demo model's 9 heads do not) so the test loads in seconds; its jobs are long enough that the kill
lands mid-generation, and the test checks that it did.
"""

from __future__ import annotations

import os
import re
import signal
import time
import uuid
from pathlib import Path

import pytest
import redis
from tokenizers import Tokenizer
from transformers import AutoConfig, AutoModelForCausalLM

from common.keys import WORKER_GROUP, Keys
from common.protocol import Event, Job, Sampling
from tests.integration.conftest import RedisServer
from tests.integration.service_fixtures import (  # noqa: F401 (an autouse fixture)
    START_TIMEOUT_S,
    JobChannel,
    WorkerProcess,
    children_of,
    send_job,
    service_logs_on_failure,
    spawn_worker,
    transformers_greedy,
    wait_for,
    wait_for_worker,
)
from tests.model.conftest import build_tiny_model
from worker.parallel.group import RANK_DIED_EXIT_CODE, valid_shard_counts

pytestmark = pytest.mark.slow  # three worker processes and a shard rank

NUM_SHARD = 2
ANSWER_TOKENS = 240  # long enough that 4 streamed tokens are far from the end on any machine
TOKENS_BEFORE_KILL = 4
GROUP_EXIT_TIMEOUT_S = 10.0
PROMPTS = [
    "The quick brown fox",
    "Paged attention keeps",
    "def add(a, b):",
]
SHARD_PIDS_LINE = re.compile(r"shard pids \[(\d+)\]")
RESUMED_LINE = re.compile(r"resuming (\S+) after (\d+) tokens")


@pytest.fixture(scope="module")
def tiny_llama(tmp_path_factory: pytest.TempPathFactory) -> Path:
    path = build_tiny_model("llama", tmp_path_factory.mktemp("failover") / "tiny-llama")
    assert NUM_SHARD in valid_shard_counts(AutoConfig.from_pretrained(path))
    return path


@pytest.fixture(scope="module")
def references(tiny_llama: Path) -> dict[str, tuple[list[int], list[int]]]:
    """Prompt -> (prompt ids, transformers' greedy continuation), each computed alone."""
    tokenizer = Tokenizer.from_file(str(tiny_llama / "tokenizer.json"))
    model = AutoModelForCausalLM.from_pretrained(tiny_llama).eval()
    found = {}
    for prompt in PROMPTS:
        prompt_ids = tokenizer.encode(prompt).ids
        found[prompt] = (prompt_ids, transformers_greedy(model, prompt_ids, ANSWER_TOKENS))
    return found


def long_job(model: str, prompt_ids: list[int]) -> Job:
    return Job(
        f"failover-{uuid.uuid4().hex[:8]}",
        model,
        prompt_ids,
        sampling=Sampling(temperature=0.0),
        max_new_tokens=ANSWER_TOKENS,
        ignore_eos=True,
        stream=True,
        created=time.time(),
    )


def pending_owners(client: redis.Redis, stream: str) -> list[str]:
    entries = client.xpending_range(stream, WORKER_GROUP, "-", "+", count=100)
    return [entry["consumer"].decode() for entry in entries]


def shard_rank_pid(group: WorkerProcess) -> int:
    """Rank 1's pid, from the driver's start-up log line, checked against /proc."""
    found = SHARD_PIDS_LINE.search(group.log_text())
    assert found is not None, "the group driver did not log its shard pids"
    pid = int(found.group(1))
    assert pid in children_of(group.pid)
    return pid


def assert_resumed_in_full(
    events: list[Event], expected: list[int], expected_text: str, survivor: str
) -> None:
    """The client's view: every token once, in order, seq 0..n-1, one terminal event."""
    assert [event.seq for event in events] == list(range(len(events)))
    assert [token for event in events for token in event.token_ids] == expected
    assert "".join(event.text for event in events) == expected_text
    assert [event.finish for event in events] == [None] * (len(events) - 1) + ["length"]
    assert events[-1].usage is not None
    assert events[-1].usage.completion_tokens == ANSWER_TOKENS
    assert events[-1].worker == survivor


def test_dead_shard_rank_ends_its_group_and_another_worker_resumes_its_jobs(
    redis_server: RedisServer, tiny_llama: Path, references, tmp_path: Path
):
    prefix = f"failover{uuid.uuid4().hex[:8]}"
    keys, model = Keys(prefix), tiny_llama.name
    tokenizer = Tokenizer.from_file(str(tiny_llama / "tokenizer.json"))
    client = redis.Redis.from_url(redis_server.url)

    def spawn(name: str, *extra: str) -> WorkerProcess:
        return spawn_worker(
            tiny_llama, redis_server.url, prefix, tmp_path, f"{prefix}-{name}", extra
        )

    group = spawn("group", "--num-shard", str(NUM_SHARD))
    survivor: WorkerProcess | None = None
    channels: dict[str, JobChannel] = {}
    try:
        wait_for_worker(client, prefix, group)
        rank_pid = shard_rank_pid(group)
        for prompt, (prompt_ids, _) in references.items():
            channels[prompt] = send_job(client, keys, long_job(model, prompt_ids))
        for channel in channels.values():
            channel.wait_for_tokens(TOKENS_BEFORE_KILL, timeout_s=60)
        assert pending_owners(client, keys.requests(model)) == [group.worker_id] * len(PROMPTS)

        survivor = spawn("plain")  # the group holds every job; this one starts idle
        os.kill(rank_pid, signal.SIGKILL)
        killed_at = time.monotonic()
        assert group.wait_exit(GROUP_EXIT_TIMEOUT_S) == RANK_DIED_EXIT_CODE
        assert time.monotonic() - killed_at < GROUP_EXIT_TIMEOUT_S
        assert f"rank 1 (pid {rank_pid}) exited with code -9" in group.log_text()
        wait_for(
            lambda: not client.exists(keys.worker(group.worker_id)),
            "the dead group's heartbeat to expire",
            10,
            [survivor],
        )
        wait_for_worker(client, prefix, survivor)

        for prompt, channel in channels.items():
            events = channel.read_to_end(timeout_s=START_TIMEOUT_S)
            expected = references[prompt][1]
            text = tokenizer.decode(expected)
            assert_resumed_in_full(events, expected, text, survivor.worker_id)
        resumed = {
            request_id: int(n) for request_id, n in RESUMED_LINE.findall(survivor.log_text())
        }
        assert len(resumed) == len(PROMPTS)
        assert all(TOKENS_BEFORE_KILL <= n < ANSWER_TOKENS for n in resumed.values()), resumed
        assert client.xlen(keys.requests(model)) == 0
    finally:
        for channel in channels.values():
            channel.close()
        for process in (group, survivor):
            if process is not None:
                process.kill()
        client.close()
