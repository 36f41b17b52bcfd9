"""Real service processes for the end-to-end tests: `python -m worker` and `python -m gateway`
subprocesses against the session's redis-server, each writing its output to a log file whose tail
is printed when a test fails, and each killed at teardown however the test ends. Also the probes
those tests share: a worker's heartbeat, a process's CPU time and children (from /proc), and a
transformers greedy reference.
"""

from __future__ import annotations

import contextlib
import json
import os
import re
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Self

import httpx
import pytest
import redis
import torch
from openai import AsyncOpenAI, OpenAI

from common.keys import Keys
from common.protocol import Event, Job
from tests.integration.conftest import free_port

REPO_ROOT = Path(__file__).resolve().parents[2]
DEMO_MODEL_NAME = "SmolLM2-135M-Instruct"  # the served name: the demo folder's name
START_TIMEOUT_S = 180.0  # loading the demo model takes ~10 s alone, much longer on a busy machine
LOG_TAIL_LINES = 60

# One torch thread per worker: two workers, a gateway and the test share two cores, and with
# torch's default of two threads each a decode step was measured at 2 s instead of 85 ms.
WORKER_FLAGS = (
    "--dtype", "float32",
    "--max-total-tokens", "1024",
    "--max-batch-total-tokens", "16384",
    "--heartbeat-ttl", "2",
    "--num-threads", "1",
)  # fmt: skip

_SPAWNED: list[ServiceProcess] = []  # every process of this session, for the failure report
_REQUEST_LINE = re.compile(r"request id=\S+ .*finish=\S+")
_FIELD = re.compile(r"(\w+)=(\S+)")


@dataclass
class ServiceProcess:
    """A child process whose stdout and stderr go to `log_path` (stdout may be piped instead,
    then its lines are collected in `stdout_lines` by a reader thread)."""

    name: str
    process: subprocess.Popen[bytes]
    log_path: Path
    started: float = field(default_factory=time.monotonic)
    ended: float | None = None
    stdout_lines: list[str] = field(default_factory=list)

    @classmethod
    def spawn(
        cls,
        name: str,
        argv: Sequence[str],
        log_dir: Path,
        *,
        pipe_stdout: bool = False,
        **attributes: Any,
    ) -> Self:
        log_path = log_dir / f"{name}.log"
        with log_path.open("wb") as log:
            process = subprocess.Popen(
                list(argv),
                cwd=REPO_ROOT,
                env=_child_env(),
                stdout=subprocess.PIPE if pipe_stdout else log,
                stderr=log,
            )
        spawned = cls(name, process, log_path, **attributes)
        if pipe_stdout:
            threading.Thread(target=spawned._read_stdout, daemon=True).start()
        _SPAWNED.append(spawned)
        return spawned

    def _read_stdout(self) -> None:
        assert self.process.stdout is not None
        for raw in self.process.stdout:
            self.stdout_lines.append(raw.decode(errors="replace").rstrip("\n"))

    @property
    def pid(self) -> int:
        return self.process.pid

    @property
    def alive(self) -> bool:
        return self.process.poll() is None

    def log_text(self) -> str:
        return self.log_path.read_text(errors="replace")

    def log_tail(self) -> str:
        lines = self.log_text().splitlines()[-LOG_TAIL_LINES:]
        if self.stdout_lines:
            lines = ["(stdout)", *self.stdout_lines[-LOG_TAIL_LINES:], "(stderr)", *lines]
        state = "running" if self.alive else f"exited with {self.process.returncode}"
        return "\n".join([f"----- {self.name} (pid {self.pid}, {state}) -----", *lines])

    def wait_exit(self, timeout_s: float) -> int:
        """The exit status; fails the test if the process is still running after `timeout_s`."""
        try:
            code = self.process.wait(timeout=timeout_s)
        except subprocess.TimeoutExpired:
            pytest.fail(f"{self.name} did not exit within {timeout_s:g} s\n{self.log_tail()}")
        self.ended = self.ended or time.monotonic()
        return code

    def kill(self) -> None:
        if self.alive:
            self.process.kill()
        self.process.wait(timeout=30)
        self.ended = self.ended or time.monotonic()


@dataclass
class WorkerProcess(ServiceProcess):
    worker_id: str = ""

    def finished_requests(self) -> dict[str, dict[str, str]]:
        """Request id -> the fields (finish, completion_tokens...) of the worker's one log line
        per finished request: `request id=... model=... prompt_tokens=... finish=...`."""
        lines = [line for line in self.log_text().splitlines() if _REQUEST_LINE.search(line)]
        rows = [dict(_FIELD.findall(line[line.index("request id=") :])) for line in lines]
        return {row["id"]: row for row in rows}


@dataclass
class GatewayProcess(ServiceProcess):
    port: int = 0

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"


def _child_env() -> dict[str, str]:
    """The test's environment without SPINDLE_* twins, so only the flags given here count."""
    return {key: value for key, value in os.environ.items() if not key.startswith("SPINDLE_")}


