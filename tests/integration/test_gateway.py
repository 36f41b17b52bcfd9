"""The gateway against a real redis-server and the fake worker, through the official `openai`
client and plain HTTP: every route, the streamed/non-streamed agreement, and every error path
(status and body shape), cancellation on disconnect, and one run of `python -m gateway`."""

from __future__ import annotations

import asyncio
import json
import os
import subprocess
import sys
from collections.abc import AsyncIterator, Iterator
from dataclasses import dataclass
from typing import Any

import httpx
import openai
import pytest
import redis

from common.chat import build_tokenizer, chat_prompt_ids
from gateway import openai_api
from tests.integration.conftest import (
    BackgroundLoop,
    GatewayThread,
    RedisServer,
    RunningWorker,
    free_port,
    openai_error,
    sse_data,
    start_gateway,
    start_worker,
    tgi_error,
    wait_for_message,
    wait_until,
)
from tests.integration.fake_worker import expected_token_ids, tiny_model_card

TOKENIZER = build_tokenizer(tiny_model_card())
MESSAGES = [{"role": "user", "content": "hello cat dog"}]


def expected_text(prompt_ids: list[int], max_new_tokens: int = 1000, index: int = 0) -> str:
    ids = expected_token_ids(prompt_ids, max_new_tokens, index)
    return TOKENIZER.decode(ids, skip_special_tokens=True)


CHAT_IDS = chat_prompt_ids(TOKENIZER, MESSAGES)


@dataclass
class Stack:
    prefix: str
    redis_url: str
    worker: RunningWorker
    gateway: GatewayThread

    @property
    def url(self) -> str:
        return self.gateway.url


@pytest.fixture(scope="module")
def stack(redis_server: RedisServer, background_loop: BackgroundLoop) -> Iterator[Stack]:
    prefix = "main"
    worker = start_worker(background_loop, redis_server.url, prefix)
    gateway = start_gateway(redis_server.url, prefix)
    yield Stack(prefix, redis_server.url, worker, gateway)
    gateway.stop()
    worker.stop()


@pytest.fixture
def http(stack: Stack) -> Iterator[httpx.Client]:
    with httpx.Client(base_url=stack.url, timeout=10) as client:
        yield client


@pytest.fixture
def client(stack: Stack) -> openai.OpenAI:
    return openai.OpenAI(base_url=f"{stack.url}/v1", api_key="unused", max_retries=0)


# --- OpenAI routes -------------------------------------------------------------------------


def test_chat_completion_and_usage(client: openai.OpenAI) -> None:
    answer = client.chat.completions.create(model="tiny", messages=MESSAGES)  # type: ignore[arg-type]
    assert answer.object == "chat.completion" and answer.id.startswith("chatcmpl-")
    choice = answer.choices[0]
    assert choice.message.role == "assistant" and choice.finish_reason == "stop"
    assert choice.message.content == expected_text(CHAT_IDS)
    completion_ids = expected_token_ids(CHAT_IDS, 1000)
    assert answer.usage is not None
    assert (answer.usage.prompt_tokens, answer.usage.completion_tokens) == (
        len(CHAT_IDS),
        len(completion_ids),
    )
    assert answer.usage.total_tokens == len(CHAT_IDS) + len(completion_ids)


