"""The gateway's streaming path without Redis or a server: the SSE response (sse-starlette's
EventSourceResponse) driven as an ASGI app (one body write per batch, errors as a last message,
pings, disconnects, what the request holds) and the OpenAI formatter over relayed batches."""

from __future__ import annotations

import asyncio
import json
from collections.abc import AsyncIterator
from typing import Any

import pytest
from redis.exceptions import ConnectionError as RedisConnectionError
from sse_starlette.sse import AppStatus

from common.protocol import ErrorInfo, Event, Usage
from gateway.errors import ApiError
from gateway.jobs import plan_completion
from gateway.openai_format import completion_chunks, sse_error
from gateway.relay import EventBatch
from gateway.schemas import CompletionRequest
from gateway.streaming import PING_INTERVAL_S, SseResponse, sse_frames
from tests.unit.test_gateway_validation import served


class CountingHeld:
    """Stands for the request's slot and relay (`generation.Generation`): counts its closes."""

    def __init__(self) -> None:
        self.closes = 0

    async def aclose(self) -> None:
        self.closes += 1


class Client:
    """The ASGI side of one response: records what is sent; `leave()` disconnects."""

    def __init__(self, writes_fail: bool = False) -> None:
        self.messages: list[dict[str, Any]] = []
        self._gone = asyncio.Event()
        self._writes_fail = writes_fail  # the socket is closed: as an ASGI 2.4 server reports it

    def leave(self) -> None:
        self._gone.set()

    async def receive(self) -> dict[str, Any]:
        await self._gone.wait()
        return {"type": "http.disconnect"}

    async def send(self, message: dict[str, Any]) -> None:
        if self._writes_fail:
            raise OSError("connection reset by peer")
        self.messages.append(message)

    @property
    def bodies(self) -> list[bytes]:
        return [m["body"] for m in self.messages if m["type"] == "http.response.body"]

    @property
    def data(self) -> list[str]:
        text = b"".join(self.bodies).decode()
        return [line[len("data: ") :] for line in text.split("\n") if line.startswith("data: ")]


async def serve(
    source: AsyncIterator[list[str]],
    client: Client | None = None,
    ping_interval_s: float = 15,
    method: str = "POST",
) -> tuple[Client, CountingHeld]:
    client = client or Client()
    held = CountingHeld()
    response = SseResponse(held, source, sse_error, ping_interval_s=ping_interval_s)  # type: ignore[arg-type]
    scope = {"type": "http", "method": method}
    await asyncio.wait_for(response(scope, client.receive, client.send), timeout=5)
    return client, held


class Recorded:
    """A source that records whether it ran and whether it was closed."""

    def __init__(self, *batches: list[str]) -> None:
        self.started = False
        self.closed = False
        self._batches = batches

    def __aiter__(self) -> Recorded:
        return self

    async def __anext__(self) -> list[str]:
        self.started = True
        if not self._batches:
            raise StopAsyncIteration
        batch, *rest = self._batches
        self._batches = tuple(rest)
        return batch

    async def aclose(self) -> None:
        self.closed = True


async def from_lists(*batches: list[str]) -> AsyncIterator[list[str]]:
    for batch in batches:
        yield batch


async def test_each_batch_is_one_write_in_order() -> None:
    client, held = await serve(from_lists(["a", "b"], ["c"], ["[DONE]"]))
    start = client.messages[0]
    assert start["status"] == 200
    headers = dict(start["headers"])
    assert headers[b"content-type"] == b"text/event-stream; charset=utf-8"
    assert headers[b"cache-control"] == b"no-store"
    assert headers[b"x-accel-buffering"] == b"no"
    assert client.bodies == [b"data: a\n\ndata: b\n\n", b"data: c\n\n", b"data: [DONE]\n\n", b""]
    assert client.messages[-1]["more_body"] is False and held.closes == 1


def test_frames_are_what_sse_clients_split_on() -> None:
    assert sse_frames(['{"x": 1}', "[DONE]"]) == b'data: {"x": 1}\n\ndata: [DONE]\n\n'


@pytest.mark.parametrize(
    ("failure", "status", "message"),
    [
        (ApiError(504, "too late"), "timeout", "too late"),
        (RedisConnectionError("gone"), "service_unavailable", "lost the connection to Redis: gone"),
        (RuntimeError("secret"), "internal_error", "internal error (RuntimeError); see the gateway log"),
    ],
)  # fmt: skip
async def test_an_error_mid_stream_is_the_last_message(
    failure: Exception, status: str, message: str
) -> None:
    async def failing() -> AsyncIterator[list[str]]:
        yield ['{"partial": true}']
        raise failure

    client, held = await serve(failing())
    assert client.data[0] == '{"partial": true}' and len(client.data) == 2
    error = json.loads(client.data[-1])["error"]
    assert (error["type"], error["message"]) == (status, message)
    assert held.closes == 1 and client.messages[-1]["more_body"] is False


