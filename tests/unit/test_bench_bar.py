"""bench/bar.py's verdict and table from hand-made summaries (no model, no server): the ratios,
pass/fail at and around each threshold, a missing vLLM or a failed system, and the markdown."""

from __future__ import annotations

from typing import Any

import pytest

from bench.bar import (
    E2E,
    IN_PROCESS,
    STATIC,
    VLLM,
    BarLine,
    cost_turns,
    markdown_table,
    parse_args,
    relay_verdict,
    system_row,
    ttft_cost_verdict,
    utilisation_peak,
    verdict,
)
from bench.service_bench import (
    IN_PROCESS_SIDE,
    SERVED_SIDE,
    as_flags,
    compare,
    process_role,
    round_order,
)
from bench.workloads import Workload


def summary(tok_s: float, ttft_p50_ms: float = 100.0, ttft_p99_ms: float = 1000.0) -> dict:
    return {
        "requests": 32,
        "completed": 32,
        "failed": 0,
        "wall_s": 5001 / tok_s,
        "output_tokens": 5001,
        "output_tokens_per_s": tok_s,
        "ttft": {"p50_ms": ttft_p50_ms, "p90_ms": None, "p99_ms": ttft_p99_ms},
        "repeat_tokens_per_s": [tok_s],
    }


def rounds(base: dict, rates: list[float], **figures: list[float]) -> dict:
    """`base` with each round's tok/s and, by name, each round's other figures
    (`ttft_p99_ms=[...]` becomes `repeat_ttft_p99_ms`), as `load.best_run` keeps them."""
    return {
        **base,
        "repeat_tokens_per_s": rates,
        **{f"repeat_{name}": values for name, values in figures.items()},
    }


def runs(**systems: dict[str, dict]) -> dict[str, dict[str, dict]]:
    names = {"static": STATIC, "in_process": IN_PROCESS, "e2e": E2E, "vllm": VLLM}
    return {names[key]: value for key, value in systems.items()}


def by_bar(lines: list[BarLine]) -> dict[str, BarLine]:
    return {line.bar.split(" (")[0]: line for line in lines}


def test_every_bar_passes_and_ratios_are_computed() -> None:
    lines = by_bar(
        verdict(
            runs(
                static=dict(mixed=summary(100.0)),
                in_process=dict(mixed=summary(320.0), single=summary(20.0, 150.0)),
                e2e=dict(mixed=summary(310.0, ttft_p99_ms=5000), single=summary(19.5, 154.0)),
                vllm=dict(mixed=summary(250.0, ttft_p99_ms=6100)),
            ),
            "mixed",
            "single",
        )
    )
    assert lines["e2e / static tok/s"].value == pytest.approx(3.1)
    assert lines["e2e / static tok/s"].passed is True
    assert lines["e2e / vLLM tok/s, TTFT p99"].value == pytest.approx(1.24)
    assert lines["e2e / vLLM tok/s, TTFT p99"].passed is True
    assert "5.00 s vs 6.10 s" in lines["e2e / vLLM tok/s, TTFT p99"].measured
    assert lines["service throughput cost"].value == pytest.approx(3.12, abs=0.01)
    assert lines["service throughput cost"].passed is True
    assert lines["service TTFT p50 cost"].value == pytest.approx(4.0)
    assert lines["service TTFT p50 cost"].passed is True


def test_the_ttft_cost_is_the_median_of_the_pairs_differences() -> None:
    """`single` runs in alternating pairs; the cost is read pair by pair, so a slow spell that
    caught more runs of one side than the other does not decide it (a fp32 run on the Zen 3)."""
    in_process = [217.0, 267.0, 345.0, 272.0, 251.0, 241.0, 278.0, 239.0, 253.0, 256.0]
    e2e = [264.0, 256.0, 294.0, 284.0, 254.0, 242.0, 261.0, 272.0, 258.0, 260.0]
    lines = by_bar(
        verdict(
            runs(
                in_process=dict(single={**summary(20.0, 217.0), "repeat_ttft_p50_ms": in_process}),
                e2e=dict(single={**summary(19.5, 264.0), "repeat_ttft_p50_ms": e2e}),
            ),
            "mixed",
            "single",
        )
    )
    cost = lines["service TTFT p50 cost"]
    assert cost.value == pytest.approx(3.5)  # differences -51 ... 3, 4 ... 47
    assert "median of 10 pair differences, 95 % interval -17.0 to +33.0 ms" in cost.measured
    assert "the medians differ by +6.0 ms" in cost.measured  # 260.5 - 254.5
    # 3.5 ms is under the bar, but the interval spans it by far more than 5 ms either way
    assert cost.passed is None and cost.unresolved
    result = {"dtype": "float32", "rows": [], "bar": [cost], "matmul_peak_gflops": 150.0}
    assert "| unresolved |" in markdown_table([{**result, "matmul_peak_after_gflops": 148.0}], None)


