"""Engine throughput: spindle's in-process engine against transformers static batching, on the
same machine, model, dtype and workload, in one run (the machine is shared and noisy, so only
ratios measured together mean much).

* **spindle** — every request of the workload is added to `LLMEngine` at once and the engine is
  stepped until done: what `LLM.generate` does, plus a clock on each request's first token (TTFT).
* **static** — transformers `generate` on batches of up to `--batch-size` prompts, padded
  (`bench/static_batching.py`); only each request's own max_tokens count as output.

Per dtype, both systems are loaded side by side and take turns on each workload (`--repeat`
times; the fastest repeat counts), so the two numbers of a ratio are measured minutes apart, not
a dtype apart. The machine's matmul peak (`torch.mm`, 2048², best of 5) is measured before and
after; utilisation is a run's useful model FLOPs per second over it (see `model_flops`).

    python -m bench.engine_bench --model DIR --dtype float32 bfloat16 \\
        --workload single mixed-32 --out bench/results/engine.json
"""

from __future__ import annotations

import argparse
import datetime
import gc
import itertools
import os
import platform
import statistics
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, Protocol

import torch

from bench.report import write_report
from bench.static_batching import Sample, StaticSystem, check_lengths
from bench.workloads import BenchRequest, Workload, load_workload

WARMUP_PROMPT = [504, 3469, 314, 253, 1345, 30, 378, 3834]  # a few ordinary text tokens
WARMUP_NEW_TOKENS = 4
MATCH_PREFIX = 16  # greedy tokens compared between the two systems


@dataclass
class Run:
    """A system on a workload: the best (fastest) of its repeats, with all their times."""

    system: str  # "spindle" | "static"
    dtype: str
    workload: str
    requests: int
    prompt_tokens: int
    output_tokens: int  # useful output: each request's own max_tokens
    seconds: float
    tokens_per_s: float
    cpu_s: float
    ttft_p50_s: float
    ttft_max_s: float
    utilisation: float  # useful model FLOPs / seconds / matmul peak
    padded_output_tokens: int
    padded_prompt_tokens: int
    repeat_seconds: list[float]  # every repeat, in the order run
    repeat_loads: list[float]  # 1-minute load average as each repeat started
    ratio: float | None = None  # spindle tokens/s over static tokens/s (spindle rows)
    greedy_match: float | None = None  # share of requests whose first tokens agree (spindle)


# -- the machine ------------------------------------------------------------------------------


def cpu_model() -> str:
    try:
        with open("/proc/cpuinfo") as cpuinfo:
            for line in cpuinfo:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown"


def machine_info(threads: int) -> dict[str, Any]:
    return {
        "cpu": cpu_model(),
        "cores": os.cpu_count(),
        "torch": torch.__version__,
        "threads": threads,
        "python": platform.python_version(),
        "date": datetime.datetime.now(datetime.UTC).isoformat(timespec="seconds"),
        "load_average": os.getloadavg(),
    }


def matmul_peak_flops(
    dtype: torch.dtype, threads: int, size: int = 2048, reps: int = 5, budget_s: float = 5.0
) -> float:
    """Best FLOP/s of `torch.mm` on size x size matrices (one untimed warm-up) on `threads`
    torch threads (set here: a spindle engine in this process leaves torch on one thread). Fewer
    timed calls where they would take over `budget_s` (at least one): on a CPU without bf16
    arithmetic one bf16 call takes about a minute."""
    torch.set_num_threads(threads)
    a = torch.randn(size, size, dtype=dtype)
    b = torch.randn(size, size, dtype=dtype)
    start = time.perf_counter()
    torch.mm(a, b)
    reps = max(1, min(reps, int(budget_s / (time.perf_counter() - start))))
    best = float("inf")
    for _ in range(reps):
        start = time.perf_counter()
        torch.mm(a, b)
        best = min(best, time.perf_counter() - start)
    return 2 * size**3 / best


