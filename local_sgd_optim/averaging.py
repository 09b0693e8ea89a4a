"""How tensors are averaged across ranks.

:class:`LocalSGDOptimizer` decides *when* a round happens; this module decides *how* the bytes move.

Tensors are grouped by (device, dtype) and cut into buckets of about ``bucket_cap_mb``; a tensor
larger than a bucket is split across several. Each bucket is copied into a wire buffer taken from
a small pool allocated once, all-reduced with ``async_op=True`` and copied back, so packing,
communicating and unpacking of consecutive buckets overlap, and a round costs one collective per
bucket rather than one per tensor (each gloo collective carries milliseconds of fixed latency).
Parameters keep their own storage: values are copied into the wire buffers and back, never
re-pointed or aliased into them.

With a 16-bit ``comm_dtype``, ranks exchange the *delta* since the last round (the tensor minus a
full-precision copy of the last averaged values) in 16 bits and add the averaged delta to that
copy, so the rounding error scales with how far the tensors moved, not with their magnitude.
"""

from __future__ import annotations

import contextlib
import hashlib
import time
import warnings
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
import torch.distributed as dist
from torch import Tensor

__all__ = ["BucketedAverager", "CommStats", "GradientAverager", "RoundError"]

_MB = 1024 * 1024
# Two wire buffers per device: one bucket is packed (or unpacked) while the other is in flight.
_POOL_SLOTS = 2
_SUPPORTED_COMM_DTYPES = (torch.bfloat16, torch.float16)
_STEP_DIGITS = 8  # base-16 digits of the step in a round's header: steps below 2**32


class RoundError(RuntimeError):
    """An averaging round could not be applied; raised on every rank of the group alike.

    Raised when ranks are out of step, when a rank's parameters hold NaN or inf (with
    ``on_nonfinite="raise"``), or when the round's collective fails (a rank exited or timed
    out). In the first two cases no rank's parameters changed.

    Args:
        message (str): what happened and what to do about it.

    Example::

        >>> try:
        ...     opt.step()
        ... except RoundError as error:
        ...     print(f"rank {dist.get_rank()}: {error}")  # the same on every rank
        ...     raise
    """

    def __init__(self, message: str) -> None:
        super().__init__(message)


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


def check_comm_dtype(comm_dtype: object) -> torch.dtype | None:
    """``comm_dtype`` if it is ``None``, ``torch.bfloat16`` or ``torch.float16``, else raise."""
    if comm_dtype is None or comm_dtype in _SUPPORTED_COMM_DTYPES:
        return comm_dtype
    if not isinstance(comm_dtype, torch.dtype):
        raise TypeError(
            f"comm_dtype must be None, torch.bfloat16 or torch.float16, got "
            f"{type(comm_dtype).__name__}"
        )
    raise ValueError(
        f"comm_dtype must be None (full precision), torch.bfloat16 or torch.float16, got "
        f"{comm_dtype}"
    )


def _all_finite(tensors: Sequence[Tensor]) -> bool:
    """Whether no tensor holds NaN or inf: one vectorised read of each, one sync per device.

    NaN and inf propagate into a tensor's 2-norm, so the norms tell. (The max-norm would be
    exact about huge finite values too, but on CPU it runs about 15x slower than the 2-norm; a
    2-norm overflows only for values near 1e19, which no trainable tensor survives anyway.)
    """
    groups: dict[tuple[torch.device, torch.dtype], list[Tensor]] = {}
    for t in tensors:
        if t.numel():
            t = _as_real(t)
            groups.setdefault((t.device, t.dtype), []).append(t)
    for (_, dtype), group in groups.items():
        wide = torch.promote_types(dtype, torch.float32)  # 16-bit sums of squares overflow
        try:
            norms = torch._foreach_norm(group, 2, dtype=wide)
        except TypeError:  # pragma: no cover - torch < 2.5 has no dtype argument
            norms = torch._foreach_norm([t.to(wide) for t in group], 2)
        if not bool(torch.isfinite(torch.stack(norms)).all()):
            return False
    return True


def _copy_all(destinations: list[Tensor], sources: list[Tensor]) -> None:
    if hasattr(torch, "_foreach_copy_"):
        torch._foreach_copy_(destinations, sources)
    else:  # pragma: no cover - torch builds without the fused copy
        for destination, source in zip(destinations, sources):
            destination.copy_(source)


