"""Moving a bucket's values to and from its wire buffer, in full precision or as 16-bit deltas.

Arithmetic between a 16-bit and a 32-bit tensor takes a slow path on CPU (several times slower
than a copy), so deltas are formed and applied in full precision in the staging buffer and only
cast on the way to and from the wire.
"""

from __future__ import annotations

import torch
from torch import Tensor

from local_sgd_optim.comm.buckets import Bucket
from local_sgd_optim.comm.tensors import copy_all

__all__ = ["apply_overlapped", "pack", "unpack"]


def pack(b: Bucket, payload: Tensor, payload_views: list[Tensor]) -> None:
    """Write what ``b`` sends into ``payload``: its values, or their delta from the anchor."""
    if b.delta:
        assert b.scratch is not None and b.anchor is not None
        copy_all(b.scratch_views, b.sources)
        b.scratch.sub_(b.anchor)
        payload.copy_(b.scratch)
    else:
        copy_all(payload_views, b.sources)


def unpack(b: Bucket, world_size: int) -> None:
    """Set ``b``'s sources to the mean of what every rank sent (the sum in ``b.payload``)."""
    if b.delta:
        assert b.scratch is not None and b.anchor is not None
        b.scratch.copy_(b.payload)
        b.anchor.add_(b.scratch, alpha=1.0 / world_size)
        copy_all(b.sources, b.anchor_views)
    else:
        b.payload.div_(world_size)
        copy_all(b.sources, b.payload_views)


def apply_overlapped(b: Bucket, world_size: int) -> None:
    """``source <- source - (what this rank sent) + (mean of what every rank sent)``; for deltas
    the anchor moves by the mean delta as well."""
    assert b.sent is not None
    scale = 1.0 / world_size
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