def model_flops(workload: Workload, config: Any) -> float:
    """Useful forward FLOPs of a workload: 2 x the non-embedding weights per position (prompt and
    output), 2 x the LM head per output token, and attention scores and values (4 x heads x
    head_dim x context, causal) per position and layer. Norms, rotary and activations are left
    out (< 1 %); padding is not useful work, so both systems are credited the same FLOPs."""
    hidden, layers = config.hidden_size, config.num_hidden_layers
    head_dim = getattr(config, "head_dim", None) or hidden // config.num_attention_heads
    q_width = config.num_attention_heads * head_dim
    kv_width = config.num_key_value_heads * head_dim
    per_layer = hidden * (2 * q_width + 2 * kv_width) + 3 * hidden * config.intermediate_size
    dense, lm_head = layers * per_layer, hidden * config.vocab_size
    total = 0.0
    for request in workload.requests:
        positions = len(request.prompt_ids) + request.max_tokens
        total += 2 * dense * positions + 2 * lm_head * request.max_tokens
        total += 4 * q_width * layers * positions * (positions + 1) / 2
    return total


# -- the two systems -------------------------------------------------------------------------


class SpindleSystem:
    """The in-process engine, sized for the workloads: room for `--batch-size` of the longest
    request. All requests are added at once, then the engine is stepped to the end.

    Prefix caching is off unless `--prefix-caching`: every repeat sends the same prompts, so a
    warm cache would let the second repeat skip its prefill (and the static batcher has none)."""

    name = "spindle"

    def __init__(self, model_dir: Path, dtype: str, workloads: list[Workload], args) -> None:
        from worker.engine.llm import LLM

        longest = max(len(r.prompt_ids) + r.max_tokens for w in workloads for r in w.requests)
        self.llm = LLM(
            str(model_dir),
            dtype=dtype,
            num_threads=args.threads,
            max_total_tokens=max(longest, 64) + 1,
            max_batch_size=args.batch_size,
            max_batch_prefill_tokens=args.max_batch_prefill_tokens,
            max_batch_total_tokens=args.batch_size * (longest + 1),
            enable_prefix_caching=args.prefix_caching,
        )
        self._runs = itertools.count()
        self.threads = args.threads

    def run(self, workload: Workload) -> Sample:
        from worker import kernels

        kernels.use_threads(self.threads)  # the static system's runs set torch's threads
        tag = f"{workload.name}-{next(self._runs)}"
        cpu_start = time.process_time()
        seconds, ttft, output_ids = run_spindle(self.llm, workload, tag)
        return Sample(seconds, time.process_time() - cpu_start, ttft, output_ids)


def run_spindle(
    llm: Any, workload: Workload, tag: str
) -> tuple[float, list[float], list[list[int]]]:
    """All of the workload's requests added to `llm.engine` at once, stepped to the end: the
    seconds taken, each request's time to first token, and its output ids. `tag` makes the
    request ids unique on an engine that runs several workloads."""
    from common.protocol import SamplingParams

    engine = llm.engine
    ids = [f"{tag}-{i}" for i in range(len(workload.requests))]
    outputs: dict[str, list[int]] = {request_id: [] for request_id in ids}
    first_token_at: dict[str, float] = {}
    start = time.perf_counter()
    for request_id, request in zip(ids, workload.requests, strict=True):
        params = SamplingParams.make(
            temperature=0, max_new_tokens=request.max_tokens, ignore_eos=workload.ignore_eos
        )
        engine.add_request(request_id, request.prompt_ids, params)
    while engine.has_unfinished:
        events = engine.step()  # returns after the step's tokens reached the host
        now = time.perf_counter()
        for event in events:
            if event.token_ids and event.id not in first_token_at:
                first_token_at[event.id] = now - start
            outputs[event.id].extend(event.token_ids)
    seconds = time.perf_counter() - start
    return seconds, [first_token_at[i] for i in ids], [outputs[i] for i in ids]


