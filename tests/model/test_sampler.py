"""The batched sampler against transformers' logits processors, hand-computed cases, and the
promises the engine relies on: greedy is argmax, a seed decides its tokens whatever the batch,
logprobs come from the raw logits, nothing turns into NaN."""

from __future__ import annotations

import math

import pytest
import torch
from transformers.generation.logits_process import (
    MinPLogitsWarper,
    RepetitionPenaltyLogitsProcessor,
    TemperatureLogitsWarper,
    TopKLogitsWarper,
    TopPLogitsWarper,
    TypicalLogitsWarper,
)

from common.protocol import Sampling
from worker.engine import sampler as sampler_module
from worker.engine.sampler import (
    Sampler,
    SamplingRow,
    apply_penalties,
    apply_warpers,
    make_generator,
)

INF = float("inf")


def row(
    generator: torch.Generator | None = None,
    prompt: tuple[int, ...] = (),
    output: tuple[int, ...] = (),
    logprobs: int | None = None,
    **knobs: float,
) -> SamplingRow:
    return SamplingRow(Sampling(**knobs), list(prompt), list(output), generator, logprobs)


def random_logits(rows: int, vocab: int, seed: int = 0, scale: float = 3.0) -> torch.Tensor:
    return torch.randn(rows, vocab, generator=torch.Generator().manual_seed(seed)) * scale


def assert_same_filtering(ours: torch.Tensor, reference: torch.Tensor) -> None:
    """Same tokens removed, same values on the kept ones."""
    assert torch.equal(torch.isinf(ours), torch.isinf(reference))
    kept = ~torch.isinf(reference)
    torch.testing.assert_close(ours[kept], reference[kept])


# --- greedy ----------------------------------------------------------------------------------


def test_greedy_is_argmax_with_ties_to_the_lowest_index() -> None:
    logits = random_logits(6, 100)
    logits[2, 7] = logits[2, 40] = logits[2].max() + 1.0  # a tie: argmax picks 7
    rows = [row(temperature=0.0) for _ in range(5)] + [row(top_k=1, temperature=0.8)]
    out = Sampler()(logits, rows)
    assert out.token_ids == logits.argmax(dim=-1).tolist()
    assert out.token_ids[2] == 7
    assert out.logprobs == [None] * 6


def test_an_all_greedy_batch_takes_the_native_argmax_with_torchs_answers() -> None:
    from worker import kernels

    assert kernels.native_module() is not None, "the CPU kernels did not build on this machine"
    logits = random_logits(7, 49152)
    peak = logits.max() + 1.0
    logits[1, 63] = logits[1, 64] = peak  # a tie across the kernel's 64-wide chunks
    logits[2, 100] = logits[2, 127] = peak  # a tie inside one chunk
    logits[3, -1] = peak  # the last index
    logits[4, 0] = peak  # the first index
    logits[5] = 0.5  # all equal
    out = Sampler()(logits, [row(temperature=0.0) for _ in range(7)])
    assert out.token_ids == logits.argmax(dim=-1).tolist()
    assert out.token_ids[1:6] == [63, 100, 49151, 0, 0]
    assert sampler_module._argmax(logits[:, ::2]).tolist() == logits[:, ::2].argmax(-1).tolist()


def test_greedy_rows_in_a_mixed_batch_take_the_argmax_of_the_penalised_logits() -> None:
    logits = random_logits(3, 50, seed=1)
    favourite = int(logits[0].argmax())
    rows = [
        row(temperature=0.0, output=(favourite,), repetition_penalty=1e6),
        row(make_generator(1), temperature=1.0),
        row(temperature=0.0),
    ]
    penalised = apply_penalties(logits, rows)
    out = Sampler()(logits, rows)
    assert out.token_ids[0] == int(penalised[0].argmax()) != favourite
    assert out.token_ids[2] == int(logits[2].argmax())


def test_the_callers_logits_are_not_modified() -> None:
    logits = random_logits(2, 30)
    before = logits.clone()
    rows = [
        row(make_generator(0), output=(1, 2), repetition_penalty=1.3, frequency_penalty=0.5),
        row(temperature=0.5, top_k=5, top_p=0.9, min_p=0.1, typical_p=0.9, logprobs=3),
    ]
    Sampler()(logits, rows)
    assert torch.equal(logits, before)


def test_wrong_logits_shape_is_refused_with_the_numbers() -> None:
    with pytest.raises(ValueError, match=r"\(3, 10\) for 2 rows"):
        Sampler()(torch.zeros(3, 10), [row(), row()])