def test_a_noisy_ttft_cost_is_unresolved_unless_its_interval_clears_the_bar() -> None:
    assert ttft_cost_verdict(4.4, (0.5, 8.2)) is True  # narrow: the median decides
    assert ttft_cost_verdict(5.3, (1.0, 9.0)) is False
    assert ttft_cost_verdict(5.3, (-30.3, 42.0)) is None  # straddles the bar, 72 ms wide
    assert ttft_cost_verdict(-3.0, (-30.0, 4.0)) is True  # wide, but wholly under the bar
    assert ttft_cost_verdict(30.0, (6.0, 60.0)) is False  # wide, but wholly over it
    assert ttft_cost_verdict(4.0, None) is True  # too few pairs for an interval


def test_each_bar_fails_on_its_own_threshold() -> None:
    lines = by_bar(
        verdict(
            runs(
                static=dict(mixed=summary(100.0)),
                in_process=dict(mixed=summary(320.0), single=summary(20.0, 150.0)),
                # 2.99x static; 1.3x vLLM but a worse TTFT p99; 6.6 % and 5.5 ms of service cost
                e2e=dict(mixed=summary(299.0, ttft_p99_ms=7000), single=summary(20, 155.5)),
                vllm=dict(mixed=summary(230.0, ttft_p99_ms=6100)),
            ),
            "mixed",
            "single",
        )
    )
    assert lines["e2e / static tok/s"].passed is False
    assert lines["e2e / vLLM tok/s, TTFT p99"].value == pytest.approx(1.3)
    assert lines["e2e / vLLM tok/s, TTFT p99"].passed is False  # p99 7.0 s > 6.1 s
    assert lines["service throughput cost"].passed is False
    assert lines["service TTFT p50 cost"].value == pytest.approx(5.5)
    assert lines["service TTFT p50 cost"].passed is False


def test_a_missing_vllm_or_failed_run_is_not_measured_rather_than_failed() -> None:
    failed = {"requests": 32, "completed": 0, "failed": 32}
    lines = by_bar(
        verdict(
            runs(
                static=dict(mixed=failed),
                in_process=dict(mixed=summary(320.0)),  # no `single` run at all
                e2e=dict(mixed=summary(310.0), single=summary(20.0)),
            ),
            "mixed",
            "single",
        )
    )
    assert lines["e2e / static tok/s"].passed is None
    assert lines["e2e / vLLM tok/s, TTFT p99"].passed is None
    assert lines["e2e / vLLM tok/s, TTFT p99"].measured == "vLLM not run"
    assert lines["service throughput cost"].passed is True
    assert lines["service TTFT p50 cost"].passed is None


def test_relay_verdict_uses_the_best_round() -> None:
    relay = {"tokens": 49152, "failed": 0, "tokens_per_s": 18000.0}
    assert relay_verdict({**relay, "best_round_tokens_per_s": 20500.0}).passed is True
    below = relay_verdict({**relay, "best_round_tokens_per_s": 19999.0})
    assert below.passed is False and below.value == 19999.0
    assert relay_verdict({**relay, "failed": 3, "best_round_tokens_per_s": 1e5}).passed is None
    assert relay_verdict(None).passed is None


def test_utilisation_is_model_flops_per_second_over_peak() -> None:
    row = system_row(E2E, "mixed", summary(250.0), flops=2e12, peak=1e12)
    # 5001 tokens at 250 tok/s take 20.004 s: 1e11 FLOP/s against a 1e12 peak
    assert row["utilisation"] == pytest.approx(2e12 / (5001 / 250.0) / 1e12)
    assert row["ttft_p99_ms"] == 1000.0
    failed = system_row(E2E, "mixed", {"requests": 1, "completed": 0, "failed": 1}, 2e12, 1e12)
    assert failed["tokens_per_s"] is None and failed["utilisation"] is None