def test_chat_stream_matches_non_stream_with_two_choices(client: openai.OpenAI) -> None:
    whole = client.chat.completions.create(model="tiny", messages=MESSAGES, n=2, max_tokens=4)  # type: ignore[arg-type]
    stream = client.chat.completions.create(
        model="tiny",
        messages=MESSAGES,
        n=2,
        max_tokens=4,
        stream=True,
        stream_options={"include_usage": True},
    )  # type: ignore[arg-type]
    chunks = list(stream)
    texts, roles, finishes = ["", ""], [None, None], [None, None]
    for chunk in chunks[:-1]:
        for choice in chunk.choices:
            roles[choice.index] = roles[choice.index] or choice.delta.role
            texts[choice.index] += choice.delta.content or ""
            finishes[choice.index] = choice.finish_reason or finishes[choice.index]
    assert roles == ["assistant", "assistant"] and finishes == ["length", "length"]
    assert texts == [c.message.content for c in sorted(whole.choices, key=lambda c: c.index)]
    assert (
        texts == [expected_text(CHAT_IDS, 4, 0), expected_text(CHAT_IDS, 4, 1)]
        and texts[0] != texts[1]
    )
    assert chunks[-1].choices == [] and chunks[-1].usage is not None
    assert chunks[-1].usage.completion_tokens == 8 and whole.usage.completion_tokens == 8  # type: ignore[union-attr]


def test_chat_logprobs_stop_and_length(client: openai.OpenAI) -> None:
    answer = client.chat.completions.create(
        model="tiny", messages=MESSAGES, logprobs=True, top_logprobs=2, max_tokens=2
    )  # type: ignore[arg-type]
    content = answer.choices[0].logprobs.content  # type: ignore[union-attr]
    assert [entry.token for entry in content] == ["assistant", "dog"]
    assert content[0].logprob == -0.5 and content[0].bytes == list(b"assistant")
    assert len(content[0].top_logprobs) == 2 and answer.choices[0].finish_reason == "length"
    stopped = client.chat.completions.create(model="tiny", messages=MESSAGES, stop=["cat"])  # type: ignore[arg-type]
    assert (
        stopped.choices[0].message.content == "assistant dog "
        and stopped.choices[0].finish_reason == "stop"
    )


def test_completion_prompt_forms_and_indices(client: openai.OpenAI) -> None:
    ids = TOKENIZER.encode("one two three")
    for prompt in ["one two three", ids]:
        answer = client.completions.create(model="tiny", prompt=prompt, max_tokens=10)
        assert answer.object == "text_completion" and answer.choices[0].text == "three two one"
        assert answer.choices[0].finish_reason == "stop"
        assert answer.usage.prompt_tokens == len(ids)  # type: ignore[union-attr]
    several = client.completions.create(
        model="tiny", prompt=["one two", "four five"], n=2, max_tokens=1
    )
    assert [c.text for c in sorted(several.choices, key=lambda c: c.index)] == [
        "two",
        "one",
        "five",
        "four",
    ]
    assert several.usage.prompt_tokens == 6 and several.usage.completion_tokens == 4  # type: ignore[union-attr]


def test_completion_stream_echo_and_logprobs(client: openai.OpenAI) -> None:
    stream = client.completions.create(
        model="tiny", prompt="one two", echo=True, stream=True, max_tokens=5
    )
    assert "".join(chunk.choices[0].text for chunk in stream) == "one twotwo one"
    answer = client.completions.create(model="tiny", prompt="one two", logprobs=1, max_tokens=2)
    logprobs = answer.choices[0].logprobs
    assert logprobs.tokens == ["two", "one"] and logprobs.token_logprobs == [-0.5, -0.5]  # type: ignore[union-attr]
    assert logprobs.top_logprobs == [{"two": -0.5}, {"one": -0.5}] and logprobs.text_offset == [
        0,
        3,
    ]  # type: ignore[union-attr]


def test_models_list_and_retrieve(client: openai.OpenAI) -> None:
    assert [model.id for model in client.models.list()] == ["tiny"]
    model = client.models.retrieve("tiny")
    assert model.id == "tiny" and model.object == "model" and model.owned_by == "spindle"
    with pytest.raises(openai.NotFoundError) as caught:
        client.models.retrieve("nope")
    assert "Served models: tiny" in str(caught.value)


