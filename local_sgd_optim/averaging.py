"""How tensors are averaged across ranks.

:class:`LocalSGDOptimizer` decides *when* a round happens; this module decides *how* the bytes move.
Tensors are grouped by (device, dtype) and each group is packed into one flat buffer that is
allocated once and reused, so a round costs one collective per group rather than one per tensor
(each gloo collective carries milliseconds of fixed latency). Parameters keep their own storage:
values are copied into the flat buffer and back, never re-pointed or aliased into it.
"""

from __future__ import annotations

import contextlib
import hashlib
from collections.abc import Iterable, Sequence

import torch
import torch.distributed as dist
from torch import Tensor

__all__: list[str] = []


def _as_real(tensor: Tensor) -> Tensor:
    """A real view of ``tensor`` sharing its storage (complex tensors average as pairs)."""
    return torch.view_as_real(tensor) if tensor.is_complex() else tensor


def group_size(process_group: dist.ProcessGroup | None) -> int:
    """Number of ranks in ``process_group``; 1 when torch.distributed is not initialised."""
    if not dist.is_available() or not dist.is_initialized():
        return 1
    return dist.get_world_size(process_group)


def group_rank(process_group: dist.ProcessGroup | None) -> int:
    """This process's rank inside ``process_group``, or -1 when it is not a member."""
    if not dist.is_available() or not dist.is_initialized():
        return 0
    return dist.get_rank(process_group)


def collective_device(
    process_group: dist.ProcessGroup | None, preferred: torch.device | None = None
) -> torch.device:
    """The device small bookkeeping tensors must live on for ``process_group``'s backend.

    For a CUDA-only backend (NCCL) that is ``preferred`` (the model's GPU) when it is a CUDA
    device, else the current CUDA device; ranks that never called ``torch.cuda.set_device``
    would otherwise all pick GPU 0.
    """
    backend = str(dist.get_backend(process_group)).lower()
    if "nccl" in backend and "cpu:" not in backend and torch.cuda.is_available():
        if preferred is not None and preferred.type == "cuda":
            return preferred
        return torch.device("cuda", torch.cuda.current_device())
    return torch.device("cpu")


class _FlatGroup:
    """The tensors of one (device, dtype) and a flat buffer with a shaped view for each."""

    def __init__(self, tensors: list[Tensor]) -> None:
        self.tensors = tensors
        total = sum(t.numel() for t in tensors)
        self.flat = torch.empty(total, dtype=tensors[0].dtype, device=tensors[0].device)
        self.views: list[Tensor] = []
        offset = 0
        for t in tensors:
            self.views.append(self.flat[offset : offset + t.numel()].view(t.shape))
            offset += t.numel()

    def pack(self) -> None:
        _copy_all(self.views, self.tensors)

    def unpack(self) -> None:
        _copy_all(self.tensors, self.views)


def _copy_all(destinations: list[Tensor], sources: list[Tensor]) -> None:
    if hasattr(torch, "_foreach_copy_"):
        torch._foreach_copy_(destinations, sources)
    else:  # pragma: no cover - torch builds without the fused copy
        for destination, source in zip(destinations, sources):
            destination.copy_(source)


def _group_by_device_and_dtype(tensors: Iterable[Tensor]) -> list[_FlatGroup]:
    buckets: dict[tuple[torch.device, torch.dtype], list[Tensor]] = {}
    for tensor in tensors:
        real = _as_real(tensor)
        if real.numel() == 0:
            continue
        buckets.setdefault((real.device, real.dtype), []).append(real)
    # A fixed order of groups keeps the sequence of collectives identical on every rank.
    ordered = sorted(buckets.items(), key=lambda item: (str(item[0][0]), str(item[0][1])))
    return [_FlatGroup(group) for _, group in ordered]


class TensorAverager:
    """Averages a fixed list of tensors in place across ``process_group``.

    Memory: one flat buffer per (device, dtype) group, together the size of the averaged
    tensors, allocated at construction and reused by every round.

    Args:
        tensors (Sequence[Tensor]): floating-point (or complex) tensors to average in place.
        process_group (ProcessGroup, optional): the ranks to average over (default: the world).
    """

    def __init__(self, tensors: Sequence[Tensor], process_group: dist.ProcessGroup | None) -> None:
        self.process_group = process_group
        self.world_size = group_size(process_group)
        self.groups = _group_by_device_and_dtype(tensors)
        self.numel = sum(g.flat.numel() for g in self.groups)
        self.nbytes = sum(g.flat.numel() * g.flat.element_size() for g in self.groups)

    @torch.no_grad()
    def average(self) -> None:
        """One averaging round. Every rank of the group must call it."""
        for group in self.groups:
            group.pack()
            dist.all_reduce(group.flat, op=dist.ReduceOp.SUM, group=self.process_group)
            group.flat.div_(self.world_size)
            group.unpack()


@torch.no_grad()
def broadcast_tensors(tensors: Sequence[Tensor], process_group: dist.ProcessGroup | None) -> bool:
    """Copy the group's rank 0 values of ``tensors`` to every rank, in place.

    Returns whether any of this rank's tensors changed. The flat buffers are temporary.
    """
    src = 0
    if process_group is not None:
        src = dist.get_global_rank(process_group, 0)
    changed = False
    for group in _group_by_device_and_dtype(tensors):
        group.pack()
        dist.broadcast(group.flat, src=src, group=process_group)
        changed = changed or any(
            not torch.equal(local, received) for local, received in zip(group.tensors, group.views)
        )
        group.unpack()
    return changed


def _digest(lines: Sequence[str]) -> int:
    raw = hashlib.sha256("\n".join(lines).encode()).digest()[:8]
    return int.from_bytes(raw, "little", signed=True)


def exchange_descriptions(
    lines: Sequence[str],
    process_group: dist.ProcessGroup | None,
    error: str | None = None,
    device: torch.device | None = None,
) -> list[tuple[str | None, list[str]]] | None:
    """Compare a description (one line per tensor or setting) across ranks, with local errors.

    The common case costs one all-gather of three integers per rank. Only when a rank reports an
    ``error`` or the fingerprints differ is every rank's ``(error, lines)`` gathered, so that
    every rank can name the problem; that list is returned. ``None`` means all ranks agree.
    ``device`` is the model's device, used for the collective's tensors where the backend needs.
    """
    world = group_size(process_group)
    device = collective_device(process_group, device)
    mine = torch.tensor(
        [int(error is not None), len(lines), _digest(lines)], dtype=torch.int64, device=device
    )
    gathered = [torch.empty_like(mine) for _ in range(world)]
    dist.all_gather(gathered, mine, group=process_group)
    fingerprints = [tuple(t.tolist()) for t in gathered]
    if all(f == fingerprints[0] and f[0] == 0 for f in fingerprints):
        return None
    everyone: list[tuple[str | None, list[str]] | None] = [None] * world
    # all_gather_object stages its bytes on the current CUDA device when the backend is NCCL.
    with torch.cuda.device(device) if device.type == "cuda" else contextlib.nullcontext():
        dist.all_gather_object(everyone, (error, list(lines)), group=process_group)
    return [entry if entry is not None else (None, []) for entry in everyone]
