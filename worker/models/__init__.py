"""Model architectures, looked up by the `architectures` entry of a checkpoint's config.json."""

from __future__ import annotations

from torch import nn

from worker.models.llama import LlamaForCausalLM
from worker.models.qwen import Qwen2ForCausalLM, Qwen3ForCausalLM

MODEL_REGISTRY: dict[str, type[nn.Module]] = {
    "LlamaForCausalLM": LlamaForCausalLM,
    "MistralForCausalLM": LlamaForCausalLM,
    "Qwen2ForCausalLM": Qwen2ForCausalLM,
    "Qwen3ForCausalLM": Qwen3ForCausalLM,
}


def model_class(config) -> type[nn.Module]:
    architectures = list(getattr(config, "architectures", None) or [])
    for name in architectures:
        if name in MODEL_REGISTRY:
            return MODEL_REGISTRY[name]
    raise ValueError(
        f"architecture {architectures or '(none given in config.json)'} is not supported; "
        f"supported: {', '.join(sorted(MODEL_REGISTRY))}"
    )
