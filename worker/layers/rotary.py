"""Rotary position embedding (RoPE), with the frequency schedules transformers knows (default,
llama3, linear, yarn...) taken from `transformers.modeling_rope_utils`, so a scaled-context
checkpoint gets exactly its reference frequencies. On the CPU, q and k are rotated in place by one
fused kernel (worker/kernels)."""

from __future__ import annotations

import torch
from torch import nn

from worker import kernels


def _inverse_frequencies(config, head_dim: int) -> tuple[torch.Tensor, float]:
    params = getattr(config, "rope_parameters", None) or {}
    rope_type = params.get("rope_type", "default")
    if rope_type == "default":
        theta = params.get("rope_theta", getattr(config, "rope_theta", 10000.0))
        exponents = torch.arange(0, head_dim, 2, dtype=torch.int64).float() / head_dim
        return 1.0 / (theta**exponents), 1.0
    from transformers.modeling_rope_utils import ROPE_INIT_FUNCTIONS

    if rope_type not in ROPE_INIT_FUNCTIONS or rope_type == "dynamic":
        supported = sorted({"default", *ROPE_INIT_FUNCTIONS} - {"dynamic"})
        raise ValueError(f"rope_type {rope_type!r} is not supported; supported: {supported}")
    inv_freq, scaling = ROPE_INIT_FUNCTIONS[rope_type](config, torch.device("cpu"))
    return inv_freq.float(), float(scaling)


def _rotate_half(x: torch.Tensor) -> torch.Tensor:
    first, second = x.chunk(2, dim=-1)
    return torch.cat((-second, first), dim=-1)


class RotaryEmbedding(nn.Module):
    """Rotates q and k ([tokens, heads, head_dim]) by their positions (neox/HF layout)."""

    def __init__(self, config, head_dim: int, max_positions: int):
        super().__init__()
        inv_freq, scaling = _inverse_frequencies(config, head_dim)
        positions = torch.arange(max_positions, dtype=torch.float32)
        freqs = torch.outer(positions, inv_freq.to(positions.device))
        angles = torch.cat((freqs, freqs), dim=-1)
        self.cos_cache: torch.Tensor
        self.sin_cache: torch.Tensor
        self.register_buffer("cos_cache", angles.cos() * scaling, persistent=False)
        self.register_buffer("sin_cache", angles.sin() * scaling, persistent=False)

    def forward(
        self, positions: torch.Tensor, q: torch.Tensor, k: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor]:
        native = kernels.for_tensor(q)
        if native is not None and q.stride(-1) == 1 and k.stride(-1) == 1:
            native.rotary_(q, k, positions, self.cos_cache, self.sin_cache)
            return q, k
        cos = self.cos_cache[positions].unsqueeze(1).to(q.dtype)
        sin = self.sin_cache[positions].unsqueeze(1).to(q.dtype)
        return q * cos + _rotate_half(q) * sin, k * cos + _rotate_half(k) * sin
