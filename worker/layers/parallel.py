"""Tensor-parallel context: which rank this process is and how its group talks.

Passed explicitly to every layer that splits its weights (no module globals). With world size 1
(the default) every collective is a no-op, so models are tensor-parallel-aware from the start.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
import torch.distributed as dist


@dataclass(frozen=True)
class ParallelContext:
    rank: int = 0
    world_size: int = 1
    group: Any = None  # torch.distributed process group; None = the default group

    def split(self, size: int, what: str) -> int:
        """This rank's share of `size` (heads, columns...); refuses uneven splits."""
        if size % self.world_size:
            raise ValueError(
                f"{what} = {size} cannot be split over {self.world_size} tensor-parallel ranks"
            )
        return size // self.world_size

    def all_reduce(self, tensor: torch.Tensor) -> torch.Tensor:
        if self.world_size > 1:
            dist.all_reduce(tensor, group=self.group)
        return tensor

    def all_gather_last_dim(self, tensor: torch.Tensor) -> torch.Tensor:
        if self.world_size == 1:
            return tensor
        parts = [torch.empty_like(tensor) for _ in range(self.world_size)]
        dist.all_gather(parts, tensor.contiguous(), group=self.group)
        return torch.cat(parts, dim=-1)


SINGLE = ParallelContext()
