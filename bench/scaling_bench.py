"""Scaling out on one CPU machine: the same workload, in one run, served three ways with the same
number of cores —

* **one-engine** — one engine process with all `--threads` torch threads;
* **two-engines** — two engine processes with half the threads each, every other request to each
  (wall time: from a common start until both are done) — what two worker groups on one stream do;
* **tensor-parallel** — one engine with `num_shard=2` (a two-rank gloo group), half the threads
  per rank.

Every configuration runs in its own spawned process (so its torch thread setting is its own),
loads the model and warms up first, then waits on a barrier; only the generation is timed.

The demo model has 9 attention heads, which do not split in two, so all three run on a
random-weight Llama with the given model's config except 8 heads / 2 KV heads of 72 dimensions
(576 / 8): the same hidden size, layers, MLP and vocabulary, the same FLOPs and bytes per token
to within the attention projections. Outputs are nonsense but the workload ignores EOS, so every
request produces exactly its max_tokens.

    python -m bench.scaling_bench --model DIR --dtype bfloat16 --workload mixed-32 \\
        --out bench/results/scaling.json
"""

from __future__ import annotations

import argparse
import json
import multiprocessing as mp
import os
import shutil
import tempfile
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import torch

from bench.engine_bench import WARMUP_NEW_TOKENS, WARMUP_PROMPT, machine_info, run_spindle
from bench.report import write_report
from bench.workloads import Workload, load_workload

SPLITTABLE_SHAPE = {"num_attention_heads": 8, "num_key_value_heads": 2, "head_dim": 72}
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "generation_config.json")
START_TIMEOUT_S = 600.0  # model load + warm-up of every process, on a busy machine


@dataclass(frozen=True)
class Layout:
    """One way to spend the cores: `processes` engines of `num_shard` ranks each."""

    name: str
    processes: int
    threads_per_process: int  # torch threads of one engine (split over its ranks)
    num_shard: int


@dataclass
class Result:
    layout: str
    processes: int
    ranks_per_process: int
    threads_per_rank: int
    output_tokens: int
    seconds: float  # wall: first process started generating -> last one finished
    tokens_per_s: float
    per_process_s: list[float]
    ratio_to_one_engine: float = 1.0


