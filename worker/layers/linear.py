"""Tensor-parallel linear layers. Each parameter carries its own `weight_loader(param, loaded,
shard_id)`, which reads this rank's slice of the checkpoint tensor — so the model loader is a loop
over checkpoint names and no rank materialises a full tensor it does not own.

Column-parallel layers split output features (no communication); row-parallel layers split input
features and all-reduce their output. `QKVParallelLinear` and `MergedColumnParallelLinear` fuse
several checkpoint tensors (q/k/v, gate/up) into one matmul.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import nn

from worker.layers.parallel import SINGLE, ParallelContext


def _parameter(*shape: int) -> nn.Parameter:
    return nn.Parameter(torch.empty(*shape), requires_grad=False)


def attach_loader(param: nn.Parameter, loader) -> None:
    """Give a parameter the function that copies its slice of a checkpoint tensor into it."""
    param.weight_loader = loader  # type: ignore[attr-defined]


def default_weight_loader(param: nn.Parameter, loaded, shard_id=None) -> None:
    tensor = loaded[:] if not isinstance(loaded, torch.Tensor) else loaded
    if tuple(tensor.shape) != tuple(param.shape):
        raise ValueError(
            f"checkpoint shape {tuple(tensor.shape)} != parameter {tuple(param.shape)}"
        )
    param.data.copy_(tensor)


class ColumnParallelLinear(nn.Module):
    """y = x Wᵀ + b with W's rows (output features) split across ranks."""

    def __init__(
        self,
        in_features: int,
        out_features: int,
        bias: bool = False,
        parallel: ParallelContext = SINGLE,
    ):
        super().__init__()
        self.parallel = parallel
        self.out_per_rank = parallel.split(out_features, "output features")
        self.weight = _parameter(self.out_per_rank, in_features)
        attach_loader(self.weight, self.weight_loader)
        self.bias = _parameter(self.out_per_rank) if bias else None
        if self.bias is not None:
            attach_loader(self.bias, self.weight_loader)

    def weight_loader(self, param: nn.Parameter, loaded, shard_id=None) -> None:
        start = self.parallel.rank * self.out_per_rank
        param.data.copy_(loaded[start : start + self.out_per_rank])

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.linear(x, self.weight, self.bias)


class MergedColumnParallelLinear(ColumnParallelLinear):
    """Several column-parallel outputs (e.g. gate_proj and up_proj) in one weight; checkpoint
    tensors arrive one by one with `shard_id` = their position in `output_sizes`."""

    def __init__(
        self,
        in_features: int,
        output_sizes: Sequence[int],
        bias: bool = False,
        parallel: ParallelContext = SINGLE,
    ):
        self.output_sizes = [parallel.split(size, "output features") for size in output_sizes]
        super().__init__(in_features, sum(output_sizes), bias, parallel)

    def weight_loader(self, param: nn.Parameter, loaded, shard_id=None) -> None:
        assert isinstance(shard_id, int)
        size = self.output_sizes[shard_id]
        offset = sum(self.output_sizes[:shard_id])
        start = self.parallel.rank * size
        param.data[offset : offset + size].copy_(loaded[start : start + size])


class QKVParallelLinear(ColumnParallelLinear):
    """q, k and v projections in one weight. Query heads split across ranks; KV heads split too,
    or — with more ranks than KV heads — each rank holds a replica of the one it needs."""

    def __init__(
        self,
        hidden_size: int,
        head_dim: int,
        num_heads: int,
        num_kv_heads: int,
        bias: bool = False,
        parallel: ParallelContext = SINGLE,
    ):
        world = parallel.world_size
        self.head_dim = head_dim
        self.num_heads = parallel.split(num_heads, "attention heads")
        if world >= num_kv_heads:
            if world % num_kv_heads:
                raise ValueError(
                    f"{num_kv_heads} KV heads cannot be shared evenly by {world} ranks"
                )
            self.num_kv_heads = 1
        else:
            self.num_kv_heads = parallel.split(num_kv_heads, "KV heads")
        self.total_kv_heads = num_kv_heads
        output = (self.num_heads + 2 * self.num_kv_heads) * head_dim * world
        super().__init__(hidden_size, output, bias, parallel)

    def weight_loader(self, param: nn.Parameter, loaded, shard_id=None) -> None:
        q_size = self.num_heads * self.head_dim
        kv_size = self.num_kv_heads * self.head_dim
        rank = self.parallel.rank
        if shard_id == "q":
            offset, size, start = 0, q_size, rank * q_size
        else:
            offset = q_size if shard_id == "k" else q_size + kv_size
            # With replicated KV heads, ranks world/kv apart share one head.
            replicas = max(1, self.parallel.world_size // self.total_kv_heads)
            size, start = kv_size, (rank // replicas) * kv_size
        param.data[offset : offset + size].copy_(loaded[start : start + size])


class RowParallelLinear(nn.Module):
    """y = x Wᵀ + b with W's columns (input features) split across ranks and the partial
    products all-reduced; the bias is added once, after the reduction."""

    def __init__(
        self,
        in_features: int,
        out_features: int,
        bias: bool = False,
        parallel: ParallelContext = SINGLE,
    ):
        super().__init__()
        self.parallel = parallel
        self.in_per_rank = parallel.split(in_features, "input features")
        self.weight = _parameter(out_features, self.in_per_rank)
        attach_loader(self.weight, self.weight_loader)
        self.bias = _parameter(out_features) if bias else None
        if self.bias is not None:
            attach_loader(self.bias, default_weight_loader)

    def weight_loader(self, param: nn.Parameter, loaded, shard_id=None) -> None:
        start = self.parallel.rank * self.in_per_rank
        param.data.copy_(loaded[:, start : start + self.in_per_rank])

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.parallel.all_reduce(F.linear(x, self.weight))
        return y + self.bias if self.bias is not None else y
