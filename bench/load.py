"""A load generator for any OpenAI-compatible server (spindle's gateway, vLLM, llama-server):
replays a workload (`bench/workloads.py`) as streaming `POST /v1/completions` requests with token
id prompts, greedy and `ignore_eos`, and measures what a client sees.

Per request: time to first token (TTFT, from when it was sent), inter-token latencies (ITL: gaps
between consecutive content chunks, each timed by the socket read that completed it), end-to-end
latency and output tokens (from the final `usage` chunk). Per run: output tokens/s and requests/s over the wall time from the first request sent to
the last one finished, and TTFT / ITL / latency percentiles. Requests are sent at their
`arrival_s` (mixed-32: all at once; poisson: on its schedule).

The client is plain asyncio sockets, one connection per request, and parses nothing until a
response has ended (`send_one`): it runs on the machine it measures, and httpx parsing each chunk
as it came took ~0.1 ms of CPU per token from the server under test.

The statistics (`percentile`, `inter_token_latencies`, `summarise`) are pure functions of the
recorded timestamps, so they are tested without a server (tests/unit/test_bench_load.py).

    python -m bench.load --base-url http://127.0.0.1:8000 --model SmolLM2-135M-Instruct \\
        --workload mixed-32 --out bench/results/load.json
"""

from __future__ import annotations

import argparse
import asyncio
import bisect
import itertools
import json
import math
import statistics
import time
from collections.abc import Coroutine, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, TypeVar, cast

import httpx

from bench.report import write_report
from bench.workloads import BenchRequest, Workload, load_workload

T = TypeVar("T")

PERCENTILES = (50, 90, 99)
DEFAULT_TIMEOUT_S = 900.0


@dataclass
class RequestRecord:
    """One request as the client saw it; times in seconds on `time.perf_counter`'s clock."""

    index: int
    sent_at: float
    chunk_times: list[float] = field(default_factory=list)  # arrival of each content chunk
    finished_at: float | None = None
    output_tokens: int | None = None  # from the usage chunk; None if the server sent none
    expected_tokens: int = 0  # the workload's max_tokens
    error: str | None = None

    @property
    def ttft_s(self) -> float | None:
        return self.chunk_times[0] - self.sent_at if self.chunk_times else None

    @property
    def latency_s(self) -> float | None:
        return None if self.finished_at is None else self.finished_at - self.sent_at


# -- statistics (pure) -----------------------------------------------------------------------


def percentile(values: Sequence[float], q: float) -> float | None:
    """The q-th percentile (0-100) with linear interpolation between closest ranks (numpy's
    default); None for no values."""
    if not 0 <= q <= 100:
        raise ValueError(f"percentile must be within 0-100, got {q}")
    if not values:
        return None
    ordered = sorted(values)
    rank = (len(ordered) - 1) * q / 100
    low, high = math.floor(rank), math.ceil(rank)
    return ordered[low] + (ordered[high] - ordered[low]) * (rank - low)


def inter_token_latencies(chunk_times: Sequence[float]) -> list[float]:
    """Gaps between consecutive content chunks (the first chunk's wait is TTFT, not an ITL)."""
    return [later - earlier for earlier, later in zip(chunk_times, chunk_times[1:], strict=False)]


def distribution(values: Sequence[float]) -> dict[str, float | None]:
    """Mean and the standard percentiles, in milliseconds."""
    stats: dict[str, float | None] = {f"p{q}_ms": _ms(percentile(values, q)) for q in PERCENTILES}
    stats["mean_ms"] = _ms(sum(values) / len(values)) if values else None
    return stats


def _ms(seconds: float | None) -> float | None:
    return None if seconds is None else round(seconds * 1000, 3)


def summarise(records: Sequence[RequestRecord]) -> dict[str, Any]:
    """Throughput and latency of one run. The wall time runs from the first request sent to the
    last one finished; only requests that finished without error count as completed."""
    done = [r for r in records if r.error is None and r.finished_at is not None]
    failed = len(records) - len(done)
    if not done:
        return {"requests": len(records), "completed": 0, "failed": failed}
    start = min(r.sent_at for r in records)
    wall_s = max(r.finished_at for r in done if r.finished_at is not None) - start
    output_tokens = sum(_tokens(r) for r in done)
    itl = [gap for r in done for gap in inter_token_latencies(r.chunk_times)]
    return {
        "requests": len(records),
        "completed": len(done),
        "failed": failed,
        "wall_s": round(wall_s, 4),
        "output_tokens": output_tokens,
        "short_requests": sum(_tokens(r) != r.expected_tokens for r in done),
        "output_tokens_per_s": round(output_tokens / wall_s, 2) if wall_s > 0 else None,
        "requests_per_s": round(len(done) / wall_s, 4) if wall_s > 0 else None,
        "ttft": distribution([r.ttft_s for r in done if r.ttft_s is not None]),
        "itl": distribution(itl),
        "latency": distribution([r.latency_s for r in done if r.latency_s is not None]),
    }