async def test_concurrent_requests_all_get_their_own_answer(
    stack: Stack, http: httpx.Client
) -> None:
    client = openai.AsyncOpenAI(base_url=f"{stack.url}/v1", api_key="unused", max_retries=0)
    numbers = ["one", "two", "three", "four", "five", "six", "seven", "eight", "nine", "ten"]

    async def ask(position: int) -> tuple[str, str]:
        prompt = " ".join(numbers[: position % 10 + 1])
        expected = " ".join(reversed(prompt.split()))
        if position % 2:
            stream = await client.completions.create(model="tiny", prompt=prompt, stream=True)
            return "".join([chunk.choices[0].text async for chunk in stream]), expected
        answer = await client.completions.create(model="tiny", prompt=prompt)
        return answer.choices[0].text, expected

    results = await asyncio.gather(*(ask(position) for position in range(32)))
    assert all(text == expected for text, expected in results)
    await client.close()
    assert "spindle_gateway_requests_in_flight 0.0" in http.get("/metrics").text


# --- TGI routes ----------------------------------------------------------------------------


def test_tgi_generate_with_details(http: httpx.Client) -> None:
    body = {
        "inputs": "one two three",
        "parameters": {"details": True, "max_new_tokens": 10, "return_full_text": True},
    }
    answer = http.post("/generate", json=body).json()
    assert answer["generated_text"] == "one two threethree two one"
    details = answer["details"]
    assert details["finish_reason"] == "eos_token" and details["generated_tokens"] == 4
    assert [t["text"] for t in details["tokens"]] == ["three", "two", "one", "</s>"]
    assert [t["special"] for t in details["tokens"]] == [False, False, False, True]
    short = http.post(
        "/generate", json={"inputs": "one two three", "parameters": {"max_new_tokens": 2}}
    ).json()
    assert short == {"generated_text": "three two"}


def test_tgi_generate_stream(http: httpx.Client) -> None:
    body = {"inputs": "one two three", "parameters": {"details": True, "max_new_tokens": 2}}
    with http.stream("POST", "/generate_stream", json=body) as response:
        messages = [json.loads(data) for data in sse_data(response)]
    assert [m["token"]["id"] for m in messages] == expected_token_ids(
        TOKENIZER.encode("one two three"), 2
    )
    assert (
        "".join(m["token"]["text"] for m in messages)
        == messages[-1]["generated_text"]
        == "three two"
    )
    assert [m["generated_text"] for m in messages[:-1]] == [None]
    assert (
        messages[-1]["details"]["finish_reason"] == "length"
        and messages[-1]["details"]["generated_tokens"] == 2
    )


def test_tgi_info_and_tokenize(http: httpx.Client) -> None:
    info = http.get("/info").json()
    assert (info["model_id"], info["max_input_tokens"], info["max_total_tokens"]) == (
        "tiny",
        64,
        96,
    )
    assert info["served_models"] == ["tiny"] and info["model_dtype"] == "float32"
    tokens = http.post("/tokenize", json={"inputs": "one  two"}).json()
    assert tokens == [{"id": 1, "text": "", "start": 0, "stop": 0},
                      {"id": TOKENIZER.convert_tokens_to_ids("one"), "text": "one", "start": 0, "stop": 3},
                      {"id": TOKENIZER.convert_tokens_to_ids("two"), "text": "two", "start": 5, "stop": 8}]  # fmt: skip


# --- operations ----------------------------------------------------------------------------


def test_health_metrics_docs(http: httpx.Client) -> None:
    health = http.get("/health")
    assert health.status_code == 200 and health.json()["models"] == ["tiny"]
    http.post("/v1/completions", json={"model": "tiny", "prompt": "one"})
    metrics = http.get("/metrics").text
    assert 'spindle_gateway_requests_total{route="/v1/completions",status="200"}' in metrics
    assert "spindle_gateway_requests_in_flight 0.0" in metrics
    assert http.get("/docs").status_code == 200
    assert "/v1/chat/completions" in http.get("/openapi.json").json()["paths"]


# --- errors --------------------------------------------------------------------------------


