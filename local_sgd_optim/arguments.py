"""Construction checks beyond the settings: the optimizer, the model, the group, ownership."""

from __future__ import annotations

import os
import weakref
from dataclasses import dataclass

import torch
import torch.distributed as dist
from torch import nn
from torch.optim import Optimizer

from local_sgd_optim.comm.groups import group_rank, group_size
from local_sgd_optim.ddp import has_foreign_hook, inner_ddp
from local_sgd_optim.sharded import check_sharded_model, is_dtensor

__all__ = ["Ownership", "check_arguments", "could_communicate", "first_device"]


@dataclass
class Ownership:
    """Whether the wrapper that owns a base optimizer is still open.

    Example::

        >>> ownership = Ownership.claim(base_optimizer)
        >>> ownership.closed = True  # at close(): another wrapper may take it
    """

    closed: bool = False

    @staticmethod
    def claim(base_optimizer: Optimizer) -> Ownership:
        """Record a new owner of ``base_optimizer``; the wrapper keeps the returned object."""
        ownership = Ownership()
        _OWNERS[base_optimizer] = weakref.ref(ownership)
        return ownership


# Which wrapper holds each base optimizer. Kept outside the optimizer object so that it stays
# copyable and picklable; weak both ways, so neither is kept alive by this table.
_OWNERS: weakref.WeakKeyDictionary[Optimizer, weakref.ref[Ownership]] = weakref.WeakKeyDictionary()


def _check_types(base_optimizer: object, model: object, process_group: object) -> None:
    if not isinstance(base_optimizer, Optimizer):
        raise TypeError(
            f"base_optimizer must be a torch.optim.Optimizer, got {type(base_optimizer).__name__}"
        )
    if not isinstance(model, nn.Module):
        raise TypeError(f"model must be a torch.nn.Module, got {type(model).__name__}")
    if process_group is not None and not isinstance(process_group, dist.ProcessGroup):
        raise TypeError(
            "process_group must be a torch.distributed.ProcessGroup or None, "
            f"got {type(process_group).__name__}"
        )


def check_arguments(
    base_optimizer: object,
    model: object,
    process_group: object,
    enabled: bool,
    fault_tolerant: bool = False,
) -> None:
    """Raise on a base optimizer, model or group the wrapper cannot work with.

    With ``fault_tolerant`` (rounds through a torchft quorum, across replica groups), the
    launcher's ``WORLD_SIZE`` is the replica group's, which needs no process group of ours,
    and a DDP model inside the group keeps its own gradient all-reduce; a sharded model is
    refused.

    Raises:
        TypeError: wrong types, or an FSDP1 (``FullyShardedDataParallel``) model.
        ValueError: the base optimizer is already wrapped and open, holds parameters that are
            not the model's, this rank is not in ``process_group``, or a sharded (DTensor)
            model whose mesh shares ranks with ``process_group`` (HSDP, no group given): see
            :func:`~local_sgd_optim.sharded.check_sharded_model`.
        RuntimeError: ``process_group`` without torch.distributed, several processes launched
            (``WORLD_SIZE`` > 1) without a process group, or a DDP model with a communication
            hook of its own.
        ValueError: with ``fault_tolerant``, a model with DTensor (FSDP2) parameters.

    Example::

        >>> check_arguments(torch.optim.SGD(model.parameters(), lr=0.1), model, None, True)
    """
    _check_types(base_optimizer, model, process_group)
    assert isinstance(base_optimizer, Optimizer) and isinstance(model, nn.Module)
    owner = _OWNERS.get(base_optimizer)
    ownership = owner() if owner is not None else None
    if ownership is not None and not ownership.closed:
        raise ValueError(
            "base_optimizer is already wrapped by another LocalSGDOptimizer that is still "
            "open; two wrappers would step and average it twice. close() the first one, or "
            "build a new base optimizer"
        )
    if process_group is not None and not dist.is_initialized():
        raise RuntimeError(
            "process_group was given but torch.distributed is not initialised; call "
            "torch.distributed.init_process_group() first"
        )
    world = os.environ.get("WORLD_SIZE", "1")
    launched = world.strip().isdigit() and int(world) > 1
    if fault_tolerant:
        if any(is_dtensor(p) for p in model.parameters()):
            raise ValueError(
                "fault_tolerance does not support a sharded (FSDP2) model yet: each rank of a "
                "replica group would need its shard's peers in the other groups. Use a "
                "replicated model inside each replica group"
            )
        enabled = False  # the checks of a world of our own do not apply
    if enabled and launched and not (dist.is_available() and dist.is_initialized()):
        raise RuntimeError(
            f"WORLD_SIZE={world} in the environment (torchrun or another launcher started "
            "several processes), but torch.distributed is not initialised, so each process "
            "would train alone without a word. Call torch.distributed.init_process_group() "
            "before building LocalSGDOptimizer (with a framework, build it after the object "
            "that creates the group: Accelerate's Accelerator, Lightning's Trainer.fit, "
            "transformers' TrainingArguments), or pass enabled=False to train each process alone"
        )
    model_params = {id(p) for p in model.parameters()}
    foreign = sum(
        1 for g in base_optimizer.param_groups for p in g["params"] if id(p) not in model_params
    )
    if foreign:
        raise ValueError(
            f"base_optimizer holds {foreign} parameter(s) that are not parameters of model; "
            "build the base optimizer from model.parameters() (use add_param_group for "
            "parameters that live outside the model)"
        )
    group = process_group if isinstance(process_group, dist.ProcessGroup) else None
    if enabled and group_rank(group) < 0:
        raise ValueError(
            "this rank is not a member of process_group; build LocalSGDOptimizer only on "
            "the group's ranks, or pass enabled=False elsewhere"
        )
    if enabled:
        check_sharded_model(model, group)
    ddp = inner_ddp(model)
    if enabled and ddp is not None and has_foreign_hook(ddp):
        raise RuntimeError(
            "model is a DistributedDataParallel that already has a communication hook; "
            "LocalSGDOptimizer must install its own to keep gradients local between rounds. "
            "Wrap a DDP model without register_comm_hook()"
        )


def first_device(model: object) -> torch.device | None:
    """The device of ``model``'s first parameter, where there is one."""
    if isinstance(model, nn.Module):
        return next((p.device for p in model.parameters()), None)
    return None


def could_communicate(process_group: object, enabled: object) -> bool:
    """Whether this rank would have joined the construction-time collective."""
    return (
        enabled is not False
        and dist.is_available()
        and dist.is_initialized()
        and (process_group is None or isinstance(process_group, dist.ProcessGroup))
        and group_size(process_group) > 1
        and group_rank(process_group) >= 0
    )