def spawn_worker(
    model_dir: Path,
    redis_url: str,
    prefix: str,
    log_dir: Path,
    worker_id: str,
    extra: Sequence[str] = (),
) -> WorkerProcess:
    """Start a worker (does not wait for it: see `wait_for_worker`)."""
    argv = [sys.executable, "-m", "worker", "--model", str(model_dir), "--redis-url", redis_url,
            "--prefix", prefix, "--worker-id", worker_id, *WORKER_FLAGS, *extra]  # fmt: skip
    return WorkerProcess.spawn(worker_id, argv, log_dir, worker_id=worker_id)


def spawn_gateway(redis_url: str, prefix: str, log_dir: Path) -> GatewayProcess:
    """Start `python -m gateway` on a free port (does not wait: see `wait_for_health`)."""
    port = free_port()
    argv = [sys.executable, "-m", "gateway", "--host", "127.0.0.1", "--port", str(port),
            "--redis-url", redis_url, "--prefix", prefix]  # fmt: skip
    return GatewayProcess.spawn(f"gateway-{prefix}", argv, log_dir, port=port)


def wait_for(
    condition: Callable[[], bool], what: str, timeout_s: float, processes: Sequence[ServiceProcess]
) -> None:
    """Poll `condition`; fail with the processes' logs if it times out or one of them exits."""
    deadline = time.monotonic() + timeout_s
    while not condition():
        dead = [p for p in processes if not p.alive]
        if dead or time.monotonic() > deadline:
            reason = f"{dead[0].name} exited" if dead else f"not within {timeout_s:g} s"
            logs = "\n".join(p.log_tail() for p in processes)
            pytest.fail(f"waiting for {what}: {reason}\n{logs}")
        time.sleep(0.1)


def wait_for_worker(client: redis.Redis, prefix: str, worker: WorkerProcess) -> None:
    key = Keys(prefix).worker(worker.worker_id)
    wait_for(
        lambda: bool(client.exists(key)), f"{worker.name}'s heartbeat", START_TIMEOUT_S, [worker]
    )


def wait_for_health(gateway: GatewayProcess) -> None:
    def healthy() -> bool:
        try:
            return httpx.get(f"{gateway.url}/health", timeout=2).status_code == 200
        except httpx.HTTPError:
            return False

    wait_for(healthy, f"{gateway.name}'s /health", START_TIMEOUT_S, [gateway])


def heartbeat(client: redis.Redis, prefix: str, worker_id: str) -> dict[str, Any] | None:
    raw = client.get(Keys(prefix).worker(worker_id))
    return None if raw is None else json.loads(raw)


def wait_until_idle(client: redis.Redis, prefix: str, worker_id: str, timeout_s: float) -> None:
    """Until the worker's heartbeat shows no running or waiting sequence and no used KV block."""

    def idle() -> bool:
        status = heartbeat(client, prefix, worker_id)
        return status is not None and (
            status["running"] == status["waiting"] == status["kv_used_blocks"] == 0
        )

    deadline = time.monotonic() + timeout_s
    while not idle():
        status = heartbeat(client, prefix, worker_id)
        assert time.monotonic() < deadline, f"{worker_id} not idle after {timeout_s} s: {status}"
        time.sleep(0.1)


@dataclass
class ServiceStack:
    """Worker processes and one gateway process sharing a key prefix on the session's Redis."""

    redis_url: str
    prefix: str
    workers: list[WorkerProcess]
    gateway: GatewayProcess
    client: redis.Redis

    @property
    def keys(self) -> Keys:
        return Keys(self.prefix)

    @property
    def stream(self) -> str:
        return self.keys.requests(DEMO_MODEL_NAME)

    def openai(self) -> OpenAI:
        return OpenAI(
            base_url=f"{self.gateway.url}/v1", api_key="unused", max_retries=0, timeout=300
        )

    def async_openai(self) -> AsyncOpenAI:
        return AsyncOpenAI(
            base_url=f"{self.gateway.url}/v1", api_key="unused", max_retries=0, timeout=300
        )

    def wait_idle(self, timeout_s: float = 30.0) -> None:
        for worker in self.workers:
            if worker.alive:
                wait_until_idle(self.client, self.prefix, worker.worker_id, timeout_s)
        assert self.client.xlen(self.stream) == 0


@contextlib.contextmanager
def service_stack(
    redis_url: str, prefix: str, model_dir: Path, log_dir: Path, worker_ids: Sequence[str]
) -> Iterator[ServiceStack]:
    """Start the workers and the gateway together, wait until all are ready, kill them after."""
    client = redis.Redis.from_url(redis_url)
    with contextlib.ExitStack() as cleanup:
        cleanup.callback(client.close)
        workers = []
        for worker_id in worker_ids:
            workers.append(spawn_worker(model_dir, redis_url, prefix, log_dir, worker_id))
            cleanup.callback(workers[-1].kill)
        gateway = spawn_gateway(redis_url, prefix, log_dir)
        cleanup.callback(gateway.kill)
        for worker in workers:
            wait_for_worker(client, prefix, worker)
        wait_for_health(gateway)
        yield ServiceStack(redis_url, prefix, workers, gateway, client)


