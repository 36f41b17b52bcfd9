"""Tensor-parallel linear layers. Each parameter carries its own `weight_loader(param, loaded,
shard_id)`, which reads this rank's slice of the checkpoint tensor — so the model loader is a loop
over checkpoint names and no rank materialises a full tensor it does not own.

Column-parallel layers split output features (no communication); row-parallel layers split input
features and all-reduce their output. `QKVParallelLinear` and `MergedColumnParallelLinear` fuse
several checkpoint tensors (q/k/v, gate/up) into one matmul; `GateUpParallelLinear` also owns
the SiLU-and-multiply that follows gate/up, fused into the product where a kernel allows.

On the CPU, `pack_linear_weights` reorders every weight once, after loading, into oneDNN's blocked
layout (the prepacking inductor's freezing pass and vLLM's CPU backend do): a plain `F.linear` in
bfloat16 or float32 reorders the weight on every call, which at decode batch sizes costs more than
the product (bench/engine_bench.py measures it). Where spindle's own kernels apply, the weight is
packed for them instead: bf16 on a CPU with AMX (dims multiples of 32; linear_amx.cpp streams the
weights at decode batch sizes 2-3x faster than oneDNN and matches it on prompts) or, without AMX,
with AVX512_BF16 dot products (linear_bf16.cpp, same layout; 1.2-1.7x oneDNN at 32 rows on Zen 5),
and float32 on one with AVX-512 (out dim a multiple of 32; linear_f32.cpp, 1.1-2.5x at decode sizes).
`SPINDLE_PACKED_LINEAR=0` keeps plain weights; `SPINDLE_NATIVE_LINEAR=0` (or
`SPINDLE_CPU_KERNELS=0`) keeps oneDNN's packing, to compare the two; `SPINDLE_AMX_LINEAR=0` takes
the AVX512_BF16 product on an AMX CPU.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Sequence
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from common.settings import env_switch
from worker.kernels import for_tensor
from worker.layers.activation import SiluAndMul
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


PACKABLE_DTYPES = (torch.bfloat16, torch.float32)


def packing_enabled() -> bool:
    return env_switch("SPINDLE_PACKED_LINEAR")


def packable(weight: torch.Tensor) -> bool:
    """Whether packing applies to `weight` at all: on, a CPU tensor, a dtype packing knows. Which
    packing (a spindle kernel's, oneDNN's, none) this CPU has is `native_linear`'s and
    `onednn_can_pack`'s to say."""
    return packing_enabled() and weight.device.type == "cpu" and weight.dtype in PACKABLE_DTYPES


def onednn_can_pack(weight: torch.Tensor) -> bool:
    """Whether oneDNN multiplies `weight`'s dtype here (bf16 needs AVX-512 at least)."""
    if not torch.backends.mkldnn.is_available():
        return False
    return weight.dtype != torch.bfloat16 or torch.ops.mkldnn._is_mkldnn_bf16_supported()


class NativeLinear:
    """One of spindle's own linear products (worker/kernels): its packing and its product."""

    def __init__(self, native: Any, name: str) -> None:
        self.name = name  # "amx" | "bf16" (bf16 on AMX tiles | vector units) | "f32" (float32)
        layout = "f32" if name == "f32" else "bf16"  # both bf16 products read one layout
        self.pack = getattr(native, f"pack_linear_{layout}")
        self.product = getattr(native, f"linear_{name}")
        # gate|up with the SiLU-and-multiply applied per output block (GateUpParallelLinear)
        self.pack_gated = getattr(native, f"pack_linear_{layout}_gated")
        self.silu_mul = getattr(native, f"linear_{name}_silu_mul")


def native_linear(weight: torch.Tensor) -> NativeLinear | None:
    """spindle's kernel for this CPU weight where one takes it, else None (oneDNN): bf16 on AMX
    tiles or, without AMX (or with `SPINDLE_AMX_LINEAR=0`), the vector product — AVX512_BF16 dot
    products, else AVX2 FMAs on widened weights (dims multiples of 32); float32 with AVX-512 or
    AVX2 FMAs (out dim a multiple of 32)."""
    if weight.dim() != 2 or weight.dtype not in PACKABLE_DTYPES:
        return None
    if not env_switch("SPINDLE_NATIVE_LINEAR"):
        return None
    native = for_tensor(weight)
    if native is None:
        return None
    if weight.dtype == torch.float32:
        return NativeLinear(native, "f32") if native.linear_f32_supported(*weight.shape) else None
    if env_switch("SPINDLE_AMX_LINEAR") and native.linear_amx_supported(*weight.shape):
        return NativeLinear(native, "amx")
    if native.linear_bf16_supported(*weight.shape):
        return NativeLinear(native, "bf16")
    return None


