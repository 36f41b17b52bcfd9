"""The decoder stack in one native call on the CPU (worker/kernels/csrc/decoder.cpp): for the
Llama family (Llama, Mistral, SmolLM2, Qwen2, Qwen3) with spindle's kernels behind every layer,
a step's layers run in C++ — the same kernels, in the same order, on the same tensors as the
modules' `forward`, so the outputs are identical — without ~100 us of Python per layer between
them. Qwen3's per-head q/k norms run as RMSNorm runs them (the fused kernel on a contiguous view,
torch's ops otherwise).

Measured on a 2-core Zen 4, SmolLM2-135M, a 32-row decode step spent ~3 ms of its 41 (bf16) or 76
(fp32) ms in the modules' Python. `build` returns None wherever any part would take a torch path
instead (no kernels, a linear oneDNN packs, tensor parallelism, a head size the attention kernels
do not handle); `handles` turns down steps whose prompt chunks the native prefill kernel does
not take. `SPINDLE_NATIVE_DECODER=0` keeps the modules' Python, to compare.
"""

from __future__ import annotations

from typing import Any

import torch

from common.settings import env_switch
from worker.attention.base import AttentionMetadata, SampledRows
from worker.attention.sdpa import SdpaBackend, SdpaMetadata
from worker.layers.linear import PackableLinear


class NativeDecoder:
    """A model's decoder layers as one `spindle_cpu_kernels.NativeDecoder`."""

    def __init__(self, model: Any, native_stack: Any) -> None:
        self.embed_tokens = model.model.embed_tokens
        self.stack = native_stack

    @staticmethod
    def build(model: Any, backend: Any) -> NativeDecoder | None:
        if not env_switch("SPINDLE_NATIVE_DECODER"):
            return None
        if not isinstance(backend, SdpaBackend) or backend.native is None:
            return None
        inner: Any = getattr(model, "model", None)
        layers = list(getattr(inner, "layers", []))
        if not layers or not all(_layer_qualifies(layer) for layer in layers):
            return None
        if inner.embed_tokens.parallel.world_size != 1 or inner.norm.eps != _eps(layers[0]):
            return None
        attention = layers[0].self_attn
        head_dim = attention.head_dim
        group = attention.attn.num_heads // attention.attn.num_kv_heads
        native = backend.native
        if not (
            native.paged_decode_supports(head_dim)
            and native.paged_prefill_supports(head_dim, group)
        ):
            return None
        stack = native.NativeDecoder(
            attention.attn.num_heads,
            attention.attn.num_kv_heads,
            head_dim,
            _eps(layers[0]),
            attention.attn.scale,
            inner.norm.weight,
        )
        for layer in layers:
            attn, mlp = layer.self_attn, layer.mlp
            stack.add_layer(
                layer.input_layernorm.weight,
                layer.post_attention_layernorm.weight,
                *_linear(attn.qkv_proj),
                *_linear(attn.o_proj),
                mlp.gate_up_proj.packed_weight,
                mlp.gate_up_proj.native.name,
                *_linear(mlp.down_proj),
                attn.attn.kv_cache,
                attn.rotary_emb.cos_cache,
                attn.rotary_emb.sin_cache,
                attn.q_norm.weight if attn.q_norm is not None else None,
                attn.k_norm.weight if attn.k_norm is not None else None,
            )
        return NativeDecoder(model, stack)

    def handles(self, meta: AttentionMetadata) -> bool:
        """Whether the native stack runs this step: decodes, and prompt chunks where the native
        prefill kernel takes them (the backend built their tables)."""
        return isinstance(meta, SdpaMetadata) and (
            len(meta.prefills) == 0 or meta.prefill_tables is not None
        )

    def __call__(
        self,
        input_ids: torch.Tensor,
        positions: torch.Tensor,
        meta: AttentionMetadata,
        sampled: SampledRows | None = None,
    ) -> torch.Tensor:
        """As the model's forward: every row's final hidden state, or the `sampled` rows'."""
        assert isinstance(meta, SdpaMetadata)
        tables = meta.prefill_tables
        rows: tuple[torch.Tensor | None, ...] = (None, None, None)
        if sampled is not None:
            decode = sampled.meta
            assert decode is None or isinstance(decode, SdpaMetadata)
            rows = (
                sampled.rows,
                decode.decode_block_tables if decode else None,
                decode.decode_context_lens if decode else None,
            )
        return self.stack.forward(
            self.embed_tokens(input_ids),
            positions,
            meta.slot_mapping,
            meta.num_decodes,
            meta.decode_block_tables,
            meta.decode_context_lens,
            tables.block_tables if tables else None,
            tables.starts if tables else None,
            tables.query_lens if tables else None,
            tables.context_lens if tables else None,
            *rows,
        )


def _linear(module: PackableLinear) -> tuple[torch.Tensor, str, torch.Tensor | None]:
    assert module.native is not None and module.packed_weight is not None
    return module.packed_weight, module.native.name, getattr(module, "bias", None)


def _eps(layer: Any) -> float:
    return layer.input_layernorm.eps


def _layer_qualifies(layer: Any) -> bool:
    """A Llama-style block whose every part has a native kernel."""
    attn, mlp = getattr(layer, "self_attn", None), getattr(layer, "mlp", None)
    if attn is None or mlp is None:
        return False
    head_norms = [n for n in (attn.q_norm, attn.k_norm) if n is not None]
    norms = [layer.post_attention_layernorm, *head_norms]
    if len(head_norms) not in (0, 2) or any(n.eps != _eps(layer) for n in norms):
        return False  # the stack takes one eps for every norm
    linears = (attn.qkv_proj, attn.o_proj, mlp.gate_up_proj, mlp.down_proj)
    if not all(isinstance(m, PackableLinear) and m.native is not None for m in linears):
        return False
    if not getattr(mlp.gate_up_proj, "fused", False):
        return False
    if any(m.parallel.world_size != 1 for m in linears):
        return False
    dtype = attn.attn.kv_cache.dtype
    weights = (layer.input_layernorm.weight, layer.post_attention_layernorm.weight)
    return all(w.dtype == dtype for w in weights) and attn.attn.kv_cache.dim() == 5
