"""A cost model for Local SGD against DDP: predicted steps/s, and a period to pick.

The model is deliberately small, a few lines of arithmetic that a user can check by hand:

- One all-reduce of ``S`` bytes over ``N`` ranks is a ring (Patarasuk and Yuan, "Bandwidth
  optimal all-reduce algorithms for clusters of workstations", JPDC 2009): every rank sends and
  receives ``2 (N - 1) / N * S`` bytes, in ``2 (N - 1)`` hops. Its time is
  ``latency_s + 2 (N - 1) * hop_latency_s + 2 (N - 1) / N * S / bandwidth``, where ``latency_s``
  is the fixed cost of launching a collective (about 2 ms for gloo on the 2-core machine of
  ``BENCHMARKS.md``, tens of microseconds for NCCL) and ``bandwidth`` is the link's rate times
  ``bandwidth_efficiency``.
- A round of ``S`` bytes split into buckets of at most ``bucket_cap_mb`` runs one collective per
  bucket: the bandwidth term is paid once, the latency terms once per bucket.
- DDP all-reduces the fp32 gradients every step. Its buckets start during the backward pass, so
  communication hides behind the backward share ``b`` of the compute time ``c``:
  ``step = max(c, (1 - b) * c + T_allreduce)``.
- Local SGD without overlap pays one round every ``period`` steps: ``step = c + T_round / period``.
  16-bit rounds (``comm_bits=16``) send half the bytes.
- Local SGD with ``overlap_steps = k``: a round launched at a period boundary runs while the next
  ``k`` steps compute, and only what is left is waited for:
  ``period * c + max(0, T_round - k * c)`` per period.

Numbers in, numbers out: nothing here imports torch. Run it from the command line to compare
DDP with Local SGD for your own cluster, e.g. a 1B-parameter model on 64 ranks over 10 Gbit/s::

    python -m local_sgd_optim.plan --params 1e9 --ranks 64 --gbps 10 --step-seconds 0.5

``BENCHMARKS.md`` checks the model against measured runs.
"""

from __future__ import annotations

import argparse
import math
from collections.abc import Sequence
from dataclasses import dataclass

__all__ = [
    "Prediction",
    "allreduce_seconds",
    "effective_gbps",
    "main",
    "predict",
    "predict_ddp_steps_per_second",
    "predict_steps_per_second",
    "suggest_period",
]

_MB = 1024 * 1024
DEFAULT_LATENCY_S = 2e-3
DEFAULT_BACKWARD_SHARE = 2.0 / 3.0


def _check_positive(name: str, value: float) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not value > 0:
        raise ValueError(f"{name} must be a positive number, got {value!r}")
    return float(value)


def _check_non_negative(name: str, value: float) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not value >= 0:
        raise ValueError(f"{name} must be a non-negative number, got {value!r}")
    return float(value)


def _check_positive_int(name: str, value: int) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise ValueError(f"{name} must be a positive integer, got {value!r}")
    return value


def _check_comm_bits(comm_bits: int) -> int:
    if comm_bits not in (16, 32):
        raise ValueError(f"comm_bits must be 16 or 32, got {comm_bits!r}")
    return comm_bits