class PackableLinear(nn.Module):
    """A module whose `weight` [out, in] multiplies inputs, plain or — once `pack()` ran — from
    a packed copy that replaces it: oneDNN's layout, or one of spindle's kernels' (`native`)."""

    weight: nn.Parameter
    packed_weight: torch.Tensor | None = None
    native: NativeLinear | None = None  # set when packed_weight is in a spindle kernel's layout

    def pack(self, release: bool = True) -> bool:
        """Reorder the weight for spindle's kernel or oneDNN; with `release` the plain weight's
        memory is freed (the parameter becomes empty). False, and nothing changes, where packing
        does not apply."""
        if not packable(self.weight):
            return False
        weight = self.weight.detach()
        native = native_linear(weight)
        if native is not None:
            self.native = native
            self._hold_packed(native.pack(weight), release)
        elif onednn_can_pack(weight):
            self._hold_packed(torch.ops.mkldnn._reorder_linear_weight(weight, None), release)
        else:
            return False
        return True

    def _hold_packed(self, packed: torch.Tensor, release: bool) -> None:
        """Multiply from `packed` from now on; with `release` free the plain weight's memory."""
        self.packed_weight = packed
        if release:
            self.weight.data = self.weight.data.new_empty(0)

    def matmul(self, x: torch.Tensor, bias: torch.Tensor | None = None) -> torch.Tensor:
        if self.native is not None:
            return self.native.product(x, self.packed_weight, bias)
        if self.packed_weight is not None:
            return torch.ops.mkldnn._linear_pointwise(x, self.packed_weight, bias, "none", [], "")
        return F.linear(x, self.weight, bias)


def pack_linear_weights(model: nn.Module) -> int:
    """Pack every `PackableLinear` of `model` (see the module docstring); returns how many. A
    weight shared with another module (tied embeddings) is packed as a copy and kept."""
    uses = Counter(id(p) for _, p in model.named_parameters(remove_duplicate=False))
    packed = 0
    for module in model.modules():
        if isinstance(module, PackableLinear):
            packed += module.pack(release=uses[id(module.weight)] == 1)
    return packed


def weight_bytes(model: nn.Module) -> int:
    """Bytes of the model's parameters and packed weights (what it holds in memory)."""
    total = sum(p.numel() * p.element_size() for p in model.parameters())
    for module in model.modules():
        if isinstance(module, PackableLinear) and module.packed_weight is not None:
            total += module.packed_weight.numel() * module.packed_weight.element_size()
    return total


class ColumnParallelLinear(PackableLinear):
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
        return self.matmul(x, self.bias)


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


class GateUpParallelLinear(MergedColumnParallelLinear):
    """The gate|up projection of a SiLU-gated MLP together with its activation:
    `silu_and_mul(x)` = SiLU(x Gᵀ) * (x Uᵀ). Where a native kernel takes the weight (bf16 or fp32)
    it is packed with gate and up column blocks alternating and one kernel (`_silu_mul`) applies the
    activation to each output block while it is in registers: the [tokens, 2 x intermediate]
    product is never written, and a decode step makes one kernel call per layer fewer (measured
    at 32 rows, demo model: 165 -> 134 us per layer). Elsewhere the product, then SiluAndMul."""

    fused: bool = False  # packed for the native kernel's `_silu_mul`

    def __init__(
        self,
        in_features: int,
        intermediate_size: int,
        bias: bool = False,
        parallel: ParallelContext = SINGLE,
    ):
        super().__init__(in_features, [intermediate_size] * 2, bias, parallel)
        self.act_fn = SiluAndMul()

    def pack(self, release: bool = True) -> bool:
        native = native_linear(self.weight) if packable(self.weight) else None
        if native is None or self.bias is not None:
            return super().pack(release)
        if self.weight.shape[0] % 64:  # whole 32-column blocks of gate and of up
            return super().pack(release)
        self.native, self.fused = native, True
        self._hold_packed(native.pack_gated(self.weight.detach()), release)
        return True

    def silu_and_mul(self, x: torch.Tensor) -> torch.Tensor:
        if self.fused:
            assert self.native is not None
            return self.native.silu_mul(x, self.packed_weight)
        return self.act_fn(self(x))

    def matmul(self, x: torch.Tensor, bias: torch.Tensor | None = None) -> torch.Tensor:
        if not self.fused:
            return super().matmul(x, bias)
        # The plain product from the interleaved packing: undo the block order.
        assert self.native is not None
        y = self.native.product(x, self.packed_weight, bias)
        n = y.shape[-1]
        return y.view(*y.shape[:-1], n // 64, 2, 32).transpose(-3, -2).reshape(y.shape)


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


class RowParallelLinear(PackableLinear):
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
        y = self.parallel.all_reduce(self.matmul(x))
        return y + self.bias if self.bias is not None else y