def clocked_summary(seconds: float, ttft: Sequence[float], output_tokens: int) -> dict[str, Any]:
    """A run timed without a client (an in-process engine): the keys of `summarise` that it can
    fill — wall time, output tokens/s and TTFT from the start — so tables read both alike."""
    return {
        "requests": len(ttft),
        "completed": len(ttft),
        "failed": 0,
        "wall_s": round(seconds, 4),
        "output_tokens": output_tokens,
        "output_tokens_per_s": round(output_tokens / seconds, 2) if seconds > 0 else None,
        "ttft": distribution(ttft),
    }


def best_run(summaries: Sequence[dict[str, Any]]) -> dict[str, Any]:
    """The repeat with the highest output tokens/s (one with failed requests wins only when all
    have some), with every repeat's tokens/s in run order under `repeat_tokens_per_s` and every
    repeat's TTFT p50 and p99 under `repeat_ttft_p50_ms` and `repeat_ttft_p99_ms`."""
    if not summaries:
        raise ValueError("best_run needs at least one summary")
    rates = [s.get("output_tokens_per_s") or 0.0 for s in summaries]
    clean = [bool(s.get("completed")) and not s.get("failed") for s in summaries]
    best = max(range(len(summaries)), key=lambda index: (clean[index], rates[index], -index))
    return {
        **summaries[best],
        "repeat_tokens_per_s": rates,
        "repeat_ttft_p50_ms": [(s.get("ttft") or {}).get("p50_ms") for s in summaries],
        "repeat_ttft_p99_ms": [(s.get("ttft") or {}).get("p99_ms") for s in summaries],
    }


def median_ttft_p50_ms(summary: dict[str, Any]) -> float:
    """The median over a run's repeats of their TTFT p50 (the best repeat's alone where the
    repeats were not kept): what a TTFT comparison should read when a workload is one request,
    whose single TTFT swings by several ms from one repeat to the next."""
    repeats = [value for value in summary.get("repeat_ttft_p50_ms") or [] if value is not None]
    return statistics.median(repeats) if repeats else summary["ttft"]["p50_ms"]


def paired_repeats(
    baseline: dict[str, Any], other: dict[str, Any], key: str
) -> list[tuple[float, float]]:
    """The two sides' per-repeat figure `key` (`repeat_ttft_p50_ms`, `repeat_ttft_p99_ms`) pair
    by pair, the i-th repeat of each from the i-th round, for two or more complete pairs; else
    []."""
    mine = baseline.get(key) or []
    theirs = other.get(key) or []
    if len(mine) < 2 or len(mine) != len(theirs) or None in mine or None in theirs:
        return []
    return list(zip(mine, theirs, strict=True))


def paired_rates(baseline: dict[str, Any], other: dict[str, Any]) -> list[tuple[float, float]]:
    """The two sides' tok/s pair by pair (the i-th repeat of each from the i-th round, as
    `service_bench.run_paired` keeps them), for two or more complete pairs (a failed run's
    rate is 0); else []."""
    pairs = paired_repeats(baseline, other, "repeat_tokens_per_s")
    return pairs if all(mine and theirs for mine, theirs in pairs) else []


def pair_throughput_costs_pct(baseline: dict[str, Any], other: dict[str, Any]) -> list[float]:
    """1 - other / baseline tok/s of each pair (`paired_rates`), in per cent. Their median is the
    service's throughput cost (`service_bench.compare`): adjacent runs share the machine's spell,
    the fastest runs of each side need not (on the Zen 3 one in-process run at 174 tok/s against
    its other round's 148 made a 9.6 % cost of pairs reading -4.6 and +9.6 %)."""
    return [100 * (1 - theirs / ours) for ours, theirs in paired_rates(baseline, other)]


def pair_differences(baseline: dict[str, Any], other: dict[str, Any]) -> list[float] | None:
    """`other`'s TTFT p50 minus `baseline`'s, pair by pair (the i-th repeat of each being the
    i-th pair, as `service_bench.run_paired` keeps them), or None without two or more complete
    pairs."""
    pairs = paired_repeats(baseline, other, "repeat_ttft_p50_ms")
    return [b - a for a, b in pairs] if pairs else None


