"""The driver's side of a tensor-parallel worker group (rank 0 of N).

`ShardGroup.launch` checks that the model splits over N ranks (before any process starts), spawns
ranks 1..N-1 (`worker.parallel.shard`), and joins them in one torch.distributed group — gloo on
CPU, NCCL on CUDA with rank r on the r-th visible GPU. Each rank gets `num_threads // N` torch
threads, so the group uses the cores one worker would.

Failure policy: a group is all or nothing. A watchdog thread polls the shard processes; when one
dies, the driver logs which rank and how, ends the others and exits the process at once — no rank
waits forever in a collective, the worker's heartbeat stops, and another worker resumes its jobs
from their progress lists (the service's resume path). Requests are never failed for it.
"""

from __future__ import annotations

import atexit
import contextlib
import logging
import os
import threading
import time
from dataclasses import dataclass, replace
from datetime import timedelta
from multiprocessing.connection import Connection
from pathlib import Path

import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from common.launcher import free_port
from worker.engine.config import EngineConfig
from worker.engine.model_runner import resolve_device
from worker.layers.parallel import ParallelContext
from worker.parallel.shard import run_shard
from worker.parallel.step_message import STOP, StepMessage, broadcast_payload

log = logging.getLogger(__name__)

RANK_DIED_EXIT_CODE = 75  # the process exits with this when a shard rank dies
WATCHDOG_INTERVAL_S = 0.2


def valid_shard_counts(hf_config) -> list[int]:
    """Every N the model's attention heads, KV heads (split or replicated) and MLP split over."""
    heads, kv_heads = hf_config.num_attention_heads, hf_config.num_key_value_heads
    intermediate = hf_config.intermediate_size
    return [
        n
        for n in range(1, heads + 1)
        if heads % n == 0
        and intermediate % n == 0
        and (n % kv_heads == 0 if n >= kv_heads else kv_heads % n == 0)
    ]


def check_shardable(hf_config, num_shard: int) -> None:
    valid = valid_shard_counts(hf_config)
    if num_shard not in valid:
        raise ValueError(
            f"--num-shard {num_shard} does not split this model: it has "
            f"{hf_config.num_attention_heads} attention heads, "
            f"{hf_config.num_key_value_heads} KV heads and an MLP of "
            f"{hf_config.intermediate_size} columns; valid --num-shard values are "
            f"{', '.join(map(str, valid))}"
        )


@dataclass(frozen=True)
class ShardSpec:
    """What a rank needs to join the group (sent once, at spawn)."""

    rank: int
    world_size: int
    init_method: str  # tcp://host:port of the rendezvous
    backend: str  # gloo | nccl
    config: EngineConfig  # this rank's engine settings (its device, its thread count)
    model_root: str  # the resolved Hugging Face folder (GGUF already converted)
    max_positions: int
    timeout_s: float  # collectives and the rendezvous give up after this