def test_unknown_model_is_404_listing_served_models(http: httpx.Client) -> None:
    response = http.post("/v1/chat/completions", json={"model": "nope", "messages": MESSAGES})
    error = openai_error(response, 404)
    assert (
        error["message"] == "The model 'nope' does not exist. Served models: tiny."
        and error["code"] == "model_not_found"
    )
    tgi = tgi_error(http.post("/generate", json={"inputs": "one", "model": "nope"}), 404)
    assert "Served models: tiny" in tgi["error"]


@pytest.mark.parametrize(
    ("route", "body", "expected"),
    [
        (
            "/v1/chat/completions",
            {"messages": MESSAGES, "temperature": -1},
            "temperature: Input should be greater than or equal to 0",
        ),
        (
            "/v1/chat/completions",
            {"messages": MESSAGES, "top_p": 0},
            "top_p: Input should be greater than 0",
        ),
        (
            "/v1/chat/completions",
            {"messages": MESSAGES, "n": 0},
            "n: Input should be greater than or equal to 1",
        ),
        (
            "/v1/chat/completions",
            {"messages": MESSAGES, "max_tokens": 0},
            "max_tokens: Input should be greater than or equal to 1",
        ),
        (
            "/v1/chat/completions",
            {"messages": [{"role": "robot", "content": "x"}]},
            "messages[0].role: Input should be",
        ),
        (
            "/v1/chat/completions",
            {"messages": MESSAGES, "best_of": 2},
            "best_of=2 with n=1: only best_of == n is supported",
        ),
        ("/v1/completions", {"prompt": ""}, "prompt is empty"),
        ("/v1/completions", {}, "prompt is required"),
        (
            "/v1/completions",
            {"prompt": " ".join(["cat"] * 70)},
            "prompt has 71 tokens; this model accepts at most 64 input tokens",
        ),
        (
            "/v1/completions",
            {"prompt": "one", "max_tokens": 95},
            "prompt has 2 tokens and max_tokens is 95: 97 in all, over this model's limit of 96 tokens",
        ),
    ],
)
def test_openai_validation_errors(
    http: httpx.Client, route: str, body: dict[str, Any], expected: str
) -> None:
    error = openai_error(http.post(route, json={"model": "tiny", **body}), 400)
    assert error["message"].startswith(expected) and error["type"] == "invalid_request_error"


def test_malformed_json_is_a_400_not_a_422(http: httpx.Client) -> None:
    response = http.post(
        "/v1/completions", content=b"{not json", headers={"content-type": "application/json"}
    )
    assert "not valid JSON" in openai_error(response, 400)["message"]
    assert (
        tgi_error(
            http.post("/generate", content=b"[", headers={"content-type": "application/json"}), 400
        )["error_type"]
        == "validation"
    )


@pytest.mark.parametrize(
    ("parameters", "expected"),
    [
        ({"temperature": 0}, "parameters.temperature: Input should be greater than 0"),
        ({"top_p": 1.0}, "parameters.top_p: Input should be less than 1"),
        ({"watermark": True}, "watermark is not supported"),
        ({"max_new_tokens": 200}, "prompt has 2 tokens and max_new_tokens is 200"),
    ],
)
def test_tgi_validation_errors(
    http: httpx.Client, parameters: dict[str, Any], expected: str
) -> None:
    body = tgi_error(http.post("/generate", json={"inputs": "one", "parameters": parameters}), 400)
    assert body["error"].startswith(expected) and body["error_type"] == "validation"


def test_worker_error_event_becomes_an_error(http: httpx.Client, client: openai.OpenAI) -> None:
    failing = [{"role": "user", "content": "fail now"}]
    error = openai_error(
        http.post("/v1/chat/completions", json={"model": "tiny", "messages": failing}), 500
    )
    assert error["message"] == "fake failure: the prompt asked for it"
    with pytest.raises(openai.APIError, match="fake failure"):
        list(client.chat.completions.create(model="tiny", messages=failing, stream=True))  # type: ignore[arg-type]
    with http.stream(
        "POST", "/v1/completions", json={"model": "tiny", "prompt": "fail", "stream": True}
    ) as response:
        data = sse_data(response)
    assert json.loads(data[-1])["error"]["message"] == "fake failure: the prompt asked for it"
    assert "[DONE]" not in data
    assert (
        tgi_error(http.post("/generate", json={"inputs": "fail"}), 500)["error_type"]
        == "generation"
    )


