"""Model architectures, looked up by the `architectures` entry of a checkpoint's config.json."""

from __future__ import annotations

from typing import Protocol

import torch
from torch import nn

from worker.models.llama import LlamaForCausalLM
from worker.models.qwen import Qwen2ForCausalLM, Qwen3ForCausalLM


class CausalLM(Protocol):
    """What the model runner needs of every architecture."""

    def __call__(
        self, input_ids: torch.Tensor, positions: torch.Tensor, attn_meta, sampled=None
    ) -> torch.Tensor:
        """Final hidden states of every token, or with `sampled` (SampledRows) of those rows
        only: the last layer runs on them alone past its K/V projection."""

    def compute_logits(self, hidden: torch.Tensor) -> torch.Tensor: ...

    def modules(self): ...


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