# --- filters against transformers --------------------------------------------------------------

HF_CASES = [
    ({"temperature": 0.7}, lambda: TemperatureLogitsWarper(0.7)),
    ({"top_k": 7}, lambda: TopKLogitsWarper(7)),
    ({"top_p": 0.8}, lambda: TopPLogitsWarper(0.8)),
    ({"min_p": 0.05}, lambda: MinPLogitsWarper(0.05)),
    ({"typical_p": 0.6}, lambda: TypicalLogitsWarper(0.6)),
]


@pytest.mark.parametrize(("knobs", "make_warper"), HF_CASES, ids=[str(c[0]) for c in HF_CASES])
def test_each_filter_matches_transformers(knobs: dict, make_warper) -> None:
    logits = random_logits(8, 200, seed=2)
    logits[3, :50] = -INF  # entries the model already ruled out
    ours = apply_warpers(logits, [row(**knobs) for _ in range(8)])
    assert_same_filtering(ours, make_warper()(None, logits.clone()))


def test_the_chained_filters_match_transformers_applied_in_order() -> None:
    knobs = {"temperature": 0.6, "top_k": 40, "top_p": 0.9, "min_p": 0.02, "typical_p": 0.95}
    logits = random_logits(4, 300, seed=3)
    reference = logits.clone()
    chain = [
        TemperatureLogitsWarper(0.6),
        TopKLogitsWarper(40),
        TopPLogitsWarper(0.9),
        MinPLogitsWarper(0.02),
        TypicalLogitsWarper(0.95),
    ]
    for warper in chain:
        reference = warper(None, reference)
    assert_same_filtering(apply_warpers(logits, [row(**knobs) for _ in range(4)]), reference)


def test_rows_with_different_knobs_are_each_filtered_by_their_own() -> None:
    settings = [
        {"top_p": 0.5},
        {},
        {"top_k": 3},
        {"top_p": 0.95, "min_p": 0.1},
        {"typical_p": 0.3},
        {"top_k": 1000},  # larger than the vocabulary: keeps everything
    ]
    logits = random_logits(len(settings), 120, seed=4)
    ours = apply_warpers(logits, [row(**knobs) for knobs in settings])
    for index, knobs in enumerate(settings):
        reference = logits[index : index + 1].clone()
        for warper in _hf_chain(knobs):
            reference = warper(None, reference)
        assert_same_filtering(ours[index : index + 1], reference)


def _hf_chain(knobs: dict) -> list:
    chain = []
    if "top_k" in knobs:
        chain.append(TopKLogitsWarper(knobs["top_k"]))
    if "top_p" in knobs:
        chain.append(TopPLogitsWarper(knobs["top_p"]))
    if "min_p" in knobs:
        chain.append(MinPLogitsWarper(knobs["min_p"]))
    if "typical_p" in knobs:
        chain.append(TypicalLogitsWarper(knobs["typical_p"]))
    return chain


def test_top_p_falls_back_to_a_full_sort_when_the_candidates_fall_short(monkeypatch) -> None:
    monkeypatch.setattr(sampler_module, "TOP_P_CANDIDATES", 4)
    logits = random_logits(3, 64, seed=5, scale=0.5)  # flat: 4 tokens never reach p
    logits[1] = torch.linspace(20, 0, 64)  # peaked: the candidates suffice
    top_ps = [0.9, 0.9, 0.3]
    ours = apply_warpers(logits, [row(top_p=p) for p in top_ps])
    for index, p in enumerate(top_ps):
        reference = TopPLogitsWarper(p)(None, logits[index : index + 1].clone())
        assert_same_filtering(ours[index : index + 1], reference)
    assert (~torch.isinf(ours[0])).sum() > 4


# --- filters by hand -------------------------------------------------------------------------


def kept(logits: list[float], **knobs: float) -> list[int]:
    warped = apply_warpers(torch.tensor([logits]), [row(**knobs)])[0]
    return (~torch.isinf(warped)).nonzero().squeeze(1).tolist()


def test_top_k_keeps_exactly_k() -> None:
    assert kept([0.1, 3.0, -1.0, 2.0, 5.0, 0.0], top_k=3) == [1, 3, 4]