class System(Protocol):
    name: str

    def run(self, workload: Workload) -> Sample: ...


def static_system(model_dir: Path, dtype: str, workloads: list[Workload], args) -> StaticSystem:
    return StaticSystem(model_dir, dtype, args.batch_size, args.threads)


SYSTEMS: dict[str, Callable[..., System]] = {"spindle": SpindleSystem, "static": static_system}


# -- one dtype, both systems -----------------------------------------------------------------


def bench_dtype(
    model_dir: Path, dtype: str, workloads: list[Workload], args: argparse.Namespace, config: Any
) -> dict:
    """Both systems loaded side by side and run in turn on each workload, `--repeat` times, so
    each pair of numbers is measured minutes apart; between two matmul-peak measurements."""
    peak = matmul_peak_flops(getattr(torch, dtype), args.threads)
    print(f"[{dtype}] matmul peak {peak / 1e9:.0f} GFLOP/s", flush=True)
    systems = [SYSTEMS[name](model_dir, dtype, workloads, args) for name in args.systems]
    warmup = Workload("warmup", 0, [BenchRequest(WARMUP_PROMPT, WARMUP_NEW_TOKENS)])
    for system in systems:
        system.run(warmup)  # untimed: first calls allocate and pick kernels
    runs = []
    for workload in workloads:
        samples: dict[str, list[tuple[float, Sample]]] = {s.name: [] for s in systems}
        for _ in range(args.repeat):
            for system in systems:
                load = os.getloadavg()[0]
                sample = system.run(workload)
                check_lengths(system.name, workload, sample)
                samples[system.name].append((load, sample))
                print(
                    f"[{dtype}] {system.name} {workload.name}: {workload.output_tokens} tokens "
                    f"in {sample.seconds:.1f} s (cpu {sample.cpu_s:.1f} s, load {load:.1f})",
                    flush=True,
                )
        flops = model_flops(workload, config)
        runs.extend(_pair(dtype, workload, samples, flops / peak))
    del systems
    gc.collect()
    peak_after = matmul_peak_flops(getattr(torch, dtype), args.threads)
    return {
        "dtype": dtype,
        "matmul_peak_gflops": round(peak / 1e9, 1),
        "matmul_peak_after_gflops": round(peak_after / 1e9, 1),
        "runs": [asdict(run) for run in runs],
    }


def summarise(
    system: str, dtype: str, workload: Workload, samples: list[tuple[float, Sample]], work: float
) -> Run:
    """The fastest repeat stands for the system; `work` is model FLOPs over peak FLOP/s."""
    best = min((sample for _, sample in samples), key=lambda sample: sample.seconds)
    return Run(
        system=system,
        dtype=dtype,
        workload=workload.name,
        requests=len(workload.requests),
        prompt_tokens=workload.prompt_tokens,
        output_tokens=workload.output_tokens,
        seconds=round(best.seconds, 3),
        tokens_per_s=round(workload.output_tokens / best.seconds, 2),
        cpu_s=round(best.cpu_s, 2),
        ttft_p50_s=round(statistics.median(best.ttft), 3),
        ttft_max_s=round(max(best.ttft), 3),
        utilisation=round(work / best.seconds, 4),
        padded_output_tokens=best.padded_output_tokens,
        padded_prompt_tokens=best.padded_prompt_tokens,
        repeat_seconds=[round(sample.seconds, 3) for _, sample in samples],
        repeat_loads=[round(load, 2) for load, _ in samples],
    )


def _pair(dtype: str, workload: Workload, samples: dict, work: float) -> list[Run]:
    runs = {name: summarise(name, dtype, workload, runs, work) for name, runs in samples.items()}
    if "spindle" in runs and "static" in runs:
        spindle, static = runs["spindle"], runs["static"]
        spindle.ratio = round(spindle.tokens_per_s / static.tokens_per_s, 2)
        spindle.greedy_match = share_matching(
            samples["spindle"][0][1].output_ids, samples["static"][0][1].output_ids
        )
    return list(runs.values())


