"""``python -m local_sgd_optim.plan``: the command line that prints the comparison table and the
suggested periods."""

from __future__ import annotations

import argparse
from collections.abc import Sequence
from typing import Any

from local_sgd_optim.plan.cost import DEFAULT_BACKWARD_SHARE, DEFAULT_LATENCY_S, suggest_period
from local_sgd_optim.plan.table import Prediction, predict

__all__ = ["main"]


def _format_bytes(n: float) -> str:
    for unit, size in (("GB", 1e9), ("MB", 1e6), ("kB", 1e3)):
        if n >= size:
            return f"{n / size:.3g} {unit}"
    return f"{n:.3g} B"


# The periods tabulated unless --periods says otherwise; the suggested ones are added to them.
_DEFAULT_PERIODS = (1, 2, 4, 8, 16, 32, 64)


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
    parser = _parser()
    args = parser.parse_args(argv)
    model_bytes = 4 * args.params
    link = {
        "latency_s": args.latency_ms * 1e-3,
        "hop_latency_s": args.hop_latency_us * 1e-6,
        "bucket_cap_mb": args.bucket_cap_mb,
        "bandwidth_efficiency": args.bandwidth_efficiency,
    }
    try:
        suggestions = _suggestions(args, model_bytes, link)
        periods = args.periods
        if periods is None:  # the powers of two, and every period suggested below them
            suggested = {period for _, period in suggestions if period is not None}
            periods = sorted(set(_DEFAULT_PERIODS) | suggested)
        rows = predict(
            step_seconds=args.step_seconds,
            model_bytes=model_bytes,
            ranks=args.ranks,
            gbps=args.gbps,
            periods=periods,
            overlap_steps=args.overlap_steps,
            backward_share=args.backward_share,
            **link,
        )
    except ValueError as problem:
        parser.error(str(problem))
    _print_report(args, model_bytes, rows, suggestions)


def _parser() -> argparse.ArgumentParser:
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
        "--periods",
        type=_parse_periods,
        default=None,
        help="e.g. 1,8,64 (default: 1, 2, 4, ..., 64 and the suggested periods)",
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
    return parser


def _suggestions(
    args: argparse.Namespace, model_bytes: float, link: dict[str, Any]
) -> list[tuple[str, int | None]]:
    """The suggested period of fp32, bf16 and bf16 with overlap rounds."""
    return [
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


def _print_report(
    args: argparse.Namespace,
    model_bytes: float,
    rows: list[Prediction],
    suggestions: list[tuple[str, int | None]],
) -> None:
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
