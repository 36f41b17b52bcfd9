"""bench/service_bench.py's paired runs on the demo model: the in-process engine, `spindle serve`
and a peer server alive together, each turn of the plan run the asked number of rounds on each of
its sides, in rotation, and every run's rate kept beside the fastest."""

from __future__ import annotations

from pathlib import Path

from bench import service_bench
from bench.service_bench import IN_PROCESS_SIDE, SERVED_SIDE, Turn
from bench.workloads import BenchRequest, Workload

PROMPT = [504, 3469, 314, 253, 1345, 30, 378, 3834]


def test_paired_runs_each_workload_on_every_side(demo_model_dir: Path, tmp_path: Path) -> None:
    """Both spindle sides run every turn; the peer (here a second `spindle serve`, standing in
    for vLLM) only the turn that asks for peers, as often as the two others."""
    args = service_bench.parse_args(
        ["--dtype", "float32", "--threads", "1", "--max-batch-total-tokens", "4096"]
    )
    two = Workload("two", 0, [BenchRequest(PROMPT, 5), BenchRequest(PROMPT[:4], 3)])
    one = Workload("one", 0, [BenchRequest(PROMPT, 4)])
    options = service_bench.engine_options(args)
    with service_bench.Serve(demo_model_dir, options, 1, tmp_path / "peer.log") as peer:
        sides = service_bench.run_paired(
            demo_model_dir,
            [Turn(two, 2, peers=True), Turn(one, 1)],
            args,
            tmp_path,
            peers={"peer": peer},
        )
    in_process, served = sides[IN_PROCESS_SIDE], sides[SERVED_SIDE]
    for side in (in_process, served):
        assert set(side) == {"two", "one"}
        assert len(side["two"]["repeat_tokens_per_s"]) == 2
        assert len(side["one"]["repeat_tokens_per_s"]) == 1
        assert (side["two"]["output_tokens"], side["one"]["output_tokens"]) == (8, 4)
        assert side["two"]["output_tokens_per_s"] == max(side["two"]["repeat_tokens_per_s"])
    assert set(sides["peer"]) == {"two"}
    assert len(sides["peer"]["two"]["repeat_tokens_per_s"]) == 2
    assert sides["peer"]["two"]["output_tokens"] == 8
    assert not served["two"]["failed"] and not served["one"]["failed"]
    assert not sides["peer"]["two"]["failed"]
    # each child of `spindle serve` by its role (the worker's and gateway's flags name Redis too)
    assert {"worker", "gateway", "redis", "client"} <= set(served["two"]["cpu_s"])
    assert served["two"]["cpu_s"]["worker"] > 0
    assert sides["peer"]["two"]["cpu_s"]["worker"] > 0
