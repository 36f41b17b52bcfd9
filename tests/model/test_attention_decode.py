"""Decode attention over the paged KV cache: the native CPU kernel and the pure-torch matmul path
both equal plain softmax attention over each sequence's own context, for the head layouts and
dtypes models use (MHA, GQA, MQA; head sizes the kernel specialises, 64 and 128, and ones it
leaves to the matmul path)."""

from __future__ import annotations

import pytest
import torch

from worker import kernels
from worker.attention.base import StepBatch
from worker.attention.sdpa import SdpaBackend

BLOCK = SdpaBackend.block_size


def reference(q, k_seqs, v_seqs, scale):
    """q [seqs, heads, dim]; k/v per sequence [kv_heads, len, dim], in float64."""
    outputs = []
    for query, keys, values in zip(q.double(), k_seqs, v_seqs, strict=True):
        group = query.shape[0] // keys.shape[0]
        keys, values = (t.double().repeat_interleave(group, dim=0) for t in (keys, values))
        probs = torch.softmax(torch.einsum("hd,hld->hl", query, keys) * scale, dim=-1)
        outputs.append(torch.einsum("hl,hld->hd", probs, values))
    return torch.stack(outputs)


def random_step(lengths, heads, kv_heads, dim, dtype, seed=0):
    """A cache with each sequence's blocks scattered in shuffled order, and the step batch."""
    gen = torch.Generator().manual_seed(seed)
    blocks_per_seq = [-(-n // BLOCK) for n in lengths]
    num_blocks = sum(blocks_per_seq) + 3
    order = torch.randperm(num_blocks, generator=gen).tolist()
    cache = torch.randn(2, kv_heads, num_blocks, BLOCK, dim, generator=gen).to(dtype)
    tables, k_seqs, v_seqs = [], [], []
    for count, length in zip(blocks_per_seq, lengths, strict=True):
        table, order = order[:count], order[count:]
        tables.append(table)
        k_seqs.append(cache[0][:, table].reshape(kv_heads, -1, dim)[:, :length])
        v_seqs.append(cache[1][:, table].reshape(kv_heads, -1, dim)[:, :length])
    q = torch.randn(len(lengths), heads, dim, generator=gen).to(dtype)
    batch = StepBatch(
        query_lens=[1] * len(lengths),
        context_lens=list(lengths),
        block_tables=tables,
        num_decodes=len(lengths),
        slot_mapping=torch.zeros(0, dtype=torch.long),
    )
    return q, cache, batch, k_seqs, v_seqs


def decode_with(backend: SdpaBackend, q, cache, batch, scale):
    meta = backend.build_metadata(batch)
    return backend._decode(q, cache, meta, scale)


LAYOUTS = [(9, 3, 64), (4, 4, 32), (8, 1, 128), (20, 2, 64), (6, 2, 48)]  # (heads, kv_heads, dim)
LENGTHS = [1, 15, 16, 17, 100, 333]


@pytest.mark.parametrize("heads,kv_heads,dim", LAYOUTS)
@pytest.mark.parametrize("dtype,tolerance", [(torch.float32, 1e-5), (torch.bfloat16, 2e-2)])
@pytest.mark.parametrize("path", ["kernel", "matmul"])
def test_decode_equals_softmax_attention(heads, kv_heads, dim, dtype, tolerance, path):
    backend = SdpaBackend(torch.device("cpu"))
    if path == "kernel":
        assert backend.native is not None, "the CPU kernel did not build on this machine"
        # The kernel is specialised for the common head sizes; others take the matmul path.
        assert backend.native.paged_decode_supports(dim) == (dim in (64, 128))
    else:
        backend.native = None
    q, cache, batch, k_seqs, v_seqs = random_step(LENGTHS, heads, kv_heads, dim, dtype)
    scale = dim**-0.5
    out = decode_with(backend, q, cache, batch, scale)
    assert out.shape == (len(LENGTHS), heads, dim) and out.dtype == dtype
    expected = reference(q, k_seqs, v_seqs, scale)
    assert torch.allclose(out.double(), expected, atol=tolerance, rtol=tolerance)


def test_kernel_switch_off_falls_back(monkeypatch):
    monkeypatch.setenv("SPINDLE_CPU_KERNELS", "0")
    kernels.native_module.cache_clear()
    try:
        assert SdpaBackend(torch.device("cpu")).native is None
    finally:
        monkeypatch.delenv("SPINDLE_CPU_KERNELS")
        kernels.native_module.cache_clear()
    assert SdpaBackend(torch.device("cpu")).native is not None


@pytest.mark.parametrize("dtype,tolerance", [(torch.float32, 1e-5), (torch.bfloat16, 2e-2)])
def test_kernel_reads_queries_in_place_from_the_fused_qkv_rows(dtype, tolerance):
    """The model hands q as a view into each token's q|k|v row (rows strided, heads packed);
    the kernel reads it there and its output is contiguous."""
    heads, kv_heads, dim = 9, 3, 64
    q, cache, batch, k_seqs, v_seqs = random_step(LENGTHS, heads, kv_heads, dim, dtype, seed=3)
    qkv = torch.zeros(len(LENGTHS), (heads + 2 * kv_heads) * dim, dtype=dtype)
    qkv[:, : heads * dim] = q.reshape(len(LENGTHS), -1)
    q_view = qkv[:, : heads * dim].view(len(LENGTHS), heads, dim)
    assert not q_view.is_contiguous()
    backend = SdpaBackend(torch.device("cpu"))
    assert backend.native is not None
    out = decode_with(backend, q_view, cache, batch, dim**-0.5)
    assert out.is_contiguous()
    expected = reference(q, k_seqs, v_seqs, dim**-0.5)
    assert torch.allclose(out.double(), expected, atol=tolerance, rtol=tolerance)