def test_unexpected_exceptions_never_show_a_traceback(
    http: httpx.Client, monkeypatch: pytest.MonkeyPatch
) -> None:
    def explode(*args: Any, **kwargs: Any) -> Any:
        raise RuntimeError("secret internals")

    monkeypatch.setattr(openai_api, "plan_chat", explode)
    response = http.post("/v1/chat/completions", json={"model": "tiny", "messages": MESSAGES})
    error = openai_error(response, 500)
    assert error["message"] == "internal error (RuntimeError); see the gateway log"
    assert "secret internals" not in response.text

    async def explode_mid_stream(*args: Any, **kwargs: Any) -> AsyncIterator[list[str]]:
        yield [json.dumps({"partial": True})]
        raise RuntimeError("secret internals")

    monkeypatch.setattr(openai_api, "completion_chunks", explode_mid_stream)
    body = {"model": "tiny", "prompt": "one", "stream": True}
    with http.stream("POST", "/v1/completions", json=body) as response:
        data = sse_data(response)
    assert json.loads(data[-1])["error"]["message"].startswith("internal error (RuntimeError)")
    assert "secret internals" not in "".join(data)


def test_unusable_model_registration_is_503(redis_server: RedisServer, unique_prefix: str) -> None:
    client = redis.Redis.from_url(redis_server.url)
    client.hset(
        f"{unique_prefix}:model:broken",
        mapping={**tiny_model_card().to_hash(), "tokenizer_json": "{oops"},
    )
    client.set(f"{unique_prefix}:worker:w1", json.dumps({"id": "w1", "model": "broken"}), ex=60)
    gateway = start_gateway(redis_server.url, unique_prefix)
    try:
        response = httpx.post(
            f"{gateway.url}/v1/completions", json={"model": "broken", "prompt": "one"}
        )
        assert (
            "the registration of 'broken' in Redis is unusable"
            in openai_error(response, 503)["message"]
        )
    finally:
        gateway.stop()


def test_api_key(stack: Stack) -> None:
    gateway = start_gateway(stack.redis_url, stack.prefix, api_key="sekret")
    try:
        with httpx.Client(base_url=gateway.url, timeout=10) as http:
            body = {"model": "tiny", "prompt": "one"}
            for headers in ({}, {"Authorization": "Bearer wrong"}, {"Authorization": "sekret"}):
                error = openai_error(http.post("/v1/completions", json=body, headers=headers), 401)
                assert error["code"] == "invalid_api_key"
            assert (
                tgi_error(http.post("/generate", json={"inputs": "one"}), 401)["error_type"]
                == "authentication"
            )
            assert http.get("/health").status_code == 200  # probes need no key
        keyed = openai.OpenAI(base_url=f"{gateway.url}/v1", api_key="sekret", max_retries=0)
        assert (
            keyed.completions.create(model="tiny", prompt="one two", max_tokens=1).choices[0].text
            == "two"
        )
    finally:
        gateway.stop()


def test_queue_limit_is_429(
    redis_server: RedisServer, background_loop: BackgroundLoop, unique_prefix: str
) -> None:
    worker = start_worker(background_loop, redis_server.url, unique_prefix, consume=False)
    gateway = start_gateway(redis_server.url, unique_prefix, max_queue=2)
    try:
        queue = redis.Redis.from_url(redis_server.url)
        for _ in range(2):
            queue.xadd(f"{unique_prefix}:req:tiny", {"job": "{}"})  # two jobs nobody takes
        with httpx.Client(base_url=gateway.url, timeout=10) as http:
            response = http.post("/v1/completions", json={"model": "tiny", "prompt": "one"})
            error = openai_error(response, 429)
            assert response.headers["retry-after"] == "1"
            assert (
                error["message"]
                == "the queue of 'tiny' holds 2 requests, its limit (--max-queue 2); retry shortly"
            )
            assert (
                tgi_error(http.post("/generate", json={"inputs": "one"}), 429)["error_type"]
                == "overloaded"
            )
        assert queue.xlen(f"{unique_prefix}:req:tiny") == 2  # nothing was added past the limit
    finally:
        gateway.stop()
        worker.stop()


