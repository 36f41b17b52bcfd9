"""Tensor-parallel worker groups on CPU (gloo): a group of two ranks produces the same greedy
tokens and (to float32 rounding) the same logits as one rank, with attention heads split or KV
heads replicated; each rank holds about half the parameters; a bad --num-shard fails before any
process starts; and a killed rank ends the whole group within seconds."""

from __future__ import annotations

import os
import random
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest
import torch
from transformers import AutoConfig, AutoModelForCausalLM

from common.protocol import SamplingParams
from tests.model.conftest import VOCAB, build_tokenizer
from worker.engine.config import EngineConfig
from worker.engine.engine import LLMEngine
from worker.layers.parallel import ParallelContext
from worker.loader.model_loader import build_model
from worker.loader.weights import iter_weights
from worker.parallel.group import RANK_DIED_EXIT_CODE, check_shardable, valid_shard_counts
from worker.parallel.step_message import MessageKind, StepHeader, StepMessage

REPO = Path(__file__).resolve().parents[2]


def llama_config(heads: int, kv_heads: int):
    return AutoConfig.for_model(
        "llama",
        vocab_size=VOCAB,
        hidden_size=128,
        intermediate_size=256,
        num_hidden_layers=2,
        num_attention_heads=heads,
        num_key_value_heads=kv_heads,
        max_position_embeddings=1024,
        rms_norm_eps=1e-6,
        initializer_range=0.3,
        eos_token_id=2,
        bos_token_id=None,
        architectures=["LlamaForCausalLM"],
    )


@pytest.fixture(scope="module")
def tp_models(tmp_path_factory) -> dict[str, Path]:
    """Heads split evenly (4 heads, 2 KV heads) and KV heads replicated (4 heads, 1 KV head)."""
    root = tmp_path_factory.mktemp("tp-models")
    models = {}
    for name, kv_heads in {"split-kv": 2, "replicated-kv": 1}.items():
        torch.manual_seed(0)
        model = AutoModelForCausalLM.from_config(llama_config(4, kv_heads), dtype=torch.float32)
        model.save_pretrained(root / name)
        build_tokenizer(root / name)
        models[name] = root / name
    return models


def make_engine(path: Path, num_shard: int) -> LLMEngine:
    return LLMEngine(
        EngineConfig(
            model=str(path),
            dtype="float32",
            max_total_tokens=256,
            max_batch_prefill_tokens=48,  # long prompts are chunked
            num_threads=1,
            num_shard=num_shard,
        )
    )


def run_recording_logits(engine: LLMEngine, prompts: list[list[int]]):
    """Greedy tokens per request (requests join at different steps) and each step's logits."""
    execute, logits_per_step = engine.runner.execute, []

    def recording(output):
        logits = execute(output)
        logits_per_step.append(logits.clone())
        return logits

    engine.runner.execute = recording  # type: ignore[method-assign]
    params = SamplingParams.make(temperature=0, max_new_tokens=12, ignore_eos=True)
    tokens: dict[str, list[int]] = {f"r{i}": [] for i in range(len(prompts))}
    step = 0
    while step < len(prompts) or engine.has_unfinished:
        if step < len(prompts):
            engine.add_request(f"r{step}", prompts[step], params)
        for event in engine.step():
            tokens[event.id].extend(event.token_ids)
        step += 1
    return tokens, logits_per_step


@pytest.mark.parametrize("kind", ["split-kv", "replicated-kv"])
def test_two_shards_match_one(tp_models, kind):
    rng = random.Random(3)
    prompts = [[rng.randrange(3, VOCAB) for _ in range(n)] for n in (5, 70, 1, 33)]
    single = make_engine(tp_models[kind], 1)
    expected_tokens, expected_logits = run_recording_logits(single, prompts)
    group = make_engine(tp_models[kind], 2)
    try:
        assert group.shard_group is not None and len(group.shard_group.pids) == 1
        tokens, logits = run_recording_logits(group, prompts)
    finally:
        group.close()
    assert tokens == expected_tokens
    assert all(len(t) == 12 for t in tokens.values())
    assert len(logits) == len(expected_logits)
    for got, want in zip(logits, expected_logits, strict=True):
        torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-4)
    assert not group.shard_group.processes[0].is_alive()  # close() ended the shard


def parameter_bytes(model: torch.nn.Module) -> int:
    return sum(p.numel() * p.element_size() for p in model.parameters())


@pytest.mark.parametrize("kind", ["split-kv", "replicated-kv"])
def test_each_rank_holds_its_share_of_the_parameters(tp_models, kind):
    from common.model_files import read_model_folder

    files = read_model_folder(tp_models[kind])
    config = files.load_config()

    def build(rank: int, world: int):
        context = ParallelContext(rank, world)
        return build_model(config, iter_weights(files), torch.float32, torch.device("cpu"), context)

    full = build(0, 1)
    head_dim = config.hidden_size // config.num_attention_heads
    # Replicated on every rank: the norms, and the K/V projections when there are fewer KV heads
    # than ranks (each rank keeps one whole KV head).
    replicated = sum(p.numel() for n, p in full.named_parameters() if "norm" in n) * 4
    if config.num_key_value_heads < 2:
        kv_rows = 2 * config.num_key_value_heads * head_dim
        replicated += config.num_hidden_layers * kv_rows * config.hidden_size * 4
    expected = (parameter_bytes(full) - replicated) // 2 + replicated
    for rank in range(2):
        shard = build(rank, 2)
        assert parameter_bytes(shard) == expected
        assert parameter_bytes(shard) < 0.6 * parameter_bytes(full)