def _shaped_views(flat: Tensor, sources: list[Tensor]) -> list[Tensor]:
    """Consecutive slices of the 1-D ``flat``, shaped like ``sources``."""
    views = []
    offset = 0
    for source in sources:
        views.append(flat[offset : offset + source.numel()].view(source.shape))
        offset += source.numel()
    return views


@dataclass
class CommStats:
    """What averaging has cost this rank so far (``LocalSGDOptimizer.stats``).

    Args:
        rounds (int): averaging rounds applied (skipped ones and rounds on one rank do not
            count).
        bytes_communicated (int): payload bytes this rank contributed to all-reduces (a ring
            all-reduce moves about twice that over each rank's link).
        comm_seconds (float): time the training thread spent blocked waiting on communication.
        round_seconds (float): time the training thread spent in rounds, packing and unpacking
            included (communication that overlaps compute is not counted).

    Example::

        >>> s = opt.stats
        >>> print(f"{s.bytes_communicated / 2**20:.0f} MiB over {s.rounds} rounds, "
        ...       f"{s.comm_seconds:.1f} s blocked on the network")
    """

    rounds: int = 0
    bytes_communicated: int = 0
    comm_seconds: float = 0.0
    round_seconds: float = 0.0

    def as_dict(self) -> dict[str, int | float]:
        """The four numbers as a plain dict (for logs, metrics files and checkpoints)."""
        return {
            "rounds": self.rounds,
            "bytes_communicated": self.bytes_communicated,
            "comm_seconds": self.comm_seconds,
            "round_seconds": self.round_seconds,
        }


@dataclass(eq=False)
class _Bucket:
    """A run of consecutive (slices of) tensors of one device and dtype, sent as one collective."""

    device: torch.device
    dtype: torch.dtype
    wire_dtype: torch.dtype
    sources: list[Tensor]  # 1-D slices of contiguous tensors, or whole non-contiguous tensors
    numel: int
    group: int  # index of its (device, dtype) group, for the flat full-precision copy
    group_offset: int
    header_numel: int = 0  # the first bucket of a round also carries the round's header
    wire: Tensor = field(init=False)  # what is all-reduced: header, then payload
    payload: Tensor = field(init=False)
    payload_views: list[Tensor] = field(init=False)
    scratch: Tensor | None = field(default=None, init=False)  # full precision staging
    scratch_wire: Tensor | None = field(default=None, init=False)  # header + scratch
    scratch_views: list[Tensor] = field(default_factory=list, init=False)
    sent: Tensor | None = field(default=None, init=False)  # overlap: the payload this rank sent
    sent_views: list[Tensor] = field(default_factory=list, init=False)
    anchor: Tensor | None = field(default=None, init=False)  # deltas: last averaged values
    anchor_views: list[Tensor] = field(default_factory=list, init=False)

    @property
    def delta(self) -> bool:
        return self.wire_dtype != self.dtype

    @property
    def wire_bytes(self) -> int:
        return (self.header_numel + self.numel) * self.wire_dtype.itemsize

    @property
    def header(self) -> Tensor:
        return self.wire[: self.header_numel]

    def set_wire(self, wire: Tensor) -> None:
        self.wire = wire
        self.payload = wire[self.header_numel :]
        self.payload_views = _shaped_views(self.payload, self.sources)


def _group_by_device_and_dtype(tensors: Iterable[Tensor]) -> list[list[Tensor]]:
    groups: dict[tuple[torch.device, torch.dtype], list[Tensor]] = {}
    for tensor in tensors:
        real = _as_real(tensor)
        if real.numel() == 0:
            continue
        groups.setdefault((real.device, real.dtype), []).append(real)
    # A fixed order of groups keeps the sequence of collectives identical on every rank.
    ordered = sorted(groups.items(), key=lambda item: (str(item[0][0]), str(item[0][1])))
    return [group for _, group in ordered]


def _wire_dtype(dtype: torch.dtype, comm_dtype: torch.dtype | None) -> torch.dtype:
    # Only tensors wider than comm_dtype gain from deltas; 16-bit tensors travel as they are.
    if comm_dtype is not None and dtype.is_floating_point and dtype.itemsize > comm_dtype.itemsize:
        return comm_dtype
    return dtype


