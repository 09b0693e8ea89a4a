"""Models sharded with FSDP2 (``fully_shard``) or other DTensor layouts: local shards, checks.

Local SGD across replica groups of a sharded model: a 2-D mesh ``("replicate", "shard")``, the
model sharded with ``fully_shard(module, mesh=mesh["shard"])`` (each step's reduce-scatter stays
inside a replica), and ``process_group=mesh["replicate"].get_group()``: the ranks that hold the
*same* shard, one per replica. A round then averages each rank's local shards (``to_local()``,
views of FSDP's own storage, written in place) with that group. This is sound for any DTensor
layout as long as the group shares no rank but this one with the DTensor's mesh: the mesh's
ranks hold the other pieces (or copies another mechanism keeps in step), which must never be
mixed in. See ``docs/fsdp2.md``.
"""

from __future__ import annotations

from collections.abc import Iterable
from functools import lru_cache

import torch
import torch.distributed as dist
from torch import Tensor, nn

__all__ = [
    "check_sharded_model",
    "is_dtensor",
    "layout",
    "local_tensor",
    "local_tensors",
    "reshard",
]

_FIX = (
    "shard within each replica with fully_shard(module, mesh=mesh['shard']) on a 2-D "
    "init_device_mesh(..., mesh_dim_names=('replicate', 'shard')) and pass "
    "process_group=mesh['replicate'].get_group() (see docs/fsdp2.md)"
)


@lru_cache(maxsize=1)
def _dtensor_type() -> type | None:
    try:
        from torch.distributed.tensor import DTensor
    except ImportError:  # pragma: no cover - builds without distributed support
        return None
    return DTensor


def is_dtensor(tensor: object) -> bool:
    """Whether ``tensor`` is a :class:`~torch.distributed.tensor.DTensor`."""
    cls = _dtensor_type()
    return cls is not None and isinstance(tensor, cls)


def local_tensor(tensor: Tensor) -> Tensor:
    """The part of ``tensor`` this rank holds: a DTensor's local shard, a view of the DTensor's
    own storage that may be written in place; any other tensor itself.

    Example::

        >>> local_tensor(model.weight).shape  # under fully_shard over 2 ranks: half the rows
        torch.Size([3, 6])
    """
    if not is_dtensor(tensor):
        return tensor
    # The DTensor's own local tensor, not a new view from to_local(): the same object on
    # every call while FSDP keeps its storage, so whatever keys on identity (a plan, the outer
    # optimizer's kept copy) sees the same tensors round after round.
    own = getattr(tensor, "_local_tensor", None)
    if isinstance(own, Tensor):
        return own
    with torch.no_grad():  # pragma: no cover - a DTensor without the attribute
        return tensor.to_local()  # type: ignore[attr-defined, no-any-return]


def local_tensors(tensors: Iterable[Tensor]) -> list[Tensor]:
    """:func:`local_tensor` of each."""
    return [local_tensor(t) for t in tensors]


def layout(tensor: Tensor) -> str:
    """How a DTensor is laid out, for the cross-rank agreement; ``""`` for a plain tensor.

    Ranks that average together must hold the same piece: the same local shape, placements,
    mesh shape and coordinate in it.
    """
    if not is_dtensor(tensor):
        return ""
    mesh = tensor.device_mesh  # type: ignore[attr-defined]
    placements = tuple(tensor.placements)  # type: ignore[attr-defined]
    coordinate = mesh.get_coordinate()
    return (
        f", DTensor with local shape {tuple(local_tensor(tensor).shape)}, placements "
        f"{placements} on a mesh of shape {tuple(mesh.shape)} at coordinate "
        f"{None if coordinate is None else tuple(coordinate)}"
    )


def reshard(model: nn.Module) -> None:
    """Register the sharded parameters on every FSDP2 module of ``model`` again.

    FSDP2 leaves the root module's parameters unsharded (plain tensors) after a forward
    without backward, such as an evaluation under ``torch.no_grad()``, until the next
    backward. A round must see the DTensors: averaging the unsharded copies would be lost at
    the next reshard. Does nothing to a module that is already sharded.
    """
    try:
        from torch.distributed.fsdp import FSDPModule
    except ImportError:  # pragma: no cover - builds without FSDP2
        return
    for module in model.modules():
        if isinstance(module, FSDPModule):
            module.reshard()


def _fsdp1_module(model: nn.Module) -> str | None:
    try:
        from torch.distributed.fsdp import FullyShardedDataParallel
    except ImportError:  # pragma: no cover - builds without distributed support
        return None
    for name, module in model.named_modules():
        if isinstance(module, FullyShardedDataParallel):
            return name or "<root>"
    return None


def _group_ranks(process_group: dist.ProcessGroup | None) -> list[int]:
    if process_group is None:
        return list(range(dist.get_world_size()))
    return list(dist.get_process_group_ranks(process_group))