def allreduce_seconds(
    nbytes: float,
    ranks: int,
    gbps: float,
    *,
    latency_s: float = DEFAULT_LATENCY_S,
    hop_latency_s: float = 0.0,
    bucket_cap_mb: float | None = None,
    bandwidth_efficiency: float = 1.0,
) -> float:
    """Time of a ring all-reduce of ``nbytes`` over ``ranks`` ranks, in buckets.

    Args:
        nbytes (float): bytes each rank contributes (the payload, not the traffic).
        ranks (int): ranks in the group; one rank communicates nothing.
        gbps (float): link bandwidth per rank and direction, in Gbit/s (10**9 bits).
        latency_s (float): fixed cost of one collective, in seconds (default: 2e-3).
        hop_latency_s (float): extra cost of each of the ring's ``2 (ranks - 1)`` hops
            (default: 0).
        bucket_cap_mb (float, optional): largest bucket in MiB; ``None`` is one collective
            (default: ``None``).
        bandwidth_efficiency (float): the fraction of ``gbps`` a collective achieves
            (default: 1.0).

    Returns:
        Seconds.

    Raises:
        ValueError: an argument is out of range.

    Example::

        >>> round(allreduce_seconds(125e6, 2, 1.0, latency_s=0.0), 3)  # 1 Gbit/s, 2 ranks
        1.0
    """
    nbytes = _check_non_negative("nbytes", nbytes)
    ranks = _check_positive_int("ranks", ranks)
    gbps = _check_positive("gbps", gbps)
    latency_s = _check_non_negative("latency_s", latency_s)
    hop_latency_s = _check_non_negative("hop_latency_s", hop_latency_s)
    bandwidth_efficiency = _check_positive("bandwidth_efficiency", bandwidth_efficiency)
    if bandwidth_efficiency > 1:
        raise ValueError(f"bandwidth_efficiency must be at most 1, got {bandwidth_efficiency!r}")
    if ranks == 1 or nbytes == 0:
        return 0.0
    if bucket_cap_mb is None:
        collectives = 1
    else:
        collectives = max(
            1, math.ceil(nbytes / (_check_positive("bucket_cap_mb", bucket_cap_mb) * _MB))
        )
    bytes_per_second = gbps * 1e9 / 8 * bandwidth_efficiency
    traffic = 2 * (ranks - 1) / ranks * nbytes
    per_collective = latency_s + 2 * (ranks - 1) * hop_latency_s
    return collectives * per_collective + traffic / bytes_per_second


def effective_gbps(
    nbytes: float, ranks: int, seconds: float, *, latency_s: float = DEFAULT_LATENCY_S
) -> float:
    """The bandwidth at which one all-reduce of ``nbytes`` takes ``seconds``: calibration.

    The inverse of :func:`allreduce_seconds` for one collective. Feed it a measured all-reduce
    of a preallocated flat buffer (the floor) to predict other runs on the same link.

    Args:
        nbytes (float): bytes each rank contributed to the measured all-reduce.
        ranks (int): ranks in the group, at least 2.
        seconds (float): the measured time of that all-reduce.
        latency_s (float): fixed cost of one collective, taken off before the bytes
            (default: 2e-3).

    Returns:
        Gbit/s per rank and direction.

    Raises:
        ValueError: ``seconds`` is not more than ``latency_s``, or an argument is out of range.

    Example::

        >>> effective_gbps(125e6, 2, 1.0, latency_s=0.0)
        1.0
    """
    nbytes = _check_positive("nbytes", nbytes)
    ranks = _check_positive_int("ranks", ranks)
    seconds = _check_positive("seconds", seconds)
    latency_s = _check_non_negative("latency_s", latency_s)
    if ranks < 2:
        raise ValueError(f"ranks must be at least 2 to calibrate a link, got {ranks!r}")
    if seconds <= latency_s:
        raise ValueError(
            f"seconds ({seconds!r}) must exceed latency_s ({latency_s!r}) to leave time for bytes"
        )
    traffic = 2 * (ranks - 1) / ranks * nbytes
    return traffic * 8 / (seconds - latency_s) / 1e9


