"""oneDNN-prepacked linear weights (worker/layers/linear.py): the packed product equals the plain
one, the runner packs every projection and the LM head on the CPU, frees the plain copies it no
longer needs, keeps a tied embedding, and leaves dtypes oneDNN cannot pack alone."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from worker.engine.config import EngineConfig
from worker.engine.engine import LLMEngine
from worker.layers.embedding import ParallelLMHead
from worker.layers.linear import (
    ColumnParallelLinear,
    PackableLinear,
    RowParallelLinear,
    weight_bytes,
)


@pytest.mark.parametrize("dtype,tolerance", [(torch.float32, 1e-5), (torch.bfloat16, 0.0)])
@pytest.mark.parametrize("layer_class", [ColumnParallelLinear, RowParallelLinear])
@pytest.mark.parametrize("rows", [0, 1, 7, 300])
def test_packed_product_equals_plain(dtype, tolerance, layer_class, rows):
    gen = torch.Generator().manual_seed(rows)
    layer = layer_class(96, 80, bias=True).to(dtype)
    layer.weight.copy_(torch.randn(80, 96, generator=gen) * 0.1)
    layer.bias.copy_(torch.randn(80, generator=gen))
    plain_weight = layer.weight.detach().clone()
    x = torch.randn(rows, 96, generator=gen).to(dtype)
    expected = layer(x)

    assert layer.pack()
    assert layer.weight.numel() == 0  # the packed copy replaced it
    got = layer(x)
    assert got.dtype == dtype and got.shape == (rows, 80)
    torch.testing.assert_close(got, expected, atol=tolerance, rtol=tolerance)
    torch.testing.assert_close(got, F.linear(x, plain_weight, layer.bias), atol=0.05, rtol=0.05)


def test_half_precision_and_the_switch_leave_weights_plain(monkeypatch):
    layer = ColumnParallelLinear(16, 8).to(torch.float16)
    assert not layer.pack()  # oneDNN packs fp16 only on CPUs with AVX512-FP16 / AVX-NE-CONVERT
    assert layer.packed_weight is None and layer.weight.shape == (8, 16)

    monkeypatch.setenv("SPINDLE_PACKED_LINEAR", "0")
    layer = ColumnParallelLinear(16, 8)
    assert not layer.pack()
    assert layer.packed_weight is None and layer.weight.shape == (8, 16)


@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
def test_the_runner_packs_every_projection_and_the_head(tiny_models, dtype):
    engine = LLMEngine(EngineConfig(model=str(tiny_models["llama"]), dtype=dtype))
    model = engine.runner.model
    linears = [m for m in model.modules() if isinstance(m, PackableLinear)]
    layers = engine.hf_config.num_hidden_layers
    assert len(linears) == 4 * layers + 1  # qkv, o, gate_up, down per layer; the LM head
    assert engine.runner.num_packed_weights == len(linears)
    assert all(m.packed_weight is not None for m in linears)
    assert all(m.weight.numel() == 0 for m in linears)  # untied: nothing keeps a plain copy
    # Packed weights replace plain ones: the runner holds what the checkpoint holds, once.
    assert weight_bytes(model) == checkpoint_elements(tiny_models["llama"]) * (
        2 if dtype == "bfloat16" else 4
    )


def checkpoint_elements(path) -> int:
    from safetensors.torch import load_file

    return sum(tensor.numel() for tensor in load_file(str(path / "model.safetensors")).values())


def test_a_tied_head_packs_a_copy_and_keeps_the_embedding(tmp_path):
    from tests.model.conftest import build_tiny_model

    path = build_tiny_model("llama", tmp_path / "tied", tie=True)
    engine = LLMEngine(EngineConfig(model=str(path), dtype="float32"))
    model = engine.runner.model
    head = next(m for m in model.modules() if isinstance(m, ParallelLMHead))
    embedding = model.model.embed_tokens  # type: ignore[attr-defined]
    assert head.weight is embedding.weight and head.packed_weight is not None
    assert embedding.weight.shape == (engine.hf_config.vocab_size, engine.hf_config.hidden_size)
    hidden = torch.randn(3, engine.hf_config.hidden_size)
    torch.testing.assert_close(
        head.compute_logits(hidden), F.linear(hidden, embedding.weight), atol=1e-5, rtol=1e-5
    )
