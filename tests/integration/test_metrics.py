"""The metrics move for real: a `python -m worker` (demo model, `--metrics-port`) and a
`python -m gateway` on the session's redis-server serve N requests; both /metrics endpoints are
scraped and parsed with prometheus_client's own parser. Every metric the Grafana dashboard and
the README's metrics table name must exist in those live scrapes.
"""

from __future__ import annotations

import json
import re
import time
import uuid
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx
import pytest
import redis
from openai import OpenAI
from prometheus_client.parser import text_string_to_metric_families

from tests.integration.conftest import RedisServer, free_port
from tests.integration.service_fixtures import (  # noqa: F401 (an autouse fixture)
    DEMO_MODEL_NAME,
    REPO_ROOT,
    GatewayProcess,
    WorkerProcess,
    service_logs_on_failure,
    spawn_gateway,
    spawn_worker,
    wait_for,
    wait_for_health,
    wait_for_worker,
)

pytestmark = pytest.mark.slow  # loads the demo model

REQUESTS = 4  # half streamed, half not; each exactly MAX_TOKENS tokens (ignore_eos)
MAX_TOKENS = 6
DASHBOARD = REPO_ROOT / "deploy" / "grafana" / "dashboards" / "spindle.json"
METRIC_NAME = re.compile(r"\bspindle_[a-z0-9_]+")

Samples = dict[tuple[str, tuple[tuple[str, str], ...]], float]


@dataclass
class Scrape:
    families: set[str]  # family names (a counter's without `_total`)
    samples: Samples  # (sample name, sorted labels) -> value

    @classmethod
    def of(cls, url: str) -> Scrape:
        text = httpx.get(url, timeout=5).text
        families, samples = set(), {}
        for family in text_string_to_metric_families(text):
            families.add(family.name)
            for sample in family.samples:
                samples[(sample.name, tuple(sorted(sample.labels.items())))] = sample.value
        return cls(families, samples)

    def value(self, name: str, **labels: str) -> float:
        key = (name, tuple(sorted(labels.items())))
        assert key in self.samples, f"{name}{labels} not in the scrape"
        return self.samples[key]

    def names(self) -> set[str]:
        return self.families | {name for name, _ in self.samples}


@dataclass
class Stack:
    worker: WorkerProcess
    gateway: GatewayProcess
    worker_metrics_url: str

    def scrape_gateway(self) -> Scrape:
        return Scrape.of(f"{self.gateway.url}/metrics")

    def scrape_worker(self) -> Scrape:
        return Scrape.of(self.worker_metrics_url)


