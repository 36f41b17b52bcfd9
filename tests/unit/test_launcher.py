"""`spindle serve` splits the CPU cores between its workers (oversubscribed OpenMP threads make
every operator many times slower) unless the user chose --num-threads."""

from __future__ import annotations

import os

from common.launcher import Launcher, ServePlan


def test_workers_share_the_cores():
    cores = len(os.sched_getaffinity(0))
    two = Launcher(ServePlan(model="m", workers=2))
    assert two._thread_args() == ["--num-threads", str(max(1, cores // 2))]


def test_an_explicit_thread_count_is_left_alone():
    plan = ServePlan(model="m", workers=2, worker_args=["--num-threads", "3"])
    assert Launcher(plan)._thread_args() == []
