"""bench/load.py: its statistics on hand-made timings (percentiles, inter-token latencies, the
parsing of streamed chunks, the aggregation of a run), and its client against a scripted HTTP
server on localhost."""

from __future__ import annotations

import asyncio
import json
import time

import httpx
import pytest

from bench.load import (
    RequestRecord,
    _StreamedResponse,
    best_run,
    clocked_summary,
    completion_body,
    distribution,
    drive,
    inter_token_latencies,
    markdown_table,
    median_ttft_p50_ms,
    paired_ttft_cost_interval_ms,
    paired_ttft_cost_ms,
    percentile,
    record_chunk,
    send_one,
    sse_payloads,
    summarise,
)
from bench.workloads import BenchRequest
from common.launcher import free_port


def test_percentile_interpolates_between_ranks_like_numpy() -> None:
    values = [4.0, 1.0, 3.0, 2.0]  # unsorted on purpose
    assert percentile(values, 0) == 1.0
    assert percentile(values, 100) == 4.0
    assert percentile(values, 50) == pytest.approx(2.5)
    assert percentile(values, 90) == pytest.approx(3.7)  # numpy.percentile([1,2,3,4], 90)
    assert percentile([7.0], 99) == 7.0
    assert percentile([], 50) is None


def test_percentile_rejects_out_of_range() -> None:
    with pytest.raises(ValueError, match="0-100, got 101"):
        percentile([1.0], 101)


def test_inter_token_latencies_are_gaps_between_chunks() -> None:
    assert inter_token_latencies([10.0, 10.5, 10.75, 12.0]) == [0.5, 0.25, 1.25]
    assert inter_token_latencies([3.0]) == []
    assert inter_token_latencies([]) == []


def test_distribution_reports_milliseconds() -> None:
    stats = distribution([0.010, 0.020, 0.030])
    assert stats["p50_ms"] == pytest.approx(20.0)
    assert stats["mean_ms"] == pytest.approx(20.0)
    assert stats["p99_ms"] == pytest.approx(29.8)
    assert distribution([])["p50_ms"] is None


def test_record_chunk_counts_content_chunks_and_usage() -> None:
    record = RequestRecord(0, sent_at=1.0)
    record_chunk(record, json.dumps({"choices": [{"text": "Hi", "finish_reason": None}]}), 1.2)
    # A token whose text is not complete yet (half a UTF-8 character) still arrives as a chunk.
    record_chunk(record, json.dumps({"choices": [{"text": "", "finish_reason": None}]}), 1.3)
    record_chunk(record, json.dumps({"choices": [{"text": "", "finish_reason": "length"}]}), 1.4)
    record_chunk(record, json.dumps({"choices": [], "usage": {"completion_tokens": 3}}), 1.5)
    assert record.chunk_times == [1.2, 1.3]
    assert record.output_tokens == 3
    assert record.ttft_s == pytest.approx(0.2)
    assert record.error is None


def test_record_chunk_keeps_a_streamed_error() -> None:
    record = RequestRecord(0, sent_at=0.0)
    record_chunk(record, json.dumps({"error": {"message": "worker died"}}), 0.5)
    assert record.error is not None and "worker died" in record.error


def _record(index: int, sent: float, chunks: list[float], end: float, tokens: int) -> RequestRecord:
    return RequestRecord(index, sent, chunks, end, tokens, expected_tokens=tokens)


def test_summarise_aggregates_throughput_and_latencies() -> None:
    records = [
        _record(0, 0.0, [0.1, 0.2, 0.3], 0.3, 3),
        _record(1, 0.0, [0.3, 0.4, 0.6, 1.0], 1.0, 4),
        _record(2, 0.5, [], 0.5, 0),
    ]
    records[2].error = "HTTP 429: too many requests"
    summary = summarise(records)
    assert (summary["requests"], summary["completed"], summary["failed"]) == (3, 2, 1)
    assert summary["wall_s"] == pytest.approx(1.0)  # first sent at 0.0, last finished at 1.0
    assert summary["output_tokens"] == 7
    assert summary["output_tokens_per_s"] == pytest.approx(7.0)
    assert summary["requests_per_s"] == pytest.approx(2.0)
    assert summary["ttft"]["p50_ms"] == pytest.approx(200.0)  # TTFTs 100 and 300 ms
    # ITLs: 100, 100 (request 0) and 100, 200, 400 ms (request 1)
    assert summary["itl"]["p50_ms"] == pytest.approx(100.0)
    assert summary["itl"]["p90_ms"] == pytest.approx(320.0)
    assert summary["latency"]["p50_ms"] == pytest.approx(650.0)
    assert summary["short_requests"] == 0


