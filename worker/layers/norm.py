"""RMSNorm, optionally fused with the residual add that precedes it (as in Llama's blocks). On the
CPU, contiguous rows go through one fused kernel (worker/kernels), which rounds where this code
rounds; elsewhere the torch ops below."""

from __future__ import annotations

import torch
from torch import nn

from worker import kernels


class RMSNorm(nn.Module):
    def __init__(self, size: int, eps: float = 1e-6):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(size), requires_grad=False)

    def _norm(self, x: torch.Tensor) -> torch.Tensor:
        # Computed in float32 whatever the activation dtype, as the reference implementations do.
        x32 = x.float()
        x32 = x32 * torch.rsqrt(x32.pow(2).mean(-1, keepdim=True) + self.eps)
        return self.weight * x32.to(x.dtype)

    def forward(
        self, x: torch.Tensor, residual: torch.Tensor | None = None
    ) -> tuple[torch.Tensor, torch.Tensor] | torch.Tensor:
        native = kernels.for_tensor(x)
        if native is not None and x.is_contiguous() and x.dtype == self.weight.dtype:
            if residual is None:
                return native.rms_norm(x, self.weight, self.eps)
            if residual.is_contiguous():
                native.add_rms_norm_(x, residual, self.weight, self.eps)  # both updated in place
                return x, residual
        if residual is None:
            return self._norm(x)
        summed = x + residual
        return self._norm(summed), summed
