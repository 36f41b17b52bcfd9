"""The price of the service path: one workload through spindle's in-process engine, then the same
workload end to end through `spindle serve` (Redis + worker process + gateway process, driven
over HTTP by bench/load.py), on the same model, dtype, engine limits and 2 torch threads, in one
run and never at the same time.

* **in-process** — `LLM` with the worker's engine options, every request added at once and the
  engine stepped to the end (`bench.engine_bench.run_spindle`); TTFT from the start.
* **service** — `spindle serve` started as a subprocess with the same options, warmed up on a
  short request, then the workload as streaming completions (token-id prompts, `ignore_eos`);
  TTFT from each request's send. The in-process engine is freed before the service starts.

Both run with prefix caching off unless `--prefix-caching` (the warm-up and the `--repeat`s send
the same prompts, and a warm cache would let a repeat skip its prefill); the fastest repeat counts.
`run_served` drives any started server the same way (`bench.vllm_server.VLLMServer` too).

The issue's bar: the service costs <= 5 % of the in-process throughput and <= 5 ms of TTFT p50.
Read the TTFT cost on `single`, with `--pairs N` (`run_paired`: the two systems alternate, both
alive, so a prefill's drift between the machine's fast and slow spells falls on both alike; the
cost is the median of the pairs' differences, `compare`, which reads the throughput cost pair by
pair too — the i-th run of each side being the i-th pair, which only `--pairs` makes adjacent): on
mixed-32 the worker admits the requests as they reach the stream, while the in-process engine gets
all 32 before its first step, so the two TTFT p50s differ by how the burst lands, not by the
path. The served one has read lower (first prefills smaller and earlier) and, on the Zen 4 in
2026-12, 0.3-0.4 s higher: the burst's first job prefilled alone while the other 31 waited.
On a 2-core machine with 2 torch threads, the gateway, Redis and the client take CPU from the
worker's OpenMP threads; `--threads 1` shows the path's own cost without that contention.

    python -m bench.service_bench --dtype bfloat16 --workload mixed-32 \\
        --out bench/results/service.json
    python -m bench.service_bench --dtype float32 --workload single --pairs 10
"""

from __future__ import annotations

import argparse
import contextlib
import gc
import os
import signal
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Iterator, Mapping
from pathlib import Path
from typing import Any, NamedTuple, Protocol

import httpx

from bench.load import (
    best_run,
    clocked_summary,
    drive,
    median_ttft_p50_ms,
    pair_throughput_costs_pct,
    paired_ttft_cost_interval_ms,
    paired_ttft_cost_ms,
    run_workload,
    summarise,
)
from bench.report import write_report
from bench.workloads import BenchRequest, Workload, load_workload
from common.launcher import free_port

REPO_ROOT = Path(__file__).resolve().parents[1]
READY_TIMEOUT_S = 600.0
WARMUP = Workload("warmup", 0, [BenchRequest([504, 3469, 314, 253, 1345, 30, 378, 3834], 4)])


def add_engine_arguments(parser: argparse.ArgumentParser) -> None:
    """The engine flags every spindle run of a server benchmark shares (in-process and served)."""
    add = parser.add_argument
    add("--threads", type=int, default=2, help="torch threads, both systems")
    add("--max-total-tokens", type=int, default=1024)
    add("--max-batch-total-tokens", type=int, default=16384, help="KV cache tokens, both systems")
    add("--max-batch-size", type=int, default=32)
    add("--max-batch-prefill-tokens", type=int, default=2048)
    add(
        "--prefix-caching",
        action="store_true",
        help="let spindle reuse cached prompt blocks (off: repeats send the same prompts)",
    )


def engine_options(args: argparse.Namespace) -> dict[str, Any]:
    """The engine limits both systems run with (the worker's flags of the same names)."""
    return {
        "dtype": args.dtype,
        "max_total_tokens": args.max_total_tokens,
        "max_batch_total_tokens": args.max_batch_total_tokens,
        "max_batch_size": args.max_batch_size,
        "max_batch_prefill_tokens": args.max_batch_prefill_tokens,
        "enable_prefix_caching": args.prefix_caching,
    }


def as_flags(options: dict[str, Any]) -> list[str]:
    """Worker flags: `--key value`, and `--key` / `--no-key` for booleans."""
    flags = []
    for key, value in options.items():
        name = key.replace("_", "-")
        if isinstance(value, bool):
            flags.append(f"--{name}" if value else f"--no-{name}")
        else:
            flags.extend((f"--{name}", str(value)))
    return flags


