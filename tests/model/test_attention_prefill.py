"""Prompt-chunk attention over the paged KV cache: the native CPU kernel (one call for all of a
step's chunks) and the per-chunk SDPA path both equal causal softmax attention over each
sequence's context — chunks with and without earlier cached tokens, beside decodes in the same
step, for the head layouts models use."""

from __future__ import annotations

import types

import pytest
import torch

from worker.attention.base import StepBatch
from worker.attention.sdpa import SdpaBackend

BLOCK = SdpaBackend.block_size
# (tokens already cached, tokens computed this step); the first two are decodes.
SEQUENCES = [
    (40, 1),
    (16, 1),
    (0, 1),
    (0, 7),
    (0, 16),
    (0, 17),
    (16, 16),
    (33, 50),
    (0, 300),
    (600, 90),
]
LAYOUTS = [(9, 3, 64), (8, 2, 128), (4, 4, 64), (32, 1, 64), (6, 2, 48)]  # 48: SDPA path only


def random_step(heads, kv_heads, dim, dtype, seed=0):
    """A cache whose earlier tokens are random, this step's q/k/v, and each sequence's whole
    K/V (cached then new) for the reference."""
    gen = torch.Generator().manual_seed(seed)
    blocks = [-(-(cached + new) // BLOCK) for cached, new in SEQUENCES]
    order = torch.randperm(sum(blocks) + 2, generator=gen).tolist()
    cache = torch.randn(2, kv_heads, sum(blocks) + 2, BLOCK, dim, generator=gen).to(dtype)
    tokens = sum(new for _, new in SEQUENCES)
    q = torch.randn(tokens, heads, dim, generator=gen).to(dtype)
    k, v = (torch.randn(tokens, kv_heads, dim, generator=gen).to(dtype) for _ in range(2))
    tables, slots, whole_k, whole_v, row = [], [], [], [], 0
    for count, (cached, new) in zip(blocks, SEQUENCES, strict=True):
        table, order = order[:count], order[count:]
        tables.append(table)
        slots += [table[p // BLOCK] * BLOCK + p % BLOCK for p in range(cached, cached + new)]
        for whole, part, new_rows in ((whole_k, 0, k), (whole_v, 1, v)):
            earlier = cache[part][:, table].reshape(kv_heads, -1, dim)[:, :cached]
            whole.append(torch.cat([earlier, new_rows[row : row + new].transpose(0, 1)], dim=1))
        row += new
    batch = StepBatch(
        query_lens=[new for _, new in SEQUENCES],
        context_lens=[cached + new for cached, new in SEQUENCES],
        block_tables=tables,
        num_decodes=2,
        slot_mapping=torch.tensor(slots),
    )
    return q, k, v, cache, batch, whole_k, whole_v


def reference(q, whole_k, whole_v, scale):
    outputs, row = [], 0
    for (cached, new), keys, values in zip(SEQUENCES, whole_k, whole_v, strict=True):
        query = q[row : row + new].double().transpose(0, 1)  # [heads, new, dim]
        group = query.shape[0] // keys.shape[0]
        keys, values = (t.double().repeat_interleave(group, dim=0) for t in (keys, values))
        scores = query @ keys.transpose(1, 2) * scale
        positions = torch.arange(new)[:, None] + cached
        scores = scores.masked_fill(torch.arange(cached + new)[None, :] > positions, float("-inf"))
        outputs.append((torch.softmax(scores, dim=-1) @ values).transpose(0, 1))
        row += new
    return torch.cat(outputs)


@pytest.mark.parametrize("heads,kv_heads,dim", LAYOUTS)
@pytest.mark.parametrize("dtype,tolerance", [(torch.float32, 1e-5), (torch.bfloat16, 2e-2)])
@pytest.mark.parametrize("path", ["kernel", "sdpa"])
def test_prompt_chunks_equal_causal_softmax_attention(
    heads, kv_heads, dim, dtype, tolerance, path, monkeypatch
):
    backend = SdpaBackend(torch.device("cpu"))
    assert backend.native is not None, "the CPU kernels did not build on this machine"
    calls = []
    if path == "sdpa":
        backend.native = None
    else:
        native = backend.native
        spy = types.SimpleNamespace(
            paged_prefill_supports=native.paged_prefill_supports,
            paged_prefill_=lambda *args: calls.append(1) or native.paged_prefill_(*args),
            write_kv_cache_=native.write_kv_cache_,  # the kernel path writes the cache natively
            paged_decode_supports=native.paged_decode_supports,  # the step's decodes
            paged_decode=native.paged_decode,
        )
        monkeypatch.setattr(backend, "native", spy)
    q, k, v, cache, batch, whole_k, whole_v = random_step(heads, kv_heads, dim, dtype)
    # The layer hands over q as a strided view of its fused qkv projection.
    qkv = torch.cat([q.flatten(1), k.flatten(1), v.flatten(1)], dim=1)
    q_view = qkv[:, : heads * dim].view(-1, heads, dim)
    scale = dim**-0.5
    out = backend.forward(q_view, k, v, cache, backend.build_metadata(batch), scale)

    assert out.shape == q.shape and out.dtype == dtype
    expected = reference(q, whole_k, whole_v, scale)
    assert torch.allclose(out.double(), expected, atol=tolerance, rtol=tolerance)
    assert calls == ([1] if path == "kernel" and dim != 48 else [])