def predict_steps_per_second(
    *,
    step_seconds: float,
    model_bytes: float,
    ranks: int,
    gbps: float,
    period: int,
    comm_bits: int = 32,
    overlap_steps: int = 0,
    latency_s: float = DEFAULT_LATENCY_S,
    hop_latency_s: float = 0.0,
    bucket_cap_mb: float | None = 25.0,
    bandwidth_efficiency: float = 1.0,
) -> float:
    """Steps per second of Local SGD, per rank.

    Args:
        step_seconds (float): compute time of one optimizer step (forward, backward, update)
            with no communication at all: ``c``.
        model_bytes (float): bytes of the averaged fp32 state (4 per parameter).
        ranks (int): ranks averaging together.
        gbps (float): link bandwidth per rank and direction, in Gbit/s.
        period (int): optimizer steps between rounds.
        comm_bits (int): 32 for fp32 rounds, 16 for bf16/fp16 deltas (default: 32).
        overlap_steps (int): steps a round may run behind compute before it is applied; at most
            ``period`` (default: 0, synchronous).
        latency_s (float): fixed cost of one collective (default: 2e-3).
        hop_latency_s (float): cost of each ring hop (default: 0).
        bucket_cap_mb (float, optional): bucket size of a round in MiB (default: 25.0).
        bandwidth_efficiency (float): fraction of ``gbps`` achieved (default: 1.0).

    Returns:
        Optimizer steps per second.

    Raises:
        ValueError: an argument is out of range.

    Example::

        >>> # c = 0.3 s, a 44.7 MB model, 2 ranks over 1 Gbit/s, period 8: 0.358 s per round
        >>> round(predict_steps_per_second(step_seconds=0.3, model_bytes=44.7e6, ranks=2,
        ...       gbps=1.0, period=8, latency_s=0.0, bucket_cap_mb=None), 3)
        2.901
    """
    c = _check_positive("step_seconds", step_seconds)
    period = _check_positive_int("period", period)
    comm_bits = _check_comm_bits(comm_bits)
    if isinstance(overlap_steps, bool) or not isinstance(overlap_steps, int) or overlap_steps < 0:
        raise ValueError(f"overlap_steps must be a non-negative integer, got {overlap_steps!r}")
    if overlap_steps > period:
        raise ValueError(
            f"overlap_steps must be at most period ({period}), got {overlap_steps!r}: a round "
            "must land before the next one starts"
        )
    payload = _check_non_negative("model_bytes", model_bytes) * comm_bits / 32
    round_s = allreduce_seconds(
        payload,
        ranks,
        gbps,
        latency_s=latency_s,
        hop_latency_s=hop_latency_s,
        bucket_cap_mb=bucket_cap_mb,
        bandwidth_efficiency=bandwidth_efficiency,
    )
    waited = max(0.0, round_s - overlap_steps * c)
    return period / (period * c + waited)


def predict_ddp_steps_per_second(
    *,
    step_seconds: float,
    model_bytes: float,
    ranks: int,
    gbps: float,
    backward_share: float = DEFAULT_BACKWARD_SHARE,
    latency_s: float = DEFAULT_LATENCY_S,
    hop_latency_s: float = 0.0,
    bucket_cap_mb: float | None = 25.0,
    bandwidth_efficiency: float = 1.0,
) -> float:
    """Steps per second of DDP: an fp32 gradient all-reduce every step, hidden behind backward.

    Args:
        step_seconds (float): compute time of one step with no communication: ``c``.
        model_bytes (float): bytes of the fp32 gradients (4 per parameter).
        ranks (int): ranks.
        gbps (float): link bandwidth per rank and direction, in Gbit/s.
        backward_share (float): the part of ``c`` spent in the backward pass, during which
            DDP's buckets communicate (default: 2/3).
        latency_s (float): fixed cost of one collective (default: 2e-3).
        hop_latency_s (float): cost of each ring hop (default: 0).
        bucket_cap_mb (float, optional): DDP's bucket size in MiB (default: 25.0).
        bandwidth_efficiency (float): fraction of ``gbps`` achieved (default: 1.0).

    Returns:
        Optimizer steps per second.

    Raises:
        ValueError: an argument is out of range.

    Example::

        >>> round(predict_ddp_steps_per_second(step_seconds=0.3, model_bytes=44.7e6, ranks=2,
        ...       gbps=1.0, latency_s=0.0, bucket_cap_mb=None), 3)
        2.185
    """
    c = _check_positive("step_seconds", step_seconds)
    backward_share = _check_non_negative("backward_share", backward_share)
    if backward_share > 1:
        raise ValueError(f"backward_share must be at most 1, got {backward_share!r}")
    comm = allreduce_seconds(
        model_bytes,
        ranks,
        gbps,
        latency_s=latency_s,
        hop_latency_s=hop_latency_s,
        bucket_cap_mb=bucket_cap_mb,
        bandwidth_efficiency=bandwidth_efficiency,
    )
    if comm == 0.0:
        return 1.0 / c
    return 1.0 / max(c, (1.0 - backward_share) * c + comm)


