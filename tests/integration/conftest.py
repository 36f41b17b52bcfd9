"""Integration-test plumbing: a real `redis-server` for the session, background event loops for
fake workers, and gateways served by uvicorn in a thread.

`redis_server` starts its own redis-server on a free port (no persistence), waits until PING
answers and kills it at the end of the session. Tests isolate themselves with a key prefix
(`unique_prefix`) rather than separate servers.
"""

from __future__ import annotations

import asyncio
import subprocess
import threading
import time
import uuid
from collections.abc import Callable, Coroutine, Iterator
from concurrent.futures import Future
from dataclasses import dataclass
from typing import Any

import httpx
import pytest
import redis
import uvicorn

from common.launcher import ephemeral_redis_argv, free_port
from gateway.app import create_app
from gateway.settings import GatewaySettings
from tests.integration.fake_worker import FakeWorker

REDIS_START_TIMEOUT_S = 10.0


@dataclass
class RedisServer:
    """A redis-server child process on 127.0.0.1:port."""

    port: int
    process: subprocess.Popen[bytes]

    @property
    def url(self) -> str:
        return f"redis://127.0.0.1:{self.port}/0"

    @classmethod
    def start(cls) -> RedisServer:
        port = free_port()
        process = subprocess.Popen(
            ephemeral_redis_argv(port), stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL
        )
        server = cls(port, process)
        deadline = time.monotonic() + REDIS_START_TIMEOUT_S
        client = redis.Redis(port=port, socket_connect_timeout=0.2)
        while True:
            try:
                client.ping()
                client.close()
                return server
            except redis.ConnectionError:
                if time.monotonic() > deadline or process.poll() is not None:
                    server.stop()
                    pytest.fail(f"redis-server on port {port} did not answer PING")
                time.sleep(0.02)

    def stop(self) -> None:
        self.process.kill()
        self.process.wait(timeout=10)


@pytest.fixture(scope="session")
def redis_server() -> Iterator[RedisServer]:
    server = RedisServer.start()
    yield server
    server.stop()


@pytest.fixture
def unique_prefix() -> str:
    return f"t{uuid.uuid4().hex[:10]}"


class BackgroundLoop:
    """An asyncio loop in a daemon thread, for fake workers that must outlive one test's loop."""

    def __init__(self) -> None:
        self.loop = asyncio.new_event_loop()
        self._thread = threading.Thread(target=self.loop.run_forever, daemon=True)
        self._thread.start()

    def submit(self, coroutine: Coroutine[Any, Any, Any]) -> Future[Any]:
        """Run a coroutine on the loop; its result (or error) arrives in the returned future."""
        return asyncio.run_coroutine_threadsafe(coroutine, self.loop)

    def start_task(self, coroutine: Coroutine[Any, Any, Any]) -> asyncio.Task[Any]:
        async def create() -> asyncio.Task[Any]:
            return asyncio.create_task(coroutine)

        return self.submit(create()).result(timeout=5)

    def stop_task(self, task: asyncio.Task[Any]) -> None:
        """Cancel a task and wait until its clean-up has run."""

        async def cancel() -> None:
            task.cancel()
            await asyncio.gather(task, return_exceptions=True)

        self.submit(cancel()).result(timeout=5)

    def close(self) -> None:
        async def cancel_all() -> None:
            tasks = [t for t in asyncio.all_tasks() if t is not asyncio.current_task()]
            for task in tasks:
                task.cancel()
            await asyncio.gather(*tasks, return_exceptions=True)

        self.submit(cancel_all()).result(timeout=10)
        self.loop.call_soon_threadsafe(self.loop.stop)
        self._thread.join(timeout=5)
        self.loop.close()


@pytest.fixture(scope="session")
def background_loop() -> Iterator[BackgroundLoop]:
    loop = BackgroundLoop()
    yield loop
    loop.close()


class RunningWorker:
    """A FakeWorker running on the background loop until `stop()` (which removes its heartbeat)."""

    def __init__(self, worker: FakeWorker, loop: BackgroundLoop) -> None:
        self.worker = worker
        self._loop = loop
        self._task = loop.start_task(worker.run())

    def stop(self) -> None:
        self._loop.stop_task(self._task)


def start_worker(
    loop: BackgroundLoop, redis_url: str, prefix: str, **options: Any
) -> RunningWorker:
    """Start a fake worker and wait until its heartbeat is visible."""
    worker = FakeWorker(redis_url, prefix=prefix, **options)
    running = RunningWorker(worker, loop)
    client = redis.Redis.from_url(redis_url)
    deadline = time.monotonic() + 5
    while not client.exists(worker.keys.worker(worker.worker_id)):
        if time.monotonic() > deadline:
            pytest.fail("the fake worker did not register within 5 s")
        time.sleep(0.01)
    client.close()
    return running


class GatewayThread:
    """The gateway app served by uvicorn in a thread, on a free port."""

    def __init__(self, settings: GatewaySettings) -> None:
        self.settings = settings
        config = uvicorn.Config(
            create_app(settings),
            host="127.0.0.1",
            port=settings.port,
            log_level="warning",
            lifespan="on",
        )
        self.server = uvicorn.Server(config)
        self._thread = threading.Thread(target=self.server.run, daemon=True)
        self._thread.start()
        deadline = time.monotonic() + 10
        while not self.server.started:
            if time.monotonic() > deadline or not self._thread.is_alive():
                pytest.fail("the gateway did not start within 10 s")
            time.sleep(0.01)

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.settings.port}"

    def stop(self) -> None:
        self.server.should_exit = True
        self._thread.join(timeout=10)


def start_gateway(redis_url: str, prefix: str, **overrides: Any) -> GatewayThread:
    settings = GatewaySettings(
        host="127.0.0.1", port=free_port(), redis_url=redis_url, prefix=prefix, **overrides
    )
    return GatewayThread(settings)


# --- assertions and waits shared by integration tests ---------------------------------------


def openai_error(response: httpx.Response, status: int) -> dict[str, Any]:
    """Assert an OpenAI-shaped error body with this status; return its `error` object."""
    assert response.status_code == status, response.text
    body = response.json()
    assert set(body) == {"error"} and set(body["error"]) == {"message", "type", "param", "code"}
    assert "Traceback" not in response.text
    return body["error"]


def tgi_error(response: httpx.Response, status: int) -> dict[str, Any]:
    """Assert a TGI-shaped error body (`error`, `error_type`) with this status."""
    assert response.status_code == status, response.text
    body = response.json()
    assert set(body) == {"error", "error_type"} and "Traceback" not in response.text
    return body


def sse_data(response: httpx.Response) -> list[str]:
    """The `data:` payloads of a Server-Sent Events response."""
    return [line[len("data: ") :] for line in response.iter_lines() if line.startswith("data: ")]


def wait_for_message(listener: Any, timeout_s: float = 5.0) -> str:
    """The next message on a (sync) redis pub/sub subscription, e.g. `spindle:cancel`."""
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        message = listener.get_message(ignore_subscribe_messages=True, timeout=0.1)
        if message is not None:
            return message["data"].decode()
    raise AssertionError(f"no pub/sub message arrived in {timeout_s} s")


def wait_until(condition: Callable[[], bool], timeout_s: float = 5.0) -> None:
    deadline = time.monotonic() + timeout_s
    while not condition():
        assert time.monotonic() < deadline, f"condition not met in {timeout_s} s"
        time.sleep(0.05)
