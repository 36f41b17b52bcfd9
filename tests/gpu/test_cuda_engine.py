"""The engine on CUDA (marked `gpu`; skipped where CUDA is absent): greedy output equals
transformers on the same GPU, with the backend `auto` picks (flash-attn's paged kernels when it
imports, else sdpa, whose decode steps replay CUDA graphs), under staggered arrivals, chunked
prefill and preemption."""

from __future__ import annotations

import random

import pytest
import torch
from transformers import AutoModelForCausalLM

from common.protocol import SamplingParams
from tests.model.test_engine_exact import run_staggered
from worker.attention import FlashBackend
from worker.engine.config import EngineConfig
from worker.engine.engine import LLMEngine

pytestmark = [
    pytest.mark.gpu,
    pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA"),
]


@pytest.mark.parametrize("arch", ["llama", "qwen2", "qwen3"])
def test_cuda_greedy_equals_transformers(tiny_models, arch):
    rng = random.Random(11)
    lengths = [1, 7, 40, 130, 300, 333, 64, 17]
    prompts = [[rng.randrange(3, 380) for _ in range(n)] for n in lengths]
    backend = "flash" if FlashBackend.available(torch.device("cuda")) else "sdpa"
    # flash-attn pages are 256 tokens: size the cache in tokens so preemption still happens.
    capacity = 1024 if backend == "flash" else 640
    engine = LLMEngine(
        EngineConfig(
            model=str(tiny_models[arch]),
            dtype="float32",
            device="cuda",
            attention_backend=backend,
            max_total_tokens=512,
            max_batch_total_tokens=capacity,
            max_batch_prefill_tokens=96,
        )
    )
    params = SamplingParams.make(temperature=0, max_new_tokens=24, ignore_eos=True)
    results = run_staggered(engine, prompts, params, arrivals=[0, 0, 1, 2, 3, 5, 8, 13])
    reference = AutoModelForCausalLM.from_pretrained(tiny_models[arch], dtype=torch.float32).cuda()
    graphs = engine.runner.decode_graphs
    replays = graphs.replays if graphs is not None else 0
    print(
        f"{arch}: backend={backend} preemptions={engine.scheduler.num_preemptions} "
        f"decode graph replays={replays} shapes={sorted(graphs.graphs) if graphs else []}"
    )
    if backend == "sdpa":  # its decode steps replay CUDA graphs (worker/engine/decode_graphs.py)
        assert graphs is not None and not graphs.disabled and replays > 20
    for prompt, result in zip(prompts, results, strict=True):
        ids = torch.tensor([prompt], device="cuda")
        expected = reference.generate(
            ids,
            attention_mask=torch.ones_like(ids),
            max_new_tokens=24,
            min_new_tokens=24,
            do_sample=False,
        )[0, len(prompt) :].tolist()
        assert result.token_ids == expected, (arch, len(prompt))
