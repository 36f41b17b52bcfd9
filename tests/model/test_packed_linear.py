"""Packed linear weights (worker/layers/linear.py: spindle's kernels, else oneDNN): the packed
product equals the plain one, the runner packs every projection and the LM head on the CPU, frees
the plain copies it no longer needs, keeps a tied embedding, and leaves dtypes neither packs
alone."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from worker.engine.config import EngineConfig
from worker.engine.engine import LLMEngine
from worker.layers.activation import SiluAndMul
from worker.layers.embedding import ParallelLMHead
from worker.layers.linear import (
    ColumnParallelLinear,
    GateUpParallelLinear,
    PackableLinear,
    RowParallelLinear,
    onednn_can_pack,
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

    if not onednn_can_pack(layer.weight):  # bf16 on a CPU without AVX-512: nothing packs 80 x 96
        assert not layer.pack() and layer.packed_weight is None
        assert torch.equal(layer(x), expected)
        return
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


def bf16_kernels_here() -> list[str]:
    """The bf16 products this build and CPU run: "amx" (AMX tiles), "bf16" (AVX512_BF16 dot
    products, else AVX2 FMAs)."""
    from worker.kernels import native_module

    native = native_module()
    if native is None:
        return []
    kernels = {"amx": native.linear_amx_supported, "bf16": native.linear_bf16_supported}
    return [name for name, supported in kernels.items() if supported(32, 32)]


@pytest.fixture(
    params=[
        pytest.param(
            name,
            marks=pytest.mark.skipif(
                name not in bf16_kernels_here(), reason=f"this CPU (or build) has no {name} product"
            ),
        )
        for name in ("amx", "bf16")
    ]
)
def bf16_kernel(request, monkeypatch) -> str:
    """Each bf16 kernel this CPU has in turn; an AMX CPU also runs the vector one."""
    if request.param == "bf16":
        monkeypatch.setenv("SPINDLE_AMX_LINEAR", "0")
    return request.param


@pytest.mark.parametrize("rows", [0, 1, 7, 12, 13, 16, 17, 32, 33, 300])
@pytest.mark.parametrize("with_bias", [False, True])
def test_the_bf16_product_rounds_the_fp32_product_once(bf16_kernel, rows, with_bias):
    gen = torch.Generator().manual_seed(rows)
    layer = ColumnParallelLinear(96, 64, bias=with_bias).to(torch.bfloat16)
    layer.weight.copy_(torch.randn(64, 96, generator=gen) * 0.1)
    if with_bias:
        layer.bias.copy_(torch.randn(64, generator=gen))
    weight, bias = layer.weight.detach().clone(), layer.bias
    x = torch.randn(rows, 96, generator=gen).to(torch.bfloat16)

    assert layer.pack()
    assert layer.native is not None and layer.native.name == bf16_kernel
    assert layer.weight.numel() == 0
    got = layer(x)
    assert got.dtype == torch.bfloat16 and got.shape == (rows, 64)
    exact = F.linear(x.float(), weight.float(), None if bias is None else bias.float())
    # fp32 sums in another order, then one rounding to bf16: within one bf16 step of exact.
    torch.testing.assert_close(got.float(), exact, atol=1e-3, rtol=2**-7)
    torch.testing.assert_close(got, F.linear(x, weight, bias), atol=1e-2, rtol=2**-7)


def test_the_bf16_product_takes_any_leading_shape_and_strided_rows(bf16_kernel):
    gen = torch.Generator().manual_seed(0)
    layer = RowParallelLinear(64, 32).to(torch.bfloat16)
    layer.weight.copy_(torch.randn(32, 64, generator=gen))
    weight = layer.weight.detach().clone()
    wide = torch.randn(2, 5, 128, generator=gen).to(torch.bfloat16)
    x = wide[..., ::2]  # not contiguous
    assert layer.pack() and layer.native is not None and layer.native.name == bf16_kernel
    got = layer(x)
    assert got.shape == (2, 5, 32)
    torch.testing.assert_close(
        got.float(), F.linear(x.float(), weight.float()), atol=1e-3, rtol=2**-7
    )


def test_weights_off_the_32_grid_stay_with_onednn(bf16_kernel):
    odd = ColumnParallelLinear(96, 80).to(torch.bfloat16)
    # oneDNN multiplies bf16 only with AVX-512; elsewhere the weight stays plain (F.linear)
    assert odd.pack() == onednn_can_pack(odd.weight) and odd.native is None
    assert (odd.packed_weight is not None) == onednn_can_pack(odd.weight)
    odd = ColumnParallelLinear(96, 80)
    assert odd.pack() and odd.native is None and odd.packed_weight is not None


def f32_native():
    from worker.kernels import native_module

    native = native_module()
    return native if native is not None and native.linear_f32_supported(32, 32) else None


@pytest.mark.skipif(f32_native() is None, reason="no AVX-512 or AVX2 here: linear_f32 is not built")
@pytest.mark.parametrize("rows", [0, 1, 2, 3, 11, 12, 13, 32, 300])  # 3 x rows: every tile tail
@pytest.mark.parametrize("with_bias", [False, True])
def test_the_native_fp32_product_equals_the_exact_one(rows, with_bias):
    gen = torch.Generator().manual_seed(rows)
    layer = ColumnParallelLinear(80, 96, bias=with_bias)
    layer.weight.copy_(torch.randn(96, 80, generator=gen))
    if with_bias:
        layer.bias.copy_(torch.randn(96, generator=gen))
    weight, bias = layer.weight.detach().clone(), layer.bias
    x = torch.randn(3, rows, 80, generator=gen)

    assert layer.pack()
    assert layer.native is not None and layer.native.name == "f32"
    assert layer.weight.numel() == 0
    got = layer(x)
    assert got.dtype == torch.float32 and got.shape == (3, rows, 96)
    exact = F.linear(x.double(), weight.double(), None if bias is None else bias.double())
    torch.testing.assert_close(got.double(), exact, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("rows", [0, 1, 13, 17, 300])
def test_the_fused_gate_up_equals_product_then_activation(bf16_kernel, rows):
    """GateUpParallelLinear with a bf16 kernel: SiLU(gate) * up computed per output block equals
    the bf16 product followed by SiluAndMul, and its plain product undoes the interleaving."""
    gen = torch.Generator().manual_seed(rows)
    layer = GateUpParallelLinear(96, 64).to(torch.bfloat16)
    layer.weight.copy_(torch.randn(128, 96, generator=gen) * 0.2)
    plain = layer.weight.detach().clone()
    x = torch.randn(rows, 96, generator=gen).to(torch.bfloat16)
    expected_product = layer(x)  # unpacked: F.linear
    expected = SiluAndMul()(expected_product) if rows else expected_product[:, :64]

    assert layer.pack() and layer.fused and layer.weight.numel() == 0
    assert layer.native is not None and layer.native.name == bf16_kernel
    got = layer.silu_and_mul(x)
    assert got.dtype == torch.bfloat16 and got.shape == (rows, 64)
    torch.testing.assert_close(got, expected, atol=0.02, rtol=0.02)  # F.linear sums in its order
    reference = ColumnParallelLinear(96, 128).to(torch.bfloat16)
    reference.weight.copy_(plain)
    assert reference.pack() and reference.native is not None
    unfused = reference(x)  # the same product, unfused
    assert torch.equal(layer(x), unfused)
    assert torch.equal(got, SiluAndMul()(unfused) if rows else unfused[:, :64])


def test_gate_up_without_a_fusing_kernel_applies_the_activation_after(monkeypatch):
    monkeypatch.setenv("SPINDLE_NATIVE_LINEAR", "0")  # oneDNN's packing: no fused kernel
    gen = torch.Generator().manual_seed(3)
    layer = GateUpParallelLinear(96, 64)  # float32: oneDNN packs it on any CPU
    layer.weight.copy_(torch.randn(128, 96, generator=gen) * 0.2)
    x = torch.randn(5, 96, generator=gen)
    expected = SiluAndMul()(layer(x))
    assert layer.pack() and not layer.fused and layer.packed_weight is not None
    assert torch.equal(layer.silu_and_mul(x), expected)


@pytest.mark.skipif(f32_native() is None, reason="no AVX-512 or AVX2 here: linear_f32 is not built")
@pytest.mark.parametrize("rows", [0, 1, 7, 8, 9, 11, 12, 13, 300])
def test_the_fused_fp32_gate_up_equals_product_then_activation(rows):
    """In float32 the fused kernel's SiLU(gate) * up is bit for bit the native product followed by
    SiluAndMul (same sums, same SiLU), and its plain product undoes the interleaving."""
    gen = torch.Generator().manual_seed(rows)
    layer = GateUpParallelLinear(96, 64)
    layer.weight.copy_(torch.randn(128, 96, generator=gen) * 0.2)
    reference = ColumnParallelLinear(96, 128)
    reference.weight.copy_(layer.weight.detach())
    x = torch.randn(rows, 96, generator=gen)

    assert reference.pack() and reference.native is not None
    assert layer.pack() and layer.fused and layer.weight.numel() == 0
    assert layer.native is not None and layer.native.name == "f32"
    unfused = reference(x)
    got = layer.silu_and_mul(x)
    assert got.shape == (rows, 64)
    assert torch.equal(got, SiluAndMul()(unfused) if rows else unfused[:, :64])
    assert torch.equal(layer(x), unfused)
