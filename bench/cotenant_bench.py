"""How much of the in-process engine's throughput another process's CPU use costs, with the
kernels on their own pool (worker/kernels/csrc/pool.h) and on torch's OpenMP threads.

On a server the worker shares its cores with the gateway, Redis and the clients. A burner child
process stands in for them: it spins `--burn-ms` of CPU every `--period-ms` (5 / 50: 10 % of one
core). One engine runs the workload in turns — pool and OpenMP (switched with
`kernels.use_threads` between runs), each alone and beside the burner — `--repeat` times, so the
four numbers of a round are measured seconds apart; medians count. A system that lost nothing
but the burner's share would lose burn / period / cores of its throughput (5 % on 2 cores);
OpenMP loses more because a region waits at its barrier for a preempted thread.

    python -m bench.cotenant_bench --dtype bfloat16 --workload mixed-32 --repeat 3 \\
        --out bench/results/cotenant.json
"""

from __future__ import annotations

import argparse
import os
import statistics
import subprocess
import sys
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from bench.engine_bench import run_spindle
from bench.report import write_report
from bench.service_bench import WARMUP, add_engine_arguments, engine_options
from bench.workloads import load_workload
from common.model_files import default_demo_dir

SYSTEMS = {"pool": "1", "openmp": "0"}  # SPINDLE_CPU_POOL for each
LOADS = ("alone", "burner")

BURNER = """
import sys, time
burn, period = float(sys.argv[1]) / 1000, float(sys.argv[2]) / 1000
while True:
    start = time.perf_counter()
    while time.perf_counter() - start < burn:
        pass
    time.sleep(max(0.0, period - burn))
"""


@contextmanager
def burner(burn_ms: float, period_ms: float) -> Iterator[None]:
    """A child process spinning `burn_ms` of CPU every `period_ms` while the block runs."""
    child = subprocess.Popen([sys.executable, "-c", BURNER, str(burn_ms), str(period_ms)])
    try:
        yield
    finally:
        child.kill()
        child.wait()


def use_system(system: str, threads: int) -> None:
    from worker import kernels

    os.environ["SPINDLE_CPU_POOL"] = SYSTEMS[system]
    kernels.use_threads(threads)


def summarise(samples: dict[str, dict[str, list[float]]], burn_share: float) -> list[dict]:
    """Per system: median tok/s alone and beside the burner, and the share lost."""
    rows = []
    for system, by_load in samples.items():
        alone, beside = (statistics.median(by_load[load]) for load in LOADS)
        rows.append(
            {
                "system": system,
                "alone_tok_s": round(alone, 1),
                "burner_tok_s": round(beside, 1),
                "loss_pct": round(100 * (1 - beside / alone), 1),
                "burner_share_pct": round(100 * burn_share, 1),
                "runs": by_load,
            }
        )
    return rows


def markdown_table(rows: list[dict], label: str) -> str:
    lines = [
        f"{label}",
        "",
        "| system | tok/s alone | tok/s beside the burner | lost | burner's share of the CPU |",
        "|---|---|---|---|---|",
    ]
    for row in rows:
        lines.append(
            f"| {row['system']} | {row['alone_tok_s']} | {row['burner_tok_s']} | "
            f"{row['loss_pct']} % | {row['burner_share_pct']} % |"
        )
    return "\n".join(lines) + "\n"


def run(args: argparse.Namespace) -> dict[str, Any]:
    from worker.engine.llm import LLM

    llm = LLM(
        str(args.model or default_demo_dir()), num_threads=args.threads, **engine_options(args)
    )
    run_spindle(llm, WARMUP, "warmup")
    workload = load_workload(args.workload)
    samples: dict[str, dict[str, list[float]]] = {s: {load: [] for load in LOADS} for s in SYSTEMS}
    for round_index in range(args.repeat):
        for system in SYSTEMS:
            for load in LOADS:
                use_system(system, args.threads)
                tag = f"{system}-{load}-{round_index}"
                if load == "burner":
                    with burner(args.burn_ms, args.period_ms):
                        seconds, _, outputs = run_spindle(llm, workload, tag)
                else:
                    seconds, _, outputs = run_spindle(llm, workload, tag)
                tok_s = sum(map(len, outputs)) / seconds
                samples[system][load].append(round(tok_s, 1))
                print(f"  {tag}: {tok_s:.1f} tok/s", flush=True)
    share = args.burn_ms / args.period_ms / (os.cpu_count() or 1)
    return {
        "dtype": args.dtype,
        "workload": args.workload,
        "threads": args.threads,
        "burn_ms": args.burn_ms,
        "period_ms": args.period_ms,
        "date": time.strftime("%Y-%m-%d %H:%M:%S %Z"),
        "rows": summarise(samples, share),
    }


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", type=Path, default=None, help="default: the demo model")
    parser.add_argument("--dtype", default="bfloat16")
    parser.add_argument("--workload", default="mixed-32")
    parser.add_argument("--repeat", type=int, default=3)
    parser.add_argument("--burn-ms", type=float, default=5.0)
    parser.add_argument("--period-ms", type=float, default=50.0)
    parser.add_argument("--out", type=Path, default=Path("bench/results/cotenant.json"))
    add_engine_arguments(parser)
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    report = run(args)
    label = (
        f"{report['dtype']}, {report['workload']}, burner {args.burn_ms:g} ms every "
        f"{args.period_ms:g} ms, medians of {args.repeat}"
    )
    table = markdown_table(report["rows"], label)
    write_report(args.out, report, table)


if __name__ == "__main__":
    main()
