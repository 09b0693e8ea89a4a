"""Collectives and the one pipeline loop that every bucketed operation goes through.

:func:`pipeline` runs buckets through a small pool of reused buffers: pack a bucket into its
buffer, start its collective asynchronously, and land (wait, unpack) the bucket that used the
buffer before, so that packing, communicating and unpacking of consecutive buckets overlap.
The averager's rounds, :class:`GradientAverager` (warm-up steps) and :func:`broadcast_tensors`
all use it; the DDP hook uses :func:`start_all_reduce` on DDP's own bucket.
"""

from __future__ import annotations

import contextlib
import hashlib
import time
from collections.abc import Sequence
from typing import Callable

import torch
import torch.distributed as dist
from torch import Tensor

from local_sgd_optim.comm.buckets import (
    cut_into_buckets,
    group_by_device_and_dtype,
    pool_plan,
)
from local_sgd_optim.comm.groups import (
    StandaloneGroup,
    collective_device,
    group_rank,
    group_size,
)
from local_sgd_optim.comm.header import RoundHeader
from local_sgd_optim.comm.stats import CommStats, RoundError
from local_sgd_optim.comm.tensors import all_finite, copy_all, shaped_views
from local_sgd_optim.sharded import local_tensors

__all__ = [
    "MB",
    "POOL_SLOTS",
    "GradientAverager",
    "backend_averages",
    "broadcast_tensors",
    "exchange_descriptions",
    "pipeline",
    "start_all_reduce",
    "start_collective",
    "wait",
]

MB = 1024 * 1024
# Two buffers per device: one bucket is packed (or unpacked) while the other is in flight.
POOL_SLOTS = 2


def start_all_reduce(
    tensor: Tensor,
    group: dist.ProcessGroup | None,
    stats: CommStats,
    step: int,
    op: dist.ReduceOp.RedOpType = dist.ReduceOp.SUM,
) -> dist.Work:
    """Start summing (or ``op``) ``tensor`` in place across ``group``; counts its bytes in
    ``stats``.

    Raises:
        RoundError: the collective could not start (a rank has exited).
    """
    return start_collective(
        lambda: dist.all_reduce(tensor, op=op, group=group, async_op=True),
        stats,
        step,
        tensor.numel() * tensor.element_size(),
    )


def start_collective(
    start: Callable[[], dist.Work | None], stats: CommStats, step: int, nbytes: int
) -> dist.Work:
    """Start a round's collective with ``start()`` (``async_op=True``); counts ``nbytes``, what
    this rank contributes, in ``stats``.

    Raises:
        RoundError: the collective could not start (a rank has exited).
    """
    stats.bytes_communicated += nbytes
    try:
        work = start()
    except Exception as failure:
        raise RoundError(
            f"the averaging round at step {step} could not start its collective "
            f"({failure}). Another rank has probably exited or crashed; see its log"
        ) from failure
    assert work is not None
    return work


def backend_averages(group: dist.ProcessGroup | None, device: torch.device) -> bool:
    """Whether ``group`` computes a mean of ``device`` tensors itself (``ReduceOp.AVG``, which
    NCCL has and gloo has not), sparing the division pass after a sum. Never for a
    :class:`StandaloneGroup` (a fault-tolerance quorum's): some of its ranks may join a round
    without contributing, so the mean is over fewer ranks than the group has."""
    if device.type != "cuda" or isinstance(group, StandaloneGroup):
        return False
    try:
        return "nccl" in str(dist.get_backend(group)).lower()
    except (RuntimeError, ValueError):  # pragma: no cover - a group without a backend name
        return False


def wait(work: dist.Work, stats: CommStats, step: int) -> None:
    """Wait for ``work``, adding the time blocked to ``stats``.

    Raises:
        RoundError: the collective failed (a rank exited or timed out).
    """
    began = time.perf_counter()
    try:
        work.wait()
    except Exception as failure:
        raise RoundError(
            f"the averaging round at step {step} failed in its collective ({failure}). "
            "Another rank has probably exited, crashed or stopped calling step(); see its "
            "log. Parameters on this rank may be partly averaged: resume from a checkpoint"
        ) from failure
    finally:
        stats.comm_seconds += time.perf_counter() - began