def test_markdown_table_has_a_row_per_system_and_bar_line() -> None:
    measured = runs(static=dict(mixed=summary(100.0)), e2e=dict(mixed=summary(310.0, 90, 4200)))
    result: dict[str, Any] = {
        "dtype": "bfloat16",
        "matmul_peak_gflops": 1309.4,
        "matmul_peak_after_gflops": 1290.0,
        "rows": [
            system_row(system, "mixed", by_workload["mixed"], 1e12, 1.3e12)
            for system, by_workload in measured.items()
        ],
        "bar": [line.__dict__ for line in verdict(measured, "mixed", "single")],
    }
    relay = BarLine("relay tok/s, one gateway", "21,000", ">= 20,000 tok/s", True, 21000.0)
    table = markdown_table([result], relay)
    assert (
        "| bfloat16 | spindle e2e | mixed | 5001 | 16.13 | **310.0** (310.0) | 0.09 / 4.20 |"
        in (table)
    )
    assert "| bfloat16 | e2e / static tok/s | 3.10x | >= 3x | **pass** |" in table
    assert "| bfloat16 | e2e / vLLM tok/s, TTFT p99 | vLLM not run |" in table
    assert "| all | relay tok/s, one gateway | 21,000 | >= 20,000 tok/s | **pass** |" in table
    assert "bfloat16 1309 GFLOP/s (after: 1290)" in table


def test_engine_options_become_worker_flags_with_boolean_pairs() -> None:
    flags = as_flags({"max_batch_size": 32, "enable_prefix_caching": False, "dtype": "bfloat16"})
    assert flags == ["--max-batch-size", "32", "--no-enable-prefix-caching", "--dtype", "bfloat16"]
    assert as_flags({"enable_prefix_caching": True}) == ["--enable-prefix-caching"]


def test_the_paired_runs_rotate_who_goes_first() -> None:
    order = round_order([IN_PROCESS_SIDE, SERVED_SIDE], 3)
    assert order == [
        IN_PROCESS_SIDE, SERVED_SIDE, SERVED_SIDE, IN_PROCESS_SIDE, IN_PROCESS_SIDE, SERVED_SIDE
    ]  # fmt: skip
    assert round_order(["a", "b", "c"], 4) == list("abcbcacababc")
    assert round_order(["a", "b"], 0) == []


def test_utilisation_reads_against_float32_where_the_dtype_has_no_fast_matmul() -> None:
    assert utilisation_peak("bfloat16", 2.1e12, 3.6e11) == (2.1e12, "bfloat16")  # AMX
    assert utilisation_peak("bfloat16", 3e8, 1.7e11) == (1.7e11, "float32")  # AVX2: a loop
    assert utilisation_peak("float32", 1.7e11, 1.7e11) == (1.7e11, "float32")
    result = {
        "dtype": "bfloat16",
        "matmul_peak_gflops": 0.3,
        "matmul_peak_after_gflops": 0.3,
        "utilisation_peak_gflops": 170.0,
        "utilisation_peak_dtype": "float32",
        "rows": [],
        "bar": [],
    }
    assert (
        "bfloat16 0.3 GFLOP/s (after: 0.3) — util against the float32 peak, 170"
        in markdown_table([result], None)
    )