def layouts(threads: int) -> list[Layout]:
    half = max(1, threads // 2)
    return [
        Layout("one-engine", 1, threads, 1),
        Layout("two-engines", 2, half, 1),
        Layout("tensor-parallel", 1, threads, 2),
    ]


def splittable_model(config_dir: Path, dest: Path, dtype: torch.dtype) -> Path:
    """Random weights (seed 0) with `config_dir`'s config but `SPLITTABLE_SHAPE`'s heads."""
    from transformers import AutoConfig, AutoModelForCausalLM

    dest.mkdir(parents=True, exist_ok=True)
    for name in TOKENIZER_FILES:
        if (config_dir / name).exists():
            shutil.copy(config_dir / name, dest / name)
    config = AutoConfig.from_pretrained(config_dir)
    for key, value in SPLITTABLE_SHAPE.items():
        setattr(config, key, value)
    torch.manual_seed(0)
    AutoModelForCausalLM.from_config(config, dtype=dtype).save_pretrained(dest)
    return dest


# -- one engine process -------------------------------------------------------------------------


def engine_process(
    model_dir: str,
    dtype: str,
    workload: Workload,
    layout: Layout,
    start: Any,  # a multiprocessing Barrier shared with the parent
    results: Any,  # a multiprocessing Queue: (seconds, started, finished, output tokens)
) -> None:
    """Load, warm up, wait for the others, generate the workload's requests, report."""
    from common.protocol import SamplingParams
    from worker.engine.llm import LLM

    longest = max(len(r.prompt_ids) + r.max_tokens for r in workload.requests)
    llm = LLM(
        model_dir,
        dtype=dtype,
        num_threads=layout.threads_per_process,
        num_shard=layout.num_shard,
        max_total_tokens=longest + 1,
        max_batch_size=len(workload.requests),
        max_batch_total_tokens=len(workload.requests) * (longest + 1),
        enable_prefix_caching=False,
    )
    llm.generate([WARMUP_PROMPT], SamplingParams.make(max_new_tokens=WARMUP_NEW_TOKENS))
    start.wait(START_TIMEOUT_S)
    started = time.monotonic()  # CLOCK_MONOTONIC: one clock for every process on the machine
    seconds, _, outputs = run_spindle(llm, workload, f"{layout.name}-{os.getpid()}")
    results.put((seconds, started, time.monotonic(), sum(len(ids) for ids in outputs)))
    llm.engine.close()  # a group stops its shard ranks


def share(workload: Workload, index: int, count: int) -> Workload:
    """Every `count`-th request from `index`: alternate requests to each process."""
    return Workload(
        name=f"{workload.name}[{index}::{count}]",
        seed=workload.seed,
        requests=workload.requests[index::count],
        ignore_eos=workload.ignore_eos,
    )


def run_layout(model_dir: Path, dtype: str, workload: Workload, layout: Layout) -> Result:
    context = mp.get_context("spawn")
    start = context.Barrier(layout.processes + 1)
    results = context.Queue()
    processes = [
        context.Process(
            target=engine_process,
            args=(
                str(model_dir),
                dtype,
                share(workload, i, layout.processes),
                layout,
                start,
                results,
            ),
            name=f"bench-{layout.name}-{i}",
        )
        for i in range(layout.processes)
    ]
    for process in processes:
        process.start()
    start.wait(START_TIMEOUT_S)
    reports = [results.get(timeout=START_TIMEOUT_S) for _ in processes]
    for process in processes:
        process.join(60)
        if process.exitcode != 0:
            raise RuntimeError(f"{process.name} exited with {process.exitcode}")
    wall = max(end for _, _, end, _ in reports) - min(begin for _, begin, _, _ in reports)
    tokens = sum(count for *_, count in reports)
    return Result(
        layout=layout.name,
        processes=layout.processes,
        ranks_per_process=layout.num_shard,
        threads_per_rank=max(1, layout.threads_per_process // layout.num_shard),
        output_tokens=tokens,
        seconds=round(wall, 2),
        tokens_per_s=round(tokens / wall, 1),
        per_process_s=[round(seconds, 2) for seconds, *_ in reports],
    )


# -- report ---------------------------------------------------------------------------------


def markdown_table(results: list[Result], header: dict[str, Any]) -> str:
    rows = [
        "| layout | processes × ranks × threads | output tok | s | tok/s | vs one-engine |",
        "|---|---|---|---|---|---|",
    ]
    for r in results:
        shape = f"{r.processes} × {r.ranks_per_process} × {r.threads_per_rank}"
        rows.append(
            f"| {r.layout} | {shape} | {r.output_tokens} | {r.seconds} | {r.tokens_per_s} "
            f"| **{r.ratio_to_one_engine:.2f}x** |"
        )
    rows.append("")
    rows.append(
        f"{header['model']}, {header['dtype']}, workload {header['workload']}, "
        f"{header['machine']['cores']} cores ({header['machine']['cpu']}); load average "
        f"before {header['load_before']}, after {header['load_after']}"
    )
    return "\n".join(rows) + "\n"


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="python -m bench.scaling_bench", description=__doc__)
    parser.add_argument("--model", type=Path, required=True, help="folder whose config to copy")
    parser.add_argument("--dtype", default="bfloat16", choices=["float32", "bfloat16"])
    parser.add_argument("--workload", default="mixed-32")
    parser.add_argument("--threads", type=int, default=os.cpu_count() or 2, help="cores to use")
    parser.add_argument("--out", type=Path, default=Path("bench/results/scaling.json"))
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    workload = load_workload(args.workload)
    load_before = [round(x, 2) for x in os.getloadavg()]
    with tempfile.TemporaryDirectory(prefix="spindle-scaling-") as scratch:
        model_dir = splittable_model(
            args.model, Path(scratch) / "model", getattr(torch, args.dtype)
        )
        results = []
        for layout in layouts(args.threads):
            results.append(run_layout(model_dir, args.dtype, workload, layout))
            print(json.dumps(asdict(results[-1])), flush=True)
    for result in results:
        result.ratio_to_one_engine = round(result.tokens_per_s / results[0].tokens_per_s, 2)
    header = {
        "model": f"random weights, {args.model.name}'s config with {SPLITTABLE_SHAPE}",
        "dtype": args.dtype,
        "workload": workload.name,
        "machine": machine_info(args.threads),
        "load_before": load_before,
        "load_after": [round(x, 2) for x in os.getloadavg()],
    }
    table = markdown_table(results, header)
    write_report(args.out, {**header, "results": [asdict(r) for r in results]}, table)


if __name__ == "__main__":
    main()