def pipeline(
    previous_users: Sequence[int],
    start: Callable[[int], dist.Work],
    land: Callable[[int, dist.Work], bool],
    drain: Callable[[dist.Work], None],
) -> bool:
    """Start and land ``len(previous_users)`` buckets in order through a pool of buffers.

    Bucket ``i`` is started (``start(i)``: pack and launch) only after the bucket
    ``previous_users[i]`` that used its buffer before has landed (``land(j, work)``: wait and
    unpack). When ``land`` returns ``False`` or raises, the collectives already started are
    waited for with ``drain`` (every rank started the same ones) and nothing more is unpacked.

    Returns:
        Whether every bucket landed.
    """
    started: dict[int, dist.Work] = {}
    landed = 0

    def land_next() -> bool:
        nonlocal landed
        try:
            ok = land(landed, started.pop(landed))
        except BaseException:
            for work in started.values():
                drain(work)
            raise
        landed += 1
        if not ok:
            for work in started.values():
                drain(work)
        return ok

    for i, previous in enumerate(previous_users):
        while landed <= previous:
            if not land_next():
                return False
        started[i] = start(i)
    while landed < len(previous_users):
        if not land_next():
            return False
    return True


class GradientAverager:
    """All-reduces the mean of a changing list of gradients through a reused pool of buckets.

    For synchronous (warm-up) steps on a plain module: the gradient tensors may be new objects
    each step, so buckets are cut per call (cheap bookkeeping), while the two wire buffers per
    device, of at most ``bucket_cap_mb`` each, are allocated once and grow only if a
    non-contiguous gradient needs more. A DTensor gradient (FSDP2: already reduced inside the
    shard group) is averaged as its local shard, with the ranks of ``process_group``, which
    hold the same shard.

    Args:
        process_group (ProcessGroup, optional): the ranks to average over (default: the world).
        bucket_cap_mb (float): bucket size in MiB (default: 25).
        stats (CommStats, optional): where to add up bytes and waiting time (default: new).
        device (torch.device, optional): the model's device, for the header (NCCL).

    Example::

        >>> grads = GradientAverager(None, bucket_cap_mb=25)
        >>> loss.backward()
        >>> grads.average([p.grad for p in model.parameters() if p.grad is not None], step=0)
    """

    def __init__(
        self,
        process_group: dist.ProcessGroup | None,
        bucket_cap_mb: float = 25.0,
        stats: CommStats | None = None,
        device: torch.device | None = None,
    ) -> None:
        self.stats = CommStats() if stats is None else stats
        self.process_group = process_group
        self.world_size = group_size(process_group)
        self.header = RoundHeader(
            process_group, self.world_size, group_rank(process_group), "raise", device, self.stats
        )
        self._cap_bytes = max(1, int(bucket_cap_mb * MB))
        self._pools: dict[torch.device, list[Tensor]] = {}

    def _slot(self, device: torch.device, index: int, nbytes: int) -> Tensor:
        pool = self._pools.setdefault(device, [])
        while len(pool) <= index:
            pool.append(torch.empty(0, dtype=torch.uint8, device=device))
        if pool[index].numel() < nbytes:
            pool[index] = torch.empty(
                max(nbytes, self._cap_bytes), dtype=torch.uint8, device=device
            )
        return pool[index][:nbytes]

    @torch.no_grad()
    def average(self, grads: Sequence[Tensor], step: int = 0) -> None:
        """Replace every gradient by its mean over the ranks. Every rank must call it, at the
        same optimizer ``step`` (checked in a header first, like a round's)."""
        self.header.check(self.header.exchange("gradient average", step, False), step)
        grads = local_tensors(grads)
        dense = [g for g in grads if not g.is_sparse]
        for sparse in (g for g in grads if g.is_sparse):
            self.stats.bytes_communicated += sparse.coalesce().values().nbytes
            dist.all_reduce(sparse, group=self.process_group)
            sparse.div_(self.world_size)
        buckets = cut_into_buckets(group_by_device_and_dtype(dense), self._cap_bytes, None)
        plan = pool_plan(buckets, POOL_SLOTS)
        views: dict[int, tuple[Tensor, list[Tensor]]] = {}

        def start(i: int) -> dist.Work:
            b = buckets[i]
            wire = self._slot(b.device, plan[i][0], b.wire_bytes).view(b.dtype)
            views[i] = (wire, shaped_views(wire, b.sources))
            copy_all(views[i][1], b.sources)
            self.stats.bytes_communicated += b.wire_bytes
            work = dist.all_reduce(wire, group=self.process_group, async_op=True)
            assert work is not None
            return work

        def land(i: int, work: dist.Work) -> bool:
            self._wait(work)
            wire, shaped = views.pop(i)
            wire.div_(self.world_size)
            copy_all(buckets[i].sources, shaped)
            return True

        pipeline([p for _, p in plan], start, land, self._wait)

    def _wait(self, work: dist.Work) -> None:
        began = time.perf_counter()
        work.wait()
        self.stats.comm_seconds += time.perf_counter() - began

    @staticmethod
    def finite(grads: Sequence[Tensor]) -> bool:
        """Whether every gradient is free of inf and NaN (one read of each)."""
        grads = local_tensors(grads)
        dense = [g for g in grads if not g.is_sparse]
        sparse = [g.coalesce().values() for g in grads if g.is_sparse]
        return all_finite(dense) and all_finite(sparse)