def test_the_throughput_cost_is_the_median_of_the_rounds() -> None:
    """Each round's two runs share the machine's spell: the cost is their pairs' median, not
    what one fast run of one side makes of the fastest runs."""
    in_process = {**summary(474.0), "repeat_tokens_per_s": [400.0, 474.0, 380.0]}
    e2e = {**summary(390.0), "repeat_tokens_per_s": [390.0, 385.0, 362.0]}
    lines = by_bar(
        verdict(runs(in_process=dict(mixed=in_process), e2e=dict(mixed=e2e)), "mixed", "single")
    )
    cost = lines["service throughput cost"]
    assert cost.value == pytest.approx(4.74)  # pairs 2.5, 18.8, 4.7 %
    assert cost.passed is True
    assert cost.measured == (
        "4.7 % (median of the rounds: 2.5, 18.8, 4.7 %; the fastest runs: 17.7 %)"
    )
    worse = {**e2e, "repeat_tokens_per_s": [370.0, 385.0, 362.0]}  # pairs 7.5, 18.8, 4.7
    lines = by_bar(
        verdict(runs(in_process=dict(mixed=in_process), e2e=dict(mixed=worse)), "mixed", "single")
    )
    assert lines["service throughput cost"].value == pytest.approx(7.5)
    assert lines["service throughput cost"].passed is False
    lone = {**summary(400.0), "repeat_tokens_per_s": [400.0]}
    lines = by_bar(
        verdict(runs(in_process=dict(mixed=lone), e2e=dict(mixed=e2e)), "mixed", "single")
    )
    lone_cost = lines["service throughput cost"]
    assert lone_cost.measured == "2.5 %"  # no rounds: the fastest runs, 390 against 400
    assert lone_cost.passed is True


def test_runs_made_in_blocks_are_not_read_as_pairs() -> None:
    """service_bench without --pairs runs each side's repeats one block after the other: the
    fastest runs and the medians count, not the i-th runs of each side."""
    in_process = rounds(
        summary(474.0, ttft_p50_ms=240.0), [400.0, 474.0, 380.0], ttft_p50_ms=[240.0, 250.0, 230.0]
    )
    service = rounds(
        summary(390.0, ttft_p50_ms=262.0), [390.0, 385.0, 362.0], ttft_p50_ms=[270.0, 262.0, 236.0]
    )
    alternated = compare(in_process, service)
    assert alternated["throughput_cost_pct"] == pytest.approx(4.74, abs=0.01)
    assert alternated["ttft_p50_cost_ms"] == pytest.approx(12.0)  # pairs 30, 12, 6 ms
    blocks = compare(in_process, service, alternated=False)
    assert blocks["throughput_cost_pct"] == pytest.approx(17.72, abs=0.01)  # 390 / 474
    assert blocks["throughput_cost_each_pair_pct"] == []
    assert blocks["ttft_p50_cost_ms"] == pytest.approx(22.0)  # medians 262 - 240
    assert blocks["ttft_p50_cost_interval_ms"] is None


def test_the_vllm_line_shows_each_round_beside_the_fastest_runs() -> None:
    """spindle e2e and vLLM take turns on mixed-32; the ratio is of the fastest runs, and each
    round's ratio shows how far a slow spell moved it."""
    e2e = {**summary(150.0, ttft_p99_ms=14_000), "repeat_tokens_per_s": [150.0, 120.0]}
    vllm = {**summary(100.0, ttft_p99_ms=17_000), "repeat_tokens_per_s": [100.0, 96.0]}
    lines = by_bar(verdict(runs(e2e=dict(mixed=e2e), vllm=dict(mixed=vllm)), "mixed"))
    line = lines["e2e / vLLM tok/s, TTFT p99"]
    assert line.value == pytest.approx(1.5) and line.passed is True
    assert line.measured == "1.50x, p99 14.00 s vs 17.00 s (each round: 1.50x, 1.25x)"
    lone = {**summary(100.0), "repeat_tokens_per_s": [100.0]}
    lines = by_bar(verdict(runs(e2e=dict(mixed=e2e), vllm=dict(mixed=lone)), "mixed"))
    assert "each round" not in lines["e2e / vLLM tok/s, TTFT p99"].measured  # rounds differ


