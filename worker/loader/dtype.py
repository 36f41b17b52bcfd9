"""The dtype a worker computes in: `resolve_dtype("auto" | "bf16" | ..., device)`.

"auto" means bfloat16 where the device runs it fast (CUDA with native bf16, a CPU with
AVX512_BF16 or AMX), else float32: on CPUs without those instructions bf16 matmuls are emulated
and slower than fp32.
"""

from __future__ import annotations

from pathlib import Path

import torch

DTYPE_NAMES: dict[str, torch.dtype] = {
    "float32": torch.float32,
    "fp32": torch.float32,
    "bfloat16": torch.bfloat16,
    "bf16": torch.bfloat16,
    "float16": torch.float16,
    "fp16": torch.float16,
    "half": torch.float16,
}
AUTO = "auto"
_CPU_BF16_FLAGS = frozenset({"avx512_bf16", "amx_bf16"})


def resolve_dtype(name: str, device: torch.device | str) -> torch.dtype:
    key = name.strip().lower()
    if key == AUTO:
        return torch.bfloat16 if bf16_is_fast(torch.device(device)) else torch.float32
    if key not in DTYPE_NAMES:
        valid = ", ".join([AUTO, *DTYPE_NAMES])
        raise ValueError(f"unknown dtype {name!r}; valid names are {valid}")
    return DTYPE_NAMES[key]


def bf16_is_fast(device: torch.device) -> bool:
    if device.type == "cuda":
        with torch.cuda.device(device):
            return torch.cuda.is_bf16_supported(including_emulation=False)
    if device.type == "cpu":
        flags = cpu_flags()
        if flags is not None:
            return bool(flags & _CPU_BF16_FLAGS)
        # No /proc/cpuinfo (not Linux): ask torch's own CPU feature probe, where it has one.
        probe = getattr(torch.cpu, "_is_avx512_bf16_supported", None)
        return bool(probe()) if probe is not None else False
    return False


def cpu_flags(cpuinfo: Path = Path("/proc/cpuinfo")) -> set[str] | None:
    """The CPU feature flags Linux reports, or None where /proc/cpuinfo does not exist."""
    try:
        text = cpuinfo.read_text(encoding="utf-8", errors="replace")
    except OSError:
        return None
    for line in text.splitlines():
        key, _, value = line.partition(":")
        if key.strip() in ("flags", "Features"):
            return set(value.split())
    return set()