def paired_ttft_cost_ms(baseline: dict[str, Any], other: dict[str, Any]) -> float | None:
    """The median of the alternating pairs' TTFT differences (`pair_differences`). Adjacent runs
    share the machine's spell, so the pair differences leave out the drift that the two sides'
    medians carry (a lone 128-token prefill swung 217-345 ms within one fp32 run of ten pairs on
    the Zen 3)."""
    differences = pair_differences(baseline, other)
    return None if differences is None else statistics.median(differences)


def paired_ttft_cost_interval_ms(
    baseline: dict[str, Any], other: dict[str, Any], confidence: float = 0.95
) -> tuple[float, float] | None:
    """A distribution-free `confidence` interval for `paired_ttft_cost_ms`: the order statistics
    of the pairs' differences that the median lies between with that probability (the sign
    test's binomial), or None with too few pairs (under 6 at 95 %). It says whether a run can
    tell a few ms of cost from the machine's swings at all."""
    differences = pair_differences(baseline, other)
    if differences is None:
        return None
    differences.sort()
    pairs, outside, tail = len(differences), 0, 0.0
    while tail + math.comb(pairs, outside) / 2**pairs <= (1 - confidence) / 2:
        tail += math.comb(pairs, outside) / 2**pairs
        outside += 1
    if outside == 0:
        return None
    return differences[outside - 1], differences[pairs - outside]


def _tokens(record: RequestRecord) -> int:
    """Usage's count when the server sent one, else one token per content chunk."""
    return record.output_tokens if record.output_tokens is not None else len(record.chunk_times)


# -- the client --------------------------------------------------------------------------------


def completion_body(model: str, request: BenchRequest, ignore_eos: bool) -> dict[str, Any]:
    return {
        "model": model,
        "prompt": request.prompt_ids,
        "max_tokens": request.max_tokens,
        "temperature": 0,
        "stream": True,
        "ignore_eos": ignore_eos,
        "stream_options": {"include_usage": True},
    }


def record_chunk(record: RequestRecord, payload: str, now: float) -> None:
    """Fold one SSE `data:` payload into the record: a chunk with a non-empty choice is a content
    chunk; a chunk with `usage` carries the output token count."""
    chunk = json.loads(payload)
    if "error" in chunk:
        record.error = json.dumps(chunk["error"])[:300]
        return
    if any(
        choice.get("text") or choice.get("finish_reason") is None
        for choice in chunk.get("choices") or []
    ):
        record.chunk_times.append(now)
    usage = chunk.get("usage")
    if usage:
        record.output_tokens = int(usage["completion_tokens"])


class _StreamedResponse:
    """One HTTP/1.1 response as it came off the socket: when its request went out on the open
    connection, the status, whether the body is chunked, and the body's raw reads with the time
    each arrived. Nothing is parsed while the response streams (see `send_one`)."""

    def __init__(self) -> None:
        self.sent_at: float | None = None
        self.status = 0
        self.chunked = False
        self.reads: list[tuple[float, bytes]] = []

    def body(self) -> bytes:
        return b"".join(data for _, data in self.reads)

    def timed_pieces(self) -> list[tuple[float, bytes]]:
        """The decoded body in pieces (one per HTTP chunk, or per read when not chunked), each
        with the arrival time of the read that completed it."""
        if not self.chunked:
            return list(self.reads)
        raw = self.body()
        ends = list(itertools.accumulate(len(data) for _, data in self.reads))
        times = [at for at, _ in self.reads]
        pieces, offset = [], 0
        while True:
            line_end = raw.find(b"\r\n", offset)
            if line_end < 0:
                break
            size = int(raw[offset:line_end].split(b";")[0] or b"0", 16)
            if size == 0:
                break
            start, stop = line_end + 2, line_end + 2 + size
            if stop > len(raw):
                break  # cut short: the connection ended mid-chunk
            pieces.append((times[bisect.bisect_left(ends, stop)], raw[start:stop]))
            offset = stop + 2
        return pieces