def test_the_ttft_p99_against_vllm_is_the_median_of_the_rounds() -> None:
    """A fastest run whose p99 came from a slow round does not decide alone: the rounds' p99
    differences do (here -0.10, -0.11, +0.14 s: a pass), and a loss in most rounds fails."""
    e2e = rounds(
        summary(227.0, ttft_p99_ms=10_290),
        [221.0, 221.0, 227.0],
        ttft_p99_ms=[9_900.0, 9_950.0, 10_290.0],
    )
    vllm = rounds(
        summary(179.0, ttft_p99_ms=10_060),
        [172.0, 179.0, 177.0],
        ttft_p99_ms=[10_000.0, 10_060.0, 10_150.0],
    )
    line = by_bar(verdict(runs(e2e=dict(mixed=e2e), vllm=dict(mixed=vllm)), "mixed"))[
        "e2e / vLLM tok/s, TTFT p99"
    ]
    assert line.passed is True
    assert line.measured.endswith(
        "p99 each round 9.90 / 10.00, 9.95 / 10.06, 10.29 / 10.15 s, median difference -0.10 s"
    )
    worse = {**e2e, "repeat_ttft_p99_ms": [10_100.0, 10_100.0, 9_000.0]}
    line = by_bar(verdict(runs(e2e=dict(mixed=worse), vllm=dict(mixed=vllm)), "mixed"))[
        "e2e / vLLM tok/s, TTFT p99"
    ]
    assert line.passed is False  # +0.10, +0.04 s: behind in two rounds of three
    assert "median difference +0.04 s" in line.measured


def test_out_may_name_a_folder() -> None:
    assert parse_args(["--out", "/tmp"]).out.name == "bar.json"
    assert parse_args(["--out", "/tmp/x/run.json"]).out.name == "run.json"


def test_each_cost_workload_gets_its_own_number_of_pairs() -> None:
    single, short, mixed = (Workload(name, 0, []) for name in ("single", "single-short", "mixed"))
    turns = cost_turns([single, short], [20, 60], "mixed")
    assert [(t.workload.name, t.rounds, t.peers) for t in turns] == [
        ("single", 20, False), ("single-short", 60, False)
    ]  # fmt: skip
    assert [t.rounds for t in cost_turns([single, short], [8], "mixed")] == [8, 8]
    # the bar's own workload is priced by its rounds, not a second turn
    assert [t.workload.name for t in cost_turns([mixed, short], [20, 60], "mixed")] == [
        "single-short"
    ]
    with pytest.raises(ValueError, match="3 pair counts for 2"):
        cost_turns([single, short], [1, 2, 3], "mixed")
    assert parse_args([]).cost_pairs == [20, 60]
    with pytest.raises(SystemExit):
        parse_args(["--cost-workload", "single", "single-short", "--cost-pairs", "1", "2", "3"])


def test_serve_children_are_told_apart_by_program_and_module() -> None:
    python = "/work/main/.venv/bin/python"
    assert process_role(["/usr/bin/redis-server 127.0.0.1:6380", ""]) == "redis"
    assert process_role([python, "-m", "worker", "--redis-url", "redis://x", ""]) == "worker"
    assert process_role([python, "-m", "gateway", "--redis-url", "redis://x", ""]) == "gateway"
    assert process_role([python, "-m", "worker.parallel.rank", "--rank", "1"]) == "worker"
    assert process_role([python, "-m", "common.cli", "serve", "--redis-url", "r"]) == "python"


def test_each_cost_workload_gets_its_own_ttft_line() -> None:
    """`single`'s 128-token prefill and `single-short`'s 8-token one price the path apart."""
    in_process = {**summary(20.0, 240.0), "repeat_ttft_p50_ms": [240.0, 250.0, 230.0]}
    e2e = {**summary(19.5, 270.0), "repeat_ttft_p50_ms": [270.0, 262.0, 236.0]}
    short_in = {**summary(40.0, 35.0), "repeat_ttft_p50_ms": [35.0, 36.0, 35.5]}
    short_e2e = {**summary(39.0, 38.0), "repeat_ttft_p50_ms": [38.0, 39.5, 38.0]}
    lines = verdict(
        runs(
            in_process=dict(single=in_process, **{"single-short": short_in}),
            e2e=dict(single=e2e, **{"single-short": short_e2e}),
        ),
        "mixed",
        "single",
        "single-short",
    )
    ttft = {line.bar: line for line in lines if line.bar.startswith("service TTFT")}
    assert list(ttft) == ["service TTFT p50 cost (single)", "service TTFT p50 cost (single-short)"]
    assert ttft["service TTFT p50 cost (single)"].value == pytest.approx(12.0)  # 30, 12, 6
    assert ttft["service TTFT p50 cost (single)"].passed is False
    assert ttft["service TTFT p50 cost (single-short)"].value == pytest.approx(3.0)  # 3, 3.5, 2.5
    assert ttft["service TTFT p50 cost (single-short)"].passed is True
