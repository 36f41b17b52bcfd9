"""`spindle serve` splits the CPU cores between its workers (oversubscribed OpenMP threads make
every operator many times slower) unless the user chose --num-threads, and hands its log level to
every process it starts."""

from __future__ import annotations

import os

from common.launcher import Launcher, ServePlan
from common.settings import load_settings
from gateway.settings import GatewaySettings
from worker.settings import WorkerSettings


def test_workers_share_the_cores():
    cores = len(os.sched_getaffinity(0))
    two = Launcher(ServePlan(model="m", workers=2))
    assert two._thread_args() == ["--num-threads", str(max(1, cores // 2))]


def test_an_explicit_thread_count_is_left_alone():
    plan = ServePlan(model="m", workers=2, worker_args=["--num-threads", "3"])
    assert Launcher(plan)._thread_args() == []


def test_the_log_level_reaches_every_process_it_starts(monkeypatch):
    launcher = Launcher(
        ServePlan(model="m", log_level="warning", worker_args=["--dtype", "float32"])
    )
    started: dict[str, list[str]] = {}
    monkeypatch.setattr(launcher, "_start_redis", lambda: "redis://127.0.0.1:1/0")
    monkeypatch.setattr(launcher, "_spawn", lambda name, argv: started.setdefault(name, argv))
    launcher.start()
    assert started["worker-0"][1:3] == ["-m", "worker"]
    worker = load_settings(WorkerSettings, started["worker-0"][3:], environ={})
    assert (worker.log_level, worker.dtype) == ("warning", "float32")
    assert started["gateway"][1:3] == ["-m", "gateway"]
    gateway = load_settings(GatewaySettings, started["gateway"][3:], environ={})
    assert (gateway.log_level, gateway.access_log) == ("warning", True)