class _ResponseReader(asyncio.Protocol):
    """Writes one request when connected and files the response's reads into a
    `_StreamedResponse` from the event loop's own callback: no task wakes up per read, so a
    streamed token costs the client one `recv` and a list append (on a stream reader it also cost
    a task switch: 35 % more client CPU, see `drive`)."""

    def __init__(self, request: bytes, response: _StreamedResponse) -> None:
        self._request = request
        self._response = response
        self._head = b""  # the status line and headers until their blank line is in
        self._head_done = False
        self.done: asyncio.Future[None] = asyncio.get_running_loop().create_future()

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self._response.sent_at = time.perf_counter()
        # a stream transport (uvloop's is not an asyncio.WriteTransport subclass)
        cast(asyncio.WriteTransport, transport).write(self._request)

    def data_received(self, data: bytes) -> None:
        now = time.perf_counter()
        if not self._head_done:
            self._head += data
            end = self._head.find(b"\r\n\r\n")
            if end < 0:
                return
            head, data = self._head[:end], self._head[end + 4 :]
            self._head_done = True
            try:
                self._read_head(head.decode("latin-1"))
            except (ValueError, IndexError) as err:
                self._finish(ValueError(f"not an HTTP response: {head[:200]!r} ({err})"))
                return
            if not data:
                return
        self._response.reads.append((now, data))

    def _read_head(self, head: str) -> None:
        status_line, *header_lines = head.split("\r\n")
        self._response.status = int(status_line.split()[1])
        self._response.chunked = any(
            line.lower().startswith("transfer-encoding:") and "chunked" in line.lower()
            for line in header_lines
        )

    def connection_lost(self, exc: Exception | None) -> None:
        if exc is None and not self._head_done:
            exc = asyncio.IncompleteReadError(self._head, None)
        self._finish(exc)

    def _finish(self, error: Exception | None) -> None:
        if self.done.done():
            return
        if error is None:
            self.done.set_result(None)
        else:
            self.done.set_exception(error)


def http_post(host: str, path: str, body: bytes, headers: dict[str, str] | None = None) -> bytes:
    """An HTTP/1.1 POST of a JSON `body` asking for an event stream, on a connection the server
    closes after its answer: the bytes to write."""
    head = [
        f"POST {path} HTTP/1.1",
        f"Host: {host}",
        "Content-Type: application/json",
        "Accept: text/event-stream",
        f"Content-Length: {len(body)}",
        "Connection: close",
        *(f"{name}: {value}" for name, value in (headers or {}).items()),
    ]
    return ("\r\n".join(head) + "\r\n\r\n").encode() + body


async def _post_streaming(
    url: httpx.URL, body: bytes, headers: dict[str, str], response: _StreamedResponse
) -> None:
    """POST `body` over a fresh connection and read the response to its end into `response`."""
    request = http_post(url.netloc.decode(), url.raw_path.decode(), body, headers)
    loop = asyncio.get_running_loop()
    transport, reader = await loop.create_connection(
        lambda: _ResponseReader(request, response), url.host, url.port or 80
    )
    try:
        await reader.done
    finally:
        transport.close()


def sse_payloads(pieces: list[tuple[float, bytes]]) -> list[tuple[float, str]]:
    """The `data:` payloads of an SSE body given as timed pieces, each with the time of the
    piece that completed its event."""
    payloads: list[tuple[float, str]] = []
    pending = b""
    for at, piece in pieces:
        pending += piece.replace(b"\r\n", b"\n")
        *events, pending = pending.split(b"\n\n")
        for event in events:
            for line in event.split(b"\n"):
                if line.startswith(b"data:"):
                    payloads.append((at, line[5:].strip().decode()))
    return payloads


async def send_one(
    url: httpx.URL,
    body: dict[str, Any],
    record: RequestRecord,
    headers: dict[str, str] | None = None,
    timeout_s: float = DEFAULT_TIMEOUT_S,
) -> None:
    """Stream one completion into `record` (errors are recorded, not raised).

    The client shares the machine with the server it measures (2 cores here), so it does as
    little as it can while the response streams: each socket read is stored with its arrival
    time, and the HTTP chunks, SSE events and JSON are parsed after the stream ended. Parsing
    each chunk as it came (httpx + `json.loads`) cost ~0.1 ms of CPU per token, taken from the
    server's threads.

    Times count from the request's write on its open connection (`sent_at`): the TCP connect
    before it is the client's, paid once per connection by a pooling client such as the OpenAI
    SDK, not a cost of the server's path."""
    response = _StreamedResponse()
    record.sent_at = time.perf_counter()
    payload = json.dumps(body).encode()
    try:
        await asyncio.wait_for(_post_streaming(url, payload, headers or {}, response), timeout_s)
    except (TimeoutError, OSError, asyncio.IncompleteReadError, ValueError) as err:
        record.error = f"{type(err).__name__}: {err}"
        return
    finally:
        record.sent_at = response.sent_at or record.sent_at
    if response.status != 200:
        text = response.body().decode(errors="replace")
        record.error = f"HTTP {response.status}: {text[:300]}"
        return
    for at, data in sse_payloads(response.timed_pieces()):
        if data == "[DONE]":
            break
        record_chunk(record, data, at)
    record.finished_at = response.reads[-1][0] if response.reads else time.perf_counter()


