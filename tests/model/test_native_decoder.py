"""The native decoder stack (worker/engine/native_decoder.py, csrc/decoder.cpp) against the
modules' Python: on the demo model, a tiny Qwen2 (q/k/v biases) and a tiny Qwen3 (q/k norms),
every step of a staggered, chunked, preempting run gives bit-identical logits both ways, in
float32 and bfloat16; and it stays off where a part of the model would take a torch path."""

from __future__ import annotations

import pytest
import torch

from common.protocol import SamplingParams
from tests.model.test_engine_exact import run_staggered
from worker.engine.config import EngineConfig
from worker.engine.engine import LLMEngine
from worker.engine.native_decoder import NativeDecoder

pytestmark = pytest.mark.slow


def demo_engine(path, dtype: str) -> LLMEngine:
    return LLMEngine(
        EngineConfig(
            model=str(path),
            dtype=dtype,
            max_total_tokens=512,
            max_batch_total_tokens=512,  # preemption happens
            max_batch_prefill_tokens=128,  # prompts arrive in chunks, beside decodes
        )
    )


@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
@pytest.mark.parametrize("model", ["demo", "qwen2-head64", "qwen3-head64"])
def test_native_stack_equals_the_modules_bit_for_bit(demo_model_dir, tiny_models, model, dtype):
    engine = demo_engine(demo_model_dir if model == "demo" else tiny_models[model], dtype)
    runner = engine.runner
    native = runner.native_decoder
    if native is None:
        pytest.skip(f"this CPU has no native linear kernel for {dtype}")
    kinds = {"decode-only": 0, "with prompt chunks": 0}
    python_forward = runner.forward

    def both_ways(message):
        runner.native_decoder = None  # the modules first; both write the same K/V
        expected = python_forward(message)
        runner.native_decoder = native
        got = python_forward(message)
        assert torch.equal(got, expected)
        kinds[
            "decode-only"
            if message.num_decodes == len(message.query_lens)
            else "with prompt chunks"
        ] += 1
        return got

    runner.forward = both_ways
    prompts = [[5 + (n + i) % 300 for i in range(n)] for n in (1, 9, 40, 130, 300, 64)]
    params = SamplingParams.make(temperature=0, max_new_tokens=16, ignore_eos=True)
    run_staggered(engine, prompts, params, arrivals=[0, 0, 1, 3, 5, 8])
    assert engine.scheduler.num_preemptions > 0
    assert kinds["decode-only"] >= 5 and kinds["with prompt chunks"] >= 5


def test_the_stack_runs_only_where_every_part_is_native(demo_model_dir, tiny_models, monkeypatch):
    engine = demo_engine(demo_model_dir, "float32")
    if engine.runner.native_decoder is None:
        pytest.skip("this CPU has no native float32 linear kernel")
    runner = engine.runner
    assert NativeDecoder.build(runner.model, runner.backend) is not None
    monkeypatch.setenv("SPINDLE_NATIVE_DECODER", "0")
    assert NativeDecoder.build(runner.model, runner.backend) is None
    monkeypatch.delenv("SPINDLE_NATIVE_DECODER")
    for arch in ("llama", "qwen3"):  # heads 32 wide: the native attention kernels take 64 and 128
        tiny = LLMEngine(EngineConfig(model=str(tiny_models[arch]), dtype="float32"))
        assert tiny.runner.native_decoder is None, arch