def share_matching(left: list[list[int]], right: list[list[int]]) -> float:
    same = sum(a[:MATCH_PREFIX] == b[:MATCH_PREFIX] for a, b in zip(left, right, strict=True))
    return round(same / len(left), 3)


# -- report ------------------------------------------------------------------------------------


def markdown_table(results: list[dict]) -> str:
    lines = [
        "| dtype | workload | system | output tok | s (each repeat) | tok/s | spindle/static "
        "| CPU s | TTFT p50 / max s | util | padded out/prompt | greedy match | load |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for result in results:
        for run in sorted(result["runs"], key=lambda r: (r["workload"], r["system"])):
            ratio = f"**{run['ratio']:.2f}x**" if run["ratio"] is not None else ""
            padded = ""
            if run["system"] == "static":
                padded = f"{run['padded_output_tokens']}/{run['padded_prompt_tokens']}"
            match = "" if run["greedy_match"] is None else f"{run['greedy_match']:.0%}"
            repeats = ", ".join(f"{seconds:.1f}" for seconds in run["repeat_seconds"])
            loads = ", ".join(f"{load:.1f}" for load in run["repeat_loads"])
            lines.append(
                f"| {run['dtype']} | {run['workload']} | {run['system']} "
                f"| {run['output_tokens']} | {repeats} | {run['tokens_per_s']:.1f} | {ratio} "
                f"| {run['cpu_s']:.1f} | {run['ttft_p50_s']:.2f} / {run['ttft_max_s']:.2f} "
                f"| {run['utilisation']:.1%} | {padded} | {match} | {loads} |"
            )
    peaks = ", ".join(
        f"{r['dtype']} {r['matmul_peak_gflops']:.0f} GFLOP/s (after: "
        f"{r['matmul_peak_after_gflops']:.0f})"
        for r in results
    )
    return "\n".join(lines) + f"\n\nmatmul peak (torch.mm 2048²): {peaks}\n"


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    add = parser.add_argument
    add("--model", type=Path, default=None, help="HF folder (default: the demo model)")
    add("--dtype", nargs="+", default=["float32", "bfloat16"])
    add(
        "--workload",
        nargs="+",
        default=["single", "mixed-32"],
        help="names in bench/workloads/ or paths of workload JSON files",
    )
    add("--systems", nargs="+", default=list(SYSTEMS), choices=list(SYSTEMS))
    add("--repeat", type=int, default=1, help="runs of each system per workload; best counts")
    add("--threads", type=int, default=2, help="torch threads for both systems")
    add(
        "--batch-size",
        type=int,
        default=32,
        help="static batch size and the engine's max running sequences",
    )
    add("--max-batch-prefill-tokens", type=int, default=2048)
    add("--prefix-caching", action="store_true", help="let spindle reuse cached prompt blocks")
    add("--out", type=Path, default=Path("bench/results/engine.json"))
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    from transformers import AutoConfig

    from common.model_files import default_demo_dir, ensure_demo_model

    model_dir = args.model or ensure_demo_model(default_demo_dir())
    torch.set_num_threads(args.threads)
    workloads = [load_workload(name) for name in args.workload]
    config = AutoConfig.from_pretrained(str(model_dir))
    report: dict[str, Any] = {
        "machine": machine_info(args.threads),
        "model": str(model_dir),
        "workloads": args.workload,
        "results": [],
    }
    for dtype in args.dtype:
        report["results"].append(bench_dtype(model_dir, dtype, workloads, args, config))
    report["machine"]["load_average_end"] = os.getloadavg()
    table = markdown_table(report["results"])
    write_report(args.out, report, table)


if __name__ == "__main__":
    main()
