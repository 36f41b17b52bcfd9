"""Native CPU kernels, built from `csrc/` on first use with torch's JIT extension builder (g++,
ninja) and cached under torch's extensions folder (`TORCH_EXTENSIONS_DIR`, default
~/.cache/torch_extensions), so only the first process on a machine pays the ~1-2 min build;
`scripts/bootstrap` builds them ahead (`python -m worker.kernels`). Each checkout builds into its
own folder there (`build_folder`): the build's hash covers the include path, so two checkouts
sharing one folder rebuilt it each time the other had loaded it. The build runs under an `flock`
(`build_lock`), which the kernel drops when its holder dies; holding it, a `lock` file that
torch's builder left behind is stale (a process killed mid-build) and is removed — torch's own
file lock would otherwise make every later build wait on it forever.

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

import contextlib
import fcntl
import functools
import hashlib
import logging
import os
import sys
from collections.abc import Iterator
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
EXTENSION = "spindle_cpu_kernels"


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
        folder = build_folder()
        with build_lock(folder):
            return load(
                name=EXTENSION,
                sources=[str(path) for path in SOURCES],
                extra_cflags=FLAGS,
                extra_include_paths=[str(CSRC)],
                extra_ldflags=["-fopenmp"],
                build_directory=str(folder),
            )
    except Exception as err:  # no compiler, no ninja, a failed build: the torch path still works
        log.warning("CPU kernels unavailable, using the pure-torch paths: %s", err)
        return None


def build_folder(sources: Path = CSRC) -> Path:
    """This checkout's build folder: torch's extensions folder, then the extension's name, the
    Python version and a digest of where `sources` lie and of torch's version."""
    from torch.utils.cpp_extension import get_default_build_root

    root = Path(os.environ.get("TORCH_EXTENSIONS_DIR") or get_default_build_root())
    identity = f"{sources.resolve()}\0{torch.__version__}"
    digest = hashlib.sha1(identity.encode()).hexdigest()[:10]
    python = f"py{sys.version_info.major}{sys.version_info.minor}"
    return root / f"{EXTENSION}-{python}-{digest}"


@contextlib.contextmanager
def build_lock(folder: Path) -> Iterator[None]:
    """Hold `folder`'s build lock (an flock, dropped by the kernel when its holder dies), and
    remove the `lock` file of a torch build that died before it could."""
    folder.mkdir(parents=True, exist_ok=True)
    with (folder / "spindle-build.lock").open("a") as handle:  # closing it releases the flock
        fcntl.flock(handle, fcntl.LOCK_EX)
        stale = folder / "lock"
        if stale.exists():
            log.warning("removing %s, left by a kernel build that did not finish", stale)
            stale.unlink(missing_ok=True)
        yield


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
