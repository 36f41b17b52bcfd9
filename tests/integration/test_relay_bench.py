"""bench/relay_bench.py end to end on a small scale: a real gateway process fed by the stand-in
worker, both for the relay's capacity (every token of every request arrives) and for the lone
requests' latency (each answered, its headers before its first token)."""

from __future__ import annotations

from pathlib import Path

import pytest

from bench import relay_bench
from bench.load import http_post


def test_relay_capacity_counts_every_relayed_token(tmp_path: Path) -> None:
    args = relay_bench.parse_args(["--clients", "3", "--tokens", "40", "--rounds", "2"])
    result = relay_bench.measure(args, tmp_path)
    assert (result["requests"], result["failed"], result["tokens"]) == (6, 0, 240)
    assert result["tokens_per_s"] > 0
    # every process's CPU is read (in clock ticks: a run this small may take less than one)
    assert set(result["cpu_s"]) == {"gateway", "redis", "publisher", "client"}
    assert all(seconds >= 0 for seconds in result["cpu_s"].values())


def test_stepped_publishing_relays_every_token_one_step_at_a_time(tmp_path: Path) -> None:
    args = relay_bench.parse_args(
        ["--clients", "4", "--tokens", "10", "--rounds", "1", "--step-ms", "30"]
    )
    result = relay_bench.measure(args, tmp_path)
    assert (result["requests"], result["failed"], result["tokens"]) == (4, 0, 40)
    # Ten steps 30 ms apart: no request can finish before nine gaps have passed.
    assert result["wall_s"] >= 9 * 0.030
    assert "(a step every 30 ms)" in relay_bench.markdown_table(result)


def test_lone_requests_time_headers_then_first_token(tmp_path: Path) -> None:
    args = relay_bench.parse_args(["--lone", "6", "--lone-gap-s", "0.01"])
    result = relay_bench.measure_lone(args, tmp_path)
    assert result["lone_requests"] == 6
    headers, first = result["headers"], result["first_data"]
    assert 0 < headers["p50_ms"] <= first["p50_ms"] < 5000
    assert headers["p50_ms"] <= headers["p90_ms"] <= headers["p99_ms"]
    assert set(result["cpu_ms_per_request"]) == {"gateway", "redis", "publisher"}
    table = relay_bench.lone_table(result)
    assert f"| 6 (0.01) | **{first['p50_ms']:.2f}**" in table


def test_a_refused_lone_request_is_an_error_not_a_timing(tmp_path: Path) -> None:
    with relay_bench.relay_stack(tmp_path) as (url, _pids):
        port = int(url.rsplit(":", 1)[1])
        unknown_model = http_post(
            f"127.0.0.1:{port}",
            "/v1/completions",
            b'{"model": "nope", "prompt": "x", "stream": true}',
        )
        with pytest.raises(RuntimeError, match="404"):
            relay_bench.time_lone_request(port, unknown_model)


def test_profile_finds_py_spy_beside_python_or_says_it_is_missing(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    venv_bin, elsewhere = tmp_path / "venv-bin", tmp_path / "elsewhere"
    venv_bin.mkdir()
    elsewhere.mkdir()
    monkeypatch.setattr(relay_bench.sys, "executable", str(venv_bin / "python"))
    monkeypatch.setenv("PATH", str(elsewhere))
    with pytest.raises(SystemExit):  # argparse's error: before any process starts
        relay_bench.parse_args(["--profile", str(tmp_path / "gw.txt")])
    on_path = elsewhere / "py-spy"
    on_path.write_text("#!/bin/sh\n")
    on_path.chmod(0o755)
    assert relay_bench.py_spy() == on_path
    (venv_bin / "py-spy").write_text("#!/bin/sh\n")
    assert relay_bench.py_spy() == venv_bin / "py-spy"
    assert relay_bench.parse_args(["--profile", str(tmp_path / "gw.txt")]).profile.name == "gw.txt"