def suggest_period(
    *,
    step_seconds: float,
    model_bytes: float,
    ranks: int,
    gbps: float,
    target_efficiency: float = 0.9,
    comm_bits: int = 32,
    overlap_steps: int = 0,
    max_period: int = 1024,
    latency_s: float = DEFAULT_LATENCY_S,
    hop_latency_s: float = 0.0,
    bucket_cap_mb: float | None = 25.0,
    bandwidth_efficiency: float = 1.0,
) -> int | None:
    """The smallest period whose predicted throughput reaches ``target_efficiency`` of compute.

    A shorter period averages more often, which is better for convergence; this returns the
    shortest one that keeps communication below ``1 - target_efficiency`` of the time.

    Args:
        step_seconds (float): compute time of one optimizer step with no communication.
        model_bytes (float): bytes of the averaged fp32 state (4 per parameter).
        ranks (int): ranks averaging together.
        gbps (float): link bandwidth per rank and direction, in Gbit/s.
        target_efficiency (float): the fraction of the no-communication rate ``1 / c`` to reach,
            in (0, 1] (default: 0.9).
        comm_bits (int): 32 for fp32 rounds, 16 for bf16/fp16 deltas (default: 32).
        overlap_steps (int): steps a round may run behind compute; periods shorter than it are
            skipped (default: 0).
        max_period (int): the longest period to consider (default: 1024).
        latency_s (float): fixed cost of one collective (default: 2e-3).
        hop_latency_s (float): cost of each ring hop (default: 0).
        bucket_cap_mb (float, optional): bucket size of a round in MiB (default: 25.0).
        bandwidth_efficiency (float): fraction of ``gbps`` achieved (default: 1.0).

    Returns:
        The period, or ``None`` when no period up to ``max_period`` reaches the target.

    Raises:
        ValueError: an argument is out of range.

    Example::

        >>> suggest_period(step_seconds=0.3, model_bytes=44.7e6, ranks=2, gbps=1.0,
        ...                target_efficiency=0.9, latency_s=0.0, bucket_cap_mb=None)
        11
    """
    target_efficiency = _check_positive("target_efficiency", target_efficiency)
    if target_efficiency > 1:
        raise ValueError(f"target_efficiency must be at most 1, got {target_efficiency!r}")
    max_period = _check_positive_int("max_period", max_period)
    floor = 1.0 / _check_positive("step_seconds", step_seconds)
    for period in range(max(1, overlap_steps), max_period + 1):
        rate = predict_steps_per_second(
            step_seconds=step_seconds,
            model_bytes=model_bytes,
            ranks=ranks,
            gbps=gbps,
            period=period,
            comm_bits=comm_bits,
            overlap_steps=overlap_steps,
            latency_s=latency_s,
            hop_latency_s=hop_latency_s,
            bucket_cap_mb=bucket_cap_mb,
            bandwidth_efficiency=bandwidth_efficiency,
        )
        # A relative tolerance keeps an exact hit (e.g. efficiency 1.0 with full overlap) a hit.
        if rate >= target_efficiency * floor * (1 - 1e-12):
            return period
    return None


@dataclass(frozen=True)
class Prediction:
    """One row of :func:`predict`: a method and its predicted throughput.

    Args:
        method (str): ``"DDP (fp32 gradients)"`` or a Local SGD variant.
        period (int, optional): the averaging period; ``None`` for DDP.
        steps_per_second (float): predicted optimizer steps per second.
        efficiency (float): ``steps_per_second`` against the no-communication rate.
        bytes_per_step (float): bytes each rank sends per optimizer step.

    Example::

        >>> row = predict(step_seconds=0.3, model_bytes=44.7e6, ranks=2, gbps=1.0, periods=[8])[1]
        >>> row.method, row.period
        ('Local SGD fp32', 8)
    """

    method: str
    period: int | None
    steps_per_second: float
    efficiency: float  # against the no-communication rate 1 / step_seconds
    bytes_per_step: float  # bytes each rank sends per optimizer step