def rank_config(config: EngineConfig, rank: int, world_size: int) -> EngineConfig:
    device = resolve_device(config.device)
    threads = config.num_threads or torch.get_num_threads()
    return replace(
        config,
        device=f"cuda:{rank}" if device.type == "cuda" else str(device),
        num_threads=max(1, threads // world_size),
    )


class ShardGroup:
    def __init__(self, spec: ShardSpec, processes: list, pipes: list[Connection]):
        self.spec = spec  # rank 0's own spec
        self.processes = processes  # ranks 1..N-1, in order
        self.pipes = pipes  # one step-header pipe per shard rank
        self.parallel = ParallelContext(0, spec.world_size)
        self.device = resolve_device(spec.config.device)
        self._closing = threading.Event()
        self._watchdog = threading.Thread(target=self._watch, name="shard-watchdog", daemon=True)

    @property
    def driver_config(self) -> EngineConfig:
        return self.spec.config

    @property
    def pids(self) -> list[int]:
        return [process.pid for process in self.processes]

    @classmethod
    def launch(
        cls,
        config: EngineConfig,
        hf_config,
        model_root: Path,
        max_positions: int,
        timeout_s: float = 300.0,
    ) -> ShardGroup:
        world = config.num_shard
        check_shardable(hf_config, world)
        backend = "nccl" if resolve_device(config.device).type == "cuda" else "gloo"
        if backend == "nccl" and torch.cuda.device_count() < world:
            raise ValueError(
                f"--num-shard {world} needs {world} GPUs; {torch.cuda.device_count()} are visible"
            )
        init_method = f"tcp://127.0.0.1:{free_port()}"
        specs = [
            ShardSpec(
                rank,
                world,
                init_method,
                backend,
                rank_config(config, rank, world),
                str(model_root),
                max_positions,
                timeout_s,
            )
            for rank in range(world)
        ]
        context = mp.get_context("spawn")
        processes, pipes = [], []
        for spec in specs[1:]:
            reader, writer = context.Pipe(duplex=False)
            process = context.Process(
                target=run_shard, args=(spec, reader), name=f"spindle-shard-{spec.rank}"
            )
            process.daemon = True
            process.start()
            reader.close()  # only the shard holds the read end: its EOF means we are gone
            processes.append(process)
            pipes.append(writer)
        group = cls(specs[0], processes, pipes)
        group._watchdog.start()
        group._join(backend, init_method)
        atexit.register(group.close)
        return group

    def _join(self, backend: str, init_method: str) -> None:
        if backend == "nccl":
            torch.cuda.set_device(self.device)
        dist.init_process_group(
            backend,
            init_method=init_method,
            rank=0,
            world_size=self.spec.world_size,
            timeout=timedelta(seconds=self.spec.timeout_s),
        )
        log.info(
            "tensor-parallel group of %d ranks (%s), shard pids %s, %d threads per rank",
            self.spec.world_size,
            backend,
            self.pids,
            self.spec.config.num_threads,
        )

    # -- steps --------------------------------------------------------------------------------

    def send_step(self, message: StepMessage) -> None:
        header = message.header()
        data = header.to_bytes()
        for pipe in self.pipes:
            pipe.send_bytes(data)
        broadcast_payload(header, message.payload(), self.device)

    # -- failure and shutdown -----------------------------------------------------------------

    def _dead_rank(self) -> str | None:
        for rank, process in enumerate(self.processes, start=1):
            if process.exitcode is not None:
                return f"rank {rank} (pid {process.pid}) exited with code {process.exitcode}"
        return None

    def _watch(self) -> None:
        while not self._closing.wait(WATCHDOG_INTERVAL_S):
            dead = self._dead_rank()
            if dead is not None and not self._closing.is_set():
                self._fail(dead)

    def fail_if_rank_died(self, grace_s: float = 2.0) -> None:
        """After a collective raised: if a rank died (or dies within `grace_s`, as its exit
        status arrives), that is the cause — end the group now. Otherwise return and let the
        caller's error stand."""
        deadline = time.monotonic() + grace_s
        while time.monotonic() < deadline:
            dead = self._dead_rank()
            if dead is not None:
                self._fail(dead)
            time.sleep(0.05)

    def _fail(self, dead: str) -> None:
        log.error(
            "tensor-parallel %s; stopping the whole worker group of %d ranks (its jobs will be "
            "resumed by another worker)",
            dead,
            self.spec.world_size,
        )
        for process in self.processes:
            if process.exitcode is None:
                process.kill()
        logging.shutdown()
        os._exit(RANK_DIED_EXIT_CODE)

    def close(self, timeout_s: float = 10.0) -> None:
        """Tell the shards to stop, wait for them, leave the process group. Idempotent."""
        if self._closing.is_set():
            return
        self._closing.set()
        for pipe in self.pipes:
            with contextlib.suppress(OSError):  # a shard that already exited closed its end
                pipe.send_bytes(STOP.to_bytes())
            pipe.close()
        deadline = time.monotonic() + timeout_s
        for process in self.processes:
            process.join(max(0.0, deadline - time.monotonic()))
            if process.exitcode is None:
                process.kill()
                process.join()
        if dist.is_initialized():
            dist.destroy_process_group()
