"""``BucketedAverager``: averages a fixed list of tensors in place across a process group.

Tensors are cut into buckets (:mod:`~local_sgd_optim.comm.buckets`), so that a round costs one
collective per bucket rather than one per tensor (each gloo collective carries milliseconds of
fixed latency). A bucket whose tensors lie back to back in one storage (placed there by
:class:`~local_sgd_optim.comm.resident.Residence`, or a bucket of one whole tensor) is
all-reduced where it lies, and only scaled afterwards. Any other bucket is packed into a wire
buffer from a small pool allocated once, all-reduced with ``async_op=True`` and unpacked; one
such collective is on the wire at a time while the next bucket is packed and the last unpacked.

With a 16-bit ``comm_dtype``, ranks exchange the *delta* since the last round (the tensor minus a
full-precision copy of the last averaged values, the *anchor*) in 16 bits and add the averaged
delta to that copy, so the rounding error scales with how far the tensors moved, not with their
magnitude. With ``comm_dtype="int8"`` or ``"int4"`` the delta travels as 8- or 4-bit codes with a
float32 scale per block of 128 values, through an all-gather or a reduce-scatter built of
``all_to_all`` and ``all_gather`` (:mod:`~local_sgd_optim.comm.quantize`). Overlapped rounds
(``overlap=True``) live in :mod:`~local_sgd_optim.comm.overlap`.
"""

from __future__ import annotations

import contextlib
import hashlib
import time
from collections.abc import Iterator, Sequence
from typing import Any

import torch
import torch.distributed as dist
from torch import Tensor

from local_sgd_optim.checks import check_on_nonfinite
from local_sgd_optim.comm.buckets import (
    Bucket,
    WireFormat,
    contiguous_span,
    cut_into_buckets,
    group_by_device_and_dtype,
    pool_plan,
)
from local_sgd_optim.comm.collectives import (
    MB,
    POOL_SLOTS,
    backend_averages,
    start_all_reduce,
    wait,
)
from local_sgd_optim.comm.groups import group_rank, group_size
from local_sgd_optim.comm.header import NONFINITE, TOO_LARGE, RoundHeader
from local_sgd_optim.comm.overlap import InFlightRound, Piece
from local_sgd_optim.comm.packing import delta_fits_float16, pack, unpack
from local_sgd_optim.comm.quantize import (
    CAST_VALUES,
    FORMATS,
    choose_reduction,
    reduce_share,
    start_all_gather,
    start_all_to_all,
)
from local_sgd_optim.comm.stats import CommStats
from local_sgd_optim.comm.tensors import (
    copy_all,
    divide_,
    finite_and_fingerprint,
    shaped_views,
)

__all__ = ["BucketedAverager"]


def _drain(in_flight: Sequence[dist.Work]) -> None:
    """Wait for collectives every rank started, whatever becomes of them, before an error goes
    up, so that no collective is left half done."""
    for work in in_flight:
        with contextlib.suppress(Exception):
            work.wait()


