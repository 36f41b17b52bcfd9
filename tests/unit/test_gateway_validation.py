"""The gateway's request handling without Redis: requests -> Jobs (tokenization, limits,
defaults), validation messages and shapes, event ordering, error mapping."""

from __future__ import annotations

import json
from dataclasses import replace
from typing import Any

import pytest
from pydantic import ValidationError

from common.chat import build_tokenizer, special_token_ids
from common.protocol import ErrorInfo, Event
from gateway.errors import ApiError, openai_error_body, tgi_error_body, validation_error
from gateway.generation import event_error
from gateway.jobs import plan_chat, plan_completion
from gateway.registry import ServedModel
from gateway.relay import SeqOrder
from gateway.schemas import ChatCompletionRequest, CompletionRequest, TgiGenerateRequest
from gateway.tgi_format import plan_generate
from tests.integration.fake_worker import tiny_model_card


def served(**card_changes: Any) -> ServedModel:
    card = replace(tiny_model_card(), **card_changes)
    tokenizer = build_tokenizer(card)
    return ServedModel(card, tokenizer, special_token_ids(tokenizer))


@pytest.fixture(scope="module")
def tiny() -> ServedModel:
    return served()


def chat(**fields: Any) -> ChatCompletionRequest:
    return ChatCompletionRequest.model_validate(
        {"model": "tiny", "messages": [{"role": "user", "content": "hello cat"}], **fields}
    )


def completion(**fields: Any) -> CompletionRequest:
    return CompletionRequest.model_validate({"model": "tiny", "prompt": "one two", **fields})


def api_error(call: Any) -> ApiError:
    with pytest.raises(ApiError) as caught:
        call()
    return caught.value


def test_chat_renders_the_template_and_fills_the_context(tiny: ServedModel) -> None:
    plan = plan_chat(chat(stop="cat", seed=7, n=2), tiny, timeout_s=30)
    job = plan.jobs[0]
    expected_text = "<|im_start|>user hello cat<|im_end|><|im_start|>assistant"
    assert job.prompt_ids == tiny.tokenizer.encode(expected_text, add_special_tokens=False)
    assert job.max_new_tokens == tiny.card.max_total_tokens - len(job.prompt_ids)
    assert (job.stop, job.sampling.seed, job.sampling.n, job.logprobs) == (["cat"], 7, 2, None)
    assert job.sampling.temperature == 1.0 and job.sampling.top_p == 1.0
    assert job.deadline == pytest.approx(job.created + 30)
    assert job.id == plan.request_id and plan.request_id.startswith("chatcmpl-")


def test_chat_options(tiny: ServedModel) -> None:
    job = plan_chat(chat(max_completion_tokens=5, max_tokens=9, logprobs=True, top_logprobs=3,
                         temperature=0, top_k=-1, ignore_eos=True), tiny, timeout_s=0).jobs[0]  # fmt: skip
    assert (job.max_new_tokens, job.logprobs, job.ignore_eos, job.deadline) == (5, 3, True, None)
    assert job.sampling.greedy and job.sampling.top_k == 0


def test_chat_messages_developer_role_and_text_parts(tiny: ServedModel) -> None:
    messages = [{"role": "developer", "content": "one"},
                {"role": "user", "content": [{"type": "text", "text": "two"}, {"type": "text", "text": "three"}]}]  # fmt: skip
    job = plan_chat(chat(messages=messages), tiny, timeout_s=0).jobs[0]
    assert tiny.tokenizer.decode(job.prompt_ids, skip_special_tokens=True).split() == [
        "system", "one", "user", "two", "three", "assistant"]  # fmt: skip
    image = [{"role": "user", "content": [{"type": "image_url", "image_url": {"url": "x"}}]}]
    error = api_error(lambda: plan_chat(chat(messages=image), tiny, timeout_s=0))
    assert error.status == 400 and "only text parts" in error.message


def test_generation_config_supplies_defaults_the_request_overrides() -> None:
    model = served(generation_config_json=json.dumps({"temperature": 0.6, "top_p": 0.9}))
    defaulted = plan_chat(chat(), model, timeout_s=0).jobs[0].sampling
    overridden = plan_chat(chat(temperature=0.2), model, timeout_s=0).jobs[0].sampling
    assert (defaulted.temperature, defaulted.top_p) == (0.6, 0.9)
    assert (overridden.temperature, overridden.top_p) == (0.2, 0.9)


