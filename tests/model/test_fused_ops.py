"""The fused CPU element-wise kernels (worker/kernels) against the eager torch code the layers run
without them: RMSNorm with and without the residual add, rotary embedding, SiLU-and-multiply."""

from __future__ import annotations

import types

import pytest
import torch

from worker import kernels
from worker.layers.activation import SiluAndMul
from worker.layers.norm import RMSNorm
from worker.layers.rotary import RotaryEmbedding

DTYPES = [(torch.float32, 1e-5), (torch.bfloat16, 1e-2)]


@pytest.fixture
def eager(monkeypatch):
    """Run a layer on its torch path (as on a GPU or without the kernels)."""

    def use_torch():
        monkeypatch.setattr(kernels, "for_tensor", lambda tensor: None)

    return use_torch


def close(fused, reference, tolerance):
    assert fused.dtype == reference.dtype and fused.shape == reference.shape
    return torch.allclose(fused.float(), reference.float(), atol=tolerance, rtol=tolerance)


# Row sizes: whole 16-lane vectors (the demo model's), and one with a scalar tail.
@pytest.mark.parametrize("size", [576, 100])
@pytest.mark.parametrize("dtype,tolerance", DTYPES)
def test_rms_norm_with_and_without_residual(dtype, tolerance, size, eager, monkeypatch):
    assert kernels.native_module() is not None, "the CPU kernels did not build here"
    gen = torch.Generator().manual_seed(0)
    norm = RMSNorm(size, 1e-5).to(dtype)
    norm.weight.copy_(torch.rand(size, generator=gen) + 0.5)
    x = (torch.randn(37, size, generator=gen) * 3).to(dtype)
    residual = torch.randn(37, size, generator=gen).to(dtype)

    fused_alone = norm(x.clone())
    fused_x, fused_residual = norm(x.clone(), residual.clone())
    eager()
    assert close(fused_alone, norm(x.clone()), tolerance)
    reference_x, reference_residual = norm(x.clone(), residual.clone())
    assert torch.equal(fused_residual, reference_residual)  # one rounding of one addition
    assert close(fused_x, reference_x, tolerance)


@pytest.mark.parametrize("dtype,tolerance", DTYPES)
def test_rotary_in_place_equals_eager(dtype, tolerance, eager):
    config = types.SimpleNamespace(rope_parameters={"rope_type": "default", "rope_theta": 10000.0})
    rotary = RotaryEmbedding(config, head_dim=64, max_positions=2048)
    gen = torch.Generator().manual_seed(1)
    qkv = torch.randn(29, (9 + 3 + 3) * 64, generator=gen).to(dtype)
    positions = torch.randint(0, 2048, (29,), generator=gen)

    def rotate():
        q, k, _ = qkv.clone().split([9 * 64, 3 * 64, 3 * 64], dim=-1)  # strided views, as models
        return rotary(positions, q.reshape(29, 9, 64), k.reshape(29, 3, 64))

    fused_q, fused_k = rotate()
    eager()
    reference_q, reference_k = rotate()
    assert close(fused_q, reference_q, tolerance) and close(fused_k, reference_k, tolerance)


@pytest.mark.parametrize("size", [1536, 1000])
@pytest.mark.parametrize("dtype,tolerance", DTYPES)
def test_silu_and_mul_equals_eager(dtype, tolerance, size, eager):
    gen = torch.Generator().manual_seed(2)
    gate_up = (torch.randn(23, 2 * size, generator=gen) * 6).to(dtype)
    gate_up[0, :4] = torch.tensor([-200.0, -90.0, 90.0, 0.0])  # saturated and zero gates
    fused = SiluAndMul()(gate_up)
    eager()
    assert close(fused, SiluAndMul()(gate_up), tolerance)
