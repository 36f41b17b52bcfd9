"""The wire protocol between gateway, Redis and worker: `Job` (one request) and `Event` (a piece
of its answer), plus `SamplingParams`, the engine's view of how to generate.

Every message is a plain dataclass with one `to_json` / `from_json` pair and a `v` version field;
tests/unit/test_protocol.py round-trips each one. No torch here: the gateway imports this file.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field, fields, replace
from typing import Any, Literal

PROTOCOL_VERSION = 1

FinishReason = Literal["stop", "length", "eos_token", "cancelled", "error"]
FINISH_REASONS: tuple[str, ...] = ("stop", "length", "eos_token", "cancelled", "error")


class ProtocolError(ValueError):
    """A message that cannot be decoded (wrong version, missing or malformed fields)."""


@dataclass(frozen=True)
class Sampling:
    """How the next token is drawn. Defaults are "off", so `Sampling()` is plain greedy-free
    sampling at temperature 1; temperature 0 means greedy."""

    temperature: float = 1.0
    top_k: int = 0  # 0 = off
    top_p: float = 1.0  # 1.0 = off
    min_p: float = 0.0  # 0.0 = off
    typical_p: float = 1.0  # 1.0 = off
    repetition_penalty: float = 1.0  # 1.0 = off; HF semantics (divide positive logits)
    frequency_penalty: float = 0.0  # OpenAI semantics: minus count * penalty
    presence_penalty: float = 0.0  # OpenAI semantics: minus penalty if seen
    seed: int | None = None
    n: int = 1
    best_of: int | None = None

    @property
    def greedy(self) -> bool:
        return self.temperature <= 0.0 or self.top_k == 1


@dataclass(frozen=True)
class SamplingParams:
    """Everything the engine needs to generate one request's choices (the in-process API's
    parameter object, like vLLM's)."""

    sampling: Sampling = field(default_factory=Sampling)
    max_new_tokens: int = 16
    stop: tuple[str, ...] = ()
    stop_token_ids: tuple[int, ...] = ()
    ignore_eos: bool = False
    logprobs: int | None = None  # None = no logprobs; k >= 0 = chosen token + top-k alternatives
    skip_special_tokens: bool = True
    include_stop_str_in_output: bool = False

    @classmethod
    def make(cls, **kwargs: Any) -> SamplingParams:
        """Build from flat keyword arguments, e.g. `SamplingParams.make(temperature=0, seed=1)`."""
        knob_names = {f.name for f in fields(Sampling)}
        knobs = {k: v for k, v in kwargs.items() if k in knob_names}
        rest = {k: v for k, v in kwargs.items() if k not in knob_names}
        for key in ("stop", "stop_token_ids"):
            if key in rest:
                value = rest[key]
                rest[key] = (value,) if isinstance(value, str) else tuple(value)
        return cls(sampling=Sampling(**knobs), **rest)

    def with_seed(self, seed: int | None) -> SamplingParams:
        return replace(self, sampling=replace(self.sampling, seed=seed))


