"""Buckets: runs of consecutive (slices of) tensors of one device and dtype, one collective each.

Tensors are grouped by (device, dtype) in a fixed order and cut into buckets of equal size, at
most ``cap`` bytes of full precision each; a tensor larger than a bucket is split across
several. Each piece remembers which input tensor it came from and where, so that code above the
buckets can talk about tensors, never about bucket internals.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Union

import torch
from torch import Tensor

from local_sgd_optim.comm.tensors import as_real, shaped_views

if TYPE_CHECKING:
    from local_sgd_optim.comm.quantize import QuantFormat

__all__ = [
    "Bucket",
    "WireFormat",
    "contiguous_span",
    "cut_into_buckets",
    "group_by_device_and_dtype",
    "pool_plan",
    "wire_dtype",
]

# What deltas travel as: a 16-bit dtype, an 8- or 4-bit format, or None (no deltas).
WireFormat = Union[torch.dtype, "QuantFormat", None]


@dataclass(eq=False)
class Bucket:
    """A run of pieces of one device and dtype, sent as one collective.

    Args:
        device (torch.device): where the pieces live.
        dtype (torch.dtype): their (real) dtype.
        wire_dtype (torch.dtype): what travels: ``dtype``, a 16-bit type for deltas, or
            ``torch.uint8`` for quantized deltas.
        sources (list of Tensor): 1-D slices of contiguous tensors, or whole non-contiguous ones.
        origins (list of (int, int)): for each source, the input tensor's index and the
            source's offset in that tensor's flattened real view.
        numel (int): elements in all sources.
        group (int): index of its (device, dtype) group.
        group_offset (int): where the bucket starts in its group's flat layout.
        quant (QuantFormat, optional): the 8- or 4-bit format of quantized deltas.

    Example::

        >>> buckets = cut_into_buckets(group_by_device_and_dtype(params), 4 << 20, None)
        >>> sum(b.numel for b in buckets) == sum(p.numel() for p in params)
        True
    """

    device: torch.device
    dtype: torch.dtype
    wire_dtype: torch.dtype
    sources: list[Tensor]
    origins: list[tuple[int, int]]
    numel: int
    group: int
    group_offset: int
    quant: QuantFormat | None = None
    wire: Tensor = field(init=False)  # what is all-reduced (the payload)
    payload_views: list[Tensor] = field(init=False)
    scratch: Tensor | None = field(default=None, init=False)  # full precision staging
    scratch_views: list[Tensor] = field(default_factory=list, init=False)
    sent: Tensor | None = field(default=None, init=False)  # overlap: the payload this rank sent
    sent_views: list[Tensor] = field(default_factory=list, init=False)
    anchor: Tensor | None = field(default=None, init=False)  # deltas: last averaged values
    anchor_views: list[Tensor] = field(default_factory=list, init=False)
    # The sources as one 1-D view, where they lie back to back in one storage (parameters
    # placed in bucket storage): the round then works on the tensors' own memory.
    span: Tensor | None = field(default=None, init=False)
    # The backend computes the mean itself (NCCL's ReduceOp.AVG): no division pass after it.
    backend_averages: bool = field(default=False, init=False)
    # Quantized deltas (see comm.quantize). The payload is the records of whole blocks, cut
    # into `shares` equal runs for the reduce-scatter (1: the all-gather).
    shares: int = field(default=1, init=False)
    received: Tensor | None = field(default=None, init=False)  # what the collective brings
    share: Tensor | None = field(default=None, init=False)  # reduce-scatter: this rank's mean
    work: Tensor | None = field(default=None, init=False)  # float32, whole blocks
    work_views: list[Tensor] = field(default_factory=list, init=False)
    codes: Tensor | None = field(default=None, init=False)  # int4: codes unpacked
    casts: Tensor | None = field(default=None, init=False)  # float32: codes cast to add them

    @property
    def delta(self) -> bool:
        """Whether the bucket travels as deltas (16-bit or quantized) against a
        full-precision anchor."""
        return self.wire_dtype != self.dtype

    @property
    def prescaled(self) -> bool:
        """Whether each rank divides by the world size before the sum rather than after: for
        float16 on the wire, whose sum of N values near its top (65504) would overflow."""
        return self.wire_dtype == torch.float16

    @property
    def in_place(self) -> bool:
        """Whether the full-precision payload is the tensors' own memory (nothing is copied)."""
        return self.span is not None and not self.delta

    @property
    def wire_bytes(self) -> int:
        """Bytes this rank sends: the values, or quantized codes and scales of whole blocks."""
        if self.quant is not None:
            return self.quant.payload_bytes(self.numel, self.shares)
        return self.numel * self.wire_dtype.itemsize

    @property
    def payload(self) -> Tensor:
        """What the bucket sends: the wire buffer."""
        return self.wire

    def set_wire(self, wire: Tensor) -> None:
        """Use ``wire`` for this bucket's collective."""
        self.wire = wire
        # Quantized records are not shaped like the tensors.
        self.payload_views = [] if self.quant is not None else shaped_views(wire, self.sources)