def predict(
    *,
    step_seconds: float,
    model_bytes: float,
    ranks: int,
    gbps: float,
    periods: Sequence[int] = (1, 2, 4, 8, 16, 32, 64),
    overlap_steps: int = 2,
    backward_share: float = DEFAULT_BACKWARD_SHARE,
    latency_s: float = DEFAULT_LATENCY_S,
    hop_latency_s: float = 0.0,
    bucket_cap_mb: float | None = 25.0,
    bandwidth_efficiency: float = 1.0,
) -> list[Prediction]:
    """DDP, then Local SGD fp32, bf16, and bf16 with overlap for each period: the CLI's table.

    Args:
        step_seconds (float): compute time of one optimizer step with no communication.
        model_bytes (float): bytes of the fp32 model (4 per parameter).
        ranks (int): ranks.
        gbps (float): link bandwidth per rank and direction, in Gbit/s.
        periods (Sequence[int]): the periods to tabulate (default: 1, 2, 4, ..., 64).
        overlap_steps (int): ``k`` for the overlap rows, which are left out for periods shorter
            than ``k``; 0 leaves them all out (default: 2).
        backward_share (float): the part of a step in the backward pass, for DDP
            (default: 2/3).
        latency_s (float): fixed cost of one collective (default: 2e-3).
        hop_latency_s (float): cost of each ring hop (default: 0).
        bucket_cap_mb (float, optional): bucket size in MiB (default: 25.0).
        bandwidth_efficiency (float): fraction of ``gbps`` achieved (default: 1.0).

    Returns:
        One :class:`Prediction` per row.

    Raises:
        ValueError: an argument is out of range.

    Example::

        >>> rows = predict(step_seconds=0.5, model_bytes=4e9, ranks=64, gbps=10, periods=[32])
        >>> [(r.method, r.period, round(r.steps_per_second, 2)) for r in rows]
        ... # doctest: +NORMALIZE_WHITESPACE
        [('DDP (fp32 gradients)', None, 0.15), ('Local SGD fp32', 32, 1.42),
         ('Local SGD bf16', 32, 1.66), ('Local SGD bf16, overlap 2', 32, 1.75)]
    """
    link = {
        "latency_s": latency_s,
        "hop_latency_s": hop_latency_s,
        "bucket_cap_mb": bucket_cap_mb,
        "bandwidth_efficiency": bandwidth_efficiency,
    }
    floor = 1.0 / _check_positive("step_seconds", step_seconds)
    traffic = 2 * (ranks - 1) / ranks * model_bytes if ranks > 1 else 0.0
    ddp = predict_ddp_steps_per_second(
        step_seconds=step_seconds,
        model_bytes=model_bytes,
        ranks=ranks,
        gbps=gbps,
        backward_share=backward_share,
        **link,  # type: ignore[arg-type]
    )
    rows = [Prediction("DDP (fp32 gradients)", None, ddp, ddp / floor, traffic)]
    for period in periods:
        variants = [("Local SGD fp32", 32, 0), ("Local SGD bf16", 16, 0)]
        if 0 < overlap_steps <= period:
            variants.append((f"Local SGD bf16, overlap {overlap_steps}", 16, overlap_steps))
        for name, bits, overlap in variants:
            rate = predict_steps_per_second(
                step_seconds=step_seconds,
                model_bytes=model_bytes,
                ranks=ranks,
                gbps=gbps,
                period=period,
                comm_bits=bits,
                overlap_steps=overlap,
                **link,  # type: ignore[arg-type]
            )
            rows.append(Prediction(name, period, rate, rate / floor, traffic * bits / 32 / period))
    return rows


def _format_bytes(n: float) -> str:
    for unit, size in (("GB", 1e9), ("MB", 1e6), ("kB", 1e3)):
        if n >= size:
            return f"{n / size:.3g} {unit}"
    return f"{n:.3g} B"


def _parse_periods(text: str) -> list[int]:
    try:
        periods = [int(part) for part in text.split(",") if part.strip()]
    except ValueError:
        raise argparse.ArgumentTypeError(f"periods must be integers, got {text!r}") from None
    if not periods or any(p < 1 for p in periods):
        raise argparse.ArgumentTypeError(f"periods must be positive integers, got {text!r}")
    return periods


