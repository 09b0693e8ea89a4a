"""What a round averages: the live parameters and buffers of the model, in a fixed order.

A DTensor (a model sharded with FSDP2's ``fully_shard``) is tracked as itself, and averaged
as its local shard: the tensors handed to the averager are always ones it may write in place.

Buffers: running statistics (the buffers of normalization layers, and any buffer whose name
starts with ``running_``) are averaged, as a mean of means is what a larger batch would have
given; other floating-point buffers (pruning masks, tables, caches) are not statistics, and
averaging a binary mask turns it into a fraction: they are copied from the group's first rank
at each round instead, as DDP copies every buffer from rank 0 before each forward.

Several wrappers on one model (a GAN's two optimizers, Lightning's ``configure_optimizers``
returning two): each averages the parameters its own base optimizer steps, and the buffers of
the modules that hold them; parameters no wrapper's optimizer holds, and buffers of modules
without parameters, go to the first wrapper built on the model. So every tensor is averaged
once per round, and an outer optimizer steps each parameter once.
"""

from __future__ import annotations

import weakref
from collections.abc import Hashable, Iterator, Sequence
from typing import NamedTuple

from torch import Tensor, nn
from torch.nn.modules.batchnorm import _NormBase
from torch.optim import Optimizer

from local_sgd_optim.ddp import wrapper_chain
from local_sgd_optim.sharded import is_dtensor, layout, local_tensor, reshard

__all__ = [
    "Share",
    "Tracked",
    "averaged_tensors",
    "broadcast_buffers",
    "describe",
    "is_statistic",
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
    broadcast: bool = False  # a buffer copied from the group's first rank at each round


class Share:
    """One wrapper's claim on a model: the parameters its base optimizer steps.

    Every open wrapper on a model is registered (weakly) under the model's innermost module,
    in the order they were built; :func:`tracked` asks the share which tensors are its own.

    Example::

        >>> share = Share(model, base_optimizer, extra_params)
        >>> mine, others, first = share.claims()
        >>> share.release()  # at close(): the others take over what was ours
    """

    def __init__(self, model: nn.Module, base_optimizer: Optimizer, extra: list[Tensor]) -> None:
        self._key = wrapper_chain(model)[-1]  # DDP and compile unwrapped
        self._base_optimizer = base_optimizer
        self._extra = extra
        _SHARES.setdefault(self._key, []).append(weakref.ref(self))

    def held(self) -> set[int]:
        """The ids of the parameters this wrapper's optimizer steps."""
        ids = {id(p) for group in self._base_optimizer.param_groups for p in group["params"]}
        return ids | {id(p) for p in self._extra}

    def claims(self) -> tuple[set[int], set[int], bool]:
        """This wrapper's parameter ids, the other open wrappers' ids, and whether this is the
        first open wrapper on the model (which takes what no optimizer holds)."""
        shares = [s for s in (ref() for ref in _SHARES.get(self._key, [])) if s is not None]
        others: set[int] = set()
        for share in shares:
            if share is not self:
                others |= share.held()
        return self.held(), others, not shares or shares[0] is self

    def release(self) -> None:
        """Leave the model to the other wrappers (idempotent)."""
        refs = _SHARES.get(self._key, [])
        refs[:] = [ref for ref in refs if ref() not in (None, self)]


# The open wrappers of each model, in the order they were built; weak both ways.
_SHARES: weakref.WeakKeyDictionary[nn.Module, list[weakref.ref[Share]]] = (
    weakref.WeakKeyDictionary()
)


def is_statistic(module: nn.Module, name: str) -> bool:
    """Whether buffer ``name`` of ``module`` is a running statistic, which rounds average:
    a normalization layer's buffer (BatchNorm, InstanceNorm), or a name starting with
    ``running_``."""
    return isinstance(module, _NormBase) or name.startswith("running_")


def tracked(
    model: nn.Module,
    extra_params: Sequence[Tensor],
    average_buffers: bool | str,
    share: Share | None = None,
) -> Iterator[Tracked]:
    """Every parameter (trainable ones this wrapper owns averaged), every parameter added with
    ``add_param_group``, then every buffer, in a fixed order.

    Floating-point buffers this wrapper owns: with ``average_buffers=True``, running
    statistics (:func:`is_statistic`) averaged and the others broadcast from the group's first
    rank; with ``"all"``, all averaged; with ``False``, none touched. Ownership with several
    wrappers on one model: see the module's docstring. FSDP2 modules are resharded first: a
    forward without backward leaves the root's parameters unsharded."""
    reshard(model)
    mine, others, first = share.claims() if share is not None else (set(), set(), True)

    def owns(p: Tensor | None) -> bool:
        if p is None:
            return first
        return id(p) in mine or (first and id(p) not in others)

    for name, p in model.named_parameters():
        yield Tracked("parameter", name, p, p.requires_grad and owns(p))
    for i, extra in enumerate(extra_params):
        yield Tracked("parameter", f"<add_param_group #{i}>", extra, True)
    seen: set[int] = set()
    for module_name, module in model.named_modules():
        holder = next((p for p in module._parameters.values() if p is not None), None)
        for name, b in module._buffers.items():
            if b is None or id(b) in seen:
                continue
            seen.add(id(b))
            ours = average_buffers is not False and b.is_floating_point() and owns(holder)
            averaged = ours and (average_buffers == "all" or is_statistic(module, name))
            full_name = f"{module_name}.{name}" if module_name else name
            yield Tracked("buffer", full_name, b, averaged, ours and not averaged)


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
    """Changes when a tensor is added, frozen or unfrozen, or an averaged one is replaced or
    moved to other memory (``model.to(...)`` keeps the parameter objects and gives them new
    storage), another device, dtype or shape; or a buffer copied from the first rank changes
    shape or dtype. A buffer that is not averaged may be replaced freely (one assigned anew at
    each forward)."""
    key: list[Hashable] = []
    for e in entries:
        t = local_tensor(e.tensor)
        if e.averaged:
            key.append((e.kind, e.name, id(e.tensor), t.data_ptr(), t.device, t.dtype, t.shape))
        else:
            key.append((e.kind, e.name, e.broadcast, t.dtype, t.shape))
    return tuple(key)


def broadcast_buffers(entries: Sequence[Tracked]) -> list[Tensor]:
    """The buffers copied from the group's first rank at each round, in order."""
    return [e.tensor for e in entries if e.broadcast]


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