def drive(coroutine: Coroutine[Any, Any, T]) -> T:
    """Run the client to completion on uvloop where it is installed (it is, with uvicorn's
    standard extra), else on asyncio's own loop. The client shares the cores with the server it
    measures, and on uvloop it takes ~15 % less CPU for the same stream (relay_bench with a step
    every 50 ms on the Zen 4, 8,192 streamed tokens: 0.28-0.29 CPU s against 0.33-0.35 on
    stream readers; 0.18-0.19 with `_ResponseReader`)."""
    try:
        import uvloop
    except ImportError:
        return asyncio.run(coroutine)
    return uvloop.run(coroutine)


async def run_workload(
    base_url: str,
    model: str,
    workload: Workload,
    *,
    timeout_s: float = DEFAULT_TIMEOUT_S,
    api_key: str | None = None,
) -> list[RequestRecord]:
    """Send every request of `workload` at its arrival time; return when all have finished."""
    url = httpx.URL(base_url.rstrip("/") + "/v1/completions")
    if url.scheme != "http":
        raise ValueError(f"the load generator speaks plain http only, not {url.scheme!r}")
    headers = {"Authorization": f"Bearer {api_key}"} if api_key else {}
    records = [
        RequestRecord(index, 0.0, expected_tokens=r.max_tokens)
        for index, r in enumerate(workload.requests)
    ]
    start = time.perf_counter()

    async def at_arrival(request: BenchRequest, record: RequestRecord) -> None:
        await asyncio.sleep(max(0.0, start + request.arrival_s - time.perf_counter()))
        body = completion_body(model, request, workload.ignore_eos)
        await send_one(url, body, record, headers, timeout_s)

    await asyncio.gather(
        *(at_arrival(r, rec) for r, rec in zip(workload.requests, records, strict=True))
    )
    return records


# -- report ------------------------------------------------------------------------------------


def markdown_table(rows: Sequence[tuple[str, dict[str, Any]]]) -> str:
    """One row per (label, summary)."""
    lines = [
        "| system | requests ok/all | output tok | s | tok/s | req/s "
        "| TTFT p50 / p90 / p99 ms | ITL p50 / p90 / p99 ms | latency p50 / p99 s |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for label, s in rows:
        if not s.get("completed"):
            lines.append(f"| {label} | 0/{s['requests']} | | | | | | | |")
            continue
        ttft, itl, latency = s["ttft"], s["itl"], s["latency"]
        lines.append(
            f"| {label} | {s['completed']}/{s['requests']} | {s['output_tokens']} "
            f"| {s['wall_s']:.2f} | {s['output_tokens_per_s']:.1f} | {s['requests_per_s']:.2f} "
            f"| {_triple(ttft)} | {_triple(itl)} "
            f"| {_s(latency['p50_ms'])} / {_s(latency['p99_ms'])} |"
        )
    return "\n".join(lines) + "\n"


def _triple(stats: dict[str, float | None]) -> str:
    return " / ".join(
        "-" if stats[f"p{q}_ms"] is None else f"{stats[f'p{q}_ms']:.1f}" for q in PERCENTILES
    )


def _s(milliseconds: float | None) -> str:
    return "-" if milliseconds is None else f"{milliseconds / 1000:.2f}"


def report(label: str, workload: Workload, records: list[RequestRecord]) -> dict[str, Any]:
    return {
        "label": label,
        "workload": workload.name,
        "summary": summarise(records),
        "requests": [
            {**asdict(r), "ttft_s": r.ttft_s, "latency_s": r.latency_s, "chunk_times": None}
            for r in records
        ],
    }


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--base-url", required=True, help="server root, e.g. http://127.0.0.1:8000")
    parser.add_argument("--model", required=True, help="the served model name")
    parser.add_argument("--workload", default="mixed-32", help="name in bench/workloads/ or path")
    parser.add_argument("--label", default=None, help="the system's name in the table")
    parser.add_argument("--api-key", default=None)
    parser.add_argument("--timeout", type=float, default=DEFAULT_TIMEOUT_S, help="per request, s")
    parser.add_argument("--out", type=Path, default=Path("bench/results/load.json"))
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    workload = load_workload(args.workload)
    records = drive(
        run_workload(
            args.base_url, args.model, workload, timeout_s=args.timeout, api_key=args.api_key
        )
    )
    result = report(args.label or args.base_url, workload, records)
    errors = [r.error for r in records if r.error]
    table = markdown_table([(result["label"], result["summary"])])
    write_report(args.out, result, table)
    if errors:
        print(f"{len(errors)} of {len(records)} requests failed; first: {errors[0]}")


if __name__ == "__main__":
    main()
