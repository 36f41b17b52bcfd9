"""Decode graphs' padded, fixed-shape inputs (worker/engine/decode_graphs.py), checked on the CPU
with `capture=False` (the same inputs run eagerly; CUDA capture itself is tests/gpu's): greedy
output equals transformers while batches of every size run padded to the graph shapes, through
both of the sdpa backend's decode paths, and nothing leaks into the scratch block's owners."""

from __future__ import annotations

import random

import pytest
import torch
from transformers import AutoModelForCausalLM

from common.protocol import SamplingParams
from tests.model.test_engine_exact import (
    NEW_TOKENS,
    PROMPT_LENGTHS,
    reference_greedy,
    run_staggered,
)
from worker.engine.config import EngineConfig
from worker.engine.decode_graphs import DecodeGraphs, padded_batch_sizes, padded_block_counts
from worker.engine.engine import LLMEngine


def test_padded_shapes():
    assert padded_batch_sizes(64) == [1, 2, 4, 8, 16, 24, 32, 40, 48, 56, 64]
    assert padded_batch_sizes(5) == [1, 2, 4, 5]
    assert padded_batch_sizes(1) == [1]
    assert padded_block_counts(46) == [8, 16, 32, 46]
    assert padded_block_counts(32) == [8, 16, 32]
    assert padded_block_counts(3) == [3]


def graphed_engine(path, torch_decode: bool) -> LLMEngine:
    engine = LLMEngine(
        EngineConfig(
            model=str(path),
            dtype="float32",
            max_total_tokens=512,
            max_batch_total_tokens=640,  # preemption happens (see test_engine_exact)
            max_batch_prefill_tokens=96,
            max_batch_size=7,  # padded sizes 1, 2, 4, 7
        )
    )
    runner = engine.runner
    assert runner.decode_graphs is None  # the CPU never captures
    if torch_decode:
        runner.backend.native = None  # the batched-matmul decode that CUDA uses
    runner.decode_graphs = DecodeGraphs(runner, 7, engine.max_total_tokens, capture=False)
    return engine


@pytest.mark.parametrize("torch_decode", [False, True], ids=["native-decode", "matmul-decode"])
@pytest.mark.parametrize("arch", ["llama", "qwen3"])
def test_padded_decode_equals_transformers(tiny_models, arch, torch_decode):
    rng = random.Random(7)  # test_engine_exact's prompts: no near-ties in these tiny models
    prompts = [[rng.randrange(3, 380) for _ in range(n)] for n in PROMPT_LENGTHS]
    engine = graphed_engine(tiny_models[arch], torch_decode)
    params = SamplingParams.make(temperature=0, max_new_tokens=NEW_TOKENS, ignore_eos=True)
    results = run_staggered(engine, prompts, params, arrivals=[0, 0, 1, 2, 3, 5, 8, 13])

    graphs = engine.runner.decode_graphs
    assert graphs is not None and graphs.replays > 20
    batches = {batch for batch, _ in graphs.graphs}
    assert {1, 2, 4, 7} & batches and len(batches) >= 2  # several sizes, padded
    assert engine.scheduler.num_preemptions > 0
    reference = AutoModelForCausalLM.from_pretrained(tiny_models[arch], dtype=torch.float32)
    for prompt, result in zip(prompts, results, strict=True):
        assert result.token_ids == reference_greedy(reference, prompt, NEW_TOKENS), len(prompt)
    blocks = engine.scheduler.blocks
    assert blocks.num_free_blocks == blocks.num_blocks


def test_the_scratch_block_is_outside_the_schedulers_blocks(tiny_models):
    engine = graphed_engine(tiny_models["llama"], torch_decode=True)
    runner = engine.runner
    assert runner.scratch_block == engine.scheduler.blocks.num_blocks
    cache = runner.attention_layers[0].kv_cache
    assert cache.shape[2] == runner.scratch_block + 1  # sdpa: [2, kv_heads, blocks, ...]