@pytest.fixture(autouse=True)
def service_logs_on_failure(request: pytest.FixtureRequest) -> Iterator[None]:
    """When the test failed, print the log tails of the processes that ran during it."""
    started = time.monotonic()
    failed_before = request.session.testsfailed
    yield
    if request.session.testsfailed == failed_before:
        return
    relevant = [p for p in _SPAWNED if p.ended is None or p.ended >= started]
    capture = request.config.pluginmanager.getplugin("capturemanager")
    # Teardown output is not shown for a failed call, so write past pytest's capture.
    with capture.global_and_fixture_disabled() if capture else contextlib.nullcontext():
        print("\n" + "\n".join(p.log_tail() for p in relevant), file=sys.stderr)


# --- talking to a worker through Redis alone ----------------------------------------------


class JobChannel:
    """One request's event channel, subscribed (and confirmed) before its job is sent, as the
    gateway does it (DESIGN.md: SUBSCRIBE before XADD)."""

    def __init__(self, client: redis.Redis, keys: Keys, request_id: str) -> None:
        self.events: list[Event] = []
        self._pubsub = client.pubsub()
        self._pubsub.subscribe(keys.events(request_id))
        deadline = time.monotonic() + 5
        while True:
            message = self._pubsub.get_message(timeout=0.2)
            if message is not None and message["type"] == "subscribe":
                break
            assert time.monotonic() < deadline, "Redis did not confirm the subscription in 5 s"

    def _read(self, timeout_s: float) -> None:
        message = self._pubsub.get_message(ignore_subscribe_messages=True, timeout=timeout_s)
        if message is not None and message["type"] == "message":
            self.events.append(Event.from_json(message["data"]))

    @property
    def token_ids(self) -> list[int]:
        return [token for event in self.events for token in event.token_ids]

    def wait_for_tokens(self, count: int, timeout_s: float) -> None:
        deadline = time.monotonic() + timeout_s
        while len(self.token_ids) < count:
            assert time.monotonic() < deadline, f"{len(self.token_ids)} tokens in {timeout_s} s"
            self._read(0.1)

    def read_to_end(self, timeout_s: float, linger_s: float = 0.5) -> list[Event]:
        """Every event until the terminal one, then `linger_s` more to catch any extra event."""
        deadline = time.monotonic() + timeout_s
        while not any(event.finish for event in self.events):
            assert time.monotonic() < deadline, f"no terminal event in {timeout_s} s: {self.events}"
            self._read(0.1)
        linger_until = time.monotonic() + linger_s
        while time.monotonic() < linger_until:
            self._read(0.05)
        return self.events

    def close(self) -> None:
        self._pubsub.close()


def send_job(client: redis.Redis, keys: Keys, job: Job) -> JobChannel:
    """Subscribe to the job's channel, then XADD it to its model's stream."""
    channel = JobChannel(client, keys, job.id)
    client.xadd(keys.requests(job.model), {"job": job.to_json()})
    return channel


# --- /proc probes ----------------------------------------------------------------------------


def _stat_fields(pid: int) -> list[str]:
    """/proc/<pid>/stat after the command name, so index 0 is field 3 (state)."""
    text = Path(f"/proc/{pid}/stat").read_text()
    return text[text.rindex(")") + 2 :].split()


def cpu_seconds(pid: int) -> float:
    """User + system CPU time the process has used so far."""
    fields = _stat_fields(pid)
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def children_of(pid: int) -> list[int]:
    found = []
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            with contextlib.suppress(OSError, ValueError, IndexError):
                if int(_stat_fields(int(entry.name))[1]) == pid:
                    found.append(int(entry.name))
    return found


def is_running(pid: int) -> bool:
    """True while the pid exists and is not a zombie."""
    try:
        return _stat_fields(pid)[0] != "Z"
    except (OSError, ValueError, IndexError):
        return False


def kill_quietly(pid: int) -> None:
    with contextlib.suppress(ProcessLookupError):
        os.kill(pid, signal.SIGKILL)


# --- the reference ---------------------------------------------------------------------------


@torch.inference_mode()
def transformers_greedy(
    model: Any, prompt_ids: list[int], max_new_tokens: int, eos_ids: Sequence[int] = ()
) -> list[int]:
    """Greedy decoding with transformers' forward pass over the whole sequence at each step (no
    cache: the simplest reference), stopping after an EOS id."""
    generated: list[int] = []
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # see WORKER_FLAGS
    try:
        while len(generated) < max_new_tokens and not set(generated[-1:]) & set(eos_ids):
            logits = model(input_ids=torch.tensor([prompt_ids + generated])).logits
            generated.append(int(logits[0, -1].argmax()))
    finally:
        torch.set_num_threads(threads)
    return generated
