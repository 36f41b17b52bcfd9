"""bench/poisson_sweep.py's pure parts: rescaling a Poisson workload to other rates (same prompts
and order, arrivals stretched), its caps, the table and the PNG plot (no server)."""

from __future__ import annotations

from pathlib import Path

import pytest

from bench.poisson_sweep import at_rate, markdown_table, plot_latency
from bench.workloads import BenchRequest, Workload, load_workload

PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"


def poisson_like() -> Workload:
    requests = [BenchRequest([i, i + 1], 10 + i, arrival_s=s) for i, s in enumerate([1, 3, 4, 9])]
    spec = {"kind": "poisson", "rate_per_s": 0.5, "duration_s": 10.0}
    return Workload("poisson", 7, requests, spec=spec)


def test_at_rate_stretches_arrivals_and_keeps_prompts_and_order() -> None:
    base = poisson_like()
    faster = at_rate(base, 2.0)  # 4x the drawn rate: arrivals 4x closer together
    assert [r.arrival_s for r in faster.requests] == [0.25, 0.75, 1.0, 2.25]
    assert [r.prompt_ids for r in faster.requests] == [r.prompt_ids for r in base.requests]
    assert [r.max_tokens for r in faster.requests] == [10, 11, 12, 13]
    assert faster.name == "poisson@2"
    assert faster.spec["rate_per_s"] == 2.0 and faster.spec["rescaled_from_rate_per_s"] == 0.5
    assert faster.spec["duration_s"] == pytest.approx(2.5)
    assert [r.arrival_s for r in at_rate(base, 0.25).requests] == [2, 6, 8, 18]
    assert base.requests[0].arrival_s == 1  # the original is untouched


def test_at_rate_caps_by_count_and_by_arrival_time() -> None:
    base = poisson_like()
    assert len(at_rate(base, 1.0, max_requests=2).requests) == 2
    within = at_rate(base, 1.0, duration_s=2.0)  # arrivals 0.5, 1.5, 2.0, 4.5
    assert [r.arrival_s for r in within.requests] == [0.5, 1.5]
    assert within.spec["duration_s"] == 2.0
    with pytest.raises(ValueError, match="no request"):
        at_rate(base, 1.0, duration_s=0.1)


def test_at_rate_refuses_a_workload_without_a_rate_and_a_bad_rate() -> None:
    with pytest.raises(ValueError, match="no rate_per_s"):
        at_rate(load_workload("mixed-32"), 1.0)
    with pytest.raises(ValueError, match="positive"):
        at_rate(poisson_like(), 0.0)


def test_the_committed_poisson_workload_rescales() -> None:
    committed = load_workload("poisson")
    doubled = at_rate(committed, 2 * committed.spec["rate_per_s"])
    assert len(doubled.requests) == len(committed.requests)
    assert doubled.requests[-1].arrival_s == pytest.approx(committed.requests[-1].arrival_s / 2)


def point(rate: float, ttft_ms: float, completed: int = 4) -> dict:
    stats = {"p50_ms": ttft_ms, "p90_ms": None, "p99_ms": 2 * ttft_ms, "mean_ms": ttft_ms}
    return {
        "rate_per_s": rate,
        "requests": 4,
        "completed": completed,
        "failed": 4 - completed,
        "output_tokens_per_s": 40.0 * rate,
        "ttft": stats,
        "itl": {"p50_ms": 30.0, "p90_ms": None, "p99_ms": 80.5, "mean_ms": 35.0},
        "latency": {"p50_ms": 4000.0, "p90_ms": None, "p99_ms": 9000.0, "mean_ms": 5000.0},
    }


def test_markdown_table_has_a_row_per_system_and_rate() -> None:
    table = markdown_table({"spindle": [point(0.5, 120.0), point(4, 900.0)], "vLLM": []})
    assert "| spindle | 0.5 | 4/4 | 20.0 | 0.12 / 0.24 | 30.0 / 80.5 | 4.00 / 9.00 |" in table
    assert "| spindle | 4 | 4/4 | 160.0 | 0.90 / 1.80 |" in table
    failed = markdown_table({"spindle": [point(1, 0.0, completed=0)]})
    assert "| spindle | 1 | 0/4 | | | | |" in failed


def test_plot_writes_a_png_with_a_line_per_system_and_metric(tmp_path: Path) -> None:
    results = {
        "spindle": [point(0.5, 120.0), point(1, 200.0), point(2, 600.0)],
        "vLLM": [point(0.5, 150.0), point(1, 250.0, completed=0), point(2, 500.0)],
    }
    path = tmp_path / "plots" / "poisson.png"
    labels = plot_latency(results, path)
    data = path.read_bytes()
    assert data.startswith(PNG_SIGNATURE)
    assert len(data) > 10_000  # a drawn figure, not an empty canvas
    assert len(labels) == 2 * 6
    assert "spindle ttft p99" in labels and "vLLM itl p50" in labels
    assert "vLLM latency p50" in labels