@pytest.mark.parametrize(
    ("fields", "message"),
    [
        ({"best_of": 3}, "best_of=3 with n=1: only best_of == n is supported for now"),
        ({"top_logprobs": 2}, "top_logprobs requires logprobs=true"),
        (
            {"max_tokens": 90},
            "prompt has 7 tokens and max_tokens is 90: 97 in all, over this model's limit of 96 tokens; lower max_tokens to at most 89",
        ),
    ],
)
def test_chat_rejections(tiny: ServedModel, fields: dict[str, Any], message: str) -> None:
    error = api_error(lambda: plan_chat(chat(**fields), tiny, timeout_s=0))
    assert (error.status, error.message) == (400, message)


def test_completion_prompt_forms(tiny: ServedModel) -> None:
    ids = tiny.tokenizer.encode("one two")
    assert ids[0] == tiny.tokenizer.bos_token_id  # strings get the BOS the tokenizer adds
    for prompt in ["one two", ["one two"], ids, [ids]]:
        plan = plan_completion(completion(prompt=prompt), tiny, timeout_s=0)
        assert [job.prompt_ids for job in plan.jobs] == [ids]
        assert plan.jobs[0].max_new_tokens == 16  # OpenAI's default for completions


def test_several_prompts_become_one_job_each(tiny: ServedModel) -> None:
    plan = plan_completion(
        completion(prompt=["one", "two three"], n=2, echo=True), tiny, timeout_s=0
    )
    assert [len(job.prompt_ids) for job in plan.jobs] == [2, 3]
    assert plan.jobs[0].id == f"{plan.request_id}-0" and plan.jobs[1].id == f"{plan.request_id}-1"
    assert plan.choice_count == 4 and plan.prompt_texts == ["one", "two three"]


@pytest.mark.parametrize(
    ("prompt", "message"),
    [
        ("", "prompt is empty"),
        ([], "prompt is empty"),
        ([[]], "prompt is empty; send at least one token"),
        (
            [5, 999],
            "token id 999 in prompt is out of range; the vocabulary has 48 tokens (ids 0 to 47)",
        ),
        (
            " ".join(["cat"] * 70),
            "prompt has 71 tokens; this model accepts at most 64 input tokens",
        ),
    ],
)
def test_completion_prompt_rejections(tiny: ServedModel, prompt: Any, message: str) -> None:
    error = api_error(lambda: plan_completion(completion(prompt=prompt), tiny, timeout_s=0))
    assert (error.status, error.message, error.param) == (400, message, "prompt")


def test_echo_with_logprobs_is_refused(tiny: ServedModel) -> None:
    error = api_error(lambda: plan_completion(completion(echo=True, logprobs=1), tiny, timeout_s=0))
    assert error.status == 400 and "echo" in error.message


def test_context_with_no_room_left_is_refused() -> None:
    model = served(max_input_tokens=64, max_total_tokens=3)
    error = api_error(
        lambda: plan_completion(completion(prompt="one two three"), model, timeout_s=0)
    )
    assert "prompt has 4 tokens, which fills this model's context of 3 tokens" in error.message


@pytest.mark.parametrize(
    ("body", "message", "param"),
    [
        (
            {"temperature": -1},
            "temperature: Input should be greater than or equal to 0 (got -1)",
            "temperature",
        ),
        ({"top_p": 0}, "top_p: Input should be greater than 0 (got 0)", "top_p"),
        ({"top_p": 1.5}, "top_p: Input should be less than or equal to 1 (got 1.5)", "top_p"),
        ({"n": 0}, "n: Input should be greater than or equal to 1 (got 0)", "n"),
        (
            {"max_tokens": 0},
            "max_tokens: Input should be greater than or equal to 1 (got 0)",
            "max_tokens",
        ),
        (
            {"messages": [{"role": "robot", "content": "x"}]},
            "messages[0].role: Input should be",
            "messages[0].role",
        ),
        ({"messages": []}, "messages: List should have at least 1 item", "messages"),
        ({"model": None}, "model: Input should be a valid string", "model"),
    ],
)
def test_pydantic_errors_become_one_readable_message(
    body: dict[str, Any], message: str, param: str
) -> None:
    request = {"model": "tiny", "messages": [{"role": "user", "content": "x"}], **body}
    with pytest.raises(ValidationError) as caught:
        ChatCompletionRequest.model_validate(request)
    error = validation_error(caught.value.errors())
    assert error.status == 400 and error.message.startswith(message) and error.param == param