def test_bad_num_shard_fails_before_spawning_with_the_valid_counts(tp_models):
    config = llama_config(heads=4, kv_heads=2)
    assert valid_shard_counts(config) == [1, 2, 4]
    with pytest.raises(ValueError, match="4 attention heads, 2 KV heads.*valid --num-shard values"):
        check_shardable(config, 3)
    import multiprocessing

    before = set(multiprocessing.active_children())
    with pytest.raises(ValueError, match=r"--num-shard 3 does not split .* are 1, 2, 4"):
        make_engine(tp_models["split-kv"], 3)
    assert set(multiprocessing.active_children()) == before


def test_step_message_round_trip():
    message = StepMessage(
        input_ids=torch.tensor([11, 12, 13, 14]),
        positions=torch.tensor([7, 0, 1, 2]),
        slot_mapping=torch.tensor([39, 48, 49, 50]),
        logits_indices=torch.tensor([0, 3]),
        query_lens=[1, 3],
        context_lens=[8, 3],
        block_tables=[[1, 2], [3]],
        num_decodes=1,
    )
    header = StepHeader.from_bytes(message.header().to_bytes())
    assert header == message.header() and header.kind == MessageKind.STEP
    decoded = StepMessage.decode(header, message.payload())
    for field in ("input_ids", "positions", "slot_mapping", "logits_indices"):
        assert torch.equal(getattr(decoded, field), getattr(message, field))
    assert (decoded.query_lens, decoded.context_lens) == ([1, 3], [8, 3])
    assert decoded.block_tables == [[1, 2], [3]] and decoded.num_decodes == 1
    with pytest.raises(ValueError, match="announces"):
        StepMessage.decode(header, message.payload()[:-1])


KILL_SCRIPT = """
import sys
from common.protocol import SamplingParams
from worker.engine.config import EngineConfig
from worker.engine.engine import LLMEngine

if __name__ == "__main__":
    config = EngineConfig(model=sys.argv[1], dtype="float32", max_total_tokens=256,
                          num_threads=1, num_shard=2)
    engine = LLMEngine(config)
    print("SHARDS", *engine.shard_group.pids, flush=True)
    params = SamplingParams.make(temperature=0, max_new_tokens=200, ignore_eos=True)
    count = 0
    while True:
        if not engine.has_unfinished:
            engine.add_request(f"r{count}", [5, 6, 7], params)
            count += 1
        engine.step()
        print("STEP", flush=True)
"""


def start_driver(model: Path, stderr_path: Path) -> tuple[subprocess.Popen, int]:
    """A driver process generating without end; returns it and its shard's pid, mid-generation."""
    with stderr_path.open("w") as stderr:
        driver = subprocess.Popen(
            [sys.executable, "-c", textwrap.dedent(KILL_SCRIPT), str(model)],
            cwd=REPO,
            stdout=subprocess.PIPE,
            stderr=stderr,
            text=True,
        )
    assert driver.stdout is not None
    shard_pid = int(driver.stdout.readline().split()[1])
    for _ in range(3):
        assert driver.stdout.readline().strip() == "STEP"
    return driver, shard_pid


def pid_alive(pid: int) -> bool:
    try:
        with open(f"/proc/{pid}/stat") as stat:
            return stat.read().split(") ")[-1][0] != "Z"  # a zombie has exited
    except FileNotFoundError:
        return False


def test_killing_a_rank_ends_the_group_promptly(tp_models, tmp_path):
    driver, shard_pid = start_driver(tp_models["split-kv"], tmp_path / "driver.log")
    try:
        killed = time.monotonic()
        os.kill(shard_pid, signal.SIGKILL)
        code = driver.wait(timeout=10)
        elapsed = time.monotonic() - killed
    finally:
        if driver.poll() is None:
            driver.kill()
    log = (tmp_path / "driver.log").read_text()
    assert code == RANK_DIED_EXIT_CODE, log
    assert elapsed < 5, elapsed
    assert f"rank 1 (pid {shard_pid}) exited with code -9" in log
    assert "stopping the whole worker group of 2 ranks" in log


def test_killing_the_driver_ends_its_shards(tp_models, tmp_path):
    driver, shard_pid = start_driver(tp_models["split-kv"], tmp_path / "driver.log")
    driver.kill()
    driver.wait()
    deadline = time.monotonic() + 5
    while pid_alive(shard_pid) and time.monotonic() < deadline:
        time.sleep(0.1)
    alive = pid_alive(shard_pid)
    if alive:
        os.kill(shard_pid, signal.SIGKILL)
    assert not alive, "the shard outlived its driver by 5 s"
    assert "the driver (rank 0) is gone" in (tmp_path / "driver.log").read_text()