class BucketedAverager:
    """Averages a fixed list of tensors in place across ``process_group``, bucket by bucket.

    Memory, allocated at construction and reused by every round (``C`` is ``bucket_cap_mb``):

    - full precision, no overlap: nothing for buckets whose tensors lie back to back in one
      storage (all-reduced in place); two wire buffers of at most ``C`` each per device for
      the others;
    - 16-bit ``comm_dtype``: one full-precision copy of the averaged tensors (the values of the
      last round, which deltas are taken against), two 16-bit wire buffers of at most ``C / 2``
      and one full-precision staging buffer of at most ``C`` per device;
    - ``"int8"``/``"int4"``: the full-precision copy and the staging buffer as for 16 bits (the
      staging buffer is float32, whole blocks), and two pool slots per device, each the payload
      ``P`` of a bucket (``C / 3.9`` for int8, ``C / 7.5`` for int4) plus what the reduction
      receives: ``W * P`` for the all-gather (``W`` ranks), ``P + P / W`` for the
      reduce-scatter; with int4, an int8 buffer of ``C / 4`` for unpacked codes; and 1 MiB of
      float32 that codes are cast into before they are added;
    - ``overlap``: a round stays in flight while training goes on, so every bucket has its own
      wire buffer and a copy of what this rank sent: two copies of the averaged tensors in the
      wire dtype (plus the full-precision copy with a 16-bit ``comm_dtype``); quantized, each
      bucket keeps its payload and the all-gather's ``W`` payloads, ``(W + 1)`` quantized
      copies in all.

    A non-contiguous tensor larger than ``C`` is the one thing that makes a bucket larger.

    Args:
        tensors (Sequence[Tensor]): floating-point (or complex) tensors to average in place.
        process_group (ProcessGroup, optional): the ranks to average over (default: the world).
        bucket_cap_mb (float): bucket size in MiB of wire bytes (default: 25).
        comm_dtype (torch.dtype or str, optional): ``torch.bfloat16`` or ``torch.float16`` to
            send 16-bit deltas, ``"int8"`` or ``"int4"`` to send quantized deltas
            (:mod:`~local_sgd_optim.comm.quantize`); ``None`` sends the tensors in their own
            dtype (default: ``None``).
        overlap (bool): rounds are started with :meth:`start` and completed with
            :meth:`finish`, with training in between (default: ``False``).
        stats (CommStats, optional): where to add up the cost of rounds (default: a new one).
        on_nonfinite (str): what a round does when some rank's tensors hold NaN or inf:
            ``"raise"`` a :class:`RoundError` on every rank, or ``"skip"`` the round with a
            warning; either way no tensor is changed (default: ``"raise"``).
        cpu_offload (bool): keep the full-precision copy for 16-bit deltas in CPU memory
            (pinned for CUDA tensors) between rounds; it visits the tensors' device during a
            round only (default: ``False``).
        also (str): a description of anything else the round's caller sends after it (the
            buffers copied from the first rank), folded into the plan that every rank's
            header compares (default: ``""``).
        quantized_reduction (str): how quantized deltas are averaged: ``"all_gather"``,
            ``"reduce_scatter"`` (not with ``overlap``), or ``"auto"``: the all-gather on 2
            ranks and with ``overlap``, the reduce-scatter from 3 ranks on (default:
            ``"auto"``).

    Every round starts with a header (:mod:`~local_sgd_optim.comm.header`): one all-reduce of
    ``6 * world_size`` int64 numbers that checks, before any payload moves, that every rank is
    doing the same thing at the same ``step`` and that no rank's tensors hold NaN or inf; it
    costs one read of the tensors and that small collective.

    A round's mean is over :attr:`contributors` ranks, the group's size unless set lower for a
    round in which some ranks join without contributing, after :meth:`withhold` (a
    fault-tolerance replica that has just received a peer's state; the group is then a
    :class:`~local_sgd_optim.comm.groups.StandaloneGroup`, whose backend never averages).

    Example::

        >>> averager = BucketedAverager(list(model.parameters()), None, bucket_cap_mb=4)
        >>> averager.average()  # every rank: parameters become the mean over ranks

    .. warning::
        Every rank must build it from the same shapes and dtypes, and make the same calls.
    """

    # Tests set this to make CPU anchors visit a copy of themselves as CUDA ones would.
    _visit_cpu = False

    def __init__(
        self,
        tensors: Sequence[Tensor],
        process_group: dist.ProcessGroup | None,
        *,
        bucket_cap_mb: float = 25.0,
        comm_dtype: torch.dtype | str | None = None,
        overlap: bool = False,
        stats: CommStats | None = None,
        on_nonfinite: str = "raise",
        cpu_offload: bool = False,
        also: str = "",
        quantized_reduction: str = "auto",
    ) -> None:
        self.process_group = process_group
        self.cpu_offload = cpu_offload
        self.world_size = group_size(process_group)
        # The ranks a round's mean is over: fewer than world_size when some join a round
        # without contributing (a fault-tolerance replica healed for it: see withhold()).
        self.contributors = self.world_size
        self.comm_dtype = comm_dtype
        self.overlap = overlap
        wire: WireFormat = None if isinstance(comm_dtype, str) else comm_dtype
        if isinstance(comm_dtype, str):
            if comm_dtype not in FORMATS:
                raise ValueError(
                    f"comm_dtype must be a torch dtype or one of {sorted(FORMATS)}, got "
                    f"{comm_dtype!r}"
                )
            wire = FORMATS[comm_dtype]
        self.reduction = choose_reduction(quantized_reduction, self.world_size, overlap)
        self.stats = CommStats() if stats is None else stats
        groups = group_by_device_and_dtype(tensors)
        device = groups[0][0][1].device if groups else None
        self.header = RoundHeader(
            process_group,
            self.world_size,
            group_rank(process_group),
            check_on_nonfinite(on_nonfinite),
            device,
            self.stats,
        )
        self._group_numels = [sum(t.numel() for _, t in g) for g in groups]
        self.buckets = cut_into_buckets(groups, max(1, int(bucket_cap_mb * MB)), wire)
        if self.reduction == "reduce_scatter":
            for b in self.buckets:
                b.shares = self.world_size if b.quant is not None else 1
        self.numel = sum(b.numel for b in self.buckets)
        self.nbytes = sum(b.wire_bytes for b in self.buckets)
        self._anchors: list[Tensor | None] = [None] * len(groups)
        self._fingerprint: int | None = None  # this rank's, at its last round
        # What this averager averages, comparable across ranks: shapes and dtypes in order.
        described = repr([(tuple(t.shape), str(t.dtype)) for t in tensors]) + also
        if isinstance(comm_dtype, str):  # ranks that disagree would meet in other collectives
            described += f" {comm_dtype} by {self.reduction}"
        self.plan = (
            int.from_bytes(hashlib.blake2b(described.encode(), digest_size=8).digest(), "little")
            >> 2
        )
        self._skipped = 0  # rounds in a row skipped for non-finite values
        self._allocate()
        self._in_flight = InFlightRound(
            self.buckets, self.world_size, process_group, self.stats, self.header.rank
        )

    @property
    def on_nonfinite(self) -> str:
        """``"raise"`` or ``"skip"``: what a round does when some rank's tensors are not finite."""
        return self.header.on_nonfinite

    # --- memory ---------------------------------------------------------------------------

    def _slot_bytes(self, b: Bucket) -> int:
        """Bytes of a bucket's wire buffer: its payload, and for quantized deltas what the
        reduction receives (every rank's payload, or this rank's share from each rank and its
        mean)."""
        payload = b.wire_bytes
        if b.quant is None:
            return payload
        if b.shares == 1:
            return payload * (1 + self.world_size)
        return payload * 2 + payload // b.shares

    def _bind(self, b: Bucket, buffer: Tensor) -> None:
        """Point ``b``'s wire (and the buffers of its reduction) into the uint8 ``buffer``."""
        payload = b.wire_bytes
        if b.quant is None:
            b.set_wire(buffer[:payload].view(b.wire_dtype))
            return
        b.set_wire(buffer[:payload])
        if b.shares == 1:
            b.received = buffer[payload : payload * (1 + self.world_size)]
        else:
            b.received = buffer[payload : 2 * payload]
            b.share = buffer[2 * payload : 2 * payload + payload // b.shares]

    def _allocate(self) -> None:
        if self.overlap:
            for b in self.buckets:
                buffer = torch.empty(self._slot_bytes(b), dtype=torch.uint8, device=b.device)
                self._bind(b, buffer)
                if b.quant is None:  # quantized: what this rank sent is its slot of received
                    b.sent = torch.empty(b.numel, dtype=b.wire_dtype, device=b.device)
                    b.sent_views = shaped_views(b.sent, b.sources)
        else:
            for b in self.buckets:
                b.span = contiguous_span(b.sources)
                if b.in_place:
                    b.set_wire(b.span)  # type: ignore[arg-type]
                full = not b.delta and not b.prescaled
                b.backend_averages = full and backend_averages(self.process_group, b.device)
            # Buckets whose tensors lie apart are copied through a small pool of buffers.
            pooled = [b for b in self.buckets if not b.in_place]
            sizes: dict[torch.device, int] = {}
            for b in pooled:
                sizes[b.device] = max(sizes.get(b.device, 0), self._slot_bytes(b))
            pools: dict[tuple[torch.device, int], Tensor] = {}
            for b, (slot, _) in zip(pooled, pool_plan(pooled, POOL_SLOTS)):
                if (b.device, slot) not in pools:
                    pools[b.device, slot] = torch.empty(
                        sizes[b.device], dtype=torch.uint8, device=b.device
                    )
                self._bind(b, pools[b.device, slot])
        # What the header reads for NaN: a bucket's span in one piece where it has one.
        self._checked = [
            t for b in self.buckets for t in ([b.span] if b.span is not None else b.sources)
        ]
        self._allocate_staging()

    def _allocate_staging(self) -> None:
        # One full-precision staging buffer per device for the delta buckets, also the wire of
        # the full-precision round that sets the anchor. Quantized buckets form their deltas
        # in it as float32 whole blocks (never while it is that wire).
        for device in {b.device for b in self.buckets if b.delta}:
            deltas = [b for b in self.buckets if b.delta and b.device == device]
            work = {b: b.quant.padded(b.numel, b.shares) for b in deltas if b.quant is not None}
            size = max(max(b.numel * b.dtype.itemsize, work.get(b, 0) * 4) for b in deltas)
            scratch = torch.empty(size, dtype=torch.uint8, device=device)
            four = [n for b, n in work.items() if b.quant is not None and b.quant.bits == 4]
            codes = torch.empty(max(four), dtype=torch.int8, device=device) if four else None
            casts = None
            if work:
                values = min(CAST_VALUES, max(work.values()))
                casts = torch.empty(values, dtype=torch.float32, device=device)
            for b in deltas:
                b.scratch = scratch[: b.numel * b.dtype.itemsize].view(b.dtype)
                b.scratch_views = shaped_views(b.scratch, b.sources)
                if b in work:
                    b.work = scratch[: work[b] * 4].view(torch.float32)
                    b.work_views = shaped_views(b.work, b.sources)
                    b.codes, b.casts = codes, casts

    @property
    def workspace_bytes(self) -> int:
        """Bytes this averager allocated for itself (buffers, copies), not counting the tensors."""
        seen: dict[int, int] = {}
        own = [
            (None if b.in_place else b.wire, b.scratch, b.sent, b.received, b.codes, b.casts)
            for b in self.buckets
        ]
        buffers = [t for kept in own for t in kept if t is not None]
        for t in buffers + [a for a in self._anchors if a is not None]:
            storage = t.untyped_storage()
            seen[storage.data_ptr()] = storage.nbytes()
        return sum(seen.values())

    def adopt(self, previous: BucketedAverager) -> bool:
        """Take over ``previous``'s anchors and last fingerprint when it averaged the same
        layout (shapes, dtypes, buckets) in other memory: a re-plan after a tensor was
        replaced by one of the same shape keeps the last round's values as the reference for
        16-bit deltas, instead of paying a full-precision round. Whether it did."""
        same = (
            previous.plan == self.plan
            and previous.comm_dtype == self.comm_dtype
            and previous.cpu_offload == self.cpu_offload
            and [(b.numel, b.dtype, b.group) for b in previous.buckets]
            == [(b.numel, b.dtype, b.group) for b in self.buckets]
            and not previous.pending
        )
        if same:
            self._anchors = list(previous._anchors)
            self._bind_anchors(self._anchors)
            self._fingerprint = previous._fingerprint
            self._skipped = previous._skipped
        return same

    # --- the anchor for 16-bit deltas -----------------------------------------------------

    @property
    def anchored(self) -> bool:
        """Whether the full-precision copy for 16-bit deltas holds the last round's values."""
        return all(b.anchor is not None for b in self.buckets if b.delta)

    def _set_anchor_storage(self) -> None:
        for g, numel in enumerate(self._group_numels):
            first = next((b for b in self.buckets if b.group == g), None)
            if self._anchors[g] is None and any(b.delta and b.group == g for b in self.buckets):
                assert first is not None
                device = torch.device("cpu") if self.cpu_offload else first.device
                pinned = self.cpu_offload and first.device.type == "cuda"
                self._anchors[g] = torch.empty(
                    numel, dtype=first.dtype, device=device, pin_memory=pinned
                )
        self._bind_anchors(self._anchors)

    def _bind_anchors(self, anchors: Sequence[Tensor | None]) -> None:
        """Point each delta bucket's anchor at its slice of its group's ``anchors[g]``."""
        for b in self.buckets:
            anchor = anchors[b.group]
            if b.delta and anchor is not None:
                b.anchor = anchor[b.group_offset : b.group_offset + b.numel]
                b.anchor_views = shaped_views(b.anchor, b.sources)

    @contextlib.contextmanager
    def _anchors_on_device(self) -> Iterator[None]:
        """With ``cpu_offload``: the anchors visit the tensors' device for a round (which reads
        and updates them there), and go back to CPU memory after it."""
        if not (self.cpu_offload and self.anchored):
            yield
            return
        homes = list(self._anchors)
        devices = [next(b.device for b in self.buckets if b.group == g) for g in range(len(homes))]
        if not (self._visit_cpu or any(d.type != "cpu" for d in devices)):
            yield
            return
        visitors = [
            None if home is None else home.to(device, non_blocking=True, copy=True)
            for home, device in zip(homes, devices)
        ]
        self._bind_anchors(visitors)
        try:
            yield
        finally:
            with torch.no_grad():
                for home, visitor in zip(homes, visitors):
                    if home is not None and visitor is not None:
                        home.copy_(visitor)
            self._bind_anchors(homes)

    def anchor_tensors(self) -> list[Tensor]:
        """The full-precision copies kept for 16-bit deltas, one flat tensor per group."""
        return [a for a in self._anchors if a is not None] if self.anchored else []

    def load_anchor_tensors(self, anchors: Sequence[Tensor]) -> None:
        """Restore :meth:`anchor_tensors` from a checkpoint (an empty list: not anchored)."""
        if not anchors:
            self._anchors = [None] * len(self._anchors)
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
                    if b.delta and b.span is not None:
                        assert b.anchor is not None
                        b.anchor.copy_(b.span)
                    elif b.delta:
                        copy_all(b.anchor_views, b.sources)

    @torch.no_grad()
    def set_anchor_values(self, values: dict[int, Tensor]) -> None:
        """Take ``values[i]`` as the reference for deltas of input tensor ``i`` (the outer
        optimizer's result, say); other tensors keep theirs."""
        for b in self.buckets:
            if b.delta and b.anchor is not None:
                for view, source, (index, offset) in zip(b.anchor_views, b.sources, b.origins):
                    if index in values:
                        view.copy_(Piece.slice_of(values[index], offset, source))

    @torch.no_grad()
    def withhold(self) -> None:
        """Make this rank's tensors contribute nothing to the next round's sum: zero, or, for
        delta buckets with an anchor, the anchor (a delta of zero). For a rank that must join
        a round's collectives without weighing in (a fault-tolerance replica that received
        its state from a peer for this round); the round overwrites every averaged tensor
        with the mean of the others (see :attr:`contributors`)."""
        for b in self.buckets:
            if b.delta and b.anchor is not None:
                copy_all(b.sources, b.anchor_views)
            else:
                torch._foreach_zero_(list(b.sources))

    # --- blocking rounds ------------------------------------------------------------------

    def _exchange_header(self, step: int, kind: str, check_diverged: bool) -> bool:
        """The header before any payload: same kind and step everywhere (else raise), every
        rank finite (else raise or skip), ranks not secretly synchronised; whether to go on."""
        finite, fingerprint = finite_and_fingerprint(self._checked)
        previous, self._fingerprint = self._fingerprint, fingerprint
        changed = check_diverged and previous is not None and fingerprint != previous
        fits = not self.anchored or all(
            delta_fits_float16(b, self.contributors) for b in self.buckets
        )
        flag = NONFINITE if not finite else (0 if fits else TOO_LARGE)
        view = self.header.exchange(kind, step, flag, fingerprint, changed, self.plan)
        self.header.check(view, step)
        if not self.header.finite_verdict(view, step, self._skipped):
            self._skipped += 1
            return False
        self._skipped = 0
        self.header.check_diverged(view, step)
        return True

    @torch.no_grad()
    def average(self, step: int = 0, kind: str = "round", check_diverged: bool = False) -> bool:
        """One averaging round, blocking until the tensors hold the mean over ranks.

        Completes a round started with :meth:`start` first. Every rank of the group must call
        it, with the same ``step`` and ``kind``.

        Args:
            step (int): the optimizer step, checked to be the same on every rank.
            kind (str): what the round is (``"round"``, ``"average()"``, ...), checked too.
            check_diverged (bool): raise when every rank's tensors changed since its last round
                and are bitwise identical across ranks (Local SGD is not happening).

        Returns:
            Whether the round was applied (``False``: skipped for non-finite values).

        Raises:
            RoundError: ranks are at different steps or doing different things, a rank's
                tensors are not finite (with ``on_nonfinite="raise"``), the ranks are secretly
                synchronised (with ``check_diverged``), or the collective failed.
        """
        if self.pending:
            self.finish()
        began = time.perf_counter()
        try:
            with self._anchors_on_device():
                applied = self._exchange_header(step, kind, check_diverged)
                if applied and any(b.delta for b in self.buckets) and not self.anchored:
                    self._full_precision_round(step)
                elif applied and self.reduction == "reduce_scatter":
                    self._pipelined_round(step, [b for b in self.buckets if b.quant is None])
                    self._reduce_scatter_round(step, [b for b in self.buckets if b.quant])
                elif applied:
                    self._pipelined_round(step, self.buckets)
        finally:
            self.stats.round_seconds += time.perf_counter() - began
        self.stats.rounds += int(applied)
        return applied

    def _start(self, b: Bucket, step: int) -> dist.Work:
        if b.quant is not None:  # the all-gather: one collective
            assert b.received is not None
            group = self.process_group
            return start_all_gather(b.received, b.wire, group, self.stats, step, b.wire_bytes)
        op = dist.ReduceOp.AVG if b.backend_averages else dist.ReduceOp.SUM
        return start_all_reduce(b.wire, self.process_group, self.stats, step, op)

    def _pipelined_round(self, step: int, buckets: list[Bucket]) -> None:
        world, divisor = self.world_size, self.contributors
        in_flight: list[dist.Work] = []  # started and not yet waited for, oldest first
        try:
            if all(b.in_place for b in buckets):
                # Nothing to copy: every bucket goes at once (gloo's threads run them side by
                # side), and each is scaled as it lands.
                for b in buckets:
                    pack(b, b.payload, b.payload_views, divisor)  # float16: divide first
                    in_flight.append(self._start(b, step))
                for b in buckets:
                    wait(in_flight.pop(0), self.stats, step)
                    unpack(b, world, divisor)
                return
            # One collective on the wire at a time, the copies of its neighbours made
            # meanwhile: the next bucket is packed while this one travels, and this one is
            # unpacked while the next travels. (Two in flight share the link and land
            # together, which would leave every unpack to the end.) A bucket's pool buffer was
            # last used two buckets earlier, which has landed by then.
            if buckets:
                pack(buckets[0], buckets[0].payload, buckets[0].payload_views, divisor)
                in_flight.append(self._start(buckets[0], step))
            for i, b in enumerate(buckets):
                following = buckets[i + 1] if i + 1 < len(buckets) else None
                if following is not None:
                    pack(following, following.payload, following.payload_views, divisor)
                wait(in_flight.pop(0), self.stats, step)
                if following is not None:
                    in_flight.append(self._start(following, step))
                unpack(b, world, divisor)
        except BaseException:
            _drain(in_flight)
            raise

    def _reduce_scatter_round(self, step: int, buckets: list[Bucket]) -> None:
        """Quantized buckets through the reduce-scatter: ``all_to_all`` of the shares, each
        rank's share averaged and requantized, ``all_gather`` of the shares. One collective on
        the wire at a time: the next bucket is packed while this one's shares are gathered, and
        this one is unpacked while the next one's shares are exchanged."""
        group, world, stats = self.process_group, self.world_size, self.stats
        divisor = self.contributors
        in_flight: list[dist.Work] = []

        def exchange(b: Bucket) -> None:
            assert b.received is not None
            work = start_all_to_all(b.received, b.wire, group, stats, step, b.wire_bytes)
            in_flight.append(work)

        try:
            if buckets:
                pack(buckets[0], buckets[0].wire, [], divisor)
                exchange(buckets[0])
            for i, b in enumerate(buckets):
                assert b.quant is not None and b.received is not None and b.share is not None
                assert b.work is not None
                wait(in_flight.pop(0), stats, step)
                reduce_share(b.quant, b.received, world, b.share, b.work, b.codes, b.casts, divisor)
                # The mean shares land in the payload, which the exchange no longer needs.
                in_flight.append(start_all_gather(b.wire, b.share, group, stats, step, 0))
                following = buckets[i + 1] if i + 1 < len(buckets) else None
                if following is not None:
                    pack(following, following.wire, [], divisor)
                wait(in_flight.pop(0), stats, step)
                if following is not None:
                    exchange(following)
                unpack(b, world, divisor)
        except BaseException:
            _drain(in_flight)
            raise

    def _full_precision_round(self, step: int) -> None:
        # The first round with 16-bit deltas has nothing to take deltas against: average in full
        # precision (delta buckets through their staging buffer), then keep the result as the
        # reference. Rare, so one bucket at a time.
        self._set_anchor_storage()
        for b in self.buckets:
            copied = b.span is None
            if not copied:
                wire, views = b.span, []  # the tensors' own memory, in full precision
            elif b.delta:
                assert b.scratch is not None
                wire, views = b.scratch, b.scratch_views
            else:
                wire, views = b.wire, b.payload_views
            assert wire is not None
            if copied:
                copy_all(views, b.sources)
            first = b.prescaled and not b.delta  # float16 on the wire: divide before the sum
            if first:
                divide_(wire, self.contributors)
            wait(start_all_reduce(wire, self.process_group, self.stats, step), self.stats, step)
            if not first:
                divide_(wire, self.contributors)
            if copied:
                copy_all(b.sources, views)
            if b.delta:
                assert b.anchor is not None
                b.anchor.copy_(wire)

    # --- overlapped rounds ----------------------------------------------------------------

    @property
    def pending(self) -> bool:
        """Whether a round started with :meth:`start` has not been finished."""
        return self._in_flight.pending

    @torch.no_grad()
    def start(
        self, step: int = 0, kind: str = "round", check_diverged: bool = False
    ) -> bool | None:
        """Exchange the header, snapshot the tensors and start all-reducing the snapshot in the
        background.

        The first round with 16-bit deltas is completed at once (see :meth:`average`).

        Returns:
            ``None`` when the round is in flight; when it completed at once or was skipped for
            non-finite values, whether it was applied.
        """
        if not self.overlap:
            raise RuntimeError("start() needs a BucketedAverager built with overlap=True")
        if self.pending:
            raise RuntimeError("a round is already in flight; finish() it first")
        if any(b.delta for b in self.buckets) and not self.anchored:
            return self.average(step, kind, check_diverged)
        began = time.perf_counter()
        try:
            with self._anchors_on_device():
                if not self._exchange_header(step, kind, check_diverged):
                    return False
                self._in_flight.start(step)
        finally:
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
        if not self.pending:
            return False
        began = time.perf_counter()
        try:
            with self._anchors_on_device():
                self._in_flight.finish()
        finally:
            self.stats.round_seconds += time.perf_counter() - began
        self.stats.rounds += 1
        return True

    def snapshot_pieces(self) -> list[Piece]:
        """Right after :meth:`finish`: every piece of the averaged tensors with the mean of the
        ranks' snapshots, for an outer optimizer, which steps from that mean."""
        return self._in_flight.snapshot_pieces()

    def pending_state(self) -> dict[str, Any] | None:
        """A round in flight as tensors (it is waited for first), for a checkpoint."""
        return self._in_flight.state()

    def load_pending_state(self, state: dict[str, Any] | None) -> None:
        """Restore a round saved by :meth:`pending_state`; :meth:`finish` then applies it."""
        if state is not None and not self.overlap:
            raise ValueError(
                "the checkpoint's round in flight does not match this model's buckets; resume "
                "with the same model, comm_dtype, overlap_steps and bucket_cap_mb"
            )
        self._in_flight.load_state(state)

    def release_buffers(self) -> None:
        """Let go of everything this averager holds except the anchors: the wire, pool and
        staging buffers, the copies of what was sent, the views of the averaged tensors (and
        with them any bucket storage the tensors have left since) and any async work.

        For the end of training: torch's discussion of gloo's abort at exit points at work
        objects holding tensors while the interpreter finalises, and the buffers are memory an
        evaluation after training can use. The anchors stay, so that
        :meth:`anchor_tensors` (a checkpoint taken after the end) still holds the last round's
        values. A round in flight is dropped, unapplied and not waited for: after an error its
        peers may never complete it. Afterwards the averager cannot average; a new one can
        take its anchors over with :meth:`adopt`.
        """
        self.load_pending_state(None)  # drops the in-flight round's work handles
        for b in self.buckets:
            b.wire = torch.empty(0, dtype=b.wire_dtype, device=b.device)
            b.payload_views = []
            b.scratch, b.scratch_views = None, []
            b.sent, b.sent_views = None, []
            b.received = b.share = b.codes = b.casts = None
            b.work, b.work_views = None, []
            b.span, b.sources = None, []
            b.anchor_views = []
        self._checked = []