def _cut_into_buckets(
    groups: list[list[Tensor]], cap_bytes: int, comm_dtype: torch.dtype | None
) -> list[_Bucket]:
    buckets: list[_Bucket] = []
    for g, tensors in enumerate(groups):
        dtype, device = tensors[0].dtype, tensors[0].device
        wire_dtype = _wire_dtype(dtype, comm_dtype)
        # The cap counts full-precision bytes, which bounds the staging buffer of 16-bit deltas
        # too; buckets of equal size keep the two reused wire buffers as small as they can be.
        cap = max(1, cap_bytes // dtype.itemsize)
        total = sum(t.numel() for t in tensors)
        cap = -(-total // -(-total // cap))
        runs: list[list[Tensor]] = [[]]
        filled = 0
        for tensor in tensors:
            if not tensor.is_contiguous():
                # Cannot be sliced without a copy: it travels whole, alone if it is large.
                if filled and filled + tensor.numel() > cap:
                    runs.append([])
                    filled = 0
                runs[-1].append(tensor)
                filled += tensor.numel()
                continue
            flat = tensor.view(-1)
            start = 0
            while start < flat.numel():
                if filled >= cap:
                    runs.append([])
                    filled = 0
                take = min(cap - filled, flat.numel() - start)
                runs[-1].append(flat[start : start + take])
                filled += take
                start += take
        offset = 0
        for run in runs:
            numel = sum(t.numel() for t in run)
            if numel:
                buckets.append(_Bucket(device, dtype, wire_dtype, run, numel, g, offset))
                offset += numel
    return buckets


class BucketedAverager:
    """Averages a fixed list of tensors in place across ``process_group``, bucket by bucket.

    Memory, allocated at construction and reused by every round (``C`` is ``bucket_cap_mb``):

    - full precision, no overlap: two wire buffers of at most ``C`` each per device;
    - 16-bit ``comm_dtype``: one full-precision copy of the averaged tensors (the values of the
      last round, which deltas are taken against), two 16-bit wire buffers of at most ``C / 2``
      and one full-precision staging buffer of at most ``C`` per device;
    - ``overlap``: a round stays in flight while training goes on, so every bucket has its own
      wire buffer and a copy of what this rank sent: two copies of the averaged tensors in the
      wire dtype (plus the full-precision copy with a 16-bit ``comm_dtype``).

    A non-contiguous tensor larger than ``C`` is the one thing that makes a bucket larger.

    Args:
        tensors (Sequence[Tensor]): floating-point (or complex) tensors to average in place.
        process_group (ProcessGroup, optional): the ranks to average over (default: the world).
        bucket_cap_mb (float): bucket size in MiB of wire bytes (default: 25).
        comm_dtype (torch.dtype, optional): ``torch.bfloat16`` or ``torch.float16`` to send
            16-bit deltas; ``None`` sends the tensors in their own dtype (default: ``None``).
        overlap (bool): rounds are started with :meth:`start` and completed with
            :meth:`finish`, with training in between (default: ``False``).
        stats (CommStats, optional): where to add up the cost of rounds (default: a new one).
        on_nonfinite (str): what a round does when some rank's tensors hold NaN or inf:
            ``"raise"`` a :class:`RoundError` on every rank, or ``"skip"`` the round with a
            warning; either way no tensor is changed (default: ``"raise"``).

    Every round checks, inside its first collective, that no rank's tensors hold NaN or inf
    and that all ranks are at the same ``step``; the check costs one read of the tensors and a
    header of ``9 * world_size`` numbers on the wire.

    Example::

        >>> averager = BucketedAverager(list(model.parameters()), None, bucket_cap_mb=4)
        >>> averager.average()  # every rank: parameters become the mean over ranks

    .. warning::
        Every rank must build it from the same shapes and dtypes, and make the same calls.
    """

    def __init__(
        self,
        tensors: Sequence[Tensor],
        process_group: dist.ProcessGroup | None,
        *,
        bucket_cap_mb: float = 25.0,
        comm_dtype: torch.dtype | None = None,
        overlap: bool = False,
        stats: CommStats | None = None,
        on_nonfinite: str = "raise",
    ) -> None:
        if on_nonfinite not in ("raise", "skip"):
            raise ValueError(f"on_nonfinite must be 'raise' or 'skip', got {on_nonfinite!r}")
        self.process_group = process_group
        self.world_size = group_size(process_group)
        self.comm_dtype = comm_dtype
        self.overlap = overlap
        self.on_nonfinite = on_nonfinite
        self.stats = CommStats() if stats is None else stats
        self._groups = _group_by_device_and_dtype(tensors)
        self._tensors = [t for group in self._groups for t in group]
        cap_bytes = max(1, int(bucket_cap_mb * _MB))
        self.buckets = _cut_into_buckets(self._groups, cap_bytes, comm_dtype)
        self.header_numel = self.world_size * (1 + _STEP_DIGITS) if self.buckets else 0
        if self.buckets:
            self.buckets[0].header_numel = self.header_numel
        self.numel = sum(b.numel for b in self.buckets)
        self.nbytes = sum(b.wire_bytes for b in self.buckets)
        self._previous_user: list[int] = []
        self._anchors: list[Tensor | None] = [None] * len(self._groups)
        self._pending: list[dist.Work] | None = None
        self._pending_step = 0
        self._payload_scaled = False
        self._allocate()

    # --- memory ---------------------------------------------------------------------------

    def _allocate(self) -> None:
        per_device: dict[torch.device, list[int]] = {}
        for i, bucket in enumerate(self.buckets):
            per_device.setdefault(bucket.device, []).append(i)
        self._previous_user = [-1] * len(self.buckets)
        for device, indices in per_device.items():
            if self.overlap:
                for i in indices:
                    b = self.buckets[i]
                    b.set_wire(
                        torch.empty(b.header_numel + b.numel, dtype=b.wire_dtype, device=device)
                    )
                    b.sent = torch.empty(b.numel, dtype=b.wire_dtype, device=device)
                    b.sent_views = _shaped_views(b.sent, b.sources)
            else:
                slots = min(_POOL_SLOTS, len(indices))
                size = max(self.buckets[i].wire_bytes for i in indices)
                pool = [torch.empty(size, dtype=torch.uint8, device=device) for _ in range(slots)]
                for k, i in enumerate(indices):
                    b = self.buckets[i]
                    b.set_wire(pool[k % slots][: b.wire_bytes].view(b.wire_dtype))
                    if k >= slots:
                        self._previous_user[i] = indices[k - slots]
            deltas = [self.buckets[i] for i in indices if self.buckets[i].delta]
            if deltas:
                # Also the wire of the full-precision round that sets the copy: room for a header.
                size = max((b.header_numel + b.numel) * b.dtype.itemsize for b in deltas)
                scratch = torch.empty(size, dtype=torch.uint8, device=device)
                for b in deltas:
                    full = scratch[: (b.header_numel + b.numel) * b.dtype.itemsize].view(b.dtype)
                    b.scratch_wire = full
                    b.scratch = full[b.header_numel :]
                    b.scratch_views = _shaped_views(b.scratch, b.sources)

    @property
    def workspace_bytes(self) -> int:
        """Bytes this averager allocated for itself (buffers, copies), not counting the tensors."""
        seen: dict[int, int] = {}
        for b in self.buckets:
            for t in (b.wire, b.scratch, b.sent):
                if t is not None:
                    storage = t.untyped_storage()
                    seen[storage.data_ptr()] = storage.nbytes()
        for a in self._anchors:
            if a is not None:
                seen[a.untyped_storage().data_ptr()] = a.untyped_storage().nbytes()
        return sum(seen.values())

    @property
    def anchored(self) -> bool:
        """Whether the full-precision copy for 16-bit deltas holds the last round's values."""
        return all(b.anchor is not None for b in self.buckets if b.delta)

    def _set_anchor_storage(self) -> None:
        for g, tensors in enumerate(self._groups):
            if self._anchors[g] is None and any(b.delta and b.group == g for b in self.buckets):
                numel = sum(t.numel() for t in tensors)
                first = tensors[0]
                self._anchors[g] = torch.empty(numel, dtype=first.dtype, device=first.device)
        for b in self.buckets:
            anchor = self._anchors[b.group]
            if b.delta and anchor is not None:
                b.anchor = anchor[b.group_offset : b.group_offset + b.numel]
                b.anchor_views = _shaped_views(b.anchor, b.sources)

    def anchor_tensors(self) -> list[Tensor]:
        """The full-precision copies kept for 16-bit deltas, one flat tensor per group."""
        return [a for a in self._anchors if a is not None] if self.anchored else []

    def load_anchor_tensors(self, anchors: Sequence[Tensor]) -> None:
        """Restore :meth:`anchor_tensors` from a checkpoint (an empty list: not anchored)."""
        if not anchors:
            self._anchors = [None] * len(self._groups)
            for b in self.buckets:
                b.anchor, b.anchor_views = None, []
            return
        self._set_anchor_storage()
        mine = [a for a in self._anchors if a is not None]
        if len(anchors) != len(mine) or any(
            a.numel() != b.numel() or a.dtype != b.dtype for a, b in zip(anchors, mine)
        ):
            raise ValueError(
                "the checkpoint's full-precision copy for comm_dtype does not match this model "
                f"({[(tuple(a.shape), a.dtype) for a in anchors]} against "
                f"{[(tuple(a.shape), a.dtype) for a in mine]})"
            )
        with torch.no_grad():
            for destination, source in zip(mine, anchors):
                destination.copy_(source)

    def set_anchor_from_tensors(self) -> None:
        """Take the tensors' current values as the reference for deltas (ranks must agree)."""
        if any(b.delta for b in self.buckets):
            self._set_anchor_storage()
            with torch.no_grad():
                for b in self.buckets:
                    if b.delta:
                        _copy_all(b.anchor_views, b.sources)

    # --- the header: every rank's step and whether its tensors are finite -------------------

    def _local_nonfinite(self) -> bool:
        return not _all_finite(self._tensors)

    def _write_header(self, header: Tensor, step: int, nonfinite: bool) -> None:
        # Each rank writes only its own slots and the others add zeros, so every value arrives
        # exact whatever the wire dtype: the step goes as base-16 digits, exact even in bf16.
        header.zero_()
        rank, world = group_rank(self.process_group), self.world_size
        header[rank] = float(nonfinite)
        digits = [(step >> (4 * j)) & 15 for j in range(_STEP_DIGITS)]
        start = world + rank * _STEP_DIGITS
        header[start : start + _STEP_DIGITS] = torch.tensor(digits, dtype=header.dtype)

    def _read_header(self, header: Tensor) -> tuple[list[int], list[int]]:
        values = [round(v) for v in header.double().cpu().tolist()]
        world = self.world_size
        nonfinite = [r for r in range(world) if values[r]]
        steps = [
            sum(values[world + r * _STEP_DIGITS + j] << (4 * j) for j in range(_STEP_DIGITS))
            for r in range(world)
        ]
        return nonfinite, steps

    def _verdict(self, header: Tensor, step: int) -> bool:
        """Whether the round may be applied; raises (on every rank alike) when it must not."""
        nonfinite, steps = self._read_header(header)
        if len(set(steps)) > 1:
            at = ", ".join(f"rank {r} at step {s}" for r, s in enumerate(steps))
            raise RoundError(
                f"ranks are out of step at an averaging round ({at}). Every rank must call "
                "step() the same number of times; nothing was averaged"
            )
        if nonfinite:
            names = ", ".join(map(str, nonfinite))
            message = (
                f"non-finite values (NaN or inf) in the averaged tensors of rank(s) {names} at "
                f"step {step}; the round was not applied, so no rank's values changed"
            )
            if self.on_nonfinite == "raise":
                raise RoundError(
                    message + ". Lower the learning rate or clip gradients, or pass "
                    "on_nonfinite='skip' to skip such rounds with a warning"
                )
            warnings.warn(message, RuntimeWarning, stacklevel=4)
            return False
        return True

    # --- blocking rounds ------------------------------------------------------------------

    @torch.no_grad()
    def average(self, step: int = 0) -> bool:
        """One averaging round, blocking until the tensors hold the mean over ranks.

        Completes a round started with :meth:`start` first. Every rank of the group must call
        it, with the same ``step``.

        Returns:
            Whether the round was applied (``False``: skipped for non-finite values).

        Raises:
            RoundError: ranks are at different steps, a rank's tensors are not finite (with
                ``on_nonfinite="raise"``), or the collective failed (a rank exited or timed out).
        """
        if self._pending is not None:
            self.finish()
        began = time.perf_counter()
        nonfinite = self._local_nonfinite()
        try:
            if any(b.delta for b in self.buckets) and not self.anchored:
                applied = self._full_precision_round(step, nonfinite)
            else:
                applied = self._pipelined_round(step, nonfinite)
        finally:
            self.stats.round_seconds += time.perf_counter() - began
        self.stats.rounds += int(applied)
        return applied

    def _wait(self, work: dist.Work, step: int) -> None:
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
            self.stats.comm_seconds += time.perf_counter() - began

    def _all_reduce(self, tensor: Tensor, step: int) -> dist.Work:
        self.stats.bytes_communicated += tensor.numel() * tensor.element_size()
        try:
            work = dist.all_reduce(tensor, group=self.process_group, async_op=True)
        except Exception as failure:
            raise RoundError(
                f"the averaging round at step {step} could not start its collective "
                f"({failure}). Another rank has probably exited or crashed; see its log"
            ) from failure
        assert work is not None
        return work

    def _drain(self, works: list[dist.Work], step: int) -> None:
        for work in works:
            self._wait(work, step)

    def _pipelined_round(self, step: int, nonfinite: bool) -> bool:
        works: list[dist.Work] = []
        finished = 0
        for i, b in enumerate(self.buckets):
            # The wire buffer is shared with an earlier bucket: that one must be unpacked first.
            while finished <= self._previous_user[i]:
                if not self._finish_bucket(works, finished, step):
                    return False
                finished += 1
            self._pack(b, b.payload, b.payload_views)
            if i == 0:
                self._write_header(b.header, step, nonfinite)
            works.append(self._all_reduce(b.wire, step))
        while finished < len(self.buckets):
            if not self._finish_bucket(works, finished, step):
                return False
            finished += 1
        return True

    def _finish_bucket(self, works: list[dist.Work], i: int, step: int) -> bool:
        self._wait(works[i], step)
        if i == 0:
            try:
                applied = self._verdict(self.buckets[0].header, step)
            except RoundError:
                self._drain(works[1:], step)  # every rank launched the same buckets
                raise
            if not applied:
                self._drain(works[1:], step)
                return False
        self._unpack(self.buckets[i])
        return True

    # Arithmetic between a 16-bit and a 32-bit tensor takes a slow path on CPU (several times
    # slower than a copy), so deltas are formed and applied in full precision in the staging
    # buffer and only cast on the way to and from the wire.

    def _pack(self, b: _Bucket, payload: Tensor, payload_views: list[Tensor]) -> None:
        if b.delta:
            assert b.scratch is not None and b.anchor is not None
            _copy_all(b.scratch_views, b.sources)
            b.scratch.sub_(b.anchor)
            payload.copy_(b.scratch)
        else:
            _copy_all(payload_views, b.sources)

    def _unpack(self, b: _Bucket) -> None:
        if b.delta:
            assert b.scratch is not None and b.anchor is not None
            b.scratch.copy_(b.payload)
            b.anchor.add_(b.scratch, alpha=1.0 / self.world_size)
            _copy_all(b.sources, b.anchor_views)
        else:
            b.payload.div_(self.world_size)
            _copy_all(b.sources, b.payload_views)

    def _full_precision_round(self, step: int, nonfinite: bool) -> bool:
        # The first round with 16-bit deltas has nothing to take deltas against: average in full
        # precision (delta buckets through their staging buffer), then keep the result as the
        # reference. Rare, so one bucket at a time.
        self._set_anchor_storage()
        for i, b in enumerate(self.buckets):
            if b.delta:
                assert b.scratch is not None and b.scratch_wire is not None
                wire = b.scratch_wire
                payload, views = b.scratch, b.scratch_views
            else:
                wire, payload, views = b.wire, b.payload, b.payload_views
            _copy_all(views, b.sources)
            if i == 0:
                self._write_header(wire[: b.header_numel], step, nonfinite)
            self._wait(self._all_reduce(wire, step), step)
            if i == 0 and not self._verdict(wire[: b.header_numel], step):
                return False
            payload.div_(self.world_size)
            _copy_all(b.sources, views)
            if b.delta:
                assert b.anchor is not None
                b.anchor.copy_(payload)
        return True

    # --- overlapped rounds ----------------------------------------------------------------

    @property
    def pending(self) -> bool:
        """Whether a round started with :meth:`start` has not been finished."""
        return self._pending is not None

    @torch.no_grad()
    def start(self, step: int = 0) -> bool | None:
        """Snapshot the tensors and start all-reducing the snapshot in the background.

        The first round with 16-bit deltas is completed at once (see :meth:`average`).

        Returns:
            ``None`` when the round is in flight; when it completed at once, whether it was
            applied.
        """
        if not self.overlap:
            raise RuntimeError("start() needs a BucketedAverager built with overlap=True")
        if self._pending is not None:
            raise RuntimeError("a round is already in flight; finish() it first")
        if any(b.delta for b in self.buckets) and not self.anchored:
            return self.average(step)
        began = time.perf_counter()
        nonfinite = self._local_nonfinite()
        works = []
        for i, b in enumerate(self.buckets):
            assert b.sent is not None
            self._pack(b, b.sent, b.sent_views)
            b.payload.copy_(b.sent)
            if i == 0:
                self._write_header(b.header, step, nonfinite)
            works.append(self._all_reduce(b.wire, step))
        self._pending = works
        self._pending_step = step
        self.stats.round_seconds += time.perf_counter() - began
        return None

    @torch.no_grad()
    def finish(self) -> bool:
        """Wait for the round started by :meth:`start` and apply it.

        Each tensor becomes the mean of the snapshots plus this rank's own change since its
        snapshot. Does nothing when no round is in flight.

        Returns:
            Whether a round was applied.
        """
        if self._pending is None:
            return False
        began = time.perf_counter()
        works, self._pending = self._pending, None
        step = self._pending_step
        try:
            self._drain(works, step)  # empty when pending_state() already waited
            if self.buckets and not self._verdict(self.buckets[0].header, step):
                return False
            for b in self.buckets:
                self._apply_overlapped(b)
            self._payload_scaled = False
        finally:
            self.stats.round_seconds += time.perf_counter() - began
        self.stats.rounds += 1
        return True

    def _apply_overlapped(self, b: _Bucket) -> None:
        # tensor <- tensor - (what this rank sent) + (mean of what every rank sent); for deltas
        # the full-precision copy moves by the mean delta as well.
        assert b.sent is not None
        scale = 1.0 / self.world_size
        if b.delta:
            assert b.scratch is not None and b.anchor is not None
            b.scratch.copy_(b.payload)
            b.anchor.add_(b.scratch, alpha=scale)
            torch._foreach_add_(b.sources, b.scratch_views, alpha=scale)
            b.scratch.copy_(b.sent)
            torch._foreach_sub_(b.sources, b.scratch_views)
        else:
            torch._foreach_sub_(b.sources, b.sent_views)
            torch._foreach_add_(b.sources, b.payload_views, alpha=scale)

    def snapshot_means(self) -> list[list[Tensor]]:
        """Right after :meth:`finish`: per bucket, views (shaped like its sources) holding the
        mean of the ranks' snapshots. For an outer optimizer, which steps from that mean."""
        means = []
        for b in self.buckets:
            if b.delta:
                means.append(b.anchor_views)  # the last values plus the mean delta
            else:
                if not self._payload_scaled:
                    b.payload.mul_(1.0 / self.world_size)
                means.append(b.payload_views)
        self._payload_scaled = True
        return means

    def pending_state(self) -> dict[str, Any] | None:
        """A round in flight as tensors (it is waited for first), for a checkpoint."""
        if self._pending is None:
            return None
        self._drain(self._pending, self._pending_step)
        self._pending = []  # complete, waiting to be applied
        return {
            "step": self._pending_step,
            "received": [b.wire.clone() for b in self.buckets],
            "sent": [b.sent.clone() for b in self.buckets if b.sent is not None],
        }

    def load_pending_state(self, state: dict[str, Any] | None) -> None:
        """Restore a round saved by :meth:`pending_state`; :meth:`finish` then applies it."""
        if state is None:
            self._pending = None
            return
        received, sent = state["received"], state["sent"]
        if (
            not self.overlap
            or len(received) != len(self.buckets)
            or len(sent) != len(self.buckets)
            or any(
                r.numel() != b.header_numel + b.numel
                or s.numel() != b.numel
                or r.dtype != b.wire_dtype
                for r, s, b in zip(received, sent, self.buckets)
            )
        ):
            raise ValueError(
                "the checkpoint's round in flight does not match this model's buckets; resume "
                "with the same model, comm_dtype, overlap_steps and bucket_cap_mb"
            )
        with torch.no_grad():
            for b, r, s in zip(self.buckets, received, sent):
                assert b.sent is not None
                b.wire.copy_(r)
                b.sent.copy_(s)
        self._pending = []
        self._pending_step = int(state["step"])


class GradientAverager:
    """All-reduces the mean of a changing list of gradients through a reused pool of buckets.

    For synchronous (warm-up) steps on a plain module: the gradient tensors may be new objects
    each step, so buckets are cut per call (cheap bookkeeping), while the two wire buffers per
    device, of at most ``bucket_cap_mb`` each, are allocated once and grow only if a
    non-contiguous gradient needs more.

    Args:
        process_group (ProcessGroup, optional): the ranks to average over (default: the world).
        bucket_cap_mb (float): bucket size in MiB (default: 25).
        stats (CommStats, optional): where to add up bytes and waiting time (default: new).

    Example::

        >>> grads = GradientAverager(None, bucket_cap_mb=25)
        >>> loss.backward()
        >>> grads.average([p.grad for p in model.parameters() if p.grad is not None])
    """

    def __init__(
        self,
        process_group: dist.ProcessGroup | None,
        bucket_cap_mb: float = 25.0,
        stats: CommStats | None = None,
    ) -> None:
        self.stats = CommStats() if stats is None else stats
        self.process_group = process_group
        self.world_size = group_size(process_group)
        self._cap_bytes = max(1, int(bucket_cap_mb * _MB))
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
    def average(self, grads: Sequence[Tensor]) -> None:
        """Replace every gradient by its mean over the ranks. Every rank must call it."""
        dense = [g for g in grads if not g.is_sparse]
        for sparse in (g for g in grads if g.is_sparse):
            self.stats.bytes_communicated += sparse.coalesce().values().nbytes
            dist.all_reduce(sparse, group=self.process_group)
            sparse.div_(self.world_size)
        buckets = _cut_into_buckets(_group_by_device_and_dtype(dense), self._cap_bytes, None)
        in_flight: list[tuple[_Bucket, Tensor, list[Tensor], dist.Work]] = []
        used: dict[torch.device, int] = {}
        for b in buckets:
            index = used.get(b.device, 0)
            used[b.device] = index + 1
            if len(in_flight) >= _POOL_SLOTS:
                self._land(*in_flight.pop(0))
            wire = self._slot(b.device, index % _POOL_SLOTS, b.wire_bytes).view(b.dtype)
            views = _shaped_views(wire, b.sources)
            _copy_all(views, b.sources)
            self.stats.bytes_communicated += b.wire_bytes
            work = dist.all_reduce(wire, group=self.process_group, async_op=True)
            assert work is not None
            in_flight.append((b, wire, views, work))
        for entry in in_flight:
            self._land(*entry)

    def _land(self, b: _Bucket, wire: Tensor, views: list[Tensor], work: dist.Work) -> None:
        began = time.perf_counter()
        work.wait()
        self.stats.comm_seconds += time.perf_counter() - began
        wire.div_(self.world_size)
        _copy_all(b.sources, views)

    @staticmethod
    def finite(grads: Sequence[Tensor]) -> bool:
        """Whether every gradient is free of inf and NaN (one read of each)."""
        dense = [g for g in grads if not g.is_sparse]
        sparse = [g.coalesce().values() for g in grads if g.is_sparse]
        return _all_finite(dense) and _all_finite(sparse)


@torch.no_grad()
def broadcast_tensors(
    tensors: Sequence[Tensor], process_group: dist.ProcessGroup | None, bucket_cap_mb: float = 25.0
) -> bool:
    """Copy the group's rank 0 values of ``tensors`` to every rank, in place.

    Returns whether any of this rank's tensors changed. Goes bucket by bucket through one
    temporary buffer of at most ``bucket_cap_mb``.
    """
    src = 0
    if process_group is not None:
        src = dist.get_global_rank(process_group, 0)
    changed = False
    buckets = _cut_into_buckets(
        _group_by_device_and_dtype(tensors), max(1, int(bucket_cap_mb * _MB)), None
    )
    buffers: dict[torch.device, Tensor] = {}
    for b in buckets:
        if b.device not in buffers:
            size = max(x.wire_bytes for x in buckets if x.device == b.device)
            buffers[b.device] = torch.empty(size, dtype=torch.uint8, device=b.device)
        wire = buffers[b.device][: b.wire_bytes].view(b.dtype)
        views = _shaped_views(wire, b.sources)
        _copy_all(views, b.sources)
        dist.broadcast(wire, src=src, group=process_group)
        changed = changed or any(
            not torch.equal(local, received) for local, received in zip(b.sources, views)
        )
        _copy_all(b.sources, views)
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
