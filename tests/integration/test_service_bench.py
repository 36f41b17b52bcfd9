"""bench/service_bench.py's paired runs on the demo model: the in-process engine and `spindle
serve` alive together, each workload of the plan run the asked number of times on each side, in
alternation, and every run's rate kept beside the fastest."""

from __future__ import annotations

from pathlib import Path

from bench import service_bench
from bench.workloads import BenchRequest, Workload

PROMPT = [504, 3469, 314, 253, 1345, 30, 378, 3834]


def test_paired_runs_each_workload_on_both_systems(demo_model_dir: Path, tmp_path: Path) -> None:
    args = service_bench.parse_args(
        ["--dtype", "float32", "--threads", "1", "--max-batch-total-tokens", "4096"]
    )
    two = Workload("two", 0, [BenchRequest(PROMPT, 5), BenchRequest(PROMPT[:4], 3)])
    one = Workload("one", 0, [BenchRequest(PROMPT, 4)])
    in_process, served = service_bench.run_paired(
        demo_model_dir, [(two, 1), (one, 2)], args, tmp_path
    )
    for side in (in_process, served):
        assert set(side) == {"two", "one"}
        assert len(side["two"]["repeat_tokens_per_s"]) == 1
        assert len(side["one"]["repeat_tokens_per_s"]) == 2
        assert (side["two"]["output_tokens"], side["one"]["output_tokens"]) == (8, 4)
        assert side["two"]["output_tokens_per_s"] == max(side["two"]["repeat_tokens_per_s"])
    assert not served["two"]["failed"] and not served["one"]["failed"]
    # each child of `spindle serve` by its role (the worker's and gateway's flags name Redis too)
    assert {"worker", "gateway", "redis", "client"} <= set(served["two"]["cpu_s"])
    assert served["two"]["cpu_s"]["worker"] > 0
