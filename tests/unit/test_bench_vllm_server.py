"""bench/vllm_server.py without vLLM (it is not installed in CI): the server's command line and
environment, and its process handling against stand-in shell scripts — `group_members` finds a
real process group, `stop` leaves nothing of it alive even when it ignores SIGINT, and a server
that dies at start-up is reported with its log."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from bench import vllm_server
from bench.vllm_server import VLLMServer, group_members, vllm_argv, vllm_env


def test_vllm_argv_serves_the_model_under_our_name_without_prefix_caching() -> None:
    argv = vllm_argv(
        "/venv/bin/python", Path("/models/SmolLM2"), "SmolLM2", "bfloat16", 8123, ["--x", "1"]
    )
    assert argv[:3] == ["/venv/bin/python", "-m", "vllm.entrypoints.openai.api_server"]
    pairs = dict(zip(argv[3::2], argv[4::2], strict=False))
    assert pairs["--model"] == "/models/SmolLM2"
    assert pairs["--served-model-name"] == "SmolLM2"
    assert pairs["--dtype"] == "bfloat16"
    assert (pairs["--host"], pairs["--port"]) == ("127.0.0.1", "8123")
    assert "--no-enable-prefix-caching" in argv
    assert argv[-2:] == ["--x", "1"]


def test_vllm_env_binds_the_threads_and_drops_the_project_python() -> None:
    base = {"PATH": "/usr/bin", "PYTHONPATH": "/work/main", "VIRTUAL_ENV": "/work/main/.venv"}
    env = vllm_env(base, threads=2)
    assert env["VLLM_CPU_OMP_THREADS_BIND"] == "0-1"
    assert env["VLLM_CPU_KVCACHE_SPACE"] == "4"
    assert env["HF_HUB_OFFLINE"] == "1"
    assert env["PATH"] == "/usr/bin"
    assert "PYTHONPATH" not in env and "VIRTUAL_ENV" not in env
    assert vllm_env({}, threads=1)["VLLM_CPU_OMP_THREADS_BIND"] == "0"
    with pytest.raises(ValueError, match="at least one thread"):
        vllm_env({}, threads=0)


def wait_until(condition, timeout_s: float = 5.0) -> None:
    deadline = time.monotonic() + timeout_s
    while not condition() and time.monotonic() < deadline:
        time.sleep(0.05)


def test_group_members_lists_a_session_and_its_children_until_they_exit() -> None:
    # A session leader with one child, like vLLM's API server and its EngineCore.
    script = "import subprocess, time; subprocess.Popen(['sleep', '30']); time.sleep(30)"
    leader = subprocess.Popen([sys.executable, "-c", script], start_new_session=True)
    try:
        wait_until(lambda: len(group_members(leader.pid)) == 2)
        members = group_members(leader.pid)
        assert leader.pid in members and len(members) == 2
        assert os.getpid() not in members
    finally:
        os.killpg(leader.pid, signal.SIGKILL)
        leader.wait()
    wait_until(lambda: not group_members(leader.pid))
    assert group_members(leader.pid) == []


def fake_python(tmp_path: Path, body: str) -> Path:
    """An executable standing in for vLLM's python: ignores its arguments, runs `body`."""
    path = tmp_path / "python"
    path.write_text("#!/bin/sh\n" + body + "\n")
    path.chmod(0o755)
    return path


def test_stop_kills_a_server_and_child_that_ignore_sigint(tmp_path: Path, monkeypatch) -> None:
    monkeypatch.setattr(vllm_server, "STOP_TIMEOUT_S", 0.5)
    python = fake_python(tmp_path, "trap '' INT\nsleep 60 &\nsleep 60\nwait")
    server = VLLMServer(python, tmp_path, "bfloat16", tmp_path / "vllm.log")
    wait_until(lambda: len(group_members(server.process.pid)) == 3)  # sh + two sleeps
    assert len(group_members(server.process.pid)) == 3
    server.stop()
    assert server.process.poll() is not None
    assert group_members(server.process.pid) == []


def test_wait_ready_reports_an_early_exit_with_the_log(tmp_path: Path) -> None:
    python = fake_python(tmp_path, "echo 'no module named vllm' >&2\nexit 3")
    server = VLLMServer(python, tmp_path, "bfloat16", tmp_path / "vllm.log")
    with pytest.raises(RuntimeError, match="exited with 3") as failure, server:
        pass
    assert "no module named vllm" in str(failure.value)
    assert group_members(server.process.pid) == []