@pytest.fixture(scope="module")
def stack(
    redis_server: RedisServer, demo_model_dir: Path, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[Stack]:
    prefix = f"met{uuid.uuid4().hex[:8]}"
    log_dir = tmp_path_factory.mktemp("metrics-logs")
    port = free_port()
    extra = ["--max-batch-total-tokens", "8192", "--metrics-port", str(port)]
    worker = spawn_worker(demo_model_dir, redis_server.url, prefix, log_dir, f"{prefix}-w", extra)
    gateway = spawn_gateway(redis_server.url, prefix, log_dir)
    try:
        client = redis.Redis.from_url(redis_server.url)
        wait_for_worker(client, prefix, worker)
        client.close()
        wait_for_health(gateway)
        yield Stack(worker, gateway, f"http://127.0.0.1:{port}/metrics")
    finally:
        gateway.kill()
        worker.kill()


@pytest.fixture(scope="module")
def served(stack: Stack) -> tuple[Scrape, Scrape]:
    """Gateway and worker scrapes after REQUESTS requests, once the worker is idle again."""
    client = OpenAI(base_url=f"{stack.gateway.url}/v1", api_key="unused", max_retries=0)
    options: dict[str, Any] = {"model": DEMO_MODEL_NAME, "max_tokens": MAX_TOKENS}
    options.update(temperature=0, extra_body={"ignore_eos": True})
    for number in range(REQUESTS // 2):
        messages: list[Any] = [{"role": "user", "content": f"Count to {number + 3}."}]
        client.chat.completions.create(messages=messages, **options)
        stream = client.completions.create(
            prompt=f"Once upon a time {number}", stream=True, **options
        )
        assert len([chunk for chunk in stream if chunk.choices]) >= MAX_TOKENS

    def worker_idle() -> bool:
        scrape = stack.scrape_worker()
        busy = ("spindle_worker_kv_blocks_used", "spindle_worker_running_sequences")
        return all(scrape.value(name) == 0 for name in busy)

    wait_for(worker_idle, "the worker's KV blocks back to 0", 30, [stack.worker])
    return stack.scrape_gateway(), stack.scrape_worker()


def test_gateway_counts_every_request_and_its_latencies(served: tuple[Scrape, Scrape]) -> None:
    gateway, _ = served
    model = DEMO_MODEL_NAME
    for route in ("/v1/chat/completions", "/v1/completions"):
        requests = gateway.value("spindle_gateway_requests_total", route=route, status="200")
        assert requests == REQUESTS // 2
        assert gateway.value("spindle_gateway_request_duration_seconds_count", route=route) == 2
    assert gateway.value("spindle_gateway_generations_total", model=model, outcome="finished") == 4
    for histogram in ("time_to_first_token_seconds", "e2e_request_latency_seconds"):
        assert gateway.value(f"spindle_gateway_{histogram}_count", model=model) == REQUESTS
        assert gateway.value(f"spindle_gateway_{histogram}_sum", model=model) > 0
    generated = gateway.value("spindle_gateway_generated_tokens_sum", model=model)
    assert generated == REQUESTS * MAX_TOKENS
    # One token per event: each request has MAX_TOKENS - 1 gaps between its token events.
    itl_count = gateway.value("spindle_gateway_inter_token_latency_seconds_count", model=model)
    assert itl_count == REQUESTS * (MAX_TOKENS - 1)
    assert gateway.value("spindle_gateway_prompt_tokens_count", model=model) == REQUESTS
    assert gateway.value("spindle_gateway_requests_in_flight") == 0
    assert gateway.value("spindle_gateway_refused_requests_total", status="429") == 0


def test_gateway_exports_the_queue_from_redis(served: tuple[Scrape, Scrape]) -> None:
    gateway, _ = served
    assert gateway.value("spindle_redis_up") == 1
    assert gateway.value("spindle_workers_live", model=DEMO_MODEL_NAME) == 1
    for name in ("length", "in_flight", "waiting", "dead_letters"):
        assert gateway.value(f"spindle_queue_{name}", model=DEMO_MODEL_NAME) == 0


def test_worker_metrics_move_and_settle(served: tuple[Scrape, Scrape]) -> None:
    _, worker = served
    assert worker.value("spindle_worker_requests_total", finish="length") == REQUESTS
    assert worker.value("spindle_worker_generated_tokens_total") == REQUESTS * MAX_TOKENS
    assert worker.value("spindle_worker_queue_duration_seconds_count") == REQUESTS
    assert worker.value("spindle_worker_kv_blocks_total") == 8192 // 16
    assert worker.value("spindle_worker_kv_blocks_used") == 0
    assert worker.value("spindle_worker_waiting_sequences") == 0
    prefills = worker.value("spindle_worker_step_duration_seconds_count", phase="prefill")
    decodes = worker.value("spindle_worker_step_duration_seconds_count", phase="decode")
    assert prefills >= 1 and decodes >= 1
    # Requests ran one at a time: a prefill step that samples, then MAX_TOKENS - 1 decodes.
    assert (prefills, decodes) == (REQUESTS, REQUESTS * (MAX_TOKENS - 1))
    assert worker.value("spindle_worker_batch_size_sum") == prefills + decodes
    assert worker.value("spindle_worker_batch_tokens_sum") >= REQUESTS * MAX_TOKENS
    assert worker.value("spindle_worker_cancellations_total") == 0


def test_every_metric_the_dashboard_and_readme_name_is_exported(
    served: tuple[Scrape, Scrape],
) -> None:
    gateway, worker = served
    exported = gateway.names() | worker.names()
    dashboard = json.loads(DASHBOARD.read_text())
    expressions = [
        target["expr"] for panel in dashboard["panels"] for target in panel.get("targets", [])
    ]
    in_dashboard = {name for expr in expressions for name in METRIC_NAME.findall(expr)}
    assert len(in_dashboard) >= 8, in_dashboard
    assert in_dashboard <= exported, sorted(in_dashboard - exported)
    in_readme = readme_metric_names()
    assert len(in_readme) >= 20, in_readme
    assert in_readme <= exported, sorted(in_readme - exported)


def readme_metric_names() -> set[str]:
    """The first column of the README's "## Metrics" tables."""
    text = (REPO_ROOT / "README.md").read_text()
    section = text.split("\n## Metrics\n", 1)[1].split("\n## ", 1)[0]
    return set(re.findall(r"^\| `(spindle_[a-z0-9_]+)`", section, flags=re.MULTILINE))


def test_scrape_takes_little_time(stack: Stack) -> None:
    """The queue is read from Redis at scrape time: that must stay cheap."""
    started = time.monotonic()
    for _ in range(5):
        stack.scrape_gateway()
    assert (time.monotonic() - started) / 5 < 0.5
