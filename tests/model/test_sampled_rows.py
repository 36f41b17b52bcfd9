"""The last layer on the sampling rows only (SampledRows, worker/attention/base.py): a step with
prompt chunks runs its last layer past the K/V projection on the rows that sample, and gets the
same logits (to float rounding: their attention takes the decode kernel) and the same KV cache
as running every row — through the modules and through the native stack, including steps where
no row samples."""

from __future__ import annotations

import pytest
import torch

from common.protocol import SamplingParams
from tests.model.test_engine_exact import run_staggered
from tests.model.test_native_decoder import demo_engine
from worker.parallel.step_message import StepMessage


def message(query_lens, context_lens, tables, sampled_rows) -> StepMessage:
    tokens = sum(query_lens)
    return StepMessage(
        input_ids=torch.zeros(tokens, dtype=torch.long),
        positions=torch.zeros(tokens, dtype=torch.long),
        slot_mapping=torch.arange(100, 100 + tokens),
        logits_indices=torch.tensor(sampled_rows, dtype=torch.long),
        query_lens=query_lens,
        context_lens=context_lens,
        block_tables=tables,
        num_decodes=sum(1 for n in query_lens if n == 1),
    )


def test_sampled_batch_is_a_decode_step_over_the_sampling_sequences():
    # two decodes, a mid-prompt chunk (rows 2-5, no sample), a prompt's last chunk (rows 6-8)
    step = message([1, 1, 4, 3], [7, 20, 4, 35], [[0], [1, 2], [3], [4, 5, 6]], [0, 1, 8])
    batch = step.sampled_batch()
    assert batch is not None
    assert batch.query_lens == [1, 1, 1]
    assert batch.context_lens == [7, 20, 35]
    assert batch.block_tables == [[0], [1, 2], [4, 5, 6]]
    assert batch.num_decodes == 3
    assert batch.slot_mapping.tolist() == [100, 101, 108]


def test_sampled_batch_of_a_decode_step_is_none_and_of_mid_prompt_chunks_empty():
    assert message([1, 1], [3, 9], [[0], [1]], [0, 1]).sampled_batch() is None
    empty = message([4, 2], [4, 2], [[0], [1]], []).sampled_batch()
    assert empty is not None and empty.query_lens == [] and empty.slot_mapping.numel() == 0


def test_sampled_batch_refuses_a_row_that_is_not_a_sequence_end():
    with pytest.raises(ValueError, match="last row"):
        message([3], [3], [[0]], [1]).sampled_batch()


@pytest.mark.slow
@pytest.mark.parametrize("path", ["modules", "native"])
def test_trimmed_last_layer_gives_the_full_layers_logits_and_cache(demo_model_dir, path):
    # chunks of 128: while the 300-token prompt is alone, steps where nothing samples
    engine = demo_engine(demo_model_dir, "float32")
    runner = engine.runner
    if path == "native" and runner.native_decoder is None:
        pytest.skip("this CPU has no native float32 linear kernel")
    if path == "modules":
        runner.native_decoder = None
    caches = [layer.kv_cache for layer in runner.attention_layers]
    steps = {"none samples": 0, "some sample": 0, "all sample": 0}
    forward = runner.forward

    def both_ways(step: StepMessage):
        before = [cache.clone() for cache in caches]
        runner.trim_last_layer = False
        full = forward(step)
        full_caches = [cache.clone() for cache in caches]
        for cache, saved in zip(caches, before, strict=True):
            cache.copy_(saved)
        runner.trim_last_layer = True
        trimmed = forward(step)
        for cache, expected in zip(caches, full_caches, strict=True):
            assert torch.equal(cache, expected)
        assert trimmed.shape == full.shape == (step.logits_indices.numel(), runner.vocab_size)
        torch.testing.assert_close(trimmed, full, rtol=1e-4, atol=1e-4)
        assert torch.equal(trimmed.argmax(-1), full.argmax(-1))
        sampled = step.logits_indices.numel()
        key = "all sample" if sampled == step.input_ids.numel() else "some sample"
        steps["none samples" if sampled == 0 else key] += 1
        return trimmed

    runner.forward = both_ways
    prompts = [[5 + (n + i) % 300 for i in range(n)] for n in (300, 9, 40, 130)]
    params = SamplingParams.make(temperature=0, max_new_tokens=8, ignore_eos=True)
    run_staggered(engine, prompts, params, arrivals=[0, 3, 4, 4])
    assert steps["none samples"] >= 2 and steps["some sample"] >= 3 and steps["all sample"] >= 3
