"""The cost model's arithmetic: a ring all-reduce, and the steps/s of DDP and of Local SGD.

The formulas are those of :mod:`local_sgd_optim.plan`'s docstring; :func:`suggest_period` searches
the periods with them.
"""

from __future__ import annotations

import math

from local_sgd_optim.plan.checks import (
    check_comm_bits,
    check_non_negative,
    check_positive,
    check_positive_int,
)

__all__ = [
    "DEFAULT_BACKWARD_SHARE",
    "DEFAULT_LATENCY_S",
    "allreduce_seconds",
    "effective_gbps",
    "predict_ddp_steps_per_second",
    "predict_steps_per_second",
    "suggest_period",
]

_MB = 1024 * 1024
DEFAULT_LATENCY_S = 2e-3
DEFAULT_BACKWARD_SHARE = 2.0 / 3.0


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
    nbytes = check_non_negative("nbytes", nbytes)
    ranks = check_positive_int("ranks", ranks)
    gbps = check_positive("gbps", gbps)
    latency_s = check_non_negative("latency_s", latency_s)
    hop_latency_s = check_non_negative("hop_latency_s", hop_latency_s)
    bandwidth_efficiency = check_positive("bandwidth_efficiency", bandwidth_efficiency)
    if bandwidth_efficiency > 1:
        raise ValueError(f"bandwidth_efficiency must be at most 1, got {bandwidth_efficiency!r}")
    if ranks == 1 or nbytes == 0:
        return 0.0
    if bucket_cap_mb is None:
        collectives = 1
    else:
        collectives = max(
            1, math.ceil(nbytes / (check_positive("bucket_cap_mb", bucket_cap_mb) * _MB))
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
    nbytes = check_positive("nbytes", nbytes)
    ranks = check_positive_int("ranks", ranks)
    seconds = check_positive("seconds", seconds)
    latency_s = check_non_negative("latency_s", latency_s)
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
    # Over 60 lines (68) because the public docstring and the signature, one keyword
    # argument a line, are 44 of them; the code is 22.
    c = check_positive("step_seconds", step_seconds)
    period = check_positive_int("period", period)
    comm_bits = check_comm_bits(comm_bits)
    if isinstance(overlap_steps, bool) or not isinstance(overlap_steps, int) or overlap_steps < 0:
        raise ValueError(f"overlap_steps must be a non-negative integer, got {overlap_steps!r}")
    if overlap_steps > period:
        raise ValueError(
            f"overlap_steps must be at most period ({period}), got {overlap_steps!r}: a round "
            "must land before the next one starts"
        )
    payload = check_non_negative("model_bytes", model_bytes) * comm_bits / 32
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
    c = check_positive("step_seconds", step_seconds)
    backward_share = check_non_negative("backward_share", backward_share)
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
    # Over 60 lines (73) because the public docstring and the signature, one keyword
    # argument a line, are 48 of them; the code is 23.
    target_efficiency = check_positive("target_efficiency", target_efficiency)
    if target_efficiency > 1:
        raise ValueError(f"target_efficiency must be at most 1, got {target_efficiency!r}")
    max_period = check_positive_int("max_period", max_period)
    floor = 1.0 / check_positive("step_seconds", step_seconds)
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
