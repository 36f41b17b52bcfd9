"""A shard rank's process (ranks 1..N-1 of a worker group): load this rank's slice of the model,
then run every step the driver sends, taking part in the layers' collectives, until STOP.

A shard has no Redis, scheduler or sampler; its logits are discarded (sampling happens on rank 0).
It exits when the driver says STOP, and also when the driver's end of the step pipe closes (the
driver died), so no shard outlives its group.
"""

from __future__ import annotations

import logging
import os
import sys
import time
from datetime import timedelta
from multiprocessing.connection import Connection
from pathlib import Path
from typing import TYPE_CHECKING, NoReturn, cast

import torch
import torch.distributed as dist

from common.model_files import read_model_folder
from worker.engine.model_runner import ModelRunner
from worker.layers.linear import weight_bytes
from worker.layers.parallel import ParallelContext
from worker.parallel.step_message import MessageKind, StepHeader, StepMessage, broadcast_payload

if TYPE_CHECKING:
    from worker.parallel.group import ShardSpec

log = logging.getLogger(__name__)


def run_shard(spec: ShardSpec, steps: Connection) -> None:
    """The process entry point (spawned by `ShardGroup.launch`)."""
    logging.basicConfig(
        level=logging.INFO,
        stream=sys.stderr,
        format=f"%(asctime)s %(levelname)s shard-{spec.rank} %(name)s: %(message)s",
    )
    device = torch.device(spec.config.device)
    if spec.backend == "nccl":
        torch.cuda.set_device(device)
    dist.init_process_group(
        spec.backend,
        init_method=spec.init_method,
        rank=spec.rank,
        world_size=spec.world_size,
        timeout=timedelta(seconds=spec.timeout_s),
    )
    parallel = ParallelContext(spec.rank, spec.world_size)
    files = read_model_folder(Path(spec.model_root))
    parent = os.getppid()
    try:
        runner = ModelRunner(spec.config, files.load_config(), files, spec.max_positions, parallel)
        log.info("rank %d/%d ready: %s of parameters", spec.rank, spec.world_size, _size(runner))
        serve_steps(runner, steps)
    except RuntimeError:
        # A collective fails when the driver dies inside it: that is the driver's death, not ours.
        _exit_if_driver_gone(parent)
        raise
    dist.destroy_process_group()


def serve_steps(runner: ModelRunner, steps: Connection) -> None:
    parent = os.getppid()
    while True:
        header = _next_header(steps, parent)
        if header.kind == MessageKind.STOP:
            return
        payload = broadcast_payload(header, None, runner.device)
        runner.forward(StepMessage.decode(header, payload))


def _next_header(steps: Connection, parent: int) -> StepHeader:
    """Block (without spinning) until the driver sends a header; exit if the driver is gone."""
    while not steps.poll(1.0):
        if os.getppid() != parent:
            _driver_gone()
    try:
        return StepHeader.from_bytes(steps.recv_bytes())
    except EOFError:
        _driver_gone()


def _exit_if_driver_gone(parent: int, wait_s: float = 2.0) -> None:
    """The driver's sockets close a moment before the kernel re-parents us: wait that long."""
    deadline = time.monotonic() + wait_s
    while time.monotonic() < deadline:
        if os.getppid() != parent:
            _driver_gone()
        time.sleep(0.05)


def _driver_gone() -> NoReturn:
    log.error("the driver (rank 0) is gone; this shard exits")
    logging.shutdown()
    os._exit(1)  # skip destroy_process_group: it would wait on the dead rank


def _size(runner: ModelRunner) -> str:
    model = cast(torch.nn.Module, runner.model)
    total = weight_bytes(model)
    return f"{total / 2**20:.1f} MiB"
