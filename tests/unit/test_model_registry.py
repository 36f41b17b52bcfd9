"""The architecture registry: supported checkpoints map to their model class; anything else
fails at start-up with a message naming the architecture and the supported list."""

from __future__ import annotations

import pytest
from transformers import LlamaConfig

from worker.models import MODEL_REGISTRY, model_class
from worker.models.llama import LlamaForCausalLM
from worker.models.qwen import Qwen2ForCausalLM, Qwen3ForCausalLM


@pytest.mark.parametrize(
    ("architecture", "expected"),
    [
        ("LlamaForCausalLM", LlamaForCausalLM),
        ("MistralForCausalLM", LlamaForCausalLM),
        ("Qwen2ForCausalLM", Qwen2ForCausalLM),
        ("Qwen3ForCausalLM", Qwen3ForCausalLM),
    ],
)
def test_supported_architectures(architecture, expected):
    assert model_class(LlamaConfig(architectures=[architecture])) is expected


def test_unsupported_architecture_names_it_and_the_supported_list():
    with pytest.raises(ValueError) as error:
        model_class(LlamaConfig(architectures=["GPTNeoXForCausalLM"]))
    message = str(error.value)
    assert "GPTNeoXForCausalLM" in message
    assert all(name in message for name in MODEL_REGISTRY)


def test_missing_architectures_entry_is_explained():
    with pytest.raises(ValueError, match="none given"):
        model_class(LlamaConfig(architectures=None))