def _check_dtensor(
    kind: str, name: str, tensor: Tensor, group: list[int], process_group: object
) -> None:
    """Raise if averaging ``tensor``'s local shard over ``group`` could mix different pieces."""
    mesh = tensor.device_mesh  # type: ignore[attr-defined]
    placements = tuple(tensor.placements)  # type: ignore[attr-defined]
    if any(p.is_partial() for p in placements):
        raise ValueError(
            f"{kind} {name!r} is a DTensor with a Partial placement {placements}: its local "
            "tensor is a summand of a reduction still pending, not a piece of the value. "
            "Redistribute it to Shard or Replicate placements before building "
            "LocalSGDOptimizer"
        )
    mesh_ranks = sorted(int(r) for r in mesh.mesh.flatten().tolist())
    me = dist.get_rank()
    shared = sorted(set(mesh_ranks) & set(group) - {me})
    if not shared:
        return
    names = mesh.mesh_dim_names
    where = f"{mesh.ndim}-D mesh" + (f" {tuple(names)}" if names else "")
    where += f" of ranks {mesh_ranks}"
    if mesh.ndim > 1 and any(p.is_replicate() for p in placements):
        raise ValueError(
            f"{kind} {name!r} is sharded HSDP-style (placements {placements} on a {where}): "
            "FSDP all-reduces its gradients across the replicate dimension at every step, "
            "which is the traffic Local SGD replaces, and process_group shares ranks "
            f"{shared} with that mesh. Do not pass the 2-D mesh to fully_shard: {_FIX}"
        )
    if process_group is None:
        raise ValueError(
            f"{kind} {name!r} is a DTensor on a {where}, which hold its other pieces; "
            "process_group=None averages over the whole world, ranks "
            f"{shared} included, and would mix different shards. Pass the group of the "
            f"ranks that hold the same shard, one per replica: {_FIX}"
        )
    raise ValueError(
        f"process_group (ranks {group}) shares ranks {shared} with the mesh of {kind} "
        f"{name!r} (a DTensor with placements {placements} on a {where}), which hold other "
        "pieces of it: averaging would mix different shards. Pass a group of the ranks that "
        f"hold the same shard, one per replica, disjoint from the mesh: {_FIX}"
    )


def check_sharded_model(model: nn.Module, process_group: dist.ProcessGroup | None) -> None:
    """Raise if ``model`` is sharded in a way Local SGD over ``process_group`` cannot average.

    Accepted: DTensor parameters and buffers (FSDP2's ``fully_shard``, tensor parallelism)
    whose device mesh shares no rank but this one with ``process_group``, so that the group's
    ranks hold the same piece of each, and that piece is averaged.

    Raises:
        TypeError: a module is ``FullyShardedDataParallel`` (FSDP1).
        ValueError: a DTensor's mesh shares other ranks with ``process_group`` (HSDP, the
            world's group with ``process_group=None``, the shard group passed by mistake),
            a DTensor has a ``Partial`` placement, or a trainable plain parameter sits next to
            DTensors whose mesh spans several ranks (nothing would keep it in step there).

    Example::

        >>> fully_shard(model, mesh=mesh["shard"])
        >>> check_sharded_model(model, mesh["replicate"].get_group())  # accepted
    """
    fsdp1 = _fsdp1_module(model)
    if fsdp1 is not None:
        raise TypeError(
            f"module {fsdp1!r} is FullyShardedDataParallel (FSDP1), whose flat parameters "
            "LocalSGDOptimizer cannot average shard by shard. Use FSDP2 instead: " + _FIX
        )
    reshard(model)
    entries: list[tuple[str, str, Tensor]] = [
        ("parameter", n, t) for n, t in model.named_parameters()
    ]
    entries += [("buffer", n, t) for n, t in model.named_buffers()]
    distributed = [(k, n, t) for k, n, t in entries if is_dtensor(t)]
    if not distributed:
        return
    group = _group_ranks(process_group)
    for kind, name, tensor in distributed:
        _check_dtensor(kind, name, tensor, group, process_group)
    spread = next(
        (n for _, n, t in distributed if t.device_mesh.size() > 1),  # type: ignore[attr-defined]
        None,
    )
    plain = next(
        (n for k, n, t in entries if k == "parameter" and t.requires_grad and not is_dtensor(t)),
        None,
    )
    if spread is not None and plain is not None:
        raise ValueError(
            f"parameter {plain!r} is a plain tensor while {spread!r} is a DTensor sharded "
            f"across several ranks: nothing would keep {plain!r} in step across the ranks "
            "that hold the other shards, and rounds average it only across replicas. Apply "
            "fully_shard to the root module too (fully_shard(model, mesh=mesh['shard'])) so "
            "that every parameter is a DTensor"
        )