def run_in_process(
    model_dir: Path, workloads: list[Workload], args: argparse.Namespace
) -> dict[str, dict[str, Any]]:
    """Each workload `args.repeat` times through the engine in this process, the fastest repeat
    per workload; the engine is freed before returning so the service gets the cores."""
    llm = in_process_engine(model_dir, args)
    results = {}
    for workload in workloads:
        runs = [in_process_once(llm, workload, f"{workload.name}-{i}") for i in range(args.repeat)]
        results[workload.name] = best_run(runs)
    del llm
    gc.collect()
    return results


def in_process_engine(model_dir: Path, args: argparse.Namespace) -> Any:
    """spindle's `LLM` in this process with the worker's engine options, warmed up."""
    import torch

    from bench.engine_bench import run_spindle
    from worker.engine.llm import LLM

    torch.set_num_threads(args.threads)
    llm = LLM(str(model_dir), num_threads=args.threads, **engine_options(args))
    run_spindle(llm, WARMUP, "warmup")  # untimed: first calls allocate and pick kernels
    return llm


def in_process_once(llm: Any, workload: Workload, tag: str) -> dict[str, Any]:
    from bench.engine_bench import run_spindle

    load = os.getloadavg()[0]
    cpu_start = time.process_time()
    seconds, ttft, outputs = run_spindle(llm, workload, tag)
    summary = clocked_summary(seconds, ttft, sum(map(len, outputs)))
    summary["cpu_s"] = round(time.process_time() - cpu_start, 2)
    summary["load_average"] = load
    ttft = summary["ttft"]["p50_ms"]
    print(
        f"  in-process {workload.name}: {summary['output_tokens_per_s']} tok/s, "
        f"TTFT p50 {ttft:.1f} ms",
        flush=True,
    )
    return summary


class ServerProcess:
    """A server child on 127.0.0.1:`port`; `with` waits until it is ready and stops it after,
    also when it never became ready. Subclasses start it and define `wait_ready` and `stop`."""

    port: int

    def wait_ready(self) -> None:
        raise NotImplementedError

    def stop(self) -> object:
        raise NotImplementedError

    def __enter__(self) -> Any:
        try:
            self.wait_ready()
        except BaseException:
            self.stop()
            raise
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.stop()

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"


class Serve(ServerProcess):
    """`spindle serve` as a child: stdout read by a thread (for "spindle ready"), stderr logged.
    As a context manager: waits until ready, stops on exit."""

    def __init__(
        self,
        model_dir: Path,
        options: dict[str, Any],
        threads: int,
        log_path: Path,
        env: dict[str, str] | None = None,
    ) -> None:
        self.port = free_port()
        argv = [sys.executable, "-m", "common.cli", "--log-level", os.environ.get("SPINDLE_BENCH_LOG_LEVEL", "WARNING"), "serve",
                "--model", str(model_dir), "--port", str(self.port),
                "--num-threads", str(threads), *as_flags(options)]  # fmt: skip
        self.log_path = log_path
        self.model = ""  # the served name, read from /v1/models once ready
        # this process's SPINDLE_* switches stay here; `env` sets the served stack's own
        child_env = {k: v for k, v in os.environ.items() if not k.startswith("SPINDLE_")}
        child_env.update(env or {})
        with log_path.open("wb") as log:
            self.process = subprocess.Popen(
                argv, cwd=REPO_ROOT, env=child_env, stdout=subprocess.PIPE, stderr=log
            )
        self.ready = threading.Event()
        threading.Thread(target=self._watch_stdout, daemon=True).start()

    def _watch_stdout(self) -> None:
        assert self.process.stdout is not None
        for raw in self.process.stdout:
            if raw.startswith(b"spindle ready"):
                self.ready.set()

    def wait_ready(self) -> None:
        deadline = time.monotonic() + READY_TIMEOUT_S
        while not self.ready.wait(0.5):
            if self.process.poll() is not None or time.monotonic() > deadline:
                tail = self.log_path.read_text(errors="replace")[-3000:]
                state = (
                    f"exited with {self.process.returncode}" if self.process.poll() else "not ready"
                )
                raise RuntimeError(f"spindle serve {state} after {READY_TIMEOUT_S:g} s\n{tail}")
        self.model = httpx.get(f"{self.url}/v1/models", timeout=10).json()["data"][0]["id"]

    def cpu_by_role(self) -> dict[str, float]:
        """CPU seconds so far of the launcher and each child (worker, gateway, redis), from /proc."""
        from bench.relay_bench import cpu_seconds

        usage = {"launcher": cpu_seconds(self.process.pid)}
        for entry in Path("/proc").iterdir():
            if not entry.name.isdigit():
                continue
            try:
                stat = (entry / "stat").read_text()
                if int(stat[stat.rindex(")") + 2 :].split()[1]) != self.process.pid:
                    continue
                argv = (entry / "cmdline").read_bytes().decode().split("\0")
                role = process_role(argv)
                usage[role] = usage.get(role, 0.0) + cpu_seconds(int(entry.name))
            except (OSError, ValueError):
                continue  # exited meanwhile
        return usage

    def stop(self) -> int:
        """SIGINT, as Ctrl-C: the launcher stops gateway, worker and Redis in order."""
        if self.process.poll() is None:
            self.process.send_signal(signal.SIGINT)
        try:
            return self.process.wait(timeout=90)
        except subprocess.TimeoutExpired:
            self.process.kill()
            return self.process.wait()


