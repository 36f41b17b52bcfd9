"""SiLU-and-multiply: the gated activation of Llama-style MLPs, over a fused gate|up tensor (one
fused kernel on the CPU, worker/kernels)."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from worker import kernels


class SiluAndMul(nn.Module):
    def forward(self, gate_up: torch.Tensor) -> torch.Tensor:
        native = kernels.for_tensor(gate_up)
        if native is not None and gate_up.is_contiguous():
            return native.silu_and_mul(gate_up)
        gate, up = gate_up.chunk(2, dim=-1)
        return F.silu(gate) * up
