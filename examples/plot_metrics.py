"""Plot test accuracy from ``examples/cifar10.py`` metrics files, one line per run.

Two panels: test accuracy against epochs, and against the bytes each rank sent to all-reduces,
so a Local SGD run and its DDP baseline (``benchmarks/cifar10_ddp.py``) can be compared at a
glance::

    python examples/plot_metrics.py runs/cifar10-local-sgd/metrics.jsonl \
        runs/cifar10-ddp/metrics.jsonl --output comparison.png

Each line is labelled with the run's mode and period, or with ``--labels``.
"""

from __future__ import annotations

import argparse
import json
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import matplotlib

matplotlib.use("Agg")  # files only: no display needed, as on a cluster node

import matplotlib.pyplot as plt
from matplotlib.figure import Figure


def read_metrics(path: Path) -> tuple[dict[str, Any], list[dict[str, Any]]]:
    """The run's latest ``start`` record and its ``eval`` records, in step order."""
    start: dict[str, Any] = {}
    evals: dict[int, dict[str, Any]] = {}
    for number, line in enumerate(Path(path).read_text().splitlines(), start=1):
        if not line.strip():
            continue
        try:
            record = json.loads(line)
        except json.JSONDecodeError as error:
            raise ValueError(f"{path}:{number} is not a JSON line: {error}") from error
        if record.get("kind") == "start":
            start = record
        elif record.get("kind") == "eval":
            evals[record["step"]] = record  # a resumed run's record replaces an older one
    if not evals:
        raise ValueError(f"{path} has no evaluation records; was the run stopped in epoch 1?")
    return start, [evals[step] for step in sorted(evals)]


def run_label(start: dict[str, Any], path: Path) -> str:
    if start.get("mode") == "ddp":
        return f"DDP, {start.get('world_size', '?')} ranks"
    if start.get("mode") == "local-sgd":
        extra = "" if start.get("comm_dtype", "fp32") == "fp32" else f", {start['comm_dtype']}"
        return (
            f"Local SGD, period {start.get('period')}, {start.get('world_size', '?')} ranks{extra}"
        )
    return Path(path).parent.name or str(path)


def plot_metrics(
    paths: Sequence[Path], output: Path, labels: Sequence[str] | None = None
) -> Figure:
    """Draw every run's test accuracy against epochs and against megabytes communicated.

    Args:
        paths (Sequence[Path]): metrics files written by ``examples/cifar10.py`` or
            ``benchmarks/cifar10_ddp.py``.
        output (Path): the image to write (its suffix picks the format, e.g. ``.png``).
        labels (Sequence[str], optional): one legend entry per file (default: mode and period).

    Returns:
        The figure, for further changes or inspection.

    Raises:
        ValueError: ``labels`` does not match ``paths``, or a file has no evaluation records.
    """
    if labels is not None and len(labels) != len(paths):
        raise ValueError(f"got {len(labels)} labels for {len(paths)} metrics files")
    figure, (by_epoch, by_bytes) = plt.subplots(1, 2, figsize=(11, 4.2), layout="constrained")
    log_bytes = True
    for i, path in enumerate(paths):
        start, evals = read_metrics(path)
        label = labels[i] if labels is not None else run_label(start, path)
        accuracy = [100 * r["test_accuracy"] for r in evals]
        megabytes = [r["bytes_communicated"] / 1e6 for r in evals]
        log_bytes = log_bytes and all(mb > 0 for mb in megabytes)
        by_epoch.plot([r["epoch"] for r in evals], accuracy, marker="o", ms=3, label=label)
        by_bytes.plot(megabytes, accuracy, marker="o", ms=3, label=label)
    by_epoch.set(xlabel="epoch", ylabel="test accuracy (%)", title="Accuracy per epoch")
    by_bytes.set(
        xlabel="MB sent to all-reduces per rank",
        ylabel="test accuracy (%)",
        title="Accuracy per byte communicated",
    )
    if log_bytes:  # Local SGD sends about `period` times less: a log axis shows both runs
        by_bytes.set_xscale("log")
    for axes in (by_epoch, by_bytes):
        axes.grid(alpha=0.3)
        axes.legend()
    figure.savefig(output, dpi=100)
    return figure


def main(argv: Sequence[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("metrics", nargs="+", type=Path, help="metrics.jsonl files, one per run")
    parser.add_argument("--output", type=Path, default=Path("metrics.png"), help="image to write")
    parser.add_argument("--labels", nargs="+", help="legend entries, one per metrics file")
    args = parser.parse_args(argv)
    try:
        plot_metrics(args.metrics, args.output, args.labels)
    except (OSError, ValueError) as error:
        parser.error(str(error))
    print(f"wrote {args.output}")


if __name__ == "__main__":
    main()
