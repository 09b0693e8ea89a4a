"""Benchmark 6: convergence of a byte-level language model on 4 gloo ranks: DDP, local SGD,
post-local SGD and DiLoCo, all with AdamW.

DiLoCo (arXiv 2311.08105) is about language models trained with AdamW; this measures the outer
optimizer on that kind of task, small enough for a 2-core machine. Each method trains the same
decoder-only transformer (2 blocks, width 64, 4 heads, context 64, 120,576 parameters) on the
same tokens: the Python standard library's own source (``tests/_lm.py``; offline everywhere),
4 ranks, each its slice of one seeded draw of windows per step, 512 steps of 8 windows per rank,
AdamW (lr 3e-3, warm-up then cosine decay, weight decay 0.1), tuned a little on DDP only and the
same for every method. Methods:

- DDP: ``DistributedDataParallel``, gradients all-reduced every step;
- local SGD with AdamW at H = 8 and 32 (``LocalSGDOptimizer(period=H)``);
- post-local SGD: synchronous for the first quarter of the steps (``warmup_steps``), then H = 32;
- DiLoCo at H = 32 and 128: AdamW inside, outer Nesterov SGD (lr 0.7, momentum 0.9, the paper's).

Held-out loss (nats per byte) is that of the final model (after ``close()``, the averaged one)
on every window of the held-out 200,000 bytes; the loss curve is the mean over ranks of each
rank's current model on 256 held-out windows, every 64 steps. Bytes are what a rank handed to
all-reduces while training (``opt.stats.bytes_communicated``; for DDP, counted in a
communication hook around torch's all-reduce hook), the initial broadcast excluded for both.

Prints a markdown table, writes the per-rank results as JSON and a plot of held-out loss against
steps and against bytes (about 10 minutes on a 2-core machine)::

    python benchmarks/convergence_lm.py

``--sweep`` instead trains DiLoCo at H = 32 over outer learning rates 0.3 to 1.0 and momenta
0.7 and 0.9 (seed 0 unless ``--seeds``; about 3 minutes) and adds its table to the JSON.
Options: ``--seeds 0,1,2``, ``--methods "DDP,DiLoCo H=32"`` (also sweep points such as
``"DiLoCo H=32 lr=0.5 m=0.8"``), ``--steps``, ``--lr``, ``--json``, ``--png`` (default
``docs/convergence_lm.*``), and ``--replot`` to redraw from a saved JSON without training.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import statistics
import sys
import textwrap
import time
from typing import Any

import torch

# Run from a checkout: tests/ for _lm (shared with the test), the root for local_sgd_optim.
_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path[:0] = [os.path.join(_ROOT, "tests"), _ROOT]
import _lm  # noqa: E402
import _ranks  # noqa: E402

WORLD_SIZE = 4
TARGET = 0.02  # DiLoCo H=32 within 2% of DDP's held-out loss
TARGET_RATIO = 30  # with at least 30x fewer bytes


def _progress(method: str, seed: int, mine: dict[str, Any]) -> str:
    return f"  {method}, seed {seed}: held-out {mine['held_out_loss']:.4f}, {mine['seconds']:.1f} s"


def run_all(methods: list[str], seeds: list[int], hyper: _lm.Hyper) -> list[list[dict]]:
    """Spawn 4 gloo ranks and train every (method, seed); return the per-rank results."""
    return _ranks.run_all(_lm.train, methods, seeds, hyper, WORLD_SIZE, _progress)


def summarise(results: list[list[dict]], methods: list[str]) -> list[dict[str, Any]]:
    """One row per method: held-out loss mean and std over seeds, bytes, rounds, wall time,
    and the loss curve averaged over seeds."""
    rows = []
    for method in methods:
        runs = [per_rank for per_rank in results if per_rank[0]["method"] == method]
        loss = [r[0]["held_out_loss"] for r in runs]
        curves = [r[0]["curve"] for r in runs]
        rows.append(
            {
                "method": method,
                "seeds": len(runs),
                "loss_mean": statistics.mean(loss),
                "loss_std": statistics.stdev(loss) if len(loss) > 1 else 0.0,
                "loss_by_seed": loss,
                "bytes": max(x["bytes"] for r in runs for x in r),
                "rounds": runs[0][0]["rounds"],
                "steps": runs[0][0]["steps"],
                "seconds": statistics.mean(max(x["seconds"] for x in r) for r in runs),
                "train_loss": statistics.mean(
                    statistics.mean(x["train_loss"] for x in r) for r in runs
                ),
                "curve_steps": [p[0] for p in curves[0]],
                "curve_loss": [
                    statistics.mean(c[i][1] for c in curves) for i in range(len(curves[0]))
                ],
                "curve_bytes": runs[0][0]["curve_bytes"],
            }
        )
    return rows


def table(rows: list[dict[str, Any]]) -> str:
    """The markdown table: held-out loss, difference to DDP, bytes and their ratio, wall time."""
    ddp = next((r for r in rows if r["method"] == "DDP"), None)
    lines = [
        "| method | held-out loss, nats/byte (mean ± std) | vs DDP | bytes per rank | "
        "DDP bytes / ours | rounds | wall s |",
        "|---|---:|---:|---:|---:|---:|---:|",
    ]
    for r in rows:
        diff = f"{100 * (r['loss_mean'] / ddp['loss_mean'] - 1):+.2f}%" if ddp else "n/a"
        ratio = f"{ddp['bytes'] / r['bytes']:.1f}x" if ddp and r["bytes"] else "n/a"
        lines.append(
            f"| {r['method']} | {r['loss_mean']:.4f} ± {r['loss_std']:.4f} | {diff} | "
            f"{r['bytes']:,} | {ratio} | {r['rounds']} | {r['seconds']:.1f} |"
        )
    return "\n".join(lines)


def sweep_table(rows: list[dict[str, Any]], ddp: dict[str, Any] | None) -> str:
    """The sweep as a grid: outer learning rate across, momentum down."""
    points = {}
    for r in rows:
        parts = dict(p.split("=") for p in r["method"].split()[1:])
        points[(float(parts["lr"]), float(parts["m"]))] = r
    lrs = sorted({lr for lr, _ in points})
    momenta = sorted({m for _, m in points})
    lines = [
        "| momentum \\ outer lr | " + " | ".join(f"{lr:g}" for lr in lrs) + " |",
        "|---|" + "---:|" * len(lrs),
    ]
    for m in momenta:
        cells = []
        for lr in lrs:
            r = points.get((lr, m))
            if r is None:
                cells.append("")
                continue
            cell = f"{r['loss_mean']:.4f}"
            if r["seeds"] > 1:
                cell += f" ± {r['loss_std']:.4f}"
            if ddp:
                cell += f" ({100 * (r['loss_mean'] / ddp['loss_mean'] - 1):+.1f}%)"
            cells.append(cell)
        lines.append(f"| {m:g} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def targets(rows: list[dict[str, Any]]) -> list[str]:
    """The issue's target, met or missed, with the numbers."""
    by = {r["method"]: r for r in rows}
    ddp, ours = by.get("DDP"), by.get("DiLoCo H=32")
    if ddp is None or ours is None:
        return ["no DDP or DiLoCo H=32 row: target not checked"]
    gap = ours["loss_mean"] / ddp["loss_mean"] - 1
    ratio = ddp["bytes"] / ours["bytes"]
    verdict = "met" if gap <= TARGET and ratio >= TARGET_RATIO else "MISSED"
    return [
        f"- DiLoCo H=32 within {100 * TARGET:g}% of DDP's held-out loss with at least "
        f"{TARGET_RATIO}x fewer bytes: {verdict} ({ours['loss_mean']:.4f} against "
        f"{ddp['loss_mean']:.4f}, {100 * gap:+.2f}%; {ratio:.2f}x fewer bytes)"
    ]


