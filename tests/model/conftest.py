"""Tiny random models of each supported architecture, built with transformers (fixed seed) and
saved with a small byte-level BPE tokenizer to a temporary folder — the reference for every
engine output is transformers itself on the same weights."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

VOCAB = 384
CORPUS = [
    "The quick brown fox jumps over the lazy dog. " * 3,
    "Paged attention keeps the KV cache in fixed-size blocks. ",
    "Continuous batching lets requests join and leave at every step. ",
    "Ünïcödé, naïve café, 東京, Привет мир, 🙂 emoji and more. ",
    "def add(a, b):\n    return a + b\n",
]

ARCHITECTURES = {
    "llama": dict(arch="LlamaForCausalLM", num_attention_heads=4, num_key_value_heads=2),
    "qwen2": dict(arch="Qwen2ForCausalLM", num_attention_heads=4, num_key_value_heads=2),
    "qwen3": dict(
        arch="Qwen3ForCausalLM", num_attention_heads=4, num_key_value_heads=2, head_dim=32
    ),
    # 64-wide heads, which spindle's native attention kernels take (the others' are 32 wide)
    "qwen2-head64": dict(arch="Qwen2ForCausalLM", num_attention_heads=2, num_key_value_heads=1),
    "qwen3-head64": dict(
        arch="Qwen3ForCausalLM", num_attention_heads=2, num_key_value_heads=1, head_dim=64
    ),
}


def build_tokenizer(path: Path) -> None:
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    tokenizer = Tokenizer(models.BPE())
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tokenizer.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=VOCAB - 8,
        special_tokens=["<|endoftext|>", "<|im_start|>", "<|im_end|>"],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
    )
    tokenizer.train_from_iterator(CORPUS * 4, trainer)
    tokenizer.save(str(path / "tokenizer.json"))
    (path / "tokenizer_config.json").write_text(
        json.dumps(
            {
                "eos_token": "<|im_end|>",
                "bos_token": None,
                "model_max_length": 1024,
            }
        )
    )


def build_tiny_model(name: str, path: Path, *, seed: int = 0, tie: bool = False) -> Path:
    """A random model whose logits are well separated (large init), so greedy decoding has no
    near-ties for float rounding to flip."""
    from transformers import AutoConfig, AutoModelForCausalLM

    spec = dict(ARCHITECTURES[name])
    arch = spec.pop("arch")
    model_type = {
        "LlamaForCausalLM": "llama",
        "Qwen2ForCausalLM": "qwen2",
        "Qwen3ForCausalLM": "qwen3",
    }[arch]
    config = AutoConfig.for_model(
        model_type,
        vocab_size=VOCAB,
        hidden_size=128,
        intermediate_size=256,
        num_hidden_layers=3,
        max_position_embeddings=1024,
        rms_norm_eps=1e-6,
        tie_word_embeddings=tie,
        initializer_range=0.3,
        eos_token_id=2,
        bos_token_id=None,
        architectures=[arch],
        **spec,
    )
    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    path.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(path)
    build_tokenizer(path)
    return path


@pytest.fixture(scope="session")
def tiny_models(tmp_path_factory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("tiny-models")
    return {name: build_tiny_model(name, root / name) for name in ARCHITECTURES}
