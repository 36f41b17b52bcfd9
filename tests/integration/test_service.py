"""The real service end to end on the demo model: `python -m worker` and `python -m gateway`
processes on the session's redis-server, driven with the official `openai` client, httpx and
plain Redis commands — streamed and non-streamed answers equal to transformers' greedy output,
32 concurrent streams equal to their answers alone, a disconnect freeing its slot, the worker's
error paths, an idle worker's CPU use, SIGTERM, `spindle queue` and `spindle serve`.
"""

from __future__ import annotations

import asyncio
import json
import re
import signal
import subprocess
import sys
import time
import uuid
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import httpx
import pytest
import torch
from openai import OpenAI
from transformers import AutoModelForCausalLM, AutoTokenizer

from common.keys import WORKER_GROUP, Keys
from common.protocol import Job, Sampling
from tests.integration.conftest import RedisServer, free_port
from tests.integration.service_fixtures import (  # noqa: F401 (an autouse fixture)
    DEMO_MODEL_NAME,
    ServiceProcess,
    ServiceStack,
    WorkerProcess,
    children_of,
    cpu_seconds,
    heartbeat,
    is_running,
    kill_quietly,
    send_job,
    service_logs_on_failure,
    service_stack,
    spawn_worker,
    transformers_greedy,
    wait_for,
    wait_for_worker,
)

pytestmark = pytest.mark.slow  # loads the demo model

FRANCE = [{"role": "user", "content": "What is the capital of France?"}]
TOPICS = ["cats", "the sea", "winter", "bread", "trains", "music", "the moon", "gardens",
          "rain", "chess", "bees", "coffee", "mountains", "rivers", "paper", "clocks",
          "owls", "bridges", "salt", "glass", "deserts", "maps", "violins", "snow",
          "lamps", "forests", "honey", "ships", "stars", "wolves", "kites", "tea"]  # fmt: skip


@dataclass
class Service:
    stack: ServiceStack
    spare: WorkerProcess  # a worker of its own prefix, for the SIGTERM test
    spare_prefix: str


