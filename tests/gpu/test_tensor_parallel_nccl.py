"""Tensor parallelism over NCCL (marked `gpu`; skipped with fewer than two CUDA devices): a group
of two ranks, one GPU each, gives the same greedy tokens and logits as one GPU."""

from __future__ import annotations

import random

import pytest
import torch

from tests.model.conftest import VOCAB
from tests.model.test_tensor_parallel import run_recording_logits, tp_models  # noqa: F401
from worker.engine.config import EngineConfig
from worker.engine.engine import LLMEngine

pytestmark = [
    pytest.mark.gpu,
    pytest.mark.skipif(torch.cuda.device_count() < 2, reason="needs 2 CUDA devices"),
]


def cuda_engine(path, num_shard: int) -> LLMEngine:
    return LLMEngine(
        EngineConfig(
            model=str(path),
            dtype="float32",
            device="cuda",
            max_total_tokens=256,
            max_batch_total_tokens=4096,
            max_batch_prefill_tokens=48,
            num_shard=num_shard,
        )
    )


@pytest.mark.parametrize("kind", ["split-kv", "replicated-kv"])
def test_nccl_two_shards_match_one_gpu(tp_models, kind):  # noqa: F811
    rng = random.Random(3)
    prompts = [[rng.randrange(3, VOCAB) for _ in range(n)] for n in (5, 70, 1, 33)]
    expected_tokens, expected_logits = run_recording_logits(
        cuda_engine(tp_models[kind], 1), prompts
    )
    group = cuda_engine(tp_models[kind], 2)
    try:
        assert group.runner.device == torch.device("cuda:0")
        tokens, logits = run_recording_logits(group, prompts)
    finally:
        group.close()
    assert tokens == expected_tokens
    for got, want in zip(logits, expected_logits, strict=True):
        torch.testing.assert_close(got, want, rtol=1e-3, atol=1e-3)