def test_top_p_keeps_the_smallest_set_reaching_p() -> None:
    probs = [0.05, 0.4, 0.25, 0.3]
    logits = [math.log(p) for p in probs]
    assert kept(logits, top_p=0.35) == [1]
    assert kept(logits, top_p=0.65) == [1, 3]
    assert kept(logits, top_p=0.9) == [1, 2, 3]
    assert kept(logits, top_p=0.99) == [0, 1, 2, 3]
    assert kept(logits, top_p=0.0) == [1]  # always at least the most likely token


def test_top_p_stops_as_soon_as_the_mass_equals_p() -> None:
    logits = [math.log(0.5), math.log(0.375), math.log(0.125)]  # exact in binary floating point
    assert kept(logits, top_p=0.875) == [0, 1]
    reference = TopPLogitsWarper(0.875)(None, torch.tensor([logits]))
    assert (~torch.isinf(reference[0])).nonzero().squeeze(1).tolist() == [0, 1]


def test_min_p_threshold_is_relative_to_the_most_likely_token() -> None:
    probs = [0.5, 0.2, 0.04, 0.26]
    logits = [math.log(p) for p in probs]
    assert kept(logits, min_p=0.1) == [0, 1, 3]  # threshold 0.05
    assert kept(logits, min_p=0.5) == [0, 3]  # threshold 0.25
    assert kept(logits, min_p=1.0) == [0]
    assert kept(logits, min_p=2.0) == [0]  # out of range, yet never an empty distribution


# --- penalties -------------------------------------------------------------------------------


def test_repetition_penalty_matches_transformers_over_prompt_and_output() -> None:
    logits = random_logits(2, 40, seed=6)
    logits[0, 5] = -INF
    prompts, outputs = [(1, 2, 5, 2), (7,)], [(3, 3, 9), ()]
    rows = [
        row(prompt=p, output=o, repetition_penalty=1.7)
        for p, o in zip(prompts, outputs, strict=True)
    ]
    ours = apply_penalties(logits, rows)
    for index in range(2):
        ids = torch.tensor([prompts[index] + outputs[index]])
        reference = RepetitionPenaltyLogitsProcessor(1.7)(ids, logits[index : index + 1].clone())
        torch.testing.assert_close(ours[index : index + 1], reference)


def test_frequency_and_presence_penalties_count_output_tokens_only() -> None:
    logits = torch.zeros(1, 6)
    rows = [
        row(prompt=(0, 0, 0, 5), output=(1, 1, 1, 2), frequency_penalty=0.5, presence_penalty=2.0)
    ]
    ours = apply_penalties(logits, rows)[0].tolist()
    assert ours == [0.0, -(3 * 0.5 + 2.0), -(0.5 + 2.0), 0.0, 0.0, 0.0]


def test_penalties_only_touch_the_rows_that_ask() -> None:
    logits = random_logits(3, 10, seed=7)
    rows = [row(output=(1, 2)), row(output=(1,), presence_penalty=1.0), row(prompt=(4,))]
    ours = apply_penalties(logits, rows)
    assert torch.equal(ours[0], logits[0]) and torch.equal(ours[2], logits[2])
    assert ours[1, 1] == logits[1, 1] - 1.0


# --- seeds and the distribution --------------------------------------------------------------


def generate(sampler: Sampler, logits_per_step: list[torch.Tensor], rows: list[SamplingRow]):
    """Runs several steps; returns each row's tokens."""
    tokens: list[list[int]] = [[] for _ in rows]
    for logits in logits_per_step:
        for index, token in enumerate(sampler(logits, rows).token_ids):
            tokens[index].append(token)
    return tokens


def test_a_seed_gives_the_same_tokens_alone_and_inside_a_batch_of_16() -> None:
    steps, vocab = 20, 500
    knobs = {"temperature": 1.3, "top_p": 0.95}
    batch_logits = [random_logits(16, vocab, seed=100 + step) for step in range(steps)]
    alone = generate(
        Sampler(), [step[5:6] for step in batch_logits], [row(make_generator(42), **knobs)]
    )

    rows = [row(make_generator(1000 + i), top_k=50) for i in range(16)]
    for index in (2, 9, 11):
        rows[index] = row(temperature=0.9)  # unseeded rows share the batch draw
    rows[7] = row(temperature=0.0)
    rows[5] = row(make_generator(42), **knobs)
    batched = generate(Sampler(make_generator(7)), batch_logits, rows)
    assert batched[5] == alone[0]
    assert len(set(alone[0])) > 5  # it really sampled