@torch.no_grad()
def broadcast_tensors(
    tensors: Sequence[Tensor],
    process_group: dist.ProcessGroup | None,
    bucket_cap_mb: float = 25.0,
    stats: CommStats | None = None,
) -> bool:
    """Copy the group's rank 0 values of ``tensors`` to every rank, in place; their bytes are
    added to ``stats`` when given (a round's copied buffers; not the initial broadcast).

    Returns whether any of this rank's tensors changed. Goes bucket by bucket through one
    buffer per device of at most ``bucket_cap_mb``. The source is the group's first rank
    (its global rank, for a subgroup); of a DTensor, the local shard is copied, from the
    group's first rank that holds the same shard.

    Example::

        >>> broadcast_tensors(list(model.parameters()), None)  # every rank: rank 0's values
    """
    # A group the registry does not know has no global ranks: name the source within it.
    standalone = isinstance(process_group, StandaloneGroup)
    src = 0 if process_group is None or standalone else dist.get_global_rank(process_group, 0)
    buckets = cut_into_buckets(
        group_by_device_and_dtype(local_tensors(tensors)), max(1, int(bucket_cap_mb * MB)), None
    )
    if stats is not None:
        stats.bytes_communicated += sum(b.wire_bytes for b in buckets)
    buffers: dict[torch.device, Tensor] = {}
    for b in buckets:
        if b.device not in buffers:
            size = max(x.wire_bytes for x in buckets if x.device == b.device)
            buffers[b.device] = torch.empty(size, dtype=torch.uint8, device=b.device)
    changed = False
    views: dict[int, list[Tensor]] = {}

    def start(i: int) -> dist.Work:
        b = buckets[i]
        wire = buffers[b.device][: b.wire_bytes].view(b.dtype)
        views[i] = shaped_views(wire, b.sources)
        copy_all(views[i], b.sources)
        if standalone:
            work = dist.broadcast(wire, group=process_group, group_src=0, async_op=True)
        else:
            work = dist.broadcast(wire, src=src, group=process_group, async_op=True)
        assert work is not None
        return work

    def land(i: int, work: dist.Work) -> bool:
        nonlocal changed
        work.wait()
        received = views.pop(i)
        sources = buckets[i].sources
        changed = changed or any(not torch.equal(a, b) for a, b in zip(sources, received))
        copy_all(sources, received)
        return True

    pipeline([p for _, p in pool_plan(buckets, 1)], start, land, _wait_plain)
    return changed


def _wait_plain(work: dist.Work) -> None:
    work.wait()


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

    Example::

        >>> exchange_descriptions(["setting period=8"], None) is None  # all ranks agree
        True
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
