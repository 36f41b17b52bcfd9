"""The gateway's relay capacity: how many streamed tokens per second one `python -m gateway`
process carries from Redis pub/sub to HTTP clients when the worker is never the bottleneck.

The worker is `Publisher` below, a stand-in that registers a tiny model card and heartbeats like
tests/integration/fake_worker.py (it reuses that module's `FakeWorker` with `consume=False` for
both), XREADGROUPs jobs from `spindle:req:{model}` and PUBLISHes each job's `max_new_tokens`
one-token events to `spindle:out:{id}` in pipelines, as fast as Redis takes them. The clients are
bench/load.py's, K streaming completions at once, `rounds` times over. Each process (Redis,
publisher, gateway, clients) has its own CPU time read from /proc, so the table shows which of
them the run was waiting on.

    python -m bench.relay_bench --clients 32 --tokens 512 --rounds 3 --out bench/results/relay.json

The bar (issue 4): >= 20,000 relayed tokens/s from one gateway process.

`--lone N` measures the other side of the path instead: its latency. N streamed one-token
completions, one at a time (`--lone-gap-s` idle between them), each timed from its request's write
to its response headers and to its first `data:` line, read off a raw socket so no HTTP client's
own parsing is in the figure. With a stand-in that answers at once, what remains is the service
path's share of a request's TTFT (gateway, Redis, the hops between them), free of a prefill's
noise; the TTFT cost `service_bench --pairs` reads adds the real worker's pickup to it.

    python -m bench.relay_bench --lone 300 --lone-gap-s 0.1 --out bench/results/path.json
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx

from bench.load import distribution, drive, http_post, run_workload, summarise
from bench.report import write_report
from bench.workloads import BenchRequest, Workload
from common.keys import WORKER_GROUP, Keys
from common.launcher import ephemeral_redis_argv, free_port
from common.protocol import Event, Job, Usage

MODEL = "relay-bench"
PROMPT_IDS = [5, 6, 7, 8, 9, 10, 11, 12]  # words of the fake worker's tiny vocabulary
TOKEN_ID = 7  # "cat": every relayed token is the same one-word token
EVENTS_PER_PIPELINE = 64
REPO_ROOT = Path(__file__).resolve().parents[1]
START_TIMEOUT_S = 60.0


# -- the publisher (a child process) -------------------------------------------------------------


def token_event(job: Job, seq: int, worker_id: str) -> Event:
    """The job's one-token event number `seq`; the last one carries finish and usage."""
    last = seq == job.max_new_tokens - 1
    return Event(
        id=job.id,
        seq=seq,
        token_ids=[TOKEN_ID],
        text=" cat",
        finish="length" if last else None,
        usage=Usage(len(job.prompt_ids), job.max_new_tokens) if last else None,
        worker=worker_id,
    )


async def publish_job(redis: Any, keys: Keys, job: Job, worker_id: str) -> None:
    """`job.max_new_tokens` one-token events, the last with finish and usage, in pipelines."""
    channel = keys.events(job.id)
    total = job.max_new_tokens
    for first in range(0, total, EVENTS_PER_PIPELINE):
        pipe = redis.pipeline(transaction=False)
        for seq in range(first, min(first + EVENTS_PER_PIPELINE, total)):
            pipe.publish(channel, token_event(job, seq, worker_id).to_json())
        await pipe.execute()


class SteppedPublisher:
    """Publishes like a continuous batch decoding: every `step_s`, one event for each running
    job, all in one pipeline. Each request then gets one event per step, so the gateway writes
    one SSE message per token (what a served mixed-32 run asks of it), not 64 at once."""

    def __init__(self, redis: Any, keys: Keys, worker_id: str, step_s: float) -> None:
        self.redis, self.keys, self.worker_id, self.step_s = redis, keys, worker_id, step_s
        self.running: dict[str, tuple[Job, int]] = {}  # job id -> (job, its next seq)
        self._task: asyncio.Task[None] | None = None

    def add(self, job: Job) -> None:
        self.running[job.id] = (job, 0)
        if self._task is None or self._task.done():
            self._task = asyncio.create_task(self._steps())

    async def _steps(self) -> None:
        while self.running:
            pipe = self.redis.pipeline(transaction=False)
            for job_id, (job, seq) in list(self.running.items()):
                event = token_event(job, seq, self.worker_id)
                pipe.publish(self.keys.events(job_id), event.to_json())
                if seq + 1 == job.max_new_tokens:
                    del self.running[job_id]
                else:
                    self.running[job_id] = (job, seq + 1)
            await pipe.execute()
            await asyncio.sleep(self.step_s)