@dataclass(frozen=True)
class Job:
    """One request on `spindle:req:{model}`; `id` is also the suffix of its event channel."""

    id: str
    model: str
    prompt_ids: list[int]
    sampling: Sampling = field(default_factory=Sampling)
    stop: list[str] = field(default_factory=list)
    stop_token_ids: list[int] = field(default_factory=list)
    max_new_tokens: int = 16
    ignore_eos: bool = False
    logprobs: int | None = None
    skip_special_tokens: bool = True
    stream: bool = False
    created: float = 0.0  # unix seconds
    deadline: float | None = None  # unix seconds; past it the worker ends the job with an error
    attempt: int = 1  # delivery count, raised when another worker resumes it
    resume_from: int = 0  # completion tokens already delivered before a resume
    v: int = PROTOCOL_VERSION

    def params(self) -> SamplingParams:
        return SamplingParams(
            sampling=self.sampling,
            max_new_tokens=self.max_new_tokens,
            stop=tuple(self.stop),
            stop_token_ids=tuple(self.stop_token_ids),
            ignore_eos=self.ignore_eos,
            logprobs=self.logprobs,
            skip_special_tokens=self.skip_special_tokens,
        )

    def to_json(self) -> str:
        return _dumps(self)

    @classmethod
    def from_json(cls, raw: str | bytes) -> Job:
        data = _load(raw, "Job")
        try:
            sampling = Sampling(**data.pop("sampling", {}))
            job = cls(sampling=sampling, **data)
        except TypeError as err:
            raise ProtocolError(f"malformed Job: {err}") from err
        job._check_types()
        return job

    def _check_types(self) -> None:
        def ints(values: Any) -> bool:
            return isinstance(values, list) and all(
                isinstance(v, int) and not isinstance(v, bool) for v in values
            )

        problems = []
        if not isinstance(self.id, str) or not isinstance(self.model, str):
            problems.append("id and model must be strings")
        if not ints(self.prompt_ids) or not ints(self.stop_token_ids):
            problems.append("prompt_ids and stop_token_ids must be lists of integers")
        if not isinstance(self.stop, list) or not all(isinstance(s, str) for s in self.stop):
            problems.append("stop must be a list of strings")
        if not isinstance(self.max_new_tokens, int) or not isinstance(self.sampling.n, int):
            problems.append("max_new_tokens and n must be integers")
        if problems:
            raise ProtocolError(f"malformed Job: {'; '.join(problems)}")


@dataclass(frozen=True)
class TokenLogprob:
    """The chosen token's log-probability and the top alternatives (id, logprob), best first."""

    token_id: int
    logprob: float
    top: list[tuple[int, float]] = field(default_factory=list)


@dataclass(frozen=True)
class Usage:
    prompt_tokens: int
    completion_tokens: int

    @property
    def total_tokens(self) -> int:
        return self.prompt_tokens + self.completion_tokens


@dataclass(frozen=True)
class ErrorInfo:
    message: str
    type: str = "internal_error"


@dataclass(frozen=True)
class Event:
    """A piece of one choice's answer. `seq` counts 0, 1, 2... per request across choices and
    resumes. Each choice ends with one event whose `finish` is set; the request's last event
    also carries `usage` (summed over its choices), so a reader knows the request is over when
    it has seen `n` finishes."""

    id: str
    seq: int
    index: int = 0
    token_ids: list[int] = field(default_factory=list)
    text: str = ""
    logprobs: list[TokenLogprob] | None = None
    finish: FinishReason | None = None
    usage: Usage | None = None
    error: ErrorInfo | None = None
    worker: str | None = None
    v: int = PROTOCOL_VERSION

    def to_json(self) -> str:
        return _dumps(self)

    @classmethod
    def from_json(cls, raw: str | bytes) -> Event:
        data = _load(raw, "Event")
        try:
            if data.get("logprobs") is not None:
                data["logprobs"] = [
                    TokenLogprob(lp["token_id"], lp["logprob"], [tuple(t) for t in lp["top"]])
                    for lp in data["logprobs"]
                ]
            if data.get("usage") is not None:
                data["usage"] = Usage(**data["usage"])
            if data.get("error") is not None:
                data["error"] = ErrorInfo(**data["error"])
            if data.get("finish") not in (None, *FINISH_REASONS):
                raise ProtocolError(f"unknown finish reason {data['finish']!r}")
            return cls(**data)
        except (TypeError, KeyError) as err:
            raise ProtocolError(f"malformed Event: {err}") from err


def _dumps(message: Any) -> str:
    """JSON of a message dataclass, nested ones included. Same text as `json.dumps(asdict(m))`
    at a quarter of the cost: `asdict` deep-copies, and this runs once per token per request."""
    return json.dumps(vars(message), separators=(",", ":"), default=vars)


def _load(raw: str | bytes, kind: str) -> dict[str, Any]:
    try:
        data = json.loads(raw)
    except (json.JSONDecodeError, UnicodeDecodeError) as err:
        raise ProtocolError(f"{kind} is not JSON: {err}") from err
    if not isinstance(data, dict):
        raise ProtocolError(f"{kind} must be a JSON object")
    version = data.get("v", PROTOCOL_VERSION)
    if version != PROTOCOL_VERSION:
        raise ProtocolError(
            f"{kind} has protocol version {version}; this build speaks {PROTOCOL_VERSION}"
        )
    return data
