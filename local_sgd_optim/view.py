"""The global model, for evaluating and saving, without touching any rank's training state.

Between rounds each rank holds its own model; what a user wants to evaluate or save is the
model the ranks would agree on: the mean of their parameters and running statistics (and rank
0's other buffers, as a round would copy them). :func:`global_view` computes that mean in place
for the duration of a ``with`` block and then puts every rank's own values back, bit for bit:
no round is counted, no anchor, outer-optimizer state, fingerprint or optimizer state changes,
so evaluating or saving every few steps leaves training exactly as it would have been.
(``average()`` is a real round: with an outer optimizer it takes an outer step, so evaluating
with it would change the trajectory.)

Memory: one copy of the averaged tensors (this rank's own values) during the block, and the
averaging buffers of one full-precision round.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator, Sequence

import torch
import torch.distributed as dist
from torch import Tensor

from local_sgd_optim.comm.averager import BucketedAverager
from local_sgd_optim.comm.collectives import broadcast_tensors
from local_sgd_optim.comm.stats import CommStats
from local_sgd_optim.sharded import local_tensor
from local_sgd_optim.tracked import Tracked, averaged_tensors, broadcast_buffers

__all__ = ["global_view"]


@contextlib.contextmanager
def global_view(
    entries: Sequence[Tracked],
    process_group: dist.ProcessGroup | None,
    step: int,
    stats: CommStats,
    bucket_cap_mb: float,
) -> Iterator[None]:
    """Within the block, ``entries``' averaged tensors hold the mean over the ranks and the
    copied buffers rank 0's values; afterwards each rank's own values, bitwise.

    Args:
        entries (Sequence[Tracked]): the live tensors (:meth:`Rounds.tracked`).
        process_group (ProcessGroup, optional): the ranks to average over.
        step (int): the optimizer step, checked to be the same on every rank.
        stats (CommStats): the bytes and time are added here; ``rounds`` is not.
        bucket_cap_mb (float): bucket size for the collectives.

    Raises:
        RoundError: ranks are at different steps or doing something else, or a rank's tensors
            hold NaN or inf (nothing is changed); raised on every rank.
    """
    tensors = averaged_tensors(entries)
    copied = [local_tensor(t) for t in broadcast_buffers(entries)]
    own = [t.detach().clone() for t in list(tensors) + copied]
    spent = CommStats()
    # A full-precision round of its own, on the tensors where they are: its header checks
    # that every rank is here at the same step before any value moves.
    averager = BucketedAverager(tensors, process_group, bucket_cap_mb=bucket_cap_mb, stats=spent)
    try:
        averager.average(step, kind="global model")
        if copied:
            broadcast_tensors(copied, process_group, bucket_cap_mb, spent)
        yield
    finally:
        _restore(list(tensors) + copied, own)
        stats.bytes_communicated += spent.bytes_communicated
        stats.comm_seconds += spent.comm_seconds
        stats.round_seconds += spent.round_seconds


@torch.no_grad()
def _restore(tensors: list[Tensor], own: list[Tensor]) -> None:
    for tensor, value in zip(tensors, own):
        tensor.copy_(value)
