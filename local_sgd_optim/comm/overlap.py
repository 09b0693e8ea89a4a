"""A round in flight: started at a boundary, applied some optimizer steps later.

Each bucket has its own wire buffer and a copy of what this rank sent (see
:class:`~local_sgd_optim.comm.averager.BucketedAverager`); a quantized bucket is all-gathered,
and what it sent is its own slot of what it received. When the round lands, each tensor
becomes the mean of the ranks' snapshots plus this rank's own change since its snapshot.
"""

from __future__ import annotations

import warnings
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import torch
import torch.distributed as dist
from torch import Tensor

from local_sgd_optim.comm.buckets import Bucket
from local_sgd_optim.comm.collectives import start_all_reduce, wait
from local_sgd_optim.comm.packing import apply_overlapped, pack
from local_sgd_optim.comm.quantize import start_all_gather
from local_sgd_optim.comm.stats import CommStats
from local_sgd_optim.comm.tensors import as_real

__all__ = ["InFlightRound", "Piece"]


@dataclass
class Piece:
    """A piece of an averaged tensor as one bucket holds it.

    Args:
        index (int): the tensor's index in the list the averager was built from.
        offset (int): where the piece starts in the tensor's flattened real view.
        source (Tensor): the piece of the tensor itself (a view).
        mean (Tensor): the mean over ranks that goes with it, shaped like ``source``.

    Example::

        >>> for piece in averager.snapshot_pieces():
        ...     kept = Piece.slice_of(copies[piece.index], piece.offset, piece.source)
    """

    index: int
    offset: int
    source: Tensor
    mean: Tensor

    @staticmethod
    def slice_of(tensor: Tensor, offset: int, like: Tensor) -> Tensor:
        """The part of the contiguous ``tensor`` at ``offset`` that matches the piece ``like``
        of a tensor of the same shape."""
        flat = as_real(tensor).reshape(-1)
        return flat[offset : offset + like.numel()].view(like.shape)


class InFlightRound:
    """Starts, lands, saves and restores the overlapped round of a list of buckets.

    Args:
        buckets (Sequence[Bucket]): the averager's buckets, with their own wire and ``sent``.
        world_size (int): ranks in the group.
        process_group (ProcessGroup, optional): the ranks to average over.
        stats (CommStats): where to add up the cost.
        rank (int): this rank's index in the group (default: 0).

    Example::

        >>> round = InFlightRound(averager.buckets, 2, None, stats, dist.get_rank())
        >>> round.start(step=8)
        >>> ...  # optimizer steps
        >>> round.finish()
    """

    def __init__(
        self,
        buckets: Sequence[Bucket],
        world_size: int,
        process_group: dist.ProcessGroup | None,
        stats: CommStats,
        rank: int = 0,
    ) -> None:
        self.buckets = list(buckets)
        self.world_size = world_size
        self.rank = rank
        self.process_group = process_group
        self.stats = stats
        self._works: list[dist.Work] | None = None
        self._step = 0
        self._payload_scaled = False

    @property
    def pending(self) -> bool:
        """Whether a round was started and not finished."""
        return self._works is not None

    def start(self, step: int) -> None:
        """Snapshot every bucket into its ``sent`` copy and start all-reducing it (the header
        was exchanged and judged before)."""
        works = []
        for b in self.buckets:
            if b.quant is not None:
                assert b.received is not None
                pack(b, b.wire, [], self.world_size)
                group, counted = self.process_group, b.wire_bytes
                works.append(start_all_gather(b.received, b.wire, group, self.stats, step, counted))
                continue
            assert b.sent is not None
            pack(b, b.sent, b.sent_views, self.world_size)
            b.payload.copy_(b.sent)
            works.append(start_all_reduce(b.wire, self.process_group, self.stats, step))
        self._works = works
        self._step = step

    def finish(self) -> None:
        """Wait for the round and apply it."""
        works, self._works = self._works or [], None
        for work in works:  # empty when state() already waited
            wait(work, self.stats, self._step)
        for b in self.buckets:
            apply_overlapped(b, self.world_size, self.rank)
        self._payload_scaled = False

    def snapshot_pieces(self) -> list[Piece]:
        """Right after :meth:`finish`: each piece with the mean of the ranks' snapshots."""
        pieces = []
        for b in self.buckets:
            if b.delta:
                means = b.anchor_views  # the last values plus the mean delta
            else:
                if not self._payload_scaled and not b.prescaled:
                    b.payload.mul_(1.0 / self.world_size)
                means = b.payload_views
            for source, mean, (index, offset) in zip(b.sources, means, b.origins):
                pieces.append(Piece(index, offset, source, mean))
        self._payload_scaled = True
        return pieces

    def state(self) -> dict[str, Any] | None:
        """The round in flight as tensors (it is waited for first), for a checkpoint."""
        if self._works is None:
            return None
        for work in self._works:
            wait(work, self.stats, self._step)
        self._works = []  # complete, waiting to be applied
        return {
            "step": self._step,
            "received": [self._received(b).clone() for b in self.buckets],
            "sent": [self._sent(b).clone() for b in self.buckets],
        }

    @staticmethod
    def _received(b: Bucket) -> Tensor:
        """What the collective brought: the sum, or every rank's quantized payload."""
        return b.wire if b.received is None else b.received

    @staticmethod
    def _sent(b: Bucket) -> Tensor:
        """What this rank sent: its copy, or its quantized payload."""
        return b.wire if b.sent is None else b.sent

    def load_state(self, state: dict[str, Any] | None) -> None:
        """Restore a round saved by :meth:`state`; :meth:`finish` then applies it."""
        if state is None:
            self._works = None
            return
        received, sent = list(state["received"]), state["sent"]
        if received and self.buckets and self.buckets[0].quant is None:
            received[0] = self._without_old_header(received[0])
            if received[0] is None:  # the old header's verdict: a rank was not finite
                self._works = None
                return
        if (
            len(received) != len(self.buckets)
            or len(sent) != len(self.buckets)
            or any(
                r.numel() != self._received(b).numel()
                or s.numel() != self._sent(b).numel()
                or r.dtype != b.wire_dtype
                or s.dtype != b.wire_dtype
                for r, s, b in zip(received, sent, self.buckets)
            )
        ):
            raise ValueError(
                "the checkpoint's round in flight does not match this model's buckets; resume "
                "with the same model, comm_dtype, overlap_steps and bucket_cap_mb"
            )
        with torch.no_grad():
            for b, r, s in zip(self.buckets, received, sent):
                self._sent(b).copy_(s)
                self._received(b).copy_(r)
        self._works = []
        self._step = int(state["step"])

    def _without_old_header(self, received: Tensor) -> Tensor | None:
        """Checkpoints of version 0.1.0.dev0 before the separate header carried it at the front
        of the first bucket (``9 * world_size`` numbers; the first ``world_size`` say which
        ranks were not finite): drop it, or ``None`` when the round was to be skipped."""
        old = 9 * self.world_size
        if received.numel() != self.buckets[0].numel + old:
            return received
        if bool(received[: self.world_size].ne(0).any()):
            warnings.warn(
                "the checkpoint's round in flight found non-finite values on some rank; it "
                "is dropped, so no rank's values change",
                RuntimeWarning,
                stacklevel=4,
            )
            return None
        return received[old:]
