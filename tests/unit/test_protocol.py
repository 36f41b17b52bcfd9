"""Wire protocol: every message survives `to_json` / `from_json` unchanged, and what cannot be
decoded (another protocol version, broken JSON, missing or unknown fields) raises ProtocolError."""

from __future__ import annotations

import json

import pytest

from common.protocol import (
    PROTOCOL_VERSION,
    ErrorInfo,
    Event,
    Job,
    ProtocolError,
    Sampling,
    SamplingParams,
    TokenLogprob,
    Usage,
)


def full_job() -> Job:
    """A Job with every field away from its default."""
    return Job(
        id="req-1",
        model="smollm2",
        prompt_ids=[1, 2, 3, 49151],
        sampling=Sampling(
            temperature=0.7,
            top_k=40,
            top_p=0.9,
            min_p=0.05,
            typical_p=0.95,
            repetition_penalty=1.1,
            frequency_penalty=0.5,
            presence_penalty=-0.25,
            seed=1234,
            n=3,
            best_of=5,
        ),
        stop=["\n\n", "END"],
        stop_token_ids=[2, 7],
        max_new_tokens=128,
        ignore_eos=True,
        logprobs=4,
        skip_special_tokens=False,
        stream=True,
        created=1_764_000_000.25,
        deadline=1_764_000_060.5,
        attempt=2,
        resume_from=17,
    )


def test_job_round_trips_with_every_field_set() -> None:
    job = full_job()
    assert Job.from_json(job.to_json()) == job


def test_job_round_trips_with_defaults_and_from_bytes() -> None:
    job = Job(id="r", model="m", prompt_ids=[5])
    decoded = Job.from_json(job.to_json().encode())
    assert decoded == job
    assert decoded.v == PROTOCOL_VERSION
    assert decoded.sampling == Sampling()


def test_job_params_carry_the_request_fields() -> None:
    params = full_job().params()
    assert params == SamplingParams(
        sampling=full_job().sampling,
        max_new_tokens=128,
        stop=("\n\n", "END"),
        stop_token_ids=(2, 7),
        ignore_eos=True,
        logprobs=4,
        skip_special_tokens=False,
    )


def test_event_round_trips_with_logprobs() -> None:
    event = Event(
        id="req-1",
        seq=3,
        index=1,
        token_ids=[42],
        text=" Paris",
        logprobs=[TokenLogprob(42, -0.125, [(42, -0.125), (7, -2.5), (9, -3.75)])],
        worker="w-1",
    )
    decoded = Event.from_json(event.to_json())
    assert decoded == event
    # JSON has no tuples: the decoder must turn the (id, logprob) pairs back into tuples.
    assert decoded.logprobs is not None and decoded.logprobs[0].top[1] == (7, -2.5)


def test_terminal_event_round_trips_with_usage() -> None:
    event = Event(id="r", seq=9, token_ids=[2], text="", finish="eos_token", usage=Usage(12, 30))
    decoded = Event.from_json(event.to_json())
    assert decoded == event
    assert decoded.usage is not None and decoded.usage.total_tokens == 42


def test_error_event_round_trips() -> None:
    event = Event(
        id="r",
        seq=0,
        finish="error",
        error=ErrorInfo("request passed its deadline by 3.2 s", "timeout"),
        usage=Usage(5, 0),
    )
    assert Event.from_json(event.to_json()) == event


@pytest.mark.parametrize("finish", ["stop", "length", "eos_token", "cancelled", "error", None])
def test_every_finish_reason_round_trips(finish: str | None) -> None:
    event = Event(id="r", seq=1, finish=finish)  # type: ignore[arg-type]
    assert Event.from_json(event.to_json()).finish == finish


@pytest.mark.parametrize("message", [Job(id="r", model="m", prompt_ids=[1]), Event(id="r", seq=0)])
def test_another_protocol_version_is_refused(message: Job | Event) -> None:
    data = json.loads(message.to_json())
    data["v"] = PROTOCOL_VERSION + 1
    with pytest.raises(ProtocolError, match=f"version {PROTOCOL_VERSION + 1}"):
        type(message).from_json(json.dumps(data))


@pytest.mark.parametrize("decode", [Job.from_json, Event.from_json], ids=["Job", "Event"])
@pytest.mark.parametrize("raw", ['{"id": "r", "seq": ', "not json", b"\xff\xfe", "", "[1, 2]", "7"])
def test_malformed_json_is_refused(decode, raw: str | bytes) -> None:
    with pytest.raises(ProtocolError):
        decode(raw)


@pytest.mark.parametrize("decode", [Job.from_json, Event.from_json], ids=["Job", "Event"])
def test_bytes_that_are_not_utf8_are_refused(decode) -> None:
    # Redis hands the worker bytes; a corrupt entry must become a ProtocolError (dead-lettered
    # with a message), not a UnicodeDecodeError escaping the decoder.
    with pytest.raises(ProtocolError):
        decode(b'{"id": "r", "seq": 0, "text": "\x80"}')


@pytest.mark.parametrize(
    "change",
    [
        {"id": None},  # missing required field (removed below)
        {"surprise": 1},  # unknown field
        {"sampling": {"temperature": 0.5, "warmth": 2}},  # unknown sampling knob
        {"sampling": [0.5]},  # sampling not an object
    ],
)
def test_malformed_job_is_refused(change: dict) -> None:
    data = json.loads(Job(id="r", model="m", prompt_ids=[1]).to_json())
    data.update(change)
    if change.get("id", "") is None:
        del data["id"]
    with pytest.raises(ProtocolError, match="Job"):
        Job.from_json(json.dumps(data))


@pytest.mark.parametrize(
    "change",
    [
        {"finish": "exploded"},
        {"seq": None, "id": None},  # missing required fields (removed below)
        {"surprise": 1},
        {"logprobs": [{"token_id": 1}]},  # no logprob, no top
        {"logprobs": [{"token_id": 1, "logprob": -1.0, "top": [7]}]},  # top entry not a pair
        {"usage": {"prompt_tokens": 1}},
        {"error": {"kind": "oops"}},
    ],
)
def test_malformed_event_is_refused(change: dict) -> None:
    data = json.loads(Event(id="r", seq=0).to_json())
    data.update(change)
    for key in [k for k, v in change.items() if v is None]:
        del data[key]
    with pytest.raises(ProtocolError):
        Event.from_json(json.dumps(data))


def test_message_without_version_is_read_as_the_current_one() -> None:
    data = json.loads(Event(id="r", seq=4, text="hi").to_json())
    del data["v"]
    assert Event.from_json(json.dumps(data)) == Event(id="r", seq=4, text="hi")


def test_sampling_params_make_splits_knobs_from_request_fields() -> None:
    params = SamplingParams.make(temperature=0, seed=1, max_new_tokens=5, stop="###")
    assert params.sampling == Sampling(temperature=0, seed=1)
    assert params.sampling.greedy
    assert params.max_new_tokens == 5 and params.stop == ("###",)
    assert params.with_seed(9).sampling.seed == 9 and params.with_seed(9).max_new_tokens == 5
