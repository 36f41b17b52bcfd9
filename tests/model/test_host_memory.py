"""The KV cache's host memory (worker/engine/host_memory.py): zeroed tensors of the asked shapes
on 2 MB-aligned transparent huge pages, and plain torch.zeros when switched off."""

from __future__ import annotations

import re
from pathlib import Path

import pytest
import torch

from worker.engine import host_memory

THP = Path("/sys/kernel/mm/transparent_hugepage/enabled")
SHAPES = [(2, 3, 256, 16, 64), (2, 3, 256, 16, 64), (5, 7)]


def anon_huge_kb() -> int:
    rollup = Path("/proc/self/smaps_rollup").read_text()
    return int(re.search(r"AnonHugePages:\s+(\d+) kB", rollup).group(1))


def test_tensors_are_zeroed_separate_and_aligned():
    tensors = host_memory.zeros(SHAPES, torch.bfloat16)
    assert [tuple(t.shape) for t in tensors] == SHAPES
    assert all(t.dtype == torch.bfloat16 and t.is_contiguous() for t in tensors)
    assert all(not t.any() for t in tensors)
    if host_memory.huge_pages_enabled():
        assert all(t.data_ptr() % host_memory.HUGE_PAGE == 0 for t in tensors)
    tensors[0].fill_(1.5)  # writing one leaves the others as they were
    assert not tensors[1].any() and not tensors[2].any()
    assert tensors[0].float().sum().item() == 1.5 * tensors[0].numel()


def test_huge_pages_back_the_cache():
    if not (THP.exists() and "[never]" not in THP.read_text()):
        pytest.skip("this kernel has transparent huge pages off")
    before = anon_huge_kb()
    tensors = host_memory.zeros([(2, 3, 4096, 16, 64)], torch.bfloat16)  # 24 MiB
    assert anon_huge_kb() - before >= 16 * 1024  # most of it on 2 MB pages
    del tensors


def test_switched_off_gives_plain_zeros(monkeypatch):
    monkeypatch.setenv("SPINDLE_HUGE_PAGES", "0")
    tensors = host_memory.zeros(SHAPES, torch.float32)
    assert [tuple(t.shape) for t in tensors] == SHAPES and all(not t.any() for t in tensors)