async def serve_jobs(redis_url: str, prefix: str, step_ms: float = 0.0) -> None:
    """Register + heartbeat (FakeWorker without consuming) and publish every job's tokens: as
    fast as Redis takes them, or with `step_ms` > 0 one per job per step (`SteppedPublisher`)."""
    from redis.asyncio import Redis
    from redis.exceptions import ResponseError

    from tests.integration.fake_worker import FakeWorker, tiny_model_card

    card = tiny_model_card(MODEL, max_input_tokens=64, max_total_tokens=1 << 20)
    registrar = FakeWorker(redis_url, prefix=prefix, card=card, consume=False)
    keys, redis = Keys(prefix), Redis.from_url(redis_url)
    stream = keys.requests(MODEL)
    with contextlib.suppress(ResponseError):  # BUSYGROUP
        await redis.xgroup_create(stream, WORKER_GROUP, id="0", mkstream=True)
    heartbeat = asyncio.create_task(registrar.run())
    running: set[asyncio.Task[None]] = set()
    stepped = SteppedPublisher(redis, keys, registrar.worker_id, step_ms / 1000)
    while True:
        batches = await redis.xreadgroup(
            WORKER_GROUP, registrar.worker_id, {stream: ">"}, count=64, block=100
        )
        for _, entries in batches or []:
            for entry_id, fields in entries:
                job = Job.from_json(fields[b"job"])
                if step_ms > 0:
                    stepped.add(job)
                else:
                    task = asyncio.create_task(publish_job(redis, keys, job, registrar.worker_id))
                    running.add(task)
                    task.add_done_callback(running.discard)
                await redis.xack(stream, WORKER_GROUP, entry_id)
                await redis.xdel(stream, entry_id)
        if heartbeat.done():
            heartbeat.result()  # re-raise why registration stopped


# -- processes -----------------------------------------------------------------------------------


def cpu_seconds(pid: int) -> float:
    """User + system CPU time of a process so far (/proc/<pid>/stat fields 14 and 15)."""
    text = Path(f"/proc/{pid}/stat").read_text()
    fields = text[text.rindex(")") + 2 :].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


@contextlib.contextmanager
def cpu_used(pids: dict[str, int]) -> Iterator[dict[str, float]]:
    """A dict that, once the block has run, holds each named process's CPU seconds during it."""
    before = {name: cpu_seconds(pid) for name, pid in pids.items()}
    used: dict[str, float] = {}
    yield used
    used.update({name: cpu_seconds(pid) - before[name] for name, pid in pids.items()})


@contextlib.contextmanager
def child(argv: list[str], log_dir: Path, name: str) -> Iterator[subprocess.Popen[bytes]]:
    """A child process logging to `log_dir/name.log`, interrupted (then killed) on exit."""
    with (log_dir / f"{name}.log").open("wb") as log:
        process = subprocess.Popen(argv, cwd=REPO_ROOT, stdout=log, stderr=log)
    try:
        yield process
    finally:
        if process.poll() is None:
            process.send_signal(signal.SIGINT)
            try:
                process.wait(timeout=10)
            except subprocess.TimeoutExpired:
                process.kill()
                process.wait()


def wait_healthy(url: str, processes: list[subprocess.Popen[bytes]], log_dir: Path) -> None:
    """Until /health answers 200 (a worker heartbeat is registered)."""
    deadline = time.monotonic() + START_TIMEOUT_S
    while time.monotonic() < deadline:
        if any(p.poll() is not None for p in processes):
            break
        with contextlib.suppress(httpx.HTTPError):
            if httpx.get(f"{url}/health", timeout=2).status_code == 200:
                return
        time.sleep(0.2)
    logs = "\n".join(f"--- {p.name}\n{p.read_text()[-2000:]}" for p in log_dir.glob("*.log"))
    raise RuntimeError(f"gateway at {url} not healthy within {START_TIMEOUT_S:g} s\n{logs}")


def py_spy() -> Path | None:
    """py-spy beside this Python (a venv's bin, where `pip install py-spy` puts it), else on
    PATH; None where neither has it (it is not one of spindle's dependencies)."""
    beside = Path(sys.executable).parent / "py-spy"
    if beside.exists():
        return beside
    found = shutil.which("py-spy")
    return Path(found) if found else None


@contextlib.contextmanager
def profiled(pid: int, out: Path | None, log_dir: Path) -> Iterator[None]:
    """`py-spy record` on `pid` while the block runs, written to `out` (a flame graph .svg, or
    py-spy's raw collapsed stacks for any other suffix); nothing when `out` is None."""
    if out is None:
        yield
        return
    out.parent.mkdir(parents=True, exist_ok=True)
    kind = "flamegraph" if out.suffix == ".svg" else "raw"
    argv = [str(py_spy()), "record", "--pid", str(pid), "--output", str(out), "--format", kind,
            "--rate", "1000", "--nonblocking"]  # fmt: skip
    with child(argv, log_dir, "py-spy"):
        time.sleep(1.0)  # py-spy attaches before the load starts
        yield


