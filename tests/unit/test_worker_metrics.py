"""The worker's per-step record: what a step computed goes into the Prometheus histograms and, at
debug level, into one log line per step."""

from __future__ import annotations

import logging
from types import SimpleNamespace

from worker.metrics import WorkerMetrics


def engine_after(*chunks: int) -> SimpleNamespace:
    """An engine whose last step ran one sequence per chunk, of that many tokens."""
    scheduled = [SimpleNamespace(num_tokens=n) for n in chunks]
    return SimpleNamespace(
        last_step=SimpleNamespace(scheduled=scheduled, num_batched_tokens=sum(chunks))
    )


def step_lines(caplog) -> list[str]:
    return [r.getMessage() for r in caplog.records if r.getMessage().startswith("step at ")]


def test_each_step_is_traced_at_debug_level(caplog) -> None:
    metrics = WorkerMetrics()
    with caplog.at_level(logging.DEBUG, logger="spindle.worker"):
        with metrics.step(engine_after(448)):
            pass
        with metrics.step(engine_after(1, 1, 1)):
            pass
        with metrics.step(SimpleNamespace(last_step=None)):  # nothing ran: nothing logged
            pass
    first, second = step_lines(caplog)
    assert first.endswith("ms, prefill, 1 sequences, 448 tokens")
    assert second.endswith("ms, decode, 3 sequences, 3 tokens")


def test_steps_are_not_logged_at_info(caplog) -> None:
    with (
        caplog.at_level(logging.INFO, logger="spindle.worker"),
        WorkerMetrics().step(engine_after(16)),
    ):
        pass
    assert step_lines(caplog) == []