def test_summarise_flags_requests_short_of_max_tokens_and_falls_back_to_chunks() -> None:
    short = _record(0, 0.0, [0.1, 0.2], 0.2, 2)
    short.expected_tokens = 5
    no_usage = _record(1, 0.0, [0.1, 0.2, 0.4], 0.4, 3)
    no_usage.output_tokens = None  # a server that sends no usage: one token per chunk
    summary = summarise([short, no_usage])
    assert summary["output_tokens"] == 5
    assert summary["short_requests"] == 1


def test_summarise_of_a_failed_run_has_no_throughput() -> None:
    failed = RequestRecord(0, 0.0, error="ConnectError: refused")
    assert summarise([failed]) == {"requests": 1, "completed": 0, "failed": 1}
    assert "| spindle | 0/1 |" in markdown_table([("spindle", summarise([failed]))])


def test_completion_body_asks_for_greedy_streaming_with_usage() -> None:
    body = completion_body("m", BenchRequest([1, 2, 3], 16), ignore_eos=True)
    assert body["prompt"] == [1, 2, 3]
    assert body["max_tokens"] == 16
    assert body["temperature"] == 0
    assert body["stream"] is True and body["ignore_eos"] is True
    assert body["stream_options"] == {"include_usage": True}


def test_clocked_summary_reads_like_a_client_summary() -> None:
    summary = clocked_summary(2.0, [0.1, 0.3, 0.5], 300)
    assert summary["output_tokens_per_s"] == pytest.approx(150.0)
    assert (summary["requests"], summary["completed"], summary["failed"]) == (3, 3, 0)
    assert summary["ttft"]["p50_ms"] == pytest.approx(300.0)
    assert summary["ttft"]["p99_ms"] == pytest.approx(496.0)


def test_best_run_keeps_the_fastest_clean_repeat_and_every_rate() -> None:
    slow = {"completed": 2, "failed": 0, "output_tokens_per_s": 90.0, "ttft": {"p99_ms": 9.0}}
    fast = {"completed": 2, "failed": 0, "output_tokens_per_s": 120.0, "ttft": {"p99_ms": 7.0}}
    broken = {"completed": 1, "failed": 1, "output_tokens_per_s": 400.0}
    best = best_run([slow, broken, fast])
    assert best["output_tokens_per_s"] == 120.0
    assert best["repeat_tokens_per_s"] == [90.0, 400.0, 120.0]
    assert best["repeat_ttft_p99_ms"] == [9.0, None, 7.0]
    assert best_run([broken])["output_tokens_per_s"] == 400.0  # all failed: still reported
    with pytest.raises(ValueError, match="at least one"):
        best_run([])


def test_the_ttft_of_a_run_is_the_median_over_its_repeats() -> None:
    def repeat(rate: float, ttft_ms: float) -> dict:
        return {
            "completed": 1,
            "failed": 0,
            "output_tokens_per_s": rate,
            "ttft": {"p50_ms": ttft_ms},
        }

    best = best_run([repeat(100.0, 41.0), repeat(120.0, 58.0), repeat(90.0, 43.0)])
    assert best["ttft"]["p50_ms"] == 58.0  # the fastest repeat's own
    assert best["repeat_ttft_p50_ms"] == [41.0, 58.0, 43.0]
    assert median_ttft_p50_ms(best) == 43.0
    assert median_ttft_p50_ms({"ttft": {"p50_ms": 50.0}}) == 50.0  # no repeats kept: its own


# -- the client, against a scripted HTTP server ------------------------------------------------


def _chunked(*events: bytes) -> bytes:
    return b"".join(b"%x\r\n%s\r\n" % (len(e), e) for e in events) + b"0\r\n\r\n"


def test_sse_payloads_are_split_on_blank_lines_and_timed_by_the_piece_that_ended_them() -> None:
    pieces = [
        (1.0, b'data: {"a":1}\n\ndata: {"b"'),
        (2.0, b":2}\r\n\r\n: ping\n\ndata: [DONE]\n\n"),
    ]
    assert sse_payloads(pieces) == [(1.0, '{"a":1}'), (2.0, '{"b":2}'), (2.0, "[DONE]")]


