"""8-bit and 4-bit deltas: the format, quantizing, and the two reductions that average them.

With ``comm_dtype="int8"`` or ``"int4"`` a rank sends its delta (the tensors minus the anchor,
the last round's averaged values in full precision, as for 16-bit deltas) as integer codes
with one float32 scale per block of :data:`BLOCK` values:

- **Symmetric absmax per block.** A block's scale is its largest absolute value divided by the
  largest code (127 for int8, 7 for int4), and each value travels as ``round(value / scale)``
  (round to nearest, ties to even: deterministic). Deltas are centred on zero, so a symmetric
  range wastes nothing; zero stays exactly zero, so tensors that did not move (frozen layers,
  unused embeddings) come back unchanged; and a block costs one number (min-max would need two).
- **A float32 scale.** Any finite delta's absmax fits it: nothing overflows, so unlike float16
  deltas there is no "too large" verdict to exchange in the header. A block whose absmax is
  below ``127 * 2**-126`` (about 1.5e-36) gets the smallest normal float32 as its scale, so no
  scale is ever zero or subnormal; its values are then off by less than 6e-39.
- **Bytes.** Codes and scale of a block lie together (a *record* of 132 bytes for int8, 68 for
  int4, two codes per byte), so any run of whole blocks is one contiguous slice: what the
  reduce-scatter splits. Per value: 1 + 4/128 bytes (0.258x of float32) for int8, 0.5 + 4/128
  (0.133x) for int4. A bucket's last block is padded with zeros.

**The bound.** Rounding moves a value by at most half its block's scale (plus float32 rounding
of the scale's reciprocal, a relative 1e-7). The mean of ``W`` ranks' dequantized deltas is
therefore within ``sum_r scale_r / (2 W)`` of the mean of the exact deltas, element by element
(``scale_r``: the scale of that element's block on rank ``r``). The reduce-scatter requantizes
that mean once more, which adds half the scale of the requantized block.

**The reductions.** An all-reduce cannot add codes that carry different scales, so ranks
exchange codes and each adds dequantized values in float32, always in rank order ``0..W-1``
and then multiplied by ``1/W`` (:func:`~local_sgd_optim.comm.tensors.divide_`): every rank
dequantizes the same bytes the same way, so every rank ends bitwise identical.

- ``"all_gather"``: each rank all-gathers every rank's quantized bucket and sums all ``W``.
  One collective per bucket; each rank receives ``(W - 1)`` payloads and dequantizes ``W``.
- ``"reduce_scatter"``: each rank's bucket is cut into ``W`` shares of whole blocks;
  ``all_to_all`` sends share ``s`` to rank ``s``, which sums it, divides, requantizes and the
  shares are all-gathered. Two collectives per bucket, about ``2 (W - 1) / W`` payloads over
  each rank's link, the traffic of a ring all-reduce.

Both are built from ``all_gather`` and ``all_to_all``, which gloo and NCCL both have (a
backend's own ``reduce_scatter``, which gloo also has in torch 2.14, adds what it is given, as
an all-reduce does). :func:`choose_reduction` picks by world size (see
``docs/communication.md`` for the measurements behind it).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.distributed as dist
from torch import Tensor

from local_sgd_optim.comm.collectives import start_collective
from local_sgd_optim.comm.stats import CommStats
from local_sgd_optim.comm.tensors import divide_

__all__ = [
    "BLOCK",
    "CAST_VALUES",
    "FORMATS",
    "REDUCTIONS",
    "QuantFormat",
    "choose_reduction",
    "gathered_mean",
    "reduce_share",
    "start_all_gather",
    "start_all_to_all",
]

BLOCK = 128  # values per scale
# Values of the float32 buffer that codes are cast into, a slice at a time, before they are
# added: small enough to stay in cache (1 MiB), large enough that the calls per slice cost little.
CAST_VALUES = 1 << 18
REDUCTIONS = ("auto", "all_gather", "reduce_scatter")
# "auto" uses the reduce-scatter from this many ranks on (see choose_reduction).
_REDUCE_SCATTER_FROM = 3
_SCALE_BYTES = 4  # one float32 per block
_TINY = torch.finfo(torch.float32).tiny


@dataclass(frozen=True)
class QuantFormat:
    """Symmetric absmax codes of ``bits`` bits with one float32 scale per ``block`` values.

    Args:
        name (str): ``"int8"`` or ``"int4"``, as ``comm_dtype`` names it.
        bits (int): 8 or 4.
        block (int): values per scale (default: :data:`BLOCK`).

    Example::

        >>> fmt = FORMATS["int8"]
        >>> records = torch.empty(fmt.payload_bytes(1000), dtype=torch.uint8)
        >>> values = torch.zeros(fmt.padded(1000)); values[:1000] = delta
        >>> fmt.quantize_(values, records, None)  # values are overwritten
        >>> fmt.dequantize(records, values, None)  # values[:1000] is delta, rounded
    """

    name: str
    bits: int
    block: int = BLOCK

    @property
    def qmax(self) -> int:
        """The largest code: 127 or 7 (codes are symmetric, ``-qmax..qmax``)."""
        return (1 << (self.bits - 1)) - 1

    @property
    def code_bytes(self) -> int:
        """Bytes of one block's codes."""
        return self.block * self.bits // 8

    @property
    def record_bytes(self) -> int:
        """Bytes of one block on the wire: its codes, then its float32 scale."""
        return self.code_bytes + _SCALE_BYTES

    def blocks(self, numel: int, shares: int = 1) -> int:
        """Blocks for ``numel`` values, rounded up to a multiple of ``shares``."""
        blocks = -(-numel // self.block)
        return -(-blocks // shares) * shares

    def padded(self, numel: int, shares: int = 1) -> int:
        """Values in :meth:`blocks` whole blocks."""
        return self.blocks(numel, shares) * self.block

    def payload_bytes(self, numel: int, shares: int = 1) -> int:
        """Bytes one rank sends for ``numel`` values: codes and scales."""
        return self.blocks(numel, shares) * self.record_bytes

    def _records(self, records: Tensor) -> tuple[Tensor, Tensor]:
        """The codes (blocks x code bytes, int8) and scales (blocks x 1, float32) of a 1-D
        uint8 buffer of whole records, as views."""
        rows = records.view(-1, self.record_bytes)
        codes = rows[:, : self.code_bytes].view(torch.int8)
        scales = rows[:, self.code_bytes :].view(torch.float32)
        return codes, scales

    def quantize_(self, values: Tensor, records: Tensor, codes: Tensor | None) -> None:
        """Write the records of the float32 ``values`` (whole blocks), overwriting ``values``.

        ``codes`` is an int8 buffer of ``values.numel()`` for int4 (the codes before two are
        packed into a byte), unused for int8.
        """
        rows = values.view(-1, self.block)
        packed, scales = self._records(records)
        # amax and amin: on CPU, two passes take a seventh of aminmax's one over rows of 128.
        high, low = rows.amax(dim=1), rows.amin(dim=1)
        # The floor keeps every scale a normal float32: never 0, and its reciprocal finite.
        scale = torch.maximum(high, low.neg_()).clamp_min_(self.qmax * _TINY).div_(self.qmax)
        scales.copy_(scale.unsqueeze(1))
        # |value / scale| <= qmax (1 + 3e-7) rounds to at most qmax: no clamp is needed.
        rows.mul_(scale.reciprocal_().unsqueeze(1)).round_()
        if self.bits == 8:
            packed.copy_(rows)
            return
        assert codes is not None
        unpacked = codes[: values.numel()].view(-1, self.block)
        unpacked.copy_(rows)
        half = self.block // 2
        # The first half of a block in the low nibbles, the second half in the high ones.
        torch.bitwise_and(unpacked[:, :half], 15, out=packed)
        packed.bitwise_or_(unpacked[:, half:].bitwise_left_shift_(4))

    def _codes(self, records: Tensor, codes: Tensor | None) -> tuple[Tensor, Tensor]:
        """Codes (blocks x block, int8) and scales of ``records``; int4 codes are unpacked
        into ``codes``."""
        packed, scales = self._records(records)
        if self.bits == 8:
            return packed, scales
        assert codes is not None
        unpacked = codes[: packed.shape[0] * self.block].view(-1, self.block)
        half = self.block // 2
        # Shifting int8 left then right (arithmetic) sign-extends the low nibble.
        low = torch.bitwise_left_shift(packed, 4, out=unpacked[:, :half])
        low.bitwise_right_shift_(4)
        torch.bitwise_right_shift(packed, 4, out=unpacked[:, half:])
        return unpacked, scales

    def dequantize(
        self,
        records: Tensor,
        out: Tensor,
        codes: Tensor | None,
        casts: Tensor | None = None,
        accumulate: bool = False,
    ) -> None:
        """``out`` (float32, whole blocks) becomes the values of ``records``, or gains them
        with ``accumulate``, for which ``casts`` is a float32 buffer (of
        :data:`CAST_VALUES`, say) that the codes are cast into a slice at a time."""
        values, scales = self._codes(records, codes)
        rows = out.view(-1, self.block)
        # Arithmetic that mixes int8 and float32 takes a slow path on CPU (several times
        # slower than a cast and the arithmetic in float32): cast first.
        if not accumulate:
            rows.copy_(values)
            rows.mul_(scales)
            return
        assert casts is not None
        step = casts.numel() // self.block
        cast_rows = casts[: step * self.block].view(step, self.block)
        for start in range(0, rows.shape[0], step):
            end = min(start + step, rows.shape[0])
            cast = cast_rows[: end - start]
            cast.copy_(values[start:end])
            rows[start:end].addcmul_(cast, scales[start:end])


FORMATS = {"int8": QuantFormat("int8", 8), "int4": QuantFormat("int4", 4)}


def choose_reduction(requested: str, world_size: int, overlap: bool) -> str:
    """The reduction for quantized buckets: ``requested``, or for ``"auto"`` the all-gather
    on 2 ranks and with ``overlap`` (one collective per bucket to leave in flight), the
    reduce-scatter from 3 ranks on.

    Measured with ``benchmarks/round_cost.py`` (ResNet-18, gloo, a 2-core machine): on 2 ranks
    both send the same bytes and take the same time within noise (the all-gather is one
    collective where the reduce-scatter is two); from 3 ranks the all-gather sends ``W - 1``
    payloads against ``2 (W - 1) / W`` and is slower (on 4 ranks over a 1 Gbit/s link, twice
    as slow).

    Raises:
        ValueError: ``requested`` is not one of :data:`REDUCTIONS`, or is ``"reduce_scatter"``
            with ``overlap``.
    """
    if requested not in REDUCTIONS:
        raise ValueError(
            f"quantized_reduction must be 'auto', 'all_gather' or 'reduce_scatter', got "
            f"{requested!r}"
        )
    if requested == "reduce_scatter" and overlap:
        raise ValueError(
            "quantized_reduction='reduce_scatter' cannot overlap: its second collective needs "
            "the first one's result. Use 'all_gather' or 'auto' with overlap=True"
        )
    if requested != "auto":
        return requested
    return "reduce_scatter" if world_size >= _REDUCE_SCATTER_FROM and not overlap else "all_gather"


def start_all_gather(
    output: Tensor,
    payload: Tensor,
    group: dist.ProcessGroup | None,
    stats: CommStats,
    step: int,
    counted: int,
) -> dist.Work:
    """Start gathering every rank's ``payload`` into ``output``, in rank order; ``counted``
    bytes go to ``stats``.

    Raises:
        RoundError: the collective could not start (a rank has exited).
    """
    # all_gather_into_tensor's newer name (torch >= 2.10 warns about the old one).
    gather = getattr(dist, "all_gather_single", None) or dist.all_gather_into_tensor
    return start_collective(
        lambda: gather(output, payload, group=group, async_op=True), stats, step, counted
    )


def start_all_to_all(
    output: Tensor,
    payload: Tensor,
    group: dist.ProcessGroup | None,
    stats: CommStats,
    step: int,
    counted: int,
) -> dist.Work:
    """Start sending share ``s`` of ``payload`` to rank ``s``; ``output`` receives this
    rank's share from every rank, in rank order. ``counted`` bytes go to ``stats``.

    Raises:
        RoundError: the collective could not start (a rank has exited).
    """
    return start_collective(
        lambda: dist.all_to_all_single(output, payload, group=group, async_op=True),
        stats,
        step,
        counted,
    )


def gathered_mean(
    fmt: QuantFormat,
    received: Tensor,
    world_size: int,
    out: Tensor,
    codes: Tensor | None,
    casts: Tensor | None,
    divisor: int | None = None,
) -> None:
    """``out`` (float32, whole blocks) becomes the mean of the ``world_size`` payloads that lie
    one after another in ``received``: dequantized and added in rank order, then divided by
    ``divisor``, the ranks that contributed (default: ``world_size``; ``codes`` and ``casts``:
    see :meth:`QuantFormat.dequantize`)."""
    for r, payload in enumerate(received.view(world_size, -1)):
        fmt.dequantize(payload, out, codes, casts, accumulate=r > 0)
    divide_(out, world_size if divisor is None else divisor)


def reduce_share(
    fmt: QuantFormat,
    received: Tensor,
    world_size: int,
    share: Tensor,
    work: Tensor,
    codes: Tensor | None,
    casts: Tensor | None,
    divisor: int | None = None,
) -> None:
    """The reduce-scatter's middle: this rank's share from every rank (``received``) becomes
    their mean (over ``divisor`` contributing ranks, default ``world_size``), requantized into
    ``share``. ``work`` is float32 of at least a share's values."""
    values = work[: share.numel() // fmt.record_bytes * fmt.block]
    gathered_mean(fmt, received, world_size, values, codes, casts, divisor)
    fmt.quantize_(values, share, codes)