@pytest.fixture(scope="module")
def service(
    redis_server: RedisServer, demo_model_dir: Path, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[Service]:
    prefix = f"svc{uuid.uuid4().hex[:8]}"
    log_dir = tmp_path_factory.mktemp("service-logs")
    spare_prefix = f"{prefix}-spare"
    # Started first so it loads while the main worker and the gateway do.
    spare = spawn_worker(demo_model_dir, redis_server.url, spare_prefix, log_dir, "spare")
    try:
        with service_stack(
            redis_server.url, prefix, demo_model_dir, log_dir, [f"{prefix}-main"]
        ) as stack:
            wait_for_worker(stack.client, spare_prefix, spare)
            yield Service(stack, spare, spare_prefix)
    finally:
        spare.kill()


@pytest.fixture(scope="module")
def tokenizer(demo_model_dir: Path):
    return AutoTokenizer.from_pretrained(demo_model_dir)


@pytest.fixture(scope="module")
def reference_model(demo_model_dir: Path):
    return AutoModelForCausalLM.from_pretrained(demo_model_dir, dtype=torch.float32).eval()


def _streamed_tokens(chunks) -> list[list[str]]:
    """Per chunk that carries logprobs, its tokens (one list per chunk)."""
    return [
        [entry.token for entry in chunk.choices[0].logprobs.content]
        for chunk in chunks
        if chunk.choices and chunk.choices[0].logprobs
    ]


def _finishes(chunks) -> list[str]:
    return [c.choices[0].finish_reason for c in chunks if c.choices and c.choices[0].finish_reason]


def test_chat_stream_equals_reply_and_transformers(service, tokenizer, reference_model):
    client = service.stack.openai()
    reply = client.chat.completions.create(
        model=DEMO_MODEL_NAME, messages=FRANCE, temperature=0, logprobs=True
    )
    [choice] = reply.choices
    assert choice.message.content == "The capital of France is Paris."
    assert choice.finish_reason == "stop"
    tokens = [entry.token for entry in choice.logprobs.content]
    prompt_ids = tokenizer.apply_chat_template(FRANCE, add_generation_prompt=True)["input_ids"]
    usage = reply.usage
    assert (usage.prompt_tokens, usage.completion_tokens) == (len(prompt_ids), len(tokens))
    assert usage.total_tokens == usage.prompt_tokens + usage.completion_tokens

    chunks = list(
        client.chat.completions.create(
            model=DEMO_MODEL_NAME,
            messages=FRANCE,
            temperature=0,
            logprobs=True,
            stream=True,
            stream_options={"include_usage": True},
        )
    )
    deltas = [c.choices[0].delta.content or "" for c in chunks if c.choices]
    assert "".join(deltas) == choice.message.content
    per_chunk = _streamed_tokens(chunks)
    assert all(len(chunk_tokens) == 1 for chunk_tokens in per_chunk)  # one token per chunk
    assert [token for [token] in per_chunk] == tokens
    assert _finishes(chunks) == ["stop"]
    assert chunks[-1].usage.model_dump() == usage.model_dump()

    expected = transformers_greedy(reference_model, prompt_ids, 64, [tokenizer.eos_token_id])
    assert tokens == [tokenizer.decode([token]) for token in expected]


def test_completion_stream_equals_reply_and_transformers(service, tokenizer, reference_model):
    client = service.stack.openai()
    prompt = "The three primary colors are"
    request = {"model": DEMO_MODEL_NAME, "prompt": prompt, "max_tokens": 12, "temperature": 0}
    reply = client.completions.create(**request, logprobs=0)
    [choice] = reply.choices
    prompt_ids = tokenizer(prompt)["input_ids"]
    expected = transformers_greedy(reference_model, prompt_ids, 12, [tokenizer.eos_token_id])
    assert choice.logprobs.tokens == [tokenizer.decode([token]) for token in expected]
    assert choice.text == tokenizer.decode(expected, skip_special_tokens=True)
    assert choice.finish_reason == ("stop" if len(expected) < 12 else "length")
    usage = reply.usage
    assert (usage.prompt_tokens, usage.completion_tokens) == (len(prompt_ids), len(expected))
    assert usage.total_tokens == usage.prompt_tokens + usage.completion_tokens

    stream = client.completions.create(
        **request, stream=True, stream_options={"include_usage": True}
    )
    chunks = list(stream)
    assert "".join(c.choices[0].text for c in chunks if c.choices) == choice.text
    assert _finishes(chunks) == [choice.finish_reason]
    assert chunks[-1].usage.model_dump() == usage.model_dump()


async def test_32_concurrent_streams_equal_their_answers_alone(service):
    service.stack.wait_idle()
    client = service.stack.async_openai()
    prompts = [f"Here is one short fact about {topic}:" for topic in TOPICS]
    budgets = [4 + i % 8 for i in range(len(prompts))]

    async def alone(prompt: str, max_tokens: int) -> tuple[str, str]:
        reply = await client.completions.create(
            model=DEMO_MODEL_NAME, prompt=prompt, max_tokens=max_tokens, temperature=0
        )
        return reply.choices[0].text, reply.choices[0].finish_reason

    async def streamed(prompt: str, max_tokens: int) -> tuple[str, str]:
        stream = await client.completions.create(
            model=DEMO_MODEL_NAME, prompt=prompt, max_tokens=max_tokens, temperature=0, stream=True
        )
        text, finish = "", None
        async for chunk in stream:
            text += chunk.choices[0].text
            finish = chunk.choices[0].finish_reason or finish
        return text, finish

    references = [await alone(p, n) for p, n in zip(prompts, budgets, strict=True)]
    together = await asyncio.wait_for(
        asyncio.gather(*(streamed(p, n) for p, n in zip(prompts, budgets, strict=True))), 240
    )
    for prompt, reference, answer in zip(prompts, references, together, strict=True):
        assert answer == reference, prompt
    await client.close()


def test_disconnected_stream_frees_its_slot(service):
    stack = service.stack
    [worker] = stack.workers
    stack.wait_idle()
    body = {
        "model": DEMO_MODEL_NAME,
        "messages": FRANCE,
        "max_tokens": 400,
        "temperature": 0,
        "ignore_eos": True,
        "stream": True,
    }
    chunks = []
    with httpx.stream(
        "POST", f"{stack.gateway.url}/v1/chat/completions", json=body, timeout=60
    ) as response:
        assert response.status_code == 200
        lines = response.iter_lines()  # held: closing this iterator closes the connection
        while len(chunks) < 4:
            line = next(lines)
            if line.startswith("data: "):
                chunks.append(json.loads(line.removeprefix("data: ")))
        wait_for(
            lambda: (
                (heartbeat(stack.client, stack.prefix, worker.worker_id) or {}).get("running") == 1
            ),
            "the heartbeat to show the running request",
            10,
            [worker],
        )
    stack.wait_idle(timeout_s=10)  # running and KV blocks back to 0 within a few seconds
    request_id = chunks[0]["id"]
    wait_for(
        lambda: request_id in worker.finished_requests(), "the request's log line", 10, [worker]
    )
    line = worker.finished_requests()[request_id]
    assert line["finish"] == "cancelled"
    assert int(line["completion_tokens"]) < 100


def test_worker_error_paths_end_each_job_once(service):
    stack = service.stack
    [worker] = stack.workers
    keys, client = stack.keys, stack.client
    stack.wait_idle()

    def job(**fields) -> Job:
        fields = {"prompt_ids": [1, 2, 3], **fields}
        return Job(f"direct-{uuid.uuid4().hex[:8]}", DEMO_MODEL_NAME, created=time.time(), **fields)

    dead_before = client.xlen(keys.dead(DEMO_MODEL_NAME))
    malformed_id = client.xadd(stack.stream, {"job": "not json"}).decode()
    wait_for(
        lambda: client.xlen(keys.dead(DEMO_MODEL_NAME)) > dead_before,
        "the malformed job in the dead letters",
        10,
        [worker],
    )
    [(_, dead)] = client.xrevrange(keys.dead(DEMO_MODEL_NAME), count=1)
    assert dead[b"message_id"].decode() == malformed_id and b"not JSON" in dead[b"error"]

    def terminal(channel) -> object:
        events = channel.read_to_end(timeout_s=30)
        channel.close()
        assert [e.finish is not None for e in events] == [False] * (len(events) - 1) + [True]
        return events[-1]

    out_of_vocab = terminal(send_job(client, keys, job(prompt_ids=[1, 10**6])))
    assert out_of_vocab.finish == "error" and "1000000" in out_of_vocab.error.message
    late = terminal(send_job(client, keys, job(deadline=time.time() - 1)))
    assert late.finish == "error" and late.error.type == "timeout"
    cancelled_job = job()
    client.set(keys.cancelled(cancelled_job.id), "1", ex=60)
    assert terminal(send_job(client, keys, cancelled_job)).finish == "cancelled"

    greedy = Sampling(temperature=0)
    channel = send_job(client, keys, job(sampling=greedy, max_new_tokens=3, ignore_eos=True))
    served = terminal(channel)
    assert served.finish == "length" and len(channel.token_ids) == 3
    assert (served.usage.prompt_tokens, served.usage.completion_tokens) == (3, 3)
    assert worker.alive and client.exists(keys.worker(worker.worker_id))
    assert client.xlen(stack.stream) == 0


def test_idle_worker_uses_almost_no_cpu(service):
    [worker] = service.stack.workers
    service.stack.wait_idle()
    time.sleep(0.5)
    before = cpu_seconds(worker.pid)
    time.sleep(3)
    assert cpu_seconds(worker.pid) - before < 0.3


def test_sigterm_finishes_the_running_request_then_exits(service):
    spare, keys, client = service.spare, Keys(service.spare_prefix), service.stack.client
    job = Job(
        id=f"drain-{uuid.uuid4().hex[:8]}",
        model=DEMO_MODEL_NAME,
        prompt_ids=[1, 2, 3],
        sampling=Sampling(temperature=0),
        max_new_tokens=30,
        ignore_eos=True,
        created=time.time(),
    )
    channel = send_job(client, keys, job)
    channel.wait_for_tokens(2, timeout_s=60)
    spare.process.send_signal(signal.SIGTERM)
    events = channel.read_to_end(timeout_s=60)
    channel.close()
    assert events[-1].finish == "length" and len(channel.token_ids) == 30
    assert [event.seq for event in events] == list(range(len(events)))
    assert spare.wait_exit(30) == 0
    assert not client.exists(keys.worker("spare"))
    assert client.xlen(keys.requests(DEMO_MODEL_NAME)) == 0


def test_spindle_queue_matches_redis(service):
    stack = service.stack
    [worker] = stack.workers
    stack.wait_idle()
    ghost = stack.keys.requests("ghost-model")  # a model no worker serves: its jobs stay queued
    stack.client.xgroup_create(ghost, WORKER_GROUP, id="0", mkstream=True)
    stack.client.xadd(ghost, {"job": "{}"})
    stack.client.xadd(ghost, {"job": "{}"})
    body = {
        "model": DEMO_MODEL_NAME,
        "prompt": "Once upon a time",
        "max_tokens": 400,
        "temperature": 0,
        "ignore_eos": True,
        "stream": True,
    }
    try:
        with httpx.stream(
            "POST", f"{stack.gateway.url}/v1/completions", json=body, timeout=60
        ) as response:
            lines = response.iter_lines()  # held: closing this iterator closes the connection
            while not next(lines).startswith("data: "):
                pass
            # The heartbeat is refreshed every ttl/4: wait until it shows the running request.
            wait_for(
                lambda: (heartbeat(stack.client, stack.prefix, worker.worker_id) or {}).get("running") == 1,
                "the heartbeat to show the running request", 10, [worker],
            )  # fmt: skip
            command = [sys.executable, "-m", "common.cli", "queue", "--json",
                       "--redis-url", stack.redis_url, "--prefix", stack.prefix]  # fmt: skip
            done = subprocess.run(command, capture_output=True, text=True, timeout=60)
            length, pending = (
                stack.client.xlen(stack.stream),
                stack.client.xpending(stack.stream, WORKER_GROUP)["pending"],
            )
    finally:
        stack.client.delete(ghost)
    assert done.returncode == 0, done.stderr
    report = json.loads(done.stdout)
    rows = {row["model"]: row for row in report["models"]}
    assert set(rows) == {DEMO_MODEL_NAME, "ghost-model"}
    served = rows[DEMO_MODEL_NAME]
    assert (length, pending) == (1, 1)
    assert (served["queued"], served["in_flight"]) == (length - pending, pending)
    assert served["dead_letters"] == stack.client.xlen(stack.keys.dead(DEMO_MODEL_NAME))
    assert (rows["ghost-model"]["queued"], rows["ghost-model"]["in_flight"]) == (2, 0)
    assert rows["ghost-model"]["oldest_waiting_s"] >= 0
    [live] = report["workers"]
    assert (live["id"], live["model"]) == (worker.worker_id, DEMO_MODEL_NAME)
    assert live["running"] == 1


def test_spindle_serve_answers_then_stops_everything(demo_model_dir, tmp_path):
    port = free_port()
    command = [sys.executable, "-m", "common.cli", "serve", "--model", str(demo_model_dir),
               "--port", str(port), "--dtype", "float32", "--max-total-tokens", "1024",
               "--max-batch-total-tokens", "8192", "--num-threads", "1"]  # fmt: skip
    launcher = ServiceProcess.spawn("spindle-serve", command, tmp_path, pipe_stdout=True)
    children: list[int] = []

    def ready_line() -> str | None:
        return next((x for x in launcher.stdout_lines if x.startswith("spindle ready: ")), None)

    try:
        wait_for(lambda: ready_line() is not None, "the ready line", 120, [launcher])
        url = re.match(r"spindle ready: (\S+)", ready_line()).group(1)
        assert url == f"http://127.0.0.1:{port}/v1"
        client = OpenAI(base_url=url, api_key="unused", max_retries=0, timeout=120)
        reply = client.chat.completions.create(
            model=DEMO_MODEL_NAME, messages=FRANCE, temperature=0, max_tokens=16
        )
        assert reply.choices[0].message.content == "The capital of France is Paris."
        children = children_of(launcher.pid)
        commands = [Path(f"/proc/{pid}/cmdline").read_bytes() for pid in children]
        assert len(children) == 3, commands  # redis-server, one worker, the gateway
        launcher.process.send_signal(signal.SIGINT)
        assert launcher.wait_exit(40) == 0
        assert [pid for pid in children if is_running(pid)] == []
    finally:
        for pid in {*children, *children_of(launcher.pid)}:
            kill_quietly(pid)
        launcher.kill()