def describe(setting: dict[str, Any]) -> str:
    """One line: data, model, ranks, steps and optimizer settings, seeds."""
    seeds = ",".join(map(str, setting["seeds"]))
    return (
        f"byte-level LM on Python stdlib source, {setting['layers']}x{setting['d_model']} "
        f"transformer ({setting['parameters']:,} params), {setting['world_size']} gloo ranks, "
        f"{setting['steps']} steps of {setting['batch_size']}x{setting['context']} bytes per "
        f"rank, AdamW lr {setting['lr']:g}, seeds {seeds}; unigram entropy "
        f"{setting['unigram_entropy']:.3f} nats/byte"
    )


def plot(rows: list[dict[str, Any]], path: str, title: str) -> None:
    """Held-out loss against steps and against bytes per rank (log): the curves, measured on
    the first 256 held-out windows (the table's final loss is over all of them)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (left, right) = plt.subplots(1, 2, figsize=(12, 5))
    for r in rows:
        style = "--" if r["method"].startswith("DiLoCo") else "-"
        left.plot(r["curve_steps"], r["curve_loss"], style, marker=".", label=r["method"])
        xs = [max(b, 1e3) for b in r["curve_bytes"]]  # the first point (0 bytes) on a log axis
        right.plot(xs, r["curve_loss"], style, marker=".", label=r["method"])
    for ax in (left, right):
        ax.set_ylim(top=min(3.4, max(max(r["curve_loss"][1:]) for r in rows) + 0.05))
        ax.set_ylabel("held-out loss on 256 windows, nats/byte (mean of seeds)")
        ax.grid(True, which="both", alpha=0.3)
    left.set_xlabel("optimizer steps per rank")
    left.legend(fontsize=8)
    right.set_xscale("log")
    right.set_xlabel("bytes all-reduced per rank so far (log)")
    fig.suptitle(textwrap.fill(title, 150), fontsize=8)
    fig.tight_layout()
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    fig.savefig(path, dpi=100)
    plt.close(fig)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--seeds", default=None, help="comma-separated (default 0,1,2; sweep 0)")
    parser.add_argument("--methods", default=",".join(_lm.METHODS), help="comma-separated")
    parser.add_argument("--sweep", action="store_true", help="the outer lr / momentum sweep")
    parser.add_argument("--steps", type=int, default=_lm.Hyper.steps)
    parser.add_argument("--lr", type=float, default=_lm.Hyper.lr)
    parser.add_argument("--batch-size", type=int, default=_lm.Hyper.batch_size)
    parser.add_argument("--json", default=os.path.join(_ROOT, "docs", "convergence_lm.json"))
    parser.add_argument("--png", default=os.path.join(_ROOT, "docs", "convergence_lm.png"))
    parser.add_argument(
        "--replot", action="store_true", help="redraw the PNG and tables from --json"
    )
    args = parser.parse_args()
    saved: dict[str, Any] = {}
    if os.path.exists(args.json):
        with open(args.json) as f:
            saved = json.load(f)
    if args.replot:
        print(table(saved["summary"]))
        print("\n".join(targets(saved["summary"])))
        if "sweep" in saved:
            ddp = next((r for r in saved["summary"] if r["method"] == "DDP"), None)
            print(sweep_table(saved["sweep"]["summary"], ddp))
        plot(saved["summary"], args.png, describe(saved["setting"]))
        return

    hyper = dataclasses.replace(
        _lm.Hyper(), steps=args.steps, lr=args.lr, batch_size=args.batch_size
    )
    if args.sweep:
        seeds = [int(s) for s in (args.seeds or "0").split(",")]
        methods = [
            f"DiLoCo H=32 lr={lr:g} m={m:g}" for m in _lm.SWEEP_MOMENTA for lr in _lm.SWEEP_LRS
        ]
    else:
        seeds = [int(s) for s in (args.seeds or "0,1,2").split(",")]
        methods = [m.strip() for m in args.methods.split(",") if m.strip()]
        for m in methods:
            try:
                _lm.method_config(m)
            except (KeyError, ValueError):
                parser.error(f"unknown method {m!r}; choose from {list(_lm.METHODS)}")

    start = time.perf_counter()
    results = run_all(methods, seeds, hyper)
    elapsed = time.perf_counter() - start
    rows = summarise(results, methods)
    load = os.getloadavg()
    setting = dataclasses.asdict(hyper) | {
        "world_size": WORLD_SIZE,
        "seeds": seeds,
        "parameters": _lm.parameter_count(hyper),
        "unigram_entropy": _lm.unigram_entropy(),
        "text": _lm.text_fingerprint(),
        "torch": torch.__version__,
        "seconds_in_all": elapsed,
        "load_average_after": load,
    }
    loads = ", ".join(f"{x:.1f}" for x in load)
    print(f"{describe(setting)}\n{elapsed:.0f} s in all, load average {loads}\n")

    if args.sweep:
        ddp = next((r for r in saved.get("summary", []) if r["method"] == "DDP"), None)
        print(sweep_table(rows, ddp))
        saved["sweep"] = {"setting": setting, "summary": rows, "runs": results}
        with open(args.json, "w") as f:
            json.dump(saved, f, indent=1)
        print(f"\nadded the sweep to {os.path.relpath(args.json)}")
        return

    print(table(rows))
    print()
    print("\n".join(targets(rows)))
    plot(rows, args.png, describe(setting))
    out = {"setting": setting, "summary": rows, "runs": results}
    if "sweep" in saved:
        out["sweep"] = saved["sweep"]
    with open(args.json, "w") as f:
        json.dump(out, f, indent=1)
    print(f"\nwrote {os.path.relpath(args.png)} and {os.path.relpath(args.json)}")


if __name__ == "__main__":
    main()
