"""The demo model (SmolLM2-135M-Instruct) through the engine: greedy output equals transformers
token for token for prompts of 1 to 300+ tokens arriving at different steps, with preemption."""

from __future__ import annotations

import pytest
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

from common.protocol import SamplingParams
from tests.model.test_engine_exact import reference_greedy, run_staggered
from worker.engine.config import EngineConfig
from worker.engine.engine import LLMEngine
from worker.engine.llm import LLM

pytestmark = pytest.mark.slow

TEXT = (
    "Continuous batching lets a server add new requests to the running batch at every step "
    "instead of waiting for the whole batch to finish. A paged KV cache stores keys and values "
    "in fixed-size blocks, so memory is allocated on demand and freed the moment a sequence ends. "
)


@pytest.fixture(scope="module")
def tokenizer(demo_model_dir):
    return AutoTokenizer.from_pretrained(demo_model_dir)


@pytest.fixture(scope="module")
def reference(demo_model_dir):
    return AutoModelForCausalLM.from_pretrained(demo_model_dir, dtype=torch.float32)


@pytest.fixture(scope="module")
def demo_llm(demo_model_dir):
    return LLM(str(demo_model_dir), dtype="float32", max_total_tokens=2048)


@pytest.fixture(scope="module")
def capital_question(tokenizer) -> list[int]:
    """'What is the capital of France?' with the model's chat template, as token ids."""
    text = tokenizer.apply_chat_template(
        [{"role": "user", "content": "What is the capital of France?"}],
        add_generation_prompt=True,
        tokenize=False,
    )
    return tokenizer(text, add_special_tokens=False)["input_ids"]


def test_capital_of_france(demo_llm, capital_question):
    llm, prompt = demo_llm, capital_question
    [result] = llm.generate([prompt], SamplingParams.make(temperature=0, max_new_tokens=32))
    assert result.text.strip() == "The capital of France is Paris."
    assert result.choices[0].finish_reason == "eos_token"


def test_demo_greedy_equals_transformers_in_a_changing_batch(demo_model_dir, tokenizer, reference):
    ids = tokenizer(TEXT * 4)["input_ids"]
    lengths = [1, 5, 12, 33, 70, 120, 200, 310]
    prompts = [ids[i : i + n] for i, n in enumerate(lengths)]
    engine = LLMEngine(
        EngineConfig(
            model=str(demo_model_dir),
            dtype="float32",
            max_total_tokens=512,
            max_batch_total_tokens=640,
            max_batch_prefill_tokens=128,
        )
    )
    params = SamplingParams.make(temperature=0, max_new_tokens=16, ignore_eos=True)
    results = run_staggered(engine, prompts, params, arrivals=[0, 0, 1, 3, 4, 6, 9, 12])
    assert engine.scheduler.num_preemptions > 0
    for prompt, result in zip(prompts, results, strict=True):
        assert result.token_ids == reference_greedy(reference, prompt, 16), len(prompt)
        assert result.text == tokenizer.decode(result.token_ids, skip_special_tokens=True)


def test_stop_string_ends_the_answer_before_it(demo_llm, capital_question):
    llm, prompt = demo_llm, capital_question
    params = SamplingParams.make(temperature=0, max_new_tokens=32, stop=["of Fr"])
    [result] = llm.generate([prompt], params)
    assert result.text == "The capital "
    assert result.choices[0].finish_reason == "stop"