def process_role(argv: list[str]) -> str:
    """What a child of `spindle serve` is, from its command line: "redis", "worker" or "gateway"
    (`python -m worker ...`, a rank's `-m worker.*` included), else its program's name. Not a
    substring search: the worker's and the gateway's flags name Redis too (`--redis-url`)."""
    program = Path(argv[0]).name if argv and argv[0] else "?"
    if program.startswith("redis-server"):  # Redis rewrites its title: "redis-server host:port"
        return "redis"
    if "-m" in argv[:-1]:
        module = argv[argv.index("-m") + 1].split(".")[0]
        if module in ("worker", "gateway"):
            return module
    return program


class Server(Protocol):
    """A started OpenAI-compatible server (`Serve`, `bench.vllm_server.VLLMServer`)."""

    model: str

    @property
    def url(self) -> str: ...

    def cpu_by_role(self) -> dict[str, float]: ...


def run_served(server: Server, workloads: list[Workload], repeat: int) -> dict[str, dict[str, Any]]:
    """One untimed warm-up request, then each workload `repeat` times; the fastest repeat per
    workload (the server is the same throughout, so run it without prefix caching)."""
    drive(run_workload(server.url, server.model, WARMUP))
    return {
        workload.name: best_run([served_once(server, workload) for _ in range(repeat)])
        for workload in workloads
    }


def served_once(server: Server, workload: Workload, label: str = "served") -> dict[str, Any]:
    load = os.getloadavg()[0]
    cpu_before, client_before = server.cpu_by_role(), time.process_time()
    records = drive(run_workload(server.url, server.model, workload))
    cpu = {
        role: round(s - cpu_before.get(role, 0.0), 2) for role, s in server.cpu_by_role().items()
    }
    cpu["client"] = round(time.process_time() - client_before, 2)
    summary = summarise(records)
    summary["load_average"] = load
    summary["cpu_s"] = cpu
    summary["errors"] = [r.error for r in records if r.error][:3]
    ttft = (summary.get("ttft") or {}).get("p50_ms")
    print(
        f"  {label} {workload.name}: {summary.get('output_tokens_per_s')} tok/s, "
        f"TTFT p50 {ttft} ms",
        flush=True,
    )
    return summary


def run_service(
    model_dir: Path, workloads: list[Workload], args: argparse.Namespace, log_dir: Path
) -> dict[str, dict[str, Any]]:
    """`spindle serve` with the in-process engine's options, each workload `args.repeat` times."""
    options = engine_options(args)
    with Serve(model_dir, options, args.threads, log_dir / "serve.log") as serve:
        return run_served(serve, workloads, args.repeat)


IN_PROCESS_SIDE, SERVED_SIDE = "in-process", "served"
PAIRED_SETTLE_S = 0.3  # between runs: the last run's threads go idle


class Turn(NamedTuple):
    """One workload's turn in `run_paired`: `rounds` rounds, each side once a round; with
    `peers`, the peer servers take part in its rounds too."""

    workload: Workload
    rounds: int
    peers: bool = False


