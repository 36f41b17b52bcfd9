"""Greedy output of the engine equals transformers' `generate`, token for token, while the batch
changes shape under it: requests arrive at different steps, long prompts are chunked, and the KV
cache is so small that sequences are preempted and recomputed."""

from __future__ import annotations

import random

import pytest
import torch
from transformers import AutoModelForCausalLM

from common.protocol import SamplingParams
from worker.engine.config import EngineConfig
from worker.engine.engine import LLMEngine
from worker.engine.llm import LLM, Choice, Completion

PROMPT_LENGTHS = [1, 3, 17, 40, 64, 130, 257, 333]
NEW_TOKENS = 24


def reference_greedy(model, prompt: list[int], new_tokens: int) -> list[int]:
    output = model.generate(
        torch.tensor([prompt]),
        max_new_tokens=new_tokens,
        min_new_tokens=new_tokens,
        do_sample=False,
        attention_mask=torch.ones(1, len(prompt), dtype=torch.long),
    )
    return output[0, len(prompt) :].tolist()


def run_staggered(
    engine: LLMEngine, prompts: list[list[int]], params: SamplingParams, arrivals: list[int]
) -> list[Completion]:
    """Add prompt i at step arrivals[i]; step until everything finished."""
    completions = {f"r{i}": Completion(f"r{i}", p, [Choice(0)]) for i, p in enumerate(prompts)}
    step = 0
    while step <= max(arrivals) or engine.has_unfinished:
        for i, arrival in enumerate(arrivals):
            if arrival == step:
                engine.add_request(f"r{i}", prompts[i], params)
        for event in engine.step():
            completions[event.id].apply(event)
        step += 1
    return list(completions.values())


@pytest.mark.parametrize("arch", ["llama", "qwen2", "qwen3"])
def test_greedy_equals_transformers_under_preemption(tiny_models, arch):
    rng = random.Random(7)
    prompts = [[rng.randrange(3, 380) for _ in range(n)] for n in PROMPT_LENGTHS]
    arrivals = [0, 0, 1, 2, 3, 5, 8, 13]
    # 40 blocks of 16 tokens cannot hold all eight sequences (~1,050 tokens): preemption must happen.
    engine = LLMEngine(
        EngineConfig(
            model=str(tiny_models[arch]),
            dtype="float32",
            max_total_tokens=512,
            max_batch_total_tokens=640,
            max_batch_prefill_tokens=96,
        )
    )
    params = SamplingParams.make(temperature=0, max_new_tokens=NEW_TOKENS, ignore_eos=True)
    results = run_staggered(engine, prompts, params, arrivals)

    assert engine.scheduler.num_preemptions > 0
    reference = AutoModelForCausalLM.from_pretrained(tiny_models[arch], dtype=torch.float32)
    for prompt, result in zip(prompts, results, strict=True):
        assert result.token_ids == reference_greedy(reference, prompt, NEW_TOKENS), len(prompt)
        assert result.choices[0].finish_reason == "length"
        assert result.usage.prompt_tokens == len(prompt)
        assert result.usage.completion_tokens == NEW_TOKENS
    blocks = engine.scheduler.blocks
    assert blocks.num_free_blocks == blocks.num_blocks  # nothing leaked


def test_logprobs_match_transformers_log_softmax(tiny_models):
    path = tiny_models["llama"]
    llm = LLM(str(path), dtype="float32", max_total_tokens=512)
    prompt = list(range(10, 60))
    params = SamplingParams.make(temperature=0, max_new_tokens=8, ignore_eos=True, logprobs=5)
    [result] = llm.generate([prompt], params)

    reference = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32)
    full = torch.tensor([prompt + result.token_ids])
    with torch.no_grad():
        logits = reference(full).logits[0].float()
    expected = torch.log_softmax(logits, dim=-1)[len(prompt) - 1 : -1]
    for step, logprob in enumerate(result.choices[0].logprobs):
        row = expected[step]
        assert logprob.token_id == result.token_ids[step]
        assert logprob.logprob == pytest.approx(row[logprob.token_id].item(), abs=1e-4)
        top_values, top_ids = row.topk(5)
        assert [t for t, _ in logprob.top] == top_ids.tolist()
        for (_, value), ref in zip(logprob.top, top_values.tolist(), strict=True):
            assert value == pytest.approx(ref, abs=1e-4)


def test_n_choices_share_the_prompt_blocks(tiny_models):
    llm = LLM(str(tiny_models["qwen2"]), dtype="float32", max_total_tokens=512)
    prompt = list(range(5, 105))  # 100 tokens = 6 full blocks
    params = SamplingParams.make(temperature=0, max_new_tokens=6, ignore_eos=True, n=3)
    [result] = llm.generate([prompt], params)

    blocks = llm.engine.scheduler.blocks
    assert blocks.num_cache_hit_tokens == 2 * 96  # choices 1 and 2 reused 6 blocks each
    reference = AutoModelForCausalLM.from_pretrained(tiny_models["qwen2"], dtype=torch.float32)
    expected = reference_greedy(reference, prompt, 6)
    assert [c.token_ids for c in result.choices] == [expected] * 3
    assert result.usage.completion_tokens == 18


def test_same_seed_same_text_alone_and_in_a_batch_of_16(tiny_models):
    llm = LLM(str(tiny_models["llama"]), dtype="float32", max_total_tokens=512)
    prompt = list(range(20, 45))
    seeded = SamplingParams.make(
        temperature=0.9, top_p=0.95, seed=1234, max_new_tokens=20, ignore_eos=True
    )
    [alone] = llm.generate([prompt], seeded)
    rng = random.Random(3)
    others = [[rng.randrange(3, 380) for _ in range(rng.randrange(1, 80))] for _ in range(15)]
    other_params = [
        SamplingParams.make(
            temperature=1.0,
            seed=i if i % 2 else None,
            max_new_tokens=rng.randrange(5, 30),
            ignore_eos=True,
        )
        for i in range(15)
    ]
    batch = llm.generate(
        others[:7] + [prompt] + others[7:], other_params[:7] + [seeded] + other_params[7:]
    )
    assert batch[7].token_ids == alone.token_ids
    assert batch[7].text == alone.text
    [other_seed] = llm.generate([prompt], seeded.with_seed(99))
    assert other_seed.token_ids != alone.token_ids