# -- the measurement -----------------------------------------------------------------------------


def relay_workload(clients: int, tokens: int) -> Workload:
    request = BenchRequest(PROMPT_IDS, tokens)
    return Workload(f"relay-{clients}x{tokens}", 0, [request] * clients)


@contextlib.contextmanager
def relay_stack(log_dir: Path, step_ms: float = 0.0) -> Iterator[tuple[str, dict[str, int]]]:
    """Redis, the stand-in worker (stepped if `step_ms` > 0) and one gateway, healthy: the
    gateway's URL and the pids."""
    redis_port, gateway_port = free_port(), free_port()
    redis_url = f"redis://127.0.0.1:{redis_port}/0"
    prefix = f"relay{uuid.uuid4().hex[:6]}"
    redis_argv = ephemeral_redis_argv(redis_port)
    publisher_argv = [sys.executable, "-m", "bench.relay_bench", "--publisher",
                      "--redis-url", redis_url, "--prefix", prefix,
                      "--step-ms", str(step_ms)]  # fmt: skip
    gateway_argv = [sys.executable, "-m", "gateway", "--host", "127.0.0.1",
                    "--port", str(gateway_port), "--redis-url", redis_url, "--prefix", prefix,
                    "--log-level", "warning"]  # fmt: skip
    url = f"http://127.0.0.1:{gateway_port}"
    with (
        child(redis_argv, log_dir, "redis") as redis,
        child(publisher_argv, log_dir, "publisher") as publisher,
        child(gateway_argv, log_dir, "gateway") as gateway,
    ):
        wait_healthy(url, [redis, publisher, gateway], log_dir)
        drive(run_workload(url, MODEL, relay_workload(4, 16)))  # warm-up, untimed
        yield url, {"gateway": gateway.pid, "redis": redis.pid, "publisher": publisher.pid}


def measure(args: argparse.Namespace, log_dir: Path) -> dict[str, Any]:
    with relay_stack(log_dir, args.step_ms) as (url, pids):
        workload = relay_workload(args.clients, args.tokens)
        with cpu_used(pids) as cpu, profiled(pids["gateway"], args.profile, log_dir):
            client_before, start = time.process_time(), time.perf_counter()
            summaries = [drive(run_workload(url, MODEL, workload)) for _ in range(args.rounds)]
            wall_s = time.perf_counter() - start
        cpu["client"] = time.process_time() - client_before
    return relay_result(args, summaries, wall_s, cpu)


def measure_lone(args: argparse.Namespace, log_dir: Path) -> dict[str, Any]:
    """`args.lone` one-token streamed completions, one at a time: each one's time from the
    request's write to the response headers and to the first `data:` line."""
    with relay_stack(log_dir) as (url, pids):
        port = int(url.rsplit(":", 1)[1])
        body = json.dumps({"model": MODEL, "prompt": PROMPT_IDS, "max_tokens": 1, "stream": True})
        request = http_post(f"127.0.0.1:{port}", "/v1/completions", body.encode())
        with cpu_used(pids) as cpu, profiled(pids["gateway"], args.profile, log_dir):
            timings = []
            for _ in range(args.lone):
                time.sleep(args.lone_gap_s)
                timings.append(time_lone_request(port, request))
    headers_s, first_data_s = zip(*timings, strict=True)
    return lone_result(args, list(headers_s), list(first_data_s), cpu)


def time_lone_request(port: int, request: bytes) -> tuple[float, float]:
    """(seconds to the end of the response headers, to the first `data:` line) of one streamed
    request on a new connection, read to its `[DONE]`."""
    with socket.create_connection(("127.0.0.1", port), timeout=START_TIMEOUT_S) as sock:
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        received, headers_at, first_data_at = b"", None, None
        start = time.perf_counter()
        sock.sendall(request)
        while b"[DONE]" not in received:
            chunk = sock.recv(65536)
            if not chunk:
                raise RuntimeError(f"the gateway closed the stream early: {received[-500:]!r}")
            received += chunk
            now = time.perf_counter()
            if headers_at is None and b"\r\n\r\n" in received:
                headers_at = now
                if not received.startswith(b"HTTP/1.1 200"):
                    raise RuntimeError(f"not a streamed answer: {received[:500]!r}")
            if first_data_at is None and b"data: {" in received:
                first_data_at = now
    assert headers_at is not None and first_data_at is not None  # both precede [DONE]
    return headers_at - start, first_data_at - start


def lone_result(
    args: argparse.Namespace, headers_s: list[float], first_data_s: list[float], cpu: dict
) -> dict[str, Any]:
    return {
        "lone_requests": len(first_data_s),
        "gap_s": args.lone_gap_s,
        "headers": distribution(headers_s),
        "first_data": distribution(first_data_s),
        "cpu_ms_per_request": {
            name: round(1000 * seconds / len(first_data_s), 3) for name, seconds in cpu.items()
        },
        "load_average": os.getloadavg(),
        "cores": os.cpu_count(),
    }


