"""What a round averages: the live parameters and buffers of the model, in a fixed order.

A DTensor (a model sharded with FSDP2's ``fully_shard``) is tracked as itself, and averaged
as its local shard: the tensors handed to the averager are always ones it may write in place.
"""

from __future__ import annotations

from collections.abc import Hashable, Iterator, Sequence
from typing import NamedTuple

from torch import Tensor, nn

from local_sgd_optim.sharded import is_dtensor, layout, local_tensor, reshard

__all__ = [
    "Tracked",
    "averaged_tensors",
    "describe",
    "outer_sources",
    "plan_key",
    "sharded",
    "signature",
    "tracked",
]


class Tracked(NamedTuple):
    """One parameter or buffer: its kind, name, tensor and whether rounds average it.

    Example::

        >>> next(tracked(model, [], True)).name
        '0.weight'
    """

    kind: str  # "parameter" or "buffer"
    name: str
    tensor: Tensor
    averaged: bool


def tracked(
    model: nn.Module, extra_params: Sequence[Tensor], average_buffers: bool
) -> Iterator[Tracked]:
    """Every parameter (trainable ones averaged), every parameter added with
    ``add_param_group``, then every buffer (floating-point ones averaged when
    ``average_buffers``), in a fixed order. FSDP2 modules are resharded first: a forward
    without backward leaves the root's parameters unsharded."""
    reshard(model)
    for name, p in model.named_parameters():
        yield Tracked("parameter", name, p, p.requires_grad)
    for i, extra in enumerate(extra_params):
        yield Tracked("parameter", f"<add_param_group #{i}>", extra, True)
    for name, b in model.named_buffers():
        yield Tracked("buffer", name, b, average_buffers and b.is_floating_point())


def _distinct(entries: Sequence[Tracked], kinds: tuple[str, ...]) -> list[Tensor]:
    """The averaged tensors of ``kinds`` (a DTensor's local shard), each piece of memory once.

    Two tensors that are the same view of one storage (``b.weight = nn.Parameter(a.weight.data)``:
    two Parameter objects, one memory) are averaged once, as the first of them; views that
    overlap only in part cannot be averaged consistently and are refused.

    Raises:
        ValueError: two averaged tensors overlap in part.
    """
    seen: dict[tuple[object, ...], str] = {}
    spans: dict[int, list[tuple[int, int, str]]] = {}
    distinct = []
    for e in entries:
        if not e.averaged or e.kind not in kinds:
            continue
        t = local_tensor(e.tensor)
        if t.numel() == 0:
            distinct.append(t)
            continue
        key = (t.data_ptr(), t.shape, t.stride(), t.dtype)
        if key in seen:
            continue
        seen[key] = e.name
        storage = t.untyped_storage().data_ptr()
        start = int(t.storage_offset()) * t.element_size()
        reach = 1 + sum((int(n) - 1) * int(s) for n, s in zip(t.shape, t.stride()))
        end = start + reach * t.element_size()
        for other_start, other_end, other in spans.get(storage, []):
            if start < other_end and other_start < end:
                raise ValueError(
                    f"{e.kind} {e.name!r} and {other!r} share part of their memory; averaging "
                    "them would count that part twice. Tie them as one Parameter object, or "
                    "give each its own memory"
                )
        spans.setdefault(storage, []).append((start, end, e.name))
        distinct.append(t)
    return distinct


def averaged_tensors(entries: Sequence[Tracked]) -> list[Tensor]:
    """The tensors a round averages, each piece of memory once: parameters first, then
    buffers; of a DTensor, the local shard (a view of its storage)."""
    return _distinct(entries, ("parameter", "buffer"))


def outer_sources(entries: Sequence[Tracked]) -> list[Tensor]:
    """The averaged parameters, which an outer optimizer steps: the first of
    :func:`averaged_tensors`, in the same order."""
    return _distinct(entries, ("parameter",))


def plan_key(entries: Sequence[Tracked]) -> tuple[Hashable, ...]:
    """Changes when a tensor is added, replaced, frozen or unfrozen, or moved to other memory
    (``model.to(...)`` keeps the parameter objects and gives them new storage), another device,
    dtype or shape."""
    return tuple(
        (id(e.tensor), t.data_ptr(), t.device, t.dtype, t.shape, e.averaged)
        for e in entries
        for t in (local_tensor(e.tensor),)
    )


def sharded(entries: Sequence[Tracked]) -> bool:
    """Whether any tensor is a DTensor (FSDP2, tensor parallel): its local shard lives in the
    sharding framework's own storage, which rounds must write in place, never re-point."""
    return any(is_dtensor(e.tensor) for e in entries)


def signature(entries: Sequence[Tracked]) -> list[tuple[int, int]]:
    """The averaged parameters' versions and memory: changes when weights are loaded.

    A DTensor's version is its own: writes through the DTensor (``load_state_dict``, the
    optimizer) count there, not on its local tensor.
    """
    return [
        (e.tensor._version, local_tensor(e.tensor).data_ptr())
        for e in entries
        if e.averaged and e.kind == "parameter"
    ]


def describe(entries: Sequence[Tracked]) -> list[str]:
    """One line per tensor for the cross-rank agreement: name, (global) shape, dtype, frozen,
    and a DTensor's layout: local shape, placements, mesh shape and this rank's coordinate."""
    lines = []
    for e in entries:
        frozen = "" if e.averaged or e.kind == "buffer" else ", frozen"
        shape, dtype = tuple(e.tensor.shape), e.tensor.dtype
        lines.append(f"{e.kind} '{e.name}' of shape {shape}, {dtype}{frozen}{layout(e.tensor)}")
    return lines
