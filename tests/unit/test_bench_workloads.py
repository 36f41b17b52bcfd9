"""Benchmark workloads (bench/workloads.py): a seed fixes the workload, each generator meets its
spec, the JSON files round-trip, and the committed files are what their spec says."""

from __future__ import annotations

import random
from pathlib import Path

import pytest

from bench.workloads import (
    STANDARD_WORKLOADS,
    WORKLOAD_DIR,
    BenchRequest,
    RandomTokens,
    TextTokens,
    Workload,
    load_workload,
    mixed,
    poisson,
    save_workload,
    shared_prefix,
    single,
)

VOCAB = 49152
# A stand-in for tokenized text: distinct ids, so a window's position in the stream is visible.
STREAM = TextTokens(list(range(1000, 21000)))


@pytest.mark.parametrize("name", list(STANDARD_WORKLOADS))
def test_a_seed_fixes_the_workload(name):
    make = STANDARD_WORKLOADS[name]
    assert make(STREAM) == make(STREAM)
    assert make(RandomTokens(VOCAB)) == make(RandomTokens(VOCAB))


def test_another_seed_gives_another_workload():
    assert mixed(STREAM, seed=1).requests != mixed(STREAM, seed=2).requests


def test_mixed_lengths_stay_in_their_ranges_and_spread_over_them():
    workload = mixed(RandomTokens(VOCAB), count=200, prompt_len=(16, 512), max_tokens=(16, 256))
    prompt_lengths = [len(r.prompt_ids) for r in workload.requests]
    max_tokens = [r.max_tokens for r in workload.requests]
    assert len(workload.requests) == 200
    assert 16 <= min(prompt_lengths) < 60 and 470 < max(prompt_lengths) <= 512
    assert 16 <= min(max_tokens) < 40 and 230 < max(max_tokens) <= 256
    assert all(r.arrival_s == 0 for r in workload.requests)
    ids = [token for r in workload.requests for token in r.prompt_ids]
    assert min(ids) >= 256 and max(ids) < VOCAB


def test_text_prompts_are_contiguous_windows_of_the_stream():
    for request in mixed(STREAM).requests:
        first = request.prompt_ids[0]
        assert request.prompt_ids == list(range(first, first + len(request.prompt_ids)))


def test_a_prompt_longer_than_the_text_is_refused_with_both_lengths():
    with pytest.raises(ValueError, match="a 50-token prompt does not fit in the 10-token text"):
        TextTokens(list(range(10))).take(random.Random(0), 50)


def test_single_is_one_request_of_the_asked_lengths():
    workload = single(STREAM, prompt_len=128, max_tokens=128)
    assert [(len(r.prompt_ids), r.max_tokens) for r in workload.requests] == [(128, 128)]


def test_poisson_arrivals_increase_within_the_duration_at_about_the_rate():
    workload = poisson(RandomTokens(VOCAB), rate_per_s=5.0, duration_s=60.0)
    arrivals = [r.arrival_s for r in workload.requests]
    assert arrivals == sorted(arrivals) and arrivals[0] > 0 and arrivals[-1] < 60.0
    # 300 expected; a Poisson count's standard deviation is sqrt(300) ~ 17.
    assert 240 < len(arrivals) < 360


def test_poisson_refuses_a_rate_that_never_sends():
    with pytest.raises(ValueError, match=r"rate \(0.0/s\)"):
        poisson(STREAM, rate_per_s=0.0)


def test_shared_prefix_requests_share_exactly_the_prefix():
    workload = shared_prefix(STREAM, count=8, prefix_len=384, suffix_len=(16, 64))
    prefix = workload.requests[0].prompt_ids[:384]
    assert len(workload.requests) == 8
    for request in workload.requests:
        assert request.prompt_ids[:384] == prefix
        assert 16 <= len(request.prompt_ids) - 384 <= 64
    suffixes = {tuple(r.prompt_ids[384:]) for r in workload.requests}
    assert len(suffixes) == 8


def test_json_round_trip(tmp_path: Path):
    workload = poisson(STREAM, rate_per_s=1.0, duration_s=10.0, seed=3)
    path = save_workload(workload, tmp_path)
    assert path == tmp_path / "poisson.json"
    assert load_workload("poisson", tmp_path) == workload
    assert load_workload(path) == workload
    assert Workload.from_json(workload.to_json()).requests[0] == workload.requests[0]


def test_an_unknown_workload_names_the_known_ones(tmp_path: Path):
    save_workload(Workload("known", 0, [BenchRequest([1, 2], 3)]), tmp_path)
    with pytest.raises(FileNotFoundError, match=r"no workload 'missing'.*\['known'\]"):
        load_workload("missing", tmp_path)


@pytest.mark.parametrize(
    ("name", "count", "prompt_range", "max_tokens_range"),
    [("single", 1, (128, 128), (128, 128)), ("mixed-32", 32, (16, 512), (16, 256))],
)
def test_committed_workloads_match_their_spec(name, count, prompt_range, max_tokens_range):
    workload = load_workload(name, WORKLOAD_DIR)
    assert workload.name == name and workload.ignore_eos
    assert len(workload.requests) == count
    for request in workload.requests:
        assert prompt_range[0] <= len(request.prompt_ids) <= prompt_range[1]
        assert max_tokens_range[0] <= request.max_tokens <= max_tokens_range[1]
        assert min(request.prompt_ids) >= 0 and max(request.prompt_ids) < VOCAB


def test_committed_workloads_have_the_shape_their_generator_draws_today():
    """Lengths and arrivals depend on the seed alone (not on the tokenizer), so a stand-in token
    stream regenerates them: a changed generator with stale committed files fails here."""
    for name in STANDARD_WORKLOADS:
        committed = load_workload(name, WORKLOAD_DIR)
        regenerated = STANDARD_WORKLOADS[name](STREAM)
        assert [len(r.prompt_ids) for r in committed.requests] == [
            len(r.prompt_ids) for r in regenerated.requests
        ]
        assert [r.max_tokens for r in committed.requests] == [
            r.max_tokens for r in regenerated.requests
        ]
        assert [r.arrival_s for r in committed.requests] == [
            r.arrival_s for r in regenerated.requests
        ]