def test_concurrency_limit_is_429_and_disconnect_cancels(
    redis_server: RedisServer, background_loop: BackgroundLoop, unique_prefix: str
) -> None:
    worker = start_worker(background_loop, redis_server.url, unique_prefix, consume=False)
    gateway = start_gateway(redis_server.url, unique_prefix, max_concurrent_requests=1)
    queue = redis.Redis.from_url(redis_server.url)
    listener = queue.pubsub()
    listener.subscribe(f"{unique_prefix}:cancel")
    try:
        with httpx.Client(base_url=gateway.url, timeout=10) as http:
            body = {"model": "tiny", "prompt": "one", "stream": True}
            with http.stream("POST", "/v1/completions", json=body) as held:
                assert held.status_code == 200
                error = openai_error(
                    http.post("/v1/completions", json={"model": "tiny", "prompt": "one"}), 429
                )
                assert "--max-concurrent-requests 1" in error["message"]
                wait_until(lambda: queue.xlen(f"{unique_prefix}:req:tiny") == 1)
            # Closing the stream released the slot and cancelled the queued job.
            job_id = json.loads(queue.xrange(f"{unique_prefix}:req:tiny")[0][1][b"job"])["id"]
            assert wait_for_message(listener) == job_id
            assert queue.ttl(f"{unique_prefix}:cancelled:{job_id}") > 0
            wait_until(
                lambda: "spindle_gateway_requests_in_flight 0.0" in http.get("/metrics").text
            )
    finally:
        listener.close()
        gateway.stop()
        worker.stop()


def test_streaming_client_disconnect_cancels_the_running_job(
    stack: Stack, http: httpx.Client
) -> None:
    listener = redis.Redis.from_url(stack.redis_url).pubsub()
    listener.subscribe(f"{stack.prefix}:cancel")
    body = {
        "model": "tiny",
        "messages": [{"role": "user", "content": "slow one two three four five six"}],
        "stream": True,
    }
    with http.stream("POST", "/v1/chat/completions", json=body) as response:
        for data in (line[6:] for line in response.iter_lines() if line.startswith("data: ")):
            chunk = json.loads(data)
            if chunk["choices"][0]["delta"].get("content"):
                break  # the worker is generating: now leave
        request_id = chunk["id"]
    assert wait_for_message(listener) == request_id
    wait_until(lambda: request_id in stack.worker.worker.cancelled)
    listener.close()


def test_non_streaming_client_disconnect_cancels_too(stack: Stack) -> None:
    listener = redis.Redis.from_url(stack.redis_url).pubsub()
    listener.subscribe(f"{stack.prefix}:cancel")
    with (
        httpx.Client(base_url=stack.url, timeout=0.5) as impatient,
        pytest.raises(httpx.ReadTimeout),
    ):
        impatient.post(
            "/v1/completions",
            json={"model": "tiny", "prompt": "slow one two three four five six seven"},
        )
    cancelled = wait_for_message(listener)
    assert cancelled.startswith("cmpl-")
    listener.close()


def test_no_live_worker_is_503(redis_server: RedisServer, unique_prefix: str) -> None:
    gateway = start_gateway(redis_server.url, unique_prefix)
    try:
        with httpx.Client(base_url=gateway.url, timeout=10) as http:
            error = openai_error(
                http.post("/v1/chat/completions", json={"model": "tiny", "messages": MESSAGES}), 503
            )
            assert "no worker is alive" in error["message"]
            assert (
                tgi_error(http.post("/generate", json={"inputs": "one"}), 503)["error_type"]
                == "unavailable"
            )
            health = http.get("/health")
            assert health.status_code == 503 and health.json()["reason"] == "no worker is alive"
    finally:
        gateway.stop()