def contiguous_span(pieces: Sequence[Tensor]) -> Tensor | None:
    """One 1-D view over ``pieces`` when they lie back to back, in order, in one storage;
    ``None`` otherwise."""
    if not pieces or not all(p.is_contiguous() for p in pieces):
        return None
    first = pieces[0]
    storage = first.untyped_storage().data_ptr()
    expected = first.data_ptr()
    for piece in pieces:
        if piece.untyped_storage().data_ptr() != storage or piece.data_ptr() != expected:
            return None
        expected += piece.numel() * piece.element_size()
    numel = sum(p.numel() for p in pieces)
    return first.detach().as_strided((numel,), (1,), first.storage_offset())


def group_by_device_and_dtype(tensors: Iterable[Tensor]) -> list[list[tuple[int, Tensor]]]:
    """Real views of ``tensors`` with their input index, grouped by (device, dtype) in a fixed
    order; empty tensors are left out."""
    groups: dict[tuple[torch.device, torch.dtype], list[tuple[int, Tensor]]] = {}
    for index, tensor in enumerate(tensors):
        real = as_real(tensor)
        if real.numel() == 0:
            continue
        groups.setdefault((real.device, real.dtype), []).append((index, real))
    # A fixed order of groups keeps the sequence of collectives identical on every rank.
    ordered = sorted(groups.items(), key=lambda item: (str(item[0][0]), str(item[0][1])))
    return [group for _, group in ordered]


def wire_dtype(dtype: torch.dtype, comm_dtype: WireFormat) -> torch.dtype:
    """What a tensor of ``dtype`` travels as: only tensors wider than ``comm_dtype`` gain from
    deltas, so 16-bit tensors travel as they are with a 16-bit ``comm_dtype``; with a
    quantized format every floating-point tensor wider than a byte travels as bytes."""
    if comm_dtype is None or not dtype.is_floating_point:
        return dtype
    if isinstance(comm_dtype, torch.dtype):
        return comm_dtype if dtype.itemsize > comm_dtype.itemsize else dtype
    return torch.uint8 if dtype.itemsize > 1 else dtype


def _runs(
    tensors: Sequence[tuple[int, Tensor]], cap: int
) -> list[list[tuple[Tensor, tuple[int, int]]]]:
    """Pieces of at most ``cap`` elements in all, per run, in order."""
    runs: list[list[tuple[Tensor, tuple[int, int]]]] = [[]]
    filled = 0
    for index, tensor in tensors:
        if not tensor.is_contiguous():
            # Cannot be sliced without a copy: it travels whole, alone if it is large.
            if filled and filled + tensor.numel() > cap:
                runs.append([])
                filled = 0
            runs[-1].append((tensor, (index, 0)))
            filled += tensor.numel()
            continue
        flat = tensor.view(-1)
        start = 0
        while start < flat.numel():
            if filled >= cap:
                runs.append([])
                filled = 0
            take = min(cap - filled, flat.numel() - start)
            runs[-1].append((flat[start : start + take], (index, start)))
            filled += take
            start += take
    return runs


def cut_into_buckets(
    groups: list[list[tuple[int, Tensor]]], cap_bytes: int, comm_dtype: WireFormat
) -> list[Bucket]:
    """Cut each group into buckets of equal size, at most ``cap_bytes`` of full precision."""
    buckets: list[Bucket] = []
    for g, tensors in enumerate(groups):
        dtype, device = tensors[0][1].dtype, tensors[0][1].device
        # The cap counts full-precision bytes, which bounds the staging buffer of 16-bit deltas
        # too; buckets of equal size keep the two reused wire buffers as small as they can be.
        cap = max(1, cap_bytes // dtype.itemsize)
        total = sum(t.numel() for _, t in tensors)
        cap = -(-total // -(-total // cap))
        offset = 0
        for run in _runs(tensors, cap):
            numel = sum(t.numel() for t, _ in run)
            if numel:
                sources = [t for t, _ in run]
                origins = [o for _, o in run]
                wire = wire_dtype(dtype, comm_dtype)
                quant = None if isinstance(comm_dtype, torch.dtype) or wire == dtype else comm_dtype
                buckets.append(
                    Bucket(device, dtype, wire, sources, origins, numel, g, offset, quant)
                )
                offset += numel
    return buckets


def pool_plan(buckets: Sequence[Bucket], slots: int) -> list[tuple[int, int]]:
    """For each bucket, (its slot in a pool of ``slots`` buffers per device, the index of the
    bucket that used that slot before it, or -1): a bucket may be packed only once that earlier
    one has been unpacked."""
    per_device: dict[torch.device, list[int]] = {}
    plan = [(0, -1)] * len(buckets)
    for i, bucket in enumerate(buckets):
        used = per_device.setdefault(bucket.device, [])
        k = len(used)
        plan[i] = (k % slots, used[k - slots] if k >= slots else -1)
        used.append(i)
    return plan
