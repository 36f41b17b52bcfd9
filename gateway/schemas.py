"""Request bodies of the HTTP API, as pydantic models (they also document /docs).

Field names and ranges follow OpenAI (and vLLM's extras: top_k, min_p, repetition_penalty,
ignore_eos, stop_token_ids, skip_special_tokens) and TGI's `parameters`. Unknown fields are
ignored, as OpenAI does. An explicit `null` means "the default", so most fields are optional
and the defaults are applied where the Job is built (gateway/jobs.py).
"""

from __future__ import annotations

from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field


class _Lenient(BaseModel):
    model_config = ConfigDict(extra="ignore")


class StreamOptions(_Lenient):
    include_usage: bool | None = Field(
        None, description="send a last chunk with empty choices and the usage"
    )


class SamplingFields(_Lenient):
    """Fields shared by /v1/chat/completions and /v1/completions."""

    model: str
    max_tokens: int | None = Field(None, ge=1, description="tokens to generate at most")
    temperature: float | None = Field(None, ge=0, description="0 = greedy")
    top_p: float | None = Field(None, gt=0, le=1)
    top_k: int | None = Field(None, ge=-1, description="-1 or 0 = off")
    min_p: float | None = Field(None, ge=0, le=1)
    typical_p: float | None = Field(None, gt=0, le=1)
    seed: int | None = None
    stop: str | list[str] | None = None
    stop_token_ids: list[int] | None = None
    n: int | None = Field(None, ge=1, le=128)
    best_of: int | None = Field(None, ge=1, description="only best_of == n is supported")
    presence_penalty: float | None = Field(None, ge=-2, le=2)
    frequency_penalty: float | None = Field(None, ge=-2, le=2)
    repetition_penalty: float | None = Field(None, gt=0)
    user: str | None = None
    stream: bool | None = False
    stream_options: StreamOptions | None = None
    ignore_eos: bool | None = False
    skip_special_tokens: bool | None = True


class ChatMessage(_Lenient):
    role: Literal["system", "developer", "user", "assistant", "tool"]
    content: str | list[dict[str, Any]] | None = None
    name: str | None = None


class ChatCompletionRequest(SamplingFields):
    messages: list[ChatMessage] = Field(min_length=1)
    max_completion_tokens: int | None = Field(None, ge=1, description="overrides max_tokens")
    logprobs: bool | None = False
    top_logprobs: int | None = Field(None, ge=0, le=20)


class CompletionRequest(SamplingFields):
    prompt: str | list[str] | list[int] | list[list[int]]
    logprobs: int | None = Field(None, ge=0, le=20, description="top alternatives per token")
    echo: bool | None = False


class TgiParameters(_Lenient):
    """TGI's generation parameters. Greedy unless do_sample or a sampling knob is set."""

    best_of: int | None = Field(None, ge=1)
    decoder_input_details: bool = False
    details: bool = False
    do_sample: bool = False
    frequency_penalty: float | None = Field(None, ge=-2, le=2)
    grammar: Any = None
    max_new_tokens: int | None = Field(None, ge=1)
    repetition_penalty: float | None = Field(None, gt=0)
    return_full_text: bool | None = False
    seed: int | None = Field(None, ge=0)
    stop: list[str] = Field(default_factory=list)
    temperature: float | None = Field(None, gt=0)
    top_k: int | None = Field(None, gt=0)
    top_n_tokens: int | None = Field(None, ge=0, le=20)
    top_p: float | None = Field(None, gt=0, lt=1)
    truncate: int | None = Field(None, ge=1, description="keep only the last N prompt tokens")
    typical_p: float | None = Field(None, gt=0, lt=1)
    watermark: bool = False


class TgiGenerateRequest(_Lenient):
    inputs: str = Field(min_length=1)
    parameters: TgiParameters = Field(default_factory=lambda: TgiParameters.model_validate({}))
    model: str | None = Field(None, description="spindle extension; default: the first served")


class TgiTokenizeRequest(_Lenient):
    inputs: str
    parameters: TgiParameters = Field(default_factory=lambda: TgiParameters.model_validate({}))
    model: str | None = Field(None, description="spindle extension; default: the first served")