def lone_table(result: dict[str, Any]) -> str:
    first, headers, cpu = result["first_data"], result["headers"], result["cpu_ms_per_request"]
    return (
        "| requests (gap s) | first data p50 / p90 / p99 ms | headers p50 ms "
        "| CPU ms per request: gateway / redis / stand-in |\n"
        "|---|---|---|---|\n"
        f"| {result['lone_requests']} ({result['gap_s']:g}) "
        f"| **{first['p50_ms']:.2f}** / {first['p90_ms']:.2f} / {first['p99_ms']:.2f} "
        f"| {headers['p50_ms']:.2f} "
        f"| {cpu['gateway']:.2f} / {cpu['redis']:.2f} / {cpu['publisher']:.2f} |\n"
    )


def relay_result(
    args: argparse.Namespace, rounds: list[list[Any]], wall_s: float, cpu: dict[str, float]
) -> dict[str, Any]:
    records = [record for round_records in rounds for record in round_records]
    per_round = [summarise(round_records) for round_records in rounds]
    tokens = sum(s.get("output_tokens", 0) for s in per_round)
    failed = sum(s["failed"] for s in per_round)
    return {
        "clients": args.clients,
        "tokens_per_request": args.tokens,
        "rounds": args.rounds,
        "step_ms": args.step_ms,
        "requests": len(records),
        "failed": failed,
        "tokens": tokens,
        "wall_s": round(wall_s, 3),
        "tokens_per_s": round(tokens / wall_s, 1),
        "best_round_tokens_per_s": max(s.get("output_tokens_per_s") or 0 for s in per_round),
        "cpu_s": {name: round(seconds, 2) for name, seconds in cpu.items()},
        "gateway_cpu_s_per_1k_tokens": round(1000 * cpu["gateway"] / tokens, 4) if tokens else None,
        "per_round": per_round,
        "load_average": os.getloadavg(),
        "cores": os.cpu_count(),
    }


def markdown_table(result: dict[str, Any]) -> str:
    cpu = result["cpu_s"]
    stepped = f" (a step every {result['step_ms']:g} ms)" if result.get("step_ms") else ""
    shares = " / ".join(
        f"{name} {cpu[name] / result['wall_s']:.0%}"
        for name in ("gateway", "redis", "publisher", "client")
    )
    return (
        "| clients x tokens x rounds | tokens | failed | s | relayed tok/s (best round) "
        "| gateway CPU s / 1k tok | CPU share of wall: gateway / redis / publisher / client |\n"
        "|---|---|---|---|---|---|---|\n"
        f"| {result['clients']} x {result['tokens_per_request']} x {result['rounds']}{stepped} "
        f"| {result['tokens']} | {result['failed']} | {result['wall_s']:.2f} "
        f"| **{result['tokens_per_s']:,.0f}** ({result['best_round_tokens_per_s']:,.0f}) "
        f"| {result['gateway_cpu_s_per_1k_tokens']:.3f} | {shares} |\n"
    )


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--clients", type=int, default=32, help="concurrent streaming requests")
    parser.add_argument("--tokens", type=int, default=512, help="tokens per request")
    parser.add_argument("--rounds", type=int, default=3, help="waves of --clients requests")
    parser.add_argument("--out", type=Path, default=Path("bench/results/relay.json"))
    parser.add_argument(
        "--profile", type=Path, default=None, help="py-spy the gateway into this file"
    )
    parser.add_argument(
        "--lone", type=int, default=0, help="instead: N one-token requests one at a time (latency)"
    )
    parser.add_argument("--lone-gap-s", type=float, default=0.1, help="idle before each --lone")
    parser.add_argument(
        "--step-ms",
        type=float,
        default=0.0,
        help="publish one token per request every STEP_MS, as a decoding batch does (0: flat out)",
    )
    parser.add_argument("--publisher", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--redis-url", help=argparse.SUPPRESS)
    parser.add_argument("--prefix", default="spindle", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.profile is not None and py_spy() is None:
        parser.error("--profile needs py-spy: pip install py-spy (into this Python's venv)")
    return args


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    if args.publisher:
        with contextlib.suppress(KeyboardInterrupt):
            asyncio.run(serve_jobs(args.redis_url, args.prefix, args.step_ms))
        return
    with tempfile.TemporaryDirectory(prefix="relay-bench-") as log_dir:
        if args.lone:
            result = measure_lone(args, Path(log_dir))
            table = lone_table(result)
        else:
            result = measure(args, Path(log_dir))
            table = markdown_table(result)
    write_report(args.out, result, table)


if __name__ == "__main__":
    main()