def run_paired(
    model_dir: Path,
    plan: list[Turn],
    args: argparse.Namespace,
    log_dir: Path,
    peers: Mapping[str, Server] | None = None,
) -> dict[str, dict[str, dict[str, Any]]]:
    """Each turn of `plan` in order: its rounds, each running the workload once on every side —
    in-process, served and, on a turn with `peers`, each started peer server (vLLM for the bar)
    — in the order `round_order` rotates, all of them alive and idle but for the one running.
    Returns each side's summaries by workload name, each the fastest run with every run's
    tokens/s and TTFT p50 in run order (`best_run`), so the i-th runs of two sides are a pair.

    This prices the service path and compares spindle with a peer fairly: on these shared
    2-core machines the speed drifts between regimes that last seconds to minutes (a 128-token
    bf16 prefill on the AMX Xeon: ~35 ms in one, 53-65 ms in the next; a Zen 4 ran every system
    ~13 % faster an hour later; one Zen 3 core ran a register tile at 65 or 90 GFLOP/s by the
    minute), so two systems measured one after the other differ by more than the few ms or per
    cent the path costs; interleaved, all see the same regimes."""
    peers = dict(peers or {})
    llm = in_process_engine(model_dir, args)
    runs: dict[str, dict[str, list[dict[str, Any]]]] = {
        side: {} for side in (IN_PROCESS_SIDE, SERVED_SIDE, *peers)
    }
    try:
        with Serve(model_dir, engine_options(args), args.threads, log_dir / "paired.log") as serve:
            servers: dict[str, Server] = {SERVED_SIDE: serve, **peers}
            for server in servers.values():
                drive(run_workload(server.url, server.model, WARMUP))
            for workload, rounds, with_peers in plan:
                sides = [IN_PROCESS_SIDE, SERVED_SIDE, *(peers if with_peers else ())]
                for index, side in enumerate(round_order(sides, rounds)):
                    time.sleep(PAIRED_SETTLE_S)
                    if side == IN_PROCESS_SIDE:
                        summary = in_process_once(llm, workload, f"{workload.name}-paired-{index}")
                    else:
                        summary = served_once(servers[side], workload, side)
                    runs[side].setdefault(workload.name, []).append(summary)
    finally:
        del llm
        gc.collect()
    return {
        side: {name: best_run(summaries) for name, summaries in by_workload.items()}
        for side, by_workload in runs.items()
    }


def round_order(sides: list[str], rounds: int) -> list[str]:
    """`rounds` rounds of every side once, each round's order the one before rotated by one
    (AB BA AB ..., ABC BCA CAB ...), so no side always runs first after a pause."""
    order = []
    for round_index in range(rounds):
        shift = round_index % len(sides)
        order += sides[shift:] + sides[:shift]
    return order


def compare(
    in_process: dict[str, Any], service: dict[str, Any], alternated: bool = True
) -> dict[str, Any]:
    """The service's costs, read pair by pair where the runs `alternated` (`run_paired`):
    throughput as the median of the pairs' costs (`pair_throughput_costs_pct`, kept as
    `throughput_cost_each_pair_pct`), else from the fastest runs, which
    are kept alongside as `throughput_cost_fastest_pct`; TTFT p50 as the median of the pairs'
    differences (`paired_ttft_cost_ms`, with its 95 % interval), else as the difference of the
    two sides' medians, kept alongside as `ttft_p50_medians_cost_ms`. Runs made in two blocks
    (`alternated` False) are not paired: their i-th runs are minutes apart."""
    if not service.get("completed"):
        return {"throughput_ratio": None, "ttft_p50_cost_ms": None}
    fastest_ratio = service["output_tokens_per_s"] / in_process["output_tokens_per_s"]
    each_pair = pair_throughput_costs_pct(in_process, service) if alternated else []
    ratio = 1 - statistics.median(each_pair) / 100 if each_pair else fastest_ratio
    medians_cost = median_ttft_p50_ms(service) - median_ttft_p50_ms(in_process)
    paired = paired_ttft_cost_ms(in_process, service) if alternated else None
    ttft_cost = medians_cost if paired is None else paired
    interval = paired_ttft_cost_interval_ms(in_process, service) if alternated else None
    return {
        "throughput_ratio": round(ratio, 4),
        "throughput_cost_pct": round(100 * (1 - ratio), 2),
        "throughput_cost_fastest_pct": round(100 * (1 - fastest_ratio), 2),
        "throughput_cost_from_pairs": bool(each_pair),
        "throughput_cost_each_pair_pct": [round(cost, 2) for cost in each_pair],
        "ttft_p50_cost_ms": round(ttft_cost, 2),
        "ttft_p50_medians_cost_ms": round(medians_cost, 2),
        "ttft_cost_from_pairs": paired is not None,
        "ttft_p50_cost_interval_ms": interval and [round(bound, 2) for bound in interval],
        "meets_bar": bool(ratio >= 0.95 and ttft_cost <= 5.0),
    }