async def test_a_disconnect_stops_the_source_and_closes_what_the_request_holds() -> None:
    client = Client()
    cleaned_up = asyncio.Event()

    async def endless() -> AsyncIterator[list[str]]:
        try:
            yield ["first"]
            client.leave()
            await asyncio.Event().wait()  # no more events ever
            yield ["never"]
        finally:
            cleaned_up.set()

    _, held = await serve(endless(), client)
    assert cleaned_up.is_set() and held.closes == 1 and client.data == ["first"]


async def test_a_quiet_stream_gets_pings() -> None:
    async def slow() -> AsyncIterator[list[str]]:
        await asyncio.sleep(0.2)
        yield ["[DONE]"]

    client, _ = await serve(slow(), ping_interval_s=0.05)
    # A ping is a comment line of its own write, so SSE clients skip it and see no event.
    pings = [body for body in client.bodies if body.startswith(b":")]
    assert len(pings) >= 2 and set(pings) == {b": ping\n\n"}
    assert client.data == ["[DONE]"] and client.bodies[-2:] == [b"data: [DONE]\n\n", b""]


def test_pings_come_every_15_seconds_by_default() -> None:
    response = SseResponse(CountingHeld(), from_lists(), sse_error)  # type: ignore[arg-type]
    assert response.ping_interval == PING_INTERVAL_S == 15


async def test_a_client_gone_before_the_headers_still_closes_what_the_request_holds() -> None:
    source = Recorded(["never sent"])
    client, held = await serve(source, Client(writes_fail=True))
    assert client.messages == [] and not source.started
    assert source.closed and held.closes == 1


async def test_a_client_gone_before_the_first_event_stops_the_source() -> None:
    client = Client()
    client.leave()
    cleaned_up = asyncio.Event()

    async def waiting() -> AsyncIterator[list[str]]:
        try:
            await asyncio.Event().wait()  # the worker has not answered yet
            yield ["never"]
        finally:
            cleaned_up.set()

    _, held = await serve(waiting(), client)
    assert cleaned_up.is_set() and held.closes == 1 and client.data == []


async def test_a_stream_in_flight_when_the_server_stops_may_finish(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    async def finishing() -> AsyncIterator[list[str]]:
        await asyncio.sleep(0.2)
        yield ["last", "[DONE]"]

    monkeypatch.setattr(AppStatus, "should_exit", True)  # what uvicorn's SIGTERM handler sets
    client, held = await serve(finishing())
    assert client.data == ["last", "[DONE]"] and held.closes == 1


async def test_head_sends_headers_only_and_closes_what_the_request_holds() -> None:
    source = Recorded(["never sent"])
    client, held = await serve(source, method="HEAD")
    assert client.bodies == [b""] and client.messages[0]["status"] == 200
    assert not source.started and source.closed and held.closes == 1


# --- the formatter over batches ----------------------------------------------------------------


async def batches_of(*batches: EventBatch) -> AsyncIterator[EventBatch]:
    for batch in batches:
        yield batch


def token(seq: int, text: str, finish: str | None = None) -> tuple[int, Event]:
    usage = Usage(2, seq + 1) if finish else None
    return 0, Event("r", seq, token_ids=[7], text=text, finish=finish, usage=usage)  # type: ignore[arg-type]


async def test_completion_chunks_keep_batch_order_and_end_with_usage() -> None:
    plan = plan_completion(CompletionRequest(model="tiny", prompt="one two"), served(), 0)
    chunks = completion_chunks(
        plan,
        batches_of([token(0, "a"), token(1, "b")], [token(2, "c", "length")]),
        logprobs=None,
        include_usage=True,
    )
    lists = [payloads async for payloads in chunks]
    assert [len(payloads) for payloads in lists] == [2, 1, 2]
    *content, usage, done = [payload for payloads in lists for payload in payloads]
    texts = [json.loads(payload)["choices"][0]["text"] for payload in content]
    assert texts == ["a", "b", "c"] and done == "[DONE]"
    assert json.loads(content[-1])["choices"][0]["finish_reason"] == "length"
    assert json.loads(usage)["usage"] == {
        "prompt_tokens": 2,
        "completion_tokens": 3,
        "total_tokens": 5,
    }


async def test_an_error_in_a_batch_comes_after_the_events_before_it() -> None:
    plan = plan_completion(CompletionRequest(model="tiny", prompt="one two"), served(), 0)
    failed = Event("r", 2, finish="error", error=ErrorInfo("boom", "internal_error"))
    chunks = completion_chunks(
        plan,
        batches_of([token(0, "a"), token(1, "b"), (0, failed), token(3, "never")]),
        logprobs=None,
        include_usage=False,
    )
    first = await chunks.__anext__()
    assert [json.loads(payload)["choices"][0]["text"] for payload in first] == ["a", "b"]
    with pytest.raises(ApiError, match="boom"):
        await chunks.__anext__()