def test_valid_edges_are_accepted() -> None:
    request = ChatCompletionRequest.model_validate(
        {
            "model": "m",
            "messages": [{"role": "user", "content": "x"}],
            "top_p": 1.0,
            "temperature": 0,
            "unknown_field": 1,
            "n": None,
        }  # fmt: skip
    )
    assert request.top_p == 1.0 and request.temperature == 0


def test_error_body_shapes() -> None:
    error = ApiError(400, "bad", param="top_p")
    assert openai_error_body(error) == {
        "error": {"message": "bad", "type": "invalid_request_error", "param": "top_p", "code": None}
    }
    assert tgi_error_body(error) == {"error": "bad", "error_type": "validation"}


def test_events_are_reordered_and_deduplicated() -> None:
    order = SeqOrder(n=1)
    assert order.push(Event("r", 1, token_ids=[2])) == []
    assert [e.seq for e in order.push(Event("r", 0, token_ids=[1]))] == [0, 1]
    assert order.push(Event("r", 1, token_ids=[2])) == []  # duplicate
    assert not order.done
    assert [e.seq for e in order.push(Event("r", 2, finish="length"))] == [2] and order.done


def test_two_choices_need_two_finishes() -> None:
    order = SeqOrder(n=2)
    order.push(Event("r", 0, index=0, finish="stop"))
    assert not order.done
    order.push(Event("r", 1, index=1, finish="length"))
    assert order.done


def test_a_gap_is_released_once_the_terminal_event_arrived() -> None:
    order = SeqOrder(n=1)
    order.push(Event("r", 0, text="a"))
    released = order.push(Event("r", 2, text="c", finish="stop"))  # seq 1 was lost
    assert [e.seq for e in released] == [2] and order.done


def test_error_ends_the_job_and_maps_to_a_status() -> None:
    order = SeqOrder(n=3)
    failed = Event("r", 0, finish="error", error=ErrorInfo("boom", "internal_error"))
    order.push(failed)
    assert order.done
    assert (event_error(failed).status, event_error(failed).message) == (500, "boom")  # type: ignore[union-attr]
    assert event_error(Event("r", 0, finish="cancelled")).status == 503  # type: ignore[union-attr]
    timeout = Event("r", 0, finish="error", error=ErrorInfo("late", "timeout"))
    assert event_error(timeout).status == 504  # type: ignore[union-attr]
    assert event_error(Event("r", 0, finish="eos_token")) is None


def tgi(**parameters: Any) -> TgiGenerateRequest:
    return TgiGenerateRequest.model_validate({"inputs": "one two three", "parameters": parameters})


def test_tgi_is_greedy_unless_asked_to_sample(tiny: ServedModel) -> None:
    greedy = plan_generate(tgi(), tiny, 0, stream=False).jobs[0]
    assert greedy.sampling.greedy and greedy.sampling.seed is None and greedy.logprobs is None
    sampled = plan_generate(tgi(do_sample=True), tiny, 0, stream=True).jobs[0]
    assert sampled.sampling.temperature == 1.0 and sampled.sampling.seed is not None
    assert sampled.logprobs == 0  # stream tokens carry a logprob
    assert (
        not plan_generate(tgi(temperature=0.5, seed=3), tiny, 0, stream=False)
        .jobs[0]
        .sampling.greedy
    )


def test_tgi_truncate_full_text_and_defaults(tiny: ServedModel) -> None:
    plan = plan_generate(
        tgi(truncate=2, return_full_text=True, details=True), tiny, 0, stream=False
    )
    job = plan.jobs[0]
    assert job.prompt_ids == tiny.tokenizer.encode("one two three")[-2:]
    assert plan.prompt_texts == ["one two three"] and job.max_new_tokens == 94  # min(100, 96 - 2)
    assert job.logprobs == 0


@pytest.mark.parametrize(
    ("parameters", "message"),
    [
        ({"watermark": True}, "watermark is not supported"),
        ({"decoder_input_details": True}, "decoder_input_details is not supported"),
        ({"best_of": 2}, "best_of=2: only best_of=1 is supported"),
        ({"max_new_tokens": 95}, "prompt has 4 tokens and max_new_tokens is 95"),
    ],
)
def test_tgi_rejections(tiny: ServedModel, parameters: dict[str, Any], message: str) -> None:
    error = api_error(lambda: plan_generate(tgi(**parameters), tiny, 0, stream=False))
    assert error.status == 400 and error.message.startswith(message)