def test_unreachable_redis_is_503() -> None:
    gateway = start_gateway(f"redis://127.0.0.1:{free_port()}/0", "spindle")
    try:
        with httpx.Client(base_url=gateway.url, timeout=10) as http:
            error = openai_error(
                http.post("/v1/completions", json={"model": "tiny", "prompt": "one"}), 503
            )
            assert error["message"].startswith("Redis is unreachable")
            assert http.get("/health").status_code == 503
    finally:
        gateway.stop()


def test_redis_stopping_under_a_running_gateway_is_503() -> None:
    server = RedisServer.start()
    client = redis.Redis.from_url(server.url)
    client.hset("s:model:tiny", mapping=tiny_model_card().to_hash())
    client.set("s:worker:w1", json.dumps({"id": "w1", "model": "tiny"}), ex=60)
    gateway = start_gateway(server.url, "s")
    try:
        with httpx.Client(base_url=gateway.url, timeout=10) as http:
            assert http.get("/health").status_code == 200
            server.stop()
            assert http.get("/health").status_code == 503
            openai_error(http.post("/v1/completions", json={"model": "tiny", "prompt": "one"}), 503)
            assert tgi_error(http.get("/info"), 503)["error"].startswith("Redis is unreachable")
    finally:
        gateway.stop()


def test_tokenizer_is_rebuilt_when_the_model_hash_changes(
    redis_server: RedisServer, background_loop: BackgroundLoop, unique_prefix: str
) -> None:
    worker = start_worker(background_loop, redis_server.url, unique_prefix, consume=False)
    gateway = start_gateway(redis_server.url, unique_prefix)
    try:
        with httpx.Client(base_url=gateway.url, timeout=10) as http:
            assert http.get("/v1/models/tiny").json()["max_model_len"] == 96
            redis.Redis.from_url(redis_server.url).hset(
                f"{unique_prefix}:model:tiny", "max_total_tokens", "80"
            )
            wait_until(lambda: http.get("/v1/models/tiny").json()["max_model_len"] == 80)
    finally:
        gateway.stop()
        worker.stop()


def test_python_m_gateway_with_a_worker_process(
    redis_server: RedisServer, unique_prefix: str
) -> None:
    """The real entry points as processes: flags, an environment twin, uvicorn, the fake
    worker as a subprocess."""
    port = free_port()
    env = {**os.environ, "SPINDLE_PREFIX": unique_prefix, "SPINDLE_API_KEY": "k"}
    worker = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "tests.integration.fake_worker",
            "--redis-url",
            redis_server.url,
            "--prefix",
            unique_prefix,
        ]
    )
    gateway = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "gateway",
            "--host",
            "127.0.0.1",
            "--port",
            str(port),
            "--redis-url",
            redis_server.url,
        ],
        env=env,
    )
    try:
        wait_until(lambda: _healthy(f"http://127.0.0.1:{port}"), timeout_s=30)
        client = openai.OpenAI(base_url=f"http://127.0.0.1:{port}/v1", api_key="k", max_retries=0)
        answer = client.chat.completions.create(model="tiny", messages=MESSAGES)  # type: ignore[arg-type]
        assert answer.choices[0].message.content == expected_text(CHAT_IDS)
        assert (
            httpx.post(
                f"http://127.0.0.1:{port}/v1/completions", json={"model": "tiny", "prompt": "one"}
            ).status_code
            == 401
        )
    finally:
        for process in (gateway, worker):
            process.terminate()
            process.wait(timeout=10)


def _healthy(url: str) -> bool:
    try:
        return httpx.get(f"{url}/health", timeout=1).status_code == 200
    except httpx.HTTPError:
        return False
