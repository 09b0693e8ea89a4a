"""Moving a bucket's values to and from its wire buffer, in full precision, as 16-bit deltas or
as quantized (8- or 4-bit) deltas.

Arithmetic between a 16-bit and a 32-bit tensor takes a slow path on CPU (several times slower
than a copy), so deltas are formed and applied in full precision in the staging buffer and only
cast on the way to and from the wire. Quantized deltas are formed in a float32 buffer of whole
blocks (:mod:`~local_sgd_optim.comm.quantize`), where the mean of what the ranks sent lands too.
"""

from __future__ import annotations

import torch
from torch import Tensor

from local_sgd_optim.comm.buckets import Bucket
from local_sgd_optim.comm.quantize import gathered_mean
from local_sgd_optim.comm.tensors import copy_all, divide_

__all__ = ["apply_overlapped", "delta_fits_float16", "pack", "unpack"]


def pack(b: Bucket, payload: Tensor, payload_views: list[Tensor], divisor: int) -> None:
    """Write what ``b`` sends into ``payload``: its values, or their delta from the anchor
    (divided by ``divisor``, the ranks the mean is over, already for a
    :attr:`~Bucket.prescaled` bucket; quantized for a bucket with a :attr:`~Bucket.quant`
    format). An :attr:`~Bucket.in_place` bucket's payload is its tensors' memory: nothing is
    copied."""
    if b.quant is not None:
        _pack_quantized(b, payload)
    elif b.delta:
        assert b.scratch is not None and b.anchor is not None
        if b.span is not None:
            torch.sub(b.span, b.anchor, out=b.scratch)  # one pass: read both, write once
        else:
            copy_all(b.scratch_views, b.sources)
            b.scratch.sub_(b.anchor)
        if b.prescaled:
            divide_(b.scratch, divisor)
        payload.copy_(b.scratch)
    else:
        if not b.in_place:
            copy_all(payload_views, b.sources)
        if b.prescaled:
            divide_(payload, divisor)


def _pack_quantized(b: Bucket, payload: Tensor) -> None:
    """The delta of ``b`` from its anchor, in float32 whole blocks, quantized into ``payload``."""
    assert b.quant is not None and b.work is not None and b.anchor is not None
    delta = b.work[: b.numel]
    if b.span is not None:
        torch.sub(b.span, b.anchor, out=delta)
    else:
        copy_all(b.work_views, b.sources)
        delta.sub_(b.anchor)
    b.work[b.numel :].zero_()  # the last block's padding (another bucket used the buffer)
    b.quant.quantize_(b.work, payload, b.codes)


def _quantized_mean(b: Bucket, world_size: int, divisor: int) -> Tensor:
    """The mean delta of a quantized bucket whose collectives have landed, in ``b.work``: the
    all-gather brought every rank's payload; the reduce-scatter's mean shares are in the wire."""
    assert b.quant is not None and b.work is not None
    if b.shares == 1:
        assert b.received is not None
        gathered_mean(b.quant, b.received, world_size, b.work, b.codes, b.casts, divisor)
    else:
        b.quant.dequantize(b.wire, b.work, b.codes)
    return b.work[: b.numel]


def _scale(b: Bucket, divisor: int) -> float:
    """What the summed payload is multiplied by to give the mean."""
    return 1.0 if b.prescaled else 1.0 / divisor


def unpack(b: Bucket, world_size: int, divisor: int | None = None) -> None:
    """Set ``b``'s sources to the mean of what every rank sent (the sum in ``b.payload``; for
    quantized deltas, what the reduction brought). ``divisor``: the ranks the mean is over,
    when some of the ``world_size`` joined without contributing (default: ``world_size``)."""
    divisor = world_size if divisor is None else divisor
    if b.quant is not None:
        assert b.anchor is not None
        b.anchor.add_(_quantized_mean(b, world_size, divisor))
        if b.span is not None:
            b.span.copy_(b.anchor)
        else:
            copy_all(b.sources, b.anchor_views)
    elif b.delta:
        assert b.scratch is not None and b.anchor is not None
        b.scratch.copy_(b.payload)
        b.anchor.add_(b.scratch, alpha=_scale(b, divisor))
        if b.span is not None:
            b.span.copy_(b.anchor)
        else:
            copy_all(b.sources, b.anchor_views)
    else:
        if not b.prescaled and not b.backend_averages:
            divide_(b.payload, divisor)
        if not b.in_place:
            copy_all(b.sources, b.payload_views)


def apply_overlapped(b: Bucket, world_size: int, rank: int) -> None:
    """``source <- source - (what this rank sent) + (mean of what every rank sent)``; for deltas
    the anchor moves by the mean delta as well. Quantized deltas count what this rank sent as
    it arrived (dequantized): its rounding error stays in its own tensors."""
    if b.quant is not None:
        assert b.anchor is not None and b.received is not None and b.work is not None
        b.anchor.add_(_quantized_mean(b, world_size, world_size))
        torch._foreach_add_(b.sources, b.work_views)
        b.quant.dequantize(b.received.view(world_size, -1)[rank], b.work, b.codes)
        torch._foreach_sub_(b.sources, b.work_views)
        return
    assert b.sent is not None
    scale = _scale(b, world_size)
    own = float(world_size) if b.prescaled else 1.0  # what this rank sent, undivided
    if b.delta:
        assert b.scratch is not None and b.anchor is not None
        b.scratch.copy_(b.payload)
        b.anchor.add_(b.scratch, alpha=scale)
        torch._foreach_add_(b.sources, b.scratch_views, alpha=scale)
        b.scratch.copy_(b.sent)
        torch._foreach_add_(b.sources, b.scratch_views, alpha=-own)
    else:
        torch._foreach_add_(b.sources, b.sent_views, alpha=-own)
        torch._foreach_add_(b.sources, b.payload_views, alpha=scale)


def delta_fits_float16(b: Bucket, divisor: int) -> bool:
    """Whether ``b``'s delta, divided by ``divisor`` (the ranks the mean is over), fits float16
    (at most 65504): one read of the sources and the anchor, for buckets that send float16
    deltas."""
    if not (b.delta and b.prescaled) or b.anchor is None:
        return True
    moved = torch._foreach_sub(b.sources, b.anchor_views)
    largest = max(float(n) for n in torch._foreach_norm(moved, float("inf")))
    return largest / divisor <= torch.finfo(torch.float16).max
