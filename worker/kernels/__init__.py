"""Native CPU kernels, built from `csrc/` on first use with torch's JIT extension builder (g++,
ninja) and cached under torch's extensions folder (`TORCH_EXTENSIONS_DIR`, default
~/.cache/torch_extensions), so only the first process on a machine pays the ~1-2 min build;
`scripts/bootstrap` builds them ahead (`python -m worker.kernels`).

`linear_amx` (bf16 on AMX tiles), `linear_bf16` (bf16 with AVX512_BF16 dot products, else AVX2
FMAs) and `linear_f32` (AVX-512 or AVX2 FMAs) are the linear layers' products
(worker/layers/linear.py packs their weights);
`paged_decode` is decode attention and `paged_prefill_` causal attention of prompt chunks, both
read in place from the paged KV cache; `write_kv_cache_` stores a step's K/V rows in it;
`argmax_rows` is greedy sampling's argmax; `rms_norm`, `add_rms_norm_`, `rotary_` and
`silu_and_mul` fuse the element-wise layers (worker/layers); `NativeDecoder` runs a
Llama-family decoder stack through them layer by layer (worker/engine/native_decoder.py). Without a compiler the build fails
once, a warning says why, and callers fall back to their pure-torch path; `SPINDLE_CPU_KERNELS=0`
turns the kernels off on purpose (e.g. to compare the two paths).

`use_threads(n)` gives a CPU model its threads: the kernels run on their own pool (csrc/pool.h:
no barrier waits on a thread another process took the core from, the linears' items computed
again by the caller when a thread is late) and torch's ops on one thread; `SPINDLE_CPU_POOL=0`
keeps everything on torch's OpenMP threads instead.
"""

from __future__ import annotations

import functools
import logging
import os
from pathlib import Path
from typing import Any

import torch

from common.settings import env_switch

log = logging.getLogger(__name__)

CSRC = Path(__file__).parent / "csrc"
SOURCES = [
    CSRC / name
    for name in (
        "bindings.cpp",
        "paged_decode.cpp",
        "paged_prefill.cpp",
        "paged_prefill_amx.cpp",
        "rows.cpp",
        "fused_ops.cpp",
        "linear_amx.cpp",
        "linear_bf16.cpp",
        "linear_f32.cpp",
        "pool.cpp",
        "decoder.cpp",
    )
]
FLAGS = ["-O3", "-march=native", "-ffast-math", "-fopenmp"]


def enabled() -> bool:
    return env_switch("SPINDLE_CPU_KERNELS")


@functools.cache
def native_module() -> Any | None:
    """The built extension, or None when disabled or when it cannot be built here."""
    if not enabled():
        return None
    try:
        from torch.utils.cpp_extension import load

        _put_ninja_on_path()

        return load(
            name="spindle_cpu_kernels",
            sources=[str(path) for path in SOURCES],
            extra_cflags=FLAGS,
            extra_include_paths=[str(CSRC)],
            extra_ldflags=["-fopenmp"],
        )
    except Exception as err:  # no compiler, no ninja, a failed build: the torch path still works
        log.warning("CPU kernels unavailable, using the pure-torch paths: %s", err)
        return None


def use_threads(threads: int | None = None) -> None:
    """Run this process's CPU work on `threads` threads (None: as many as now): the kernels'
    pool when it can be used (the kernels built, `SPINDLE_CPU_POOL` on, 2+ threads), with
    torch's own ops then on one thread so two teams never spin for the same cores; otherwise
    torch's threads."""
    module = native_module()
    if threads is None:
        pooled = module.pool_threads() if module is not None else 0
        threads = pooled or torch.get_num_threads()
    if module is not None and threads >= 2 and env_switch("SPINDLE_CPU_POOL"):
        module.configure_pool(threads)
        torch.set_num_threads(1)
        return
    if module is not None:
        module.configure_pool(0)
    torch.set_num_threads(threads)


def _put_ninja_on_path() -> None:
    """torch's builder runs `ninja` from PATH; a venv used without activating it has the pip
    package's binary off PATH."""
    try:
        import ninja  # type: ignore[import-untyped]
    except ImportError:
        return
    path = os.environ.get("PATH", "")
    if ninja.BIN_DIR not in path.split(os.pathsep):
        os.environ["PATH"] = os.pathsep.join(filter(None, [ninja.BIN_DIR, path]))


def for_device(device: torch.device) -> Any | None:
    """The kernels when `device` is the CPU and they are built, else None (use torch)."""
    return native_module() if device.type == "cpu" else None


def for_tensor(tensor: torch.Tensor) -> Any | None:
    return for_device(tensor.device)


def main() -> None:
    logging.basicConfig(level=logging.INFO)
    module = native_module()
    print("spindle CPU kernels:", "built" if module is not None else "unavailable")
