"""The CPU kernels' own thread pool (worker/kernels/csrc/pool.h): the linear products, which run
speculatively on it (the caller computes a late thread's items again, the first copy done is
stored), give bit-for-bit the results of torch's OpenMP threads, also when every item is computed
twice; the helpers take work; `use_threads` hands torch one thread while the pool runs, and
`SPINDLE_CPU_POOL=0` keeps torch's threads; the kernels let go of the GIL while they run."""

from __future__ import annotations

import threading
import time

import pytest
import torch
import torch.nn.functional as F

from worker import kernels

# Rows: a decode batch, one that is not a multiple of the 12-row register tile, and more than
# one 256-row chunk (prefill). Columns: blocks that do not split evenly into the runs items take.
ROWS = [1, 13, 300]
OUT, IN = 32 * 37, 96


@pytest.fixture
def native():
    module = kernels.native_module()
    assert module is not None, "the CPU kernels did not build here"
    threads = module.pool_threads() or torch.get_num_threads()
    yield module
    module.configure_pool(0)  # the engine under test next sets its own threads
    torch.set_num_threads(threads)


def products(native):
    """(name, dtype, pack, product) of each linear kernel this build and CPU run."""
    found = []
    if native.linear_f32_supported(OUT, IN):
        found.append(("f32", torch.float32, native.pack_linear_f32, native.linear_f32))
        found.append(
            ("f32 gated", torch.float32, native.pack_linear_f32_gated, native.linear_f32_silu_mul)
        )
    if native.linear_bf16_supported(OUT, IN):
        found.append(("bf16", torch.bfloat16, native.pack_linear_bf16, native.linear_bf16))
        found.append(
            (
                "bf16 gated",
                torch.bfloat16,
                native.pack_linear_bf16_gated,
                native.linear_bf16_silu_mul,
            )
        )
    return found


def product_args(name, dtype, pack, rows):
    gen = torch.Generator().manual_seed(rows)
    out = 2 * OUT if "gated" in name else OUT
    weight = (torch.randn(out, IN, generator=gen) * 0.1).to(dtype)
    x = torch.randn(rows, IN, generator=gen).to(dtype)
    bias = None if "gated" in name else torch.randn(out, generator=gen).to(dtype)
    return weight, pack(weight), x, bias


def reference(name, weight, x, bias):
    y = F.linear(x.float(), weight.float(), None if bias is None else bias.float())
    if "gated" in name:
        gate, up = y.chunk(2, dim=-1)
        y = F.silu(gate) * up
    return y


@pytest.mark.parametrize("rows", ROWS)
def test_linear_products_are_the_same_on_the_pool_and_on_openmp(native, rows):
    found = products(native)
    assert found, "no linear kernel runs on this CPU"
    for name, dtype, pack, product in found:
        weight, packed, x, bias = product_args(name, dtype, pack, rows)
        args = (x, packed) if bias is None else (x, packed, bias)
        native.configure_pool(0)
        torch.set_num_threads(2)
        on_openmp = product(*args)
        native.configure_pool(2)
        torch.set_num_threads(1)
        on_pool = product(*args)
        native.configure_pool(2, speculate_all=True)
        computed_twice = product(*args)
        assert torch.equal(on_pool, on_openmp), name
        assert torch.equal(computed_twice, on_openmp), name
        tolerance = 1e-4 if dtype == torch.float32 else 3e-2
        torch.testing.assert_close(
            on_pool.float(), reference(name, weight, x, bias), atol=tolerance, rtol=tolerance
        )


def test_the_helper_takes_items(native):
    name, dtype, pack, product = products(native)[0]
    weight, packed, x, bias = product_args(name, dtype, pack, 300)
    native.configure_pool(2)
    regions, helper_items = native.pool_stats()[:2]
    for _ in range(20):
        product(x, packed, bias)
    after = native.pool_stats()
    assert after[0] - regions == 20  # one region per call
    assert after[1] > helper_items  # the other thread computed some of them


def test_use_threads_gives_torch_one_thread_while_the_pool_runs(native, monkeypatch):
    kernels.use_threads(2)
    assert native.pool_threads() == 2 and torch.get_num_threads() == 1
    kernels.use_threads()  # None: as many as now
    assert native.pool_threads() == 2 and torch.get_num_threads() == 1

    monkeypatch.setenv("SPINDLE_CPU_POOL", "0")
    kernels.use_threads(2)
    assert native.pool_threads() == 0 and torch.get_num_threads() == 2

    monkeypatch.delenv("SPINDLE_CPU_POOL")
    kernels.use_threads(1)  # one thread: nothing to share, torch's path
    assert native.pool_threads() == 0 and torch.get_num_threads() == 1


def test_kernels_let_go_of_the_gil_while_they_run(native):
    """A Python thread (the worker's publisher) runs during a kernel call, not only after it:
    with the GIL held through the call it could wake only when the call returned."""
    kernels.use_threads(2)
    x = long_silu_and_mul_input(native, seconds=0.03)
    wakes: list[float] = []
    stop = threading.Event()

    def ticker() -> None:
        while not stop.is_set():
            time.sleep(0.001)
            wakes.append(time.perf_counter())

    thread = threading.Thread(target=ticker)
    thread.start()
    time.sleep(0.01)
    start = time.perf_counter()
    native.silu_and_mul(x)
    end = time.perf_counter()
    stop.set()
    thread.join()
    # Wakes well inside the call's first half: one held off by the GIL comes only at its return
    # (the first 2 ms are left out: the interpreter may switch threads just before the call).
    inside = [t for t in wakes if start + 0.002 < t < (start + end) / 2]
    assert len(inside) >= 2, f"{len(inside)} wakes in a {(end - start) * 1e3:.0f} ms call"


def long_silu_and_mul_input(native, seconds: float) -> torch.Tensor:
    """An input `silu_and_mul` takes at least `seconds` over (at most 8192 x 16384 floats)."""
    rows = 4096
    while True:
        x = torch.randn(rows, 16384)
        native.silu_and_mul(x)  # the first call allocates
        start = time.perf_counter()
        native.silu_and_mul(x)
        if time.perf_counter() - start >= seconds or rows >= 8192:
            return x
        rows *= 2
