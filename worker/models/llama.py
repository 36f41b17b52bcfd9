"""The Llama family (Llama 2/3, Mistral, SmolLM2): pre-norm decoder blocks of grouped-query
attention with rotary positions and a SiLU-gated MLP. Qwen2/Qwen3 reuse it with q/k/v biases or
q/k norms (models/qwen.py). Parameter names follow the Hugging Face checkpoints; q/k/v and
gate/up are fused into one matmul each (`packed_modules` maps checkpoint names to them).
"""

from __future__ import annotations

import torch
from torch import nn

from worker.attention.base import AttentionMetadata, SampledRows
from worker.layers.attention import Attention
from worker.layers.embedding import ParallelLMHead, VocabParallelEmbedding
from worker.layers.linear import GateUpParallelLinear, QKVParallelLinear, RowParallelLinear
from worker.layers.norm import RMSNorm
from worker.layers.parallel import SINGLE, ParallelContext
from worker.layers.rotary import RotaryEmbedding


class LlamaAttention(nn.Module):
    def __init__(
        self,
        config,
        parallel: ParallelContext,
        max_positions: int,
        qkv_bias: bool,
        o_bias: bool,
        qk_norm: bool,
    ):
        super().__init__()
        heads, kv_heads = config.num_attention_heads, config.num_key_value_heads
        head_dim = getattr(config, "head_dim", None) or config.hidden_size // heads
        self.qkv_proj = QKVParallelLinear(
            config.hidden_size, head_dim, heads, kv_heads, qkv_bias, parallel
        )
        self.o_proj = RowParallelLinear(heads * head_dim, config.hidden_size, o_bias, parallel)
        self.q_size = self.qkv_proj.num_heads * head_dim
        self.kv_size = self.qkv_proj.num_kv_heads * head_dim
        self.head_dim = head_dim
        self.q_norm = RMSNorm(head_dim, config.rms_norm_eps) if qk_norm else None
        self.k_norm = RMSNorm(head_dim, config.rms_norm_eps) if qk_norm else None
        self.rotary_emb = RotaryEmbedding(config, head_dim, max_positions)
        self.attn = Attention(
            self.qkv_proj.num_heads, self.qkv_proj.num_kv_heads, head_dim, head_dim**-0.5
        )

    def forward(
        self,
        positions: torch.Tensor,
        hidden: torch.Tensor,
        attn_meta: AttentionMetadata,
        sampled: SampledRows | None = None,
    ) -> torch.Tensor:
        """Every row's attention output; with `sampled`, every row's K/V is stored but only the
        sampled rows attend (the last layer: see SampledRows)."""
        q, k, v = self.qkv_proj(hidden).split([self.q_size, self.kv_size, self.kv_size], dim=-1)
        q = q.reshape(-1, self.q_size // self.head_dim, self.head_dim)
        k = k.reshape(-1, self.kv_size // self.head_dim, self.head_dim)
        if self.q_norm is not None and self.k_norm is not None:
            q, k = self.q_norm(q), self.k_norm(k)
        q, k = self.rotary_emb(positions, q, k)
        if sampled is not None:
            self.attn.write_cache(k, v, attn_meta)
            if sampled.meta is None:  # no row samples
                return hidden.new_empty((0, hidden.shape[-1]))
            q, k, v = q[sampled.rows], k[sampled.rows], v[sampled.rows]
            attn_meta = sampled.meta
        return self.o_proj(self.attn(q, k, v, attn_meta))


class LlamaMLP(nn.Module):
    def __init__(self, config, parallel: ParallelContext, bias: bool = False):
        super().__init__()
        size = config.intermediate_size
        self.gate_up_proj = GateUpParallelLinear(config.hidden_size, size, bias, parallel)
        self.down_proj = RowParallelLinear(size, config.hidden_size, bias, parallel)

    def forward(self, hidden: torch.Tensor) -> torch.Tensor:
        return self.down_proj(self.gate_up_proj.silu_and_mul(hidden))


class LlamaDecoderLayer(nn.Module):
    def __init__(self, config, parallel: ParallelContext, max_positions: int, options: dict):
        super().__init__()
        self.self_attn = LlamaAttention(config, parallel, max_positions, **options)
        self.mlp = LlamaMLP(config, parallel, getattr(config, "mlp_bias", False))
        self.input_layernorm = RMSNorm(config.hidden_size, config.rms_norm_eps)
        self.post_attention_layernorm = RMSNorm(config.hidden_size, config.rms_norm_eps)

    def forward(self, positions, hidden, residual, attn_meta, sampled=None):
        """(MLP output, residual) of every row, or of the `sampled` rows only."""
        if residual is None:
            hidden, residual = self.input_layernorm(hidden), hidden
        else:
            hidden, residual = self.input_layernorm(hidden, residual)
        hidden = self.self_attn(positions, hidden, attn_meta, sampled)
        if sampled is not None:
            residual = residual[sampled.rows]
            if sampled.meta is None:
                return hidden, residual
        hidden, residual = self.post_attention_layernorm(hidden, residual)
        return self.mlp(hidden), residual


class LlamaModel(nn.Module):
    def __init__(self, config, parallel: ParallelContext, max_positions: int, options: dict):
        super().__init__()
        self.embed_tokens = VocabParallelEmbedding(config.vocab_size, config.hidden_size, parallel)
        self.layers = nn.ModuleList(
            LlamaDecoderLayer(config, parallel, max_positions, options)
            for _ in range(config.num_hidden_layers)
        )
        self.norm = RMSNorm(config.hidden_size, config.rms_norm_eps)

    def forward(self, input_ids, positions, attn_meta, sampled=None):
        hidden, residual = self.embed_tokens(input_ids), None
        last = len(self.layers) - 1
        for i, layer in enumerate(self.layers):
            rows = sampled if i == last else None
            hidden, residual = layer(positions, hidden, residual, attn_meta, rows)
        if hidden.shape[0] == 0:
            return hidden
        hidden, _ = self.norm(hidden, residual)
        return hidden


class LlamaForCausalLM(nn.Module):
    packed_modules = {
        "q_proj": ("qkv_proj", "q"),
        "k_proj": ("qkv_proj", "k"),
        "v_proj": ("qkv_proj", "v"),
        "gate_proj": ("gate_up_proj", 0),
        "up_proj": ("gate_up_proj", 1),
    }
    ignored_weights = ("rotary_emb.inv_freq",)

    def __init__(self, config, parallel: ParallelContext = SINGLE, max_positions: int = 4096):
        super().__init__()
        self.config = config
        self.model = LlamaModel(config, parallel, max_positions, self.attention_options(config))
        self.lm_head = ParallelLMHead(config.vocab_size, config.hidden_size, parallel)
        if getattr(config, "tie_word_embeddings", False):
            self.lm_head.weight = self.model.embed_tokens.weight

    @classmethod
    def attention_options(cls, config) -> dict:
        bias = bool(getattr(config, "attention_bias", False))
        return {"qkv_bias": bias, "o_bias": bias, "qk_norm": False}

    def forward(
        self,
        input_ids: torch.Tensor,
        positions: torch.Tensor,
        attn_meta: AttentionMetadata,
        sampled: SampledRows | None = None,
    ) -> torch.Tensor:
        """Final-normed hidden states of every token, or with `sampled` of those rows only."""
        return self.model(input_ids, positions, attn_meta, sampled)

    def compute_logits(self, hidden: torch.Tensor) -> torch.Tensor:
        return self.lm_head.compute_logits(hidden)