def markdown_table(report: dict[str, Any]) -> str:
    a, b, c = report["in_process"], report["service"], report["comparison"]
    head = (
        "| dtype | workload | system | output tok | s | tok/s | TTFT p50 / p99 ms "
        "| ITL p50 / p99 ms | CPU s | load |\n|---|---|---|---|---|---|---|---|---|---|\n"
    )
    prefix = f"| {report['dtype']} | {report['workload']} "
    rows = [
        f"{prefix}| in-process | {a['output_tokens']} | {a['wall_s']:.2f} "
        f"| {a['output_tokens_per_s']:.1f} | {a['ttft']['p50_ms']:.0f} / {a['ttft']['p99_ms']:.0f} "
        f"| | {a['cpu_s']:.1f} | {a['load_average']:.1f} |"
    ]
    if b.get("completed"):
        cpu = ", ".join(f"{role} {seconds:.1f}" for role, seconds in b["cpu_s"].items())
        rows.append(
            f"{prefix}| service | {b['output_tokens']} | {b['wall_s']:.2f} "
            f"| {b['output_tokens_per_s']:.1f} | {b['ttft']['p50_ms']:.0f} / {b['ttft']['p99_ms']:.0f} "
            f"| {b['itl']['p50_ms']:.1f} / {b['itl']['p99_ms']:.1f} | {cpu} | {b['load_average']:.1f} |"
        )
    verdict = (
        f"\nservice / in-process throughput **{c['throughput_ratio']}** "
        f"(cost {c.get('throughput_cost_pct')} %, bar <= 5 %); TTFT p50 cost "
        f"**{c['ttft_p50_cost_ms']} ms** (bar <= 5 ms)\n"
    )
    return head + "\n".join(rows) + "\n" + verdict


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    add = parser.add_argument
    add("--model", type=Path, default=None, help="HF folder (default: the demo model)")
    add("--dtype", default="bfloat16")
    add("--workload", default="mixed-32", help="name in bench/workloads/ or path")
    add("--repeat", type=int, default=1, help="runs of each system; the fastest counts")
    add(
        "--pairs",
        type=int,
        default=0,
        help="run the systems alternately this many times each, both alive (run_paired); "
        "0 = one after the other, --repeat times each",
    )
    add_engine_arguments(parser)
    add("--out", type=Path, default=Path("bench/results/service.json"))
    add(
        "--log-dir",
        type=Path,
        default=None,
        help="keep the served system's log here (with SPINDLE_BENCH_LOG_LEVEL=DEBUG it holds "
        "the worker's per-step lines); default: a temporary folder",
    )
    return parser.parse_args(argv)


@contextlib.contextmanager
def log_folder(keep: Path | None) -> Iterator[str]:
    """`keep` (created), or a temporary folder removed afterwards."""
    if keep is not None:
        keep.mkdir(parents=True, exist_ok=True)
        yield str(keep)
        return
    with tempfile.TemporaryDirectory(prefix="service-bench-") as log_dir:
        yield log_dir


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    from common.model_files import default_demo_dir, ensure_demo_model

    model_dir = args.model or ensure_demo_model(default_demo_dir())
    workload = load_workload(args.workload)
    report: dict[str, Any] = {
        "dtype": args.dtype,
        "workload": workload.name,
        "model": str(model_dir),
    }
    report["options"] = {**engine_options(args), "threads": args.threads}
    with log_folder(args.log_dir) as log_dir:
        if args.pairs:
            sides = run_paired(model_dir, [Turn(workload, args.pairs)], args, Path(log_dir))
            report["in_process"] = sides[IN_PROCESS_SIDE][workload.name]
            report["service"] = sides[SERVED_SIDE][workload.name]
        else:
            report["in_process"] = run_in_process(model_dir, [workload], args)[workload.name]
            report["service"] = run_service(model_dir, [workload], args, Path(log_dir))[
                workload.name
            ]
    report["comparison"] = compare(
        report["in_process"], report["service"], alternated=bool(args.pairs)
    )
    report["load_average_end"] = os.getloadavg()
    table = markdown_table(report)
    write_report(args.out, report, table)


if __name__ == "__main__":
    main()