def test_chunked_bodies_are_decoded_whatever_the_read_boundaries() -> None:
    raw = _chunked(b"data: one\n\n", b"data: two\n\n")
    response = _StreamedResponse()
    response.chunked = True
    response.reads = [(1.0, raw[:3]), (2.0, raw[3:20]), (3.0, raw[20:])]
    # "data: one" ends inside the second read, "data: two" inside the third
    assert response.timed_pieces() == [(2.0, b"data: one\n\n"), (3.0, b"data: two\n\n")]


async def _serve_once(reply_parts: list[bytes], delay_s: float = 0.02):
    """A server that reads one request and answers with `reply_parts`, pausing between them."""
    received: list[bytes] = []

    async def handle(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        head = await reader.readuntil(b"\r\n\r\n")
        length = int(
            next(
                line.split(b":")[1]
                for line in head.split(b"\r\n")
                if line.lower().startswith(b"content-length")
            )
        )
        received.append(head + await reader.readexactly(length))
        for part in reply_parts:
            writer.write(part)
            await writer.drain()
            await asyncio.sleep(delay_s)
        writer.close()

    server = await asyncio.start_server(handle, "127.0.0.1", 0)
    port = server.sockets[0].getsockname()[1]
    return server, port, received


def _chunk_json(payload: dict) -> bytes:
    return b"data: " + json.dumps(payload).encode() + b"\n\n"


@pytest.mark.parametrize("run", [asyncio.run, drive], ids=["asyncio", "drive (uvloop)"])
def test_send_one_streams_a_chunked_sse_completion(run) -> None:
    head = (
        b"HTTP/1.1 200 OK\r\ncontent-type: text/event-stream\r\ntransfer-encoding: chunked\r\n\r\n"
    )
    events = [
        _chunk_json({"choices": [{"text": "Hello", "finish_reason": None}]}),
        _chunk_json({"choices": [{"text": " world", "finish_reason": "length"}]}),
        _chunk_json({"choices": [], "usage": {"completion_tokens": 2}}),
        b"data: [DONE]\n\n",
    ]
    body = _chunked(*events)
    split = len(_chunked(events[0])) - 5  # the first event whole, without the end marker

    async def scenario():
        server, port, received = await _serve_once([head, body[:split], body[split:]])
        async with server:
            record = RequestRecord(0, 0.0, expected_tokens=2)
            url = httpx.URL(f"http://127.0.0.1:{port}/v1/completions")
            await send_one(url, {"prompt": [1, 2]}, record, {"Authorization": "Bearer k"})
        return record, received

    record, received = run(scenario())
    assert record.error is None
    assert record.output_tokens == 2
    assert len(record.chunk_times) == 2
    assert record.chunk_times[1] > record.chunk_times[0] > record.sent_at  # two reads apart
    assert record.finished_at is not None and record.finished_at >= record.chunk_times[-1]
    request = received[0]
    assert request.startswith(b"POST /v1/completions HTTP/1.1\r\n")
    assert b"Authorization: Bearer k" in request
    assert request.endswith(b'{"prompt": [1, 2]}')


def test_send_one_records_http_errors_and_refused_connections() -> None:
    async def scenario():
        reply = b'{"error": {"message": "no such model"}}'
        head = b"HTTP/1.1 404 Not Found\r\ncontent-length: %d\r\n\r\n" % len(reply)
        server, port, _ = await _serve_once([head + reply])
        async with server:
            rejected = RequestRecord(0, 0.0)
            await send_one(httpx.URL(f"http://127.0.0.1:{port}/v1/completions"), {}, rejected)
        refused = RequestRecord(1, 0.0)
        await send_one(httpx.URL(f"http://127.0.0.1:{free_port()}/v1/completions"), {}, refused)
        return rejected, refused

    rejected, refused = asyncio.run(scenario())
    assert rejected.error is not None and rejected.error.startswith("HTTP 404")
    assert "no such model" in rejected.error
    assert refused.error is not None and "ConnectionRefused" in refused.error


def test_times_count_from_the_request_write_not_the_connect(monkeypatch) -> None:
    """A slow connect (a client opening a connection) is not part of the server's TTFT."""
    connect = asyncio.BaseEventLoop.create_connection

    async def slow_connect(loop, *args, **kwargs):
        await asyncio.sleep(0.2)
        return await connect(loop, *args, **kwargs)

    monkeypatch.setattr(asyncio.BaseEventLoop, "create_connection", slow_connect)
    head = b"HTTP/1.1 200 OK\r\ntransfer-encoding: chunked\r\n\r\n"
    body = _chunked(_chunk_json({"choices": [{"text": "a", "finish_reason": "length"}]}))

    async def scenario():
        server, port, _ = await _serve_once([head, body])
        async with server:
            record = RequestRecord(0, 0.0, expected_tokens=1)
            began = time.perf_counter()
            await send_one(httpx.URL(f"http://127.0.0.1:{port}/v1/completions"), {}, record)
        return record, began

    record, began = asyncio.run(scenario())
    assert record.error is None
    assert record.sent_at - began >= 0.2  # stamped once connected
    assert record.ttft_s is not None and record.ttft_s < 0.2


def test_a_head_split_across_reads_and_a_body_in_the_head_s_read_are_both_kept() -> None:
    head = b"HTTP/1.1 200 OK\r\ntransfer-encoding: chunked\r\n\r\n"
    body = _chunked(
        _chunk_json({"choices": [{"text": "a", "finish_reason": None}]}),
        _chunk_json({"choices": [{"text": "b", "finish_reason": "length"}]}),
    )

    async def scenario():
        server, port, _ = await _serve_once([head[:7], head[7:] + body[:40], body[40:]])
        async with server:
            record = RequestRecord(0, 0.0, expected_tokens=2)
            await send_one(httpx.URL(f"http://127.0.0.1:{port}/v1/completions"), {}, record)
        return record

    record = asyncio.run(scenario())
    assert record.error is None
    assert len(record.chunk_times) == 2


def test_an_answer_that_is_not_http_is_an_error() -> None:
    async def scenario():
        server, port, _ = await _serve_once([b"SSH-2.0-OpenSSH\r\n\r\n"])
        async with server:
            record = RequestRecord(0, 0.0)
            await send_one(httpx.URL(f"http://127.0.0.1:{port}/v1/completions"), {}, record)
        cut = RequestRecord(1, 0.0)
        server, port, _ = await _serve_once([b"HTTP/1.1 200 OK\r\n"])  # closed mid-head
        async with server:
            await send_one(httpx.URL(f"http://127.0.0.1:{port}/v1/completions"), {}, cut)
        return record, cut

    record, cut = asyncio.run(scenario())
    assert record.error is not None and record.error.startswith("ValueError: not an HTTP")
    assert cut.error is not None and cut.error.startswith("IncompleteReadError")


def test_the_paired_ttft_cost_reads_each_pair() -> None:
    def runs(*ttfts):
        return {"ttft": {"p50_ms": ttfts[0]}, "repeat_ttft_p50_ms": list(ttfts)}

    # a slow spell on pairs 2 and 3 moves both sides: each pair still differs by ~2 ms
    assert paired_ttft_cost_ms(runs(40.0, 80.0, 81.0, 41.0), runs(42.0, 82.5, 83.0, 43.0)) == 2.0
    assert paired_ttft_cost_ms(runs(40.0), runs(42.0)) is None  # one pair: no pairs to read
    assert paired_ttft_cost_ms(runs(40.0, 41.0), runs(42.0, 43.0, 44.0)) is None  # not paired
    assert paired_ttft_cost_ms(runs(40.0, 41.0), runs(42.0, None)) is None  # a run without TTFT
    assert paired_ttft_cost_ms({"ttft": {"p50_ms": 1.0}}, runs(2.0, 3.0)) is None


def test_the_paired_ttft_cost_interval_is_the_sign_tests() -> None:
    def runs(ttfts):
        return {"ttft": {"p50_ms": ttfts[0]}, "repeat_ttft_p50_ms": list(ttfts)}

    base = [100.0] * 20
    differences = [float(d) for d in range(-9, 11)]  # -9 ... 10, in a shuffled order
    differences = differences[7:] + differences[:7]
    interval = paired_ttft_cost_interval_ms(
        runs(base), runs([b + d for b, d in zip(base, differences, strict=True)])
    )
    # 20 pairs: the 6th smallest and the 6th largest (P(at most 5 of 20 below the median) ~2 %)
    assert interval == (-4.0, 5.0)
    ten = [float(d) for d in range(10)]
    assert paired_ttft_cost_interval_ms(runs([0.0] * 10), runs(ten)) == (1.0, 8.0)  # 2nd, 9th
    five = runs([0.0] * 5)
    assert paired_ttft_cost_interval_ms(five, runs([1.0, 2.0, 3.0, 4.0, 5.0])) is None
    assert paired_ttft_cost_interval_ms(runs([0.0]), runs([1.0])) is None
