"""Builds a model from its checkpoint: the registry picks the class, each parameter's own
`weight_loader` reads its slice of the checkpoint tensor with the same name (or, for fused
modules, the packed name), and every parameter must have been loaded exactly once."""

from __future__ import annotations

import logging
from collections.abc import Iterable
from typing import cast

import torch
from torch import nn

from worker.layers.linear import default_weight_loader
from worker.layers.parallel import SINGLE, ParallelContext
from worker.models import CausalLM, model_class

log = logging.getLogger(__name__)


def build_model(
    config,
    weights: Iterable,
    dtype: torch.dtype,
    device: torch.device,
    parallel: ParallelContext = SINGLE,
    max_positions: int = 4096,
) -> CausalLM:
    cls = model_class(config)
    with torch.device(device):
        model = cls(config, parallel, max_positions)
    for param in model.parameters():
        param.data = param.data.to(dtype)
    load_weights(model, weights)
    return cast(CausalLM, model.eval())


def load_weights(model: nn.Module, weights: Iterable) -> None:
    params = dict(model.named_parameters(remove_duplicate=False))
    tied = getattr(model.config, "tie_word_embeddings", False)
    packed: dict[str, tuple[str, object]] = getattr(model, "packed_modules", {})
    ignored: tuple[str, ...] = getattr(model, "ignored_weights", ())
    loaded: set[str] = set()
    for name, tensor in weights:
        if any(part in name for part in ignored) or (tied and name == "lm_head.weight"):
            continue
        target, shard_id = _target(name, packed)
        if target not in params:
            raise ValueError(
                f"checkpoint tensor {name!r} matches no parameter of {type(model).__name__}"
            )
        param = params[target]
        loader = getattr(param, "weight_loader", default_weight_loader)
        loader(param, tensor, shard_id)
        loaded.add(name if shard_id is None else f"{target}:{shard_id}")
    _check_complete(model, params, loaded, packed, tied)


def _target(name: str, packed: dict[str, tuple[str, object]]) -> tuple[str, object]:
    for checkpoint_part, (param_part, shard_id) in packed.items():
        if f".{checkpoint_part}." in name:
            return name.replace(f".{checkpoint_part}.", f".{param_part}."), shard_id
    return name, None


def _check_complete(model, params, loaded, packed, tied) -> None:
    expected: set[str] = set()
    shards_of: dict[str, list[object]] = {}
    for _checkpoint_part, (param_part, shard_id) in packed.items():
        shards_of.setdefault(param_part, []).append(shard_id)
    for name in params:
        if tied and name == "lm_head.weight":
            continue
        module_name = name.rsplit(".", 2)[-2] if name.count(".") >= 1 else ""
        if module_name in shards_of:
            expected.update(f"{name}:{shard_id}" for shard_id in shards_of[module_name])
        else:
            expected.add(name)
    missing = sorted(expected - loaded)
    if missing:
        shown = ", ".join(missing[:5]) + (" ..." if len(missing) > 5 else "")
        raise ValueError(
            f"the checkpoint lacks {len(missing)} tensors of {type(model).__name__}: {shown}"
        )