def test_different_seeds_give_different_tokens() -> None:
    logits = [random_logits(1, 500, seed=step, scale=1.0) for step in range(20)]
    first = generate(Sampler(), logits, [row(make_generator(1))])
    second = generate(Sampler(), logits, [row(make_generator(2))])
    again = generate(Sampler(), logits, [row(make_generator(1))])
    assert first != second
    assert first == again


def chi_square(tokens: list[int], probs: list[float]) -> float:
    counts = torch.bincount(torch.tensor(tokens), minlength=len(probs)).tolist()
    total = len(tokens)
    assert all(count == 0 for count, p in zip(counts, probs, strict=True) if p == 0.0)
    return sum(
        (c - total * p) ** 2 / (total * p) for c, p in zip(counts, probs, strict=True) if p > 0
    )


def test_shared_draws_follow_the_distribution() -> None:
    probs = [0.4, 0.25, 0.15, 0.1, 0.06, 0.04]
    logits = torch.tensor([probs]).log().expand(4000, -1).contiguous()
    tokens = Sampler(make_generator(3))(logits, [row() for _ in range(4000)]).token_ids
    assert chi_square(tokens, probs) < 25.0  # 5 degrees of freedom: p < 1e-4 by chance


def test_seeded_draws_follow_the_filtered_distribution() -> None:
    # temperature 0.5 squares the probabilities; top-k 3 then keeps the three best
    probs = torch.tensor([0.4, 0.25, 0.15, 0.1, 0.06, 0.04])
    squared = probs[:3] ** 2 / (probs[:3] ** 2).sum()
    expected = squared.tolist() + [0.0, 0.0, 0.0]
    logits = probs.log().expand(200, -1).contiguous()
    rows = [row(make_generator(seed), temperature=0.5, top_k=3) for seed in range(200)]
    sampler = Sampler()
    tokens = [token for _ in range(20) for token in sampler(logits, rows).token_ids]
    assert chi_square(tokens, expected) < 20.0  # 2 degrees of freedom: p < 1e-4 by chance


# --- logprobs --------------------------------------------------------------------------------


def test_logprobs_come_from_the_raw_logits_best_first() -> None:
    logits = random_logits(3, 80, seed=8)
    rows = [
        row(
            make_generator(0),
            output=(3, 4),
            logprobs=5,
            temperature=0.3,
            top_k=4,
            repetition_penalty=2.0,
        ),
        row(temperature=0.0, logprobs=0),
        row(make_generator(1)),
    ]
    out = Sampler()(logits, rows)
    raw = torch.log_softmax(logits, dim=-1)
    first = out.logprobs[0]
    assert first is not None and first.token_id == out.token_ids[0]
    assert first.logprob == pytest.approx(raw[0, out.token_ids[0]].item(), abs=1e-6)
    best = raw[0].topk(5)
    assert [token for token, _ in first.top] == best.indices.tolist()
    assert [lp for _, lp in first.top] == pytest.approx(best.values.tolist(), abs=1e-6)
    assert [lp for _, lp in first.top] == sorted((lp for _, lp in first.top), reverse=True)
    second = out.logprobs[1]
    assert second is not None and second.top == []
    assert second.logprob == pytest.approx(raw[1].max().item(), abs=1e-6)
    assert out.logprobs[2] is None


def test_more_logprobs_than_the_vocabulary_gives_the_whole_vocabulary() -> None:
    out = Sampler()(random_logits(1, 5), [row(temperature=0.0, logprobs=20)])
    assert out.logprobs[0] is not None and len(out.logprobs[0].top) == 5


# --- robustness ------------------------------------------------------------------------------


@pytest.mark.parametrize("temperature", [1e-5, 1e-38, 1.0, 50.0])
def test_minus_infinity_and_extreme_temperatures_give_valid_tokens(temperature: float) -> None:
    logits = random_logits(6, 64, seed=9, scale=10.0)
    logits[:, ::2] = -INF  # even ids are forbidden
    rows = [
        row(make_generator(i), temperature=temperature, **knobs)
        for i, knobs in enumerate(
            [{}, {"top_k": 100}, {"top_p": 1.0}, {"min_p": 0.3, "top_p": 0.5}, {"typical_p": 0.2}]
        )
    ]
    warped = apply_warpers(logits[:5], rows)
    assert not torch.isnan(torch.softmax(warped, dim=-1)).any()
    for _ in range(10):
        out = Sampler()(logits, [*rows, row(logprobs=3)])
        assert all(token % 2 == 1 for token in out.token_ids)
    if temperature == 1e-5:
        assert out.token_ids[:5] == logits[:5].argmax(dim=-1).tolist()
