"""Attention backends behind one interface (`base.AttentionBackend`), chosen by name."""

from __future__ import annotations

import torch

from worker.attention.base import AttentionBackend, AttentionMetadata, StepBatch
from worker.attention.flash import FlashBackend
from worker.attention.sdpa import SdpaBackend

BACKENDS: dict[str, type[AttentionBackend]] = {"sdpa": SdpaBackend, "flash": FlashBackend}


def select_backend(name: str, device: torch.device) -> AttentionBackend:
    """`auto` prefers flash-attn on CUDA when it imports, else sdpa."""
    if name == "auto":
        name = "flash" if FlashBackend.available(device) else "sdpa"
    if name not in BACKENDS:
        raise ValueError(
            f"unknown attention backend {name!r}; choose from auto, {', '.join(BACKENDS)}"
        )
    backend = BACKENDS[name]
    if not backend.available(device):
        raise ValueError(f"attention backend {name!r} is not available on {device}")
    return backend(device)


__all__ = ["AttentionBackend", "AttentionMetadata", "StepBatch", "BACKENDS", "select_backend"]