def main(argv: Sequence[str] | None = None) -> None:
    """``python -m local_sgd_optim.plan``: print predicted steps/s of DDP and Local SGD.

    Args:
        argv (Sequence[str], optional): the command-line arguments (default: ``sys.argv[1:]``).

    Example::

        $ python -m local_sgd_optim.plan --params 1e9 --ranks 64 --gbps 10 --step-seconds 0.5
    """
    parser = argparse.ArgumentParser(
        prog="python -m local_sgd_optim.plan",
        description="Predict steps/s of DDP and Local SGD on a cluster and suggest a period.",
    )
    parser.add_argument("--params", type=float, required=True, help="parameters, e.g. 1e9")
    parser.add_argument("--ranks", type=int, required=True, help="ranks (one per GPU)")
    parser.add_argument("--gbps", type=float, required=True, help="link Gbit/s per rank")
    parser.add_argument(
        "--step-seconds",
        type=float,
        required=True,
        help="compute time of one optimizer step with no communication",
    )
    parser.add_argument(
        "--periods", type=_parse_periods, default=[1, 2, 4, 8, 16, 32, 64], help="e.g. 1,8,64"
    )
    parser.add_argument("--overlap-steps", type=int, default=2, help="0 leaves overlap out")
    parser.add_argument(
        "--latency-ms", type=float, default=DEFAULT_LATENCY_S * 1e3, help="per collective"
    )
    parser.add_argument("--hop-latency-us", type=float, default=0.0, help="per ring hop")
    parser.add_argument("--bucket-cap-mb", type=float, default=25.0)
    parser.add_argument(
        "--bandwidth-efficiency", type=float, default=1.0, help="fraction of --gbps achieved"
    )
    parser.add_argument("--backward-share", type=float, default=DEFAULT_BACKWARD_SHARE)
    parser.add_argument(
        "--target-efficiency",
        type=float,
        default=0.9,
        help="for the suggested period: fraction of the no-communication rate",
    )
    args = parser.parse_args(argv)
    model_bytes = 4 * args.params
    link = {
        "latency_s": args.latency_ms * 1e-3,
        "hop_latency_s": args.hop_latency_us * 1e-6,
        "bucket_cap_mb": args.bucket_cap_mb,
        "bandwidth_efficiency": args.bandwidth_efficiency,
    }
    try:
        rows = predict(
            step_seconds=args.step_seconds,
            model_bytes=model_bytes,
            ranks=args.ranks,
            gbps=args.gbps,
            periods=args.periods,
            overlap_steps=args.overlap_steps,
            backward_share=args.backward_share,
            **link,
        )
        suggestions = [
            (
                name,
                suggest_period(
                    step_seconds=args.step_seconds,
                    model_bytes=model_bytes,
                    ranks=args.ranks,
                    gbps=args.gbps,
                    target_efficiency=args.target_efficiency,
                    comm_bits=bits,
                    overlap_steps=overlap,
                    **link,
                ),
            )
            for name, bits, overlap in (
                ("fp32", 32, 0),
                ("bf16", 16, 0),
                (f"bf16 + overlap {args.overlap_steps}", 16, args.overlap_steps),
            )
        ]
    except ValueError as problem:
        parser.error(str(problem))
    floor = 1.0 / args.step_seconds
    print(
        f"{args.params:.3g} parameters ({_format_bytes(model_bytes)} fp32), {args.ranks} ranks, "
        f"{args.gbps:g} Gbit/s, {args.step_seconds:g} s compute per step "
        f"(no communication: {floor:.3g} steps/s)"
    )
    print()
    print("| method | period | steps/s | of compute | sent per step and rank |")
    print("|---|---:|---:|---:|---:|")
    for row in rows:
        shown = "-" if row.period is None else str(row.period)
        print(
            f"| {row.method} | {shown} | {row.steps_per_second:.3g} | "
            f"{row.efficiency:.0%} | {_format_bytes(row.bytes_per_step)} |"
        )
    print()
    for name, period in suggestions:
        pick = f"period {period}" if period is not None else "no period up to 1024 does"
        print(f"shortest period reaching {args.target_efficiency:.0%} of compute, {name}: {pick}")


if __name__ == "__main__":
    main()
