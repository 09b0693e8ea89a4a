"""Benchmark 6: convergence of a byte-level language model: DDP, local SGD, post-local SGD and
DiLoCo, all with AdamW, in two regimes.

DiLoCo (arXiv 2311.08105) is about language models trained with AdamW; this measures the outer
optimizer on that kind of task, small enough for a 2-core machine.

**Published regime** (``--regime published``): where the DiLoCo papers reach DDP's loss from
scratch (Scaling Laws for DiLoCo, arXiv 2503.09799; Streaming DiLoCo, arXiv 2501.18512): few
replicas, many rounds. A 445,952-parameter transformer (2 blocks, width 128, context 128) on
16 MB of the standard library's source (underfit: a run sees 4.2 MB), 2,048 steps of one global
batch of 16 windows split across M = 1, 2 or 4 replicas (equal tokens for every method), AdamW
with warm-up, cosine decay and gradient clipping at 1.0, each replica its own AdamW state; H = 32,
so 64 rounds. The held-out loss is the global model's (the outer weights: the last step is a
round). Each run is spawned on its own and appended to ``docs/convergence_lm_published.json`` at
once (a run already there is skipped unless ``--force``), so the sweep runs in stages; about 4
minutes a run on 2 cores::

    python benchmarks/convergence_lm.py --regime published --methods DDP --lrs 1e-3,2e-3,4e-3
    python benchmarks/convergence_lm.py --regime published --replicas 2 --lrs 2e-3 \\
        --methods "DiLoCo H=32 lr=0.6 m=0.9,DiLoCo H=32 lr=0.6 m=0.9 bf16" --seeds 0,1,2
    python benchmarks/convergence_lm.py --regime published --table

Methods are named ``"DDP"``, ``"local SGD H=32"``, ``"post-local SGD H=32"`` (the first quarter
synchronous) and ``"DiLoCo H=32 lr=0.6 m=0.9"`` (outer Nesterov lr and momentum), each with a
trailing ``bf16`` for bfloat16 pseudo-gradients; ``--replicas``, ``--lrs`` (inner peak learning
rates) and ``--seeds`` are comma-separated lists. ``--table`` prints the final table (per method
and M, its best setting, mean ± std over its seeds), the targets and every configuration run,
and writes ``docs/convergence_lm_published.png``. ``--quick`` trains DDP and DiLoCo (float32 and
bfloat16) on 2 replicas for 128 steps and keeps no file (about a minute).

**Short regime** (the default): few rounds, more replicas, a small model. Each method trains
the same decoder-only transformer (2 blocks, width 64, 4 heads, context 64, 120,576 parameters)
on the same tokens: the Python standard library's own source (``tests/_lm.py``; offline
everywhere), 4 ranks, each its slice of one seeded draw of windows per step, 512 steps of 8
windows per rank, AdamW (lr 3e-3, warm-up then cosine decay, weight decay 0.1), tuned a little
on DDP only and the same for every method. Methods:

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
        line = left.plot(r["curve_steps"], r["curve_loss"], style, marker=".", label=r["method"])
        if not r["curve_bytes"][-1]:
            continue  # one replica sends nothing: no place on the bytes axis
        xs = [max(b, 1e3) for b in r["curve_bytes"]]  # the first point (0 bytes) on a log axis
        right.plot(xs, r["curve_loss"], style, marker=".", color=line[0].get_color())
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


# The published regime: where the DiLoCo papers reach DDP's loss from scratch (few replicas, many
# rounds). Results are appended run by run, so that the sweep can be run in stages.
PUBLISHED_JSON = os.path.join(_ROOT, "docs", "convergence_lm_published.json")
PUBLISHED_PNG = os.path.join(_ROOT, "docs", "convergence_lm_published.png")
PUBLISHED_METHODS = (
    "DDP",
    "local SGD H=32",
    "post-local SGD H=32",
    "DiLoCo H=32 lr=0.7 m=0.9",
    "DiLoCo H=32 lr=0.7 m=0.9 bf16",
)
PARITY = 0.01  # DiLoCo with 2 replicas within 1% of DDP's held-out loss
# ... with at least this many times fewer bytes, by pseudo-gradient dtype.
PARITY_RATIO = {"float32": 32, "bf16": 64}


def published_hyper(replicas: int, lr: float, steps: int) -> _lm.Hyper:
    """:data:`_lm.PUBLISHED` for ``replicas`` ranks: the global batch split between them."""
    if _lm.PUBLISHED_GLOBAL_BATCH % replicas:
        raise ValueError(f"{replicas} replicas do not split {_lm.PUBLISHED_GLOBAL_BATCH} windows")
    return dataclasses.replace(
        _lm.PUBLISHED,
        batch_size=_lm.PUBLISHED_GLOBAL_BATCH // replicas,
        lr=lr,
        steps=steps,
        eval_every=min(_lm.PUBLISHED.eval_every, steps // 2),
    )


def _key(run: dict[str, Any]) -> tuple[str, int, float, int]:
    return run["method"], run["world_size"], run["lr"], run["seed"]


def _published_progress(method: str, seed: int, mine: dict[str, Any]) -> str:
    return (
        f"  {method}, M={mine['world_size']}, inner lr {mine['lr']:g}, seed {seed}: "
        f"held-out {mine['held_out_loss']:.4f}, {mine['seconds']:.1f} s"
    )


def run_published(
    methods: list[str],
    replicas: list[int],
    lrs: list[float],
    seeds: list[int],
    steps: int,
    saved: dict[str, Any],
    path: str | None,
    force: bool = False,
) -> None:
    """Train every (replicas, inner lr, seed, method) not in ``saved["runs"]`` yet, each on
    freshly spawned ranks, and append it (rank 0's record, bytes the most any rank sent) to
    ``saved``, written to ``path`` after every run."""
    done = {_key(r): i for i, r in enumerate(saved["runs"])}
    for m in replicas:
        for lr in lrs:
            hyper = published_hyper(m, lr, steps)
            for seed in seeds:
                for method in methods:
                    if (method, m, lr, seed) in done and not force:
                        continue
                    per_rank = _ranks.run_all(
                        _lm.train, [method], [seed], hyper, m, _published_progress
                    )[0]
                    run = dict(per_rank[0], bytes=max(r["bytes"] for r in per_rank))
                    if (method, m, lr, seed) in done:
                        saved["runs"][done[(method, m, lr, seed)]] = run
                    else:
                        saved["runs"].append(run)
                    if path is not None:
                        with open(path, "w") as f:
                            json.dump(saved, f, indent=1)


def label(method: str) -> str:
    """The method without its outer settings: ``"DiLoCo H=32 bf16"``."""
    return " ".join(w for w in method.split() if not w.startswith(("lr=", "m=")))


def _outer(method: str) -> str:
    options = dict(w.split("=") for w in method.split() if w.startswith(("lr=", "m=")))
    return f"{options['lr']} / {options['m']}" if options else ""


def published_configs(runs: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """One entry per (method, replicas, inner lr): its runs' held-out loss over seeds, bytes,
    rounds, wall time and mean loss curve."""
    groups: dict[tuple[str, int, float], list[dict[str, Any]]] = {}
    for r in runs:
        groups.setdefault((r["method"], r["world_size"], r["lr"]), []).append(r)
    configs = []
    for (method, m, lr), rs in groups.items():
        rs = sorted(rs, key=lambda r: r["seed"])
        loss = [r["held_out_loss"] for r in rs]
        curves = [r["curve"] for r in rs]
        configs.append(
            {
                "method": method,
                "label": label(method),
                "replicas": m,
                "lr": lr,
                "by_seed": {r["seed"]: r["held_out_loss"] for r in rs},
                "seeds": len(rs),
                "loss_mean": statistics.mean(loss),
                "loss_std": statistics.stdev(loss) if len(loss) > 1 else 0.0,
                "bytes": max(r["bytes"] for r in rs),
                "rounds": rs[0]["rounds"],
                "peak_step_bytes": rs[0].get("peak_step_bytes"),
                "seconds": statistics.mean(r["seconds"] for r in rs),
                "curve_steps": [p[0] for p in curves[0]],
                "curve_loss": [
                    statistics.mean(c[i][1] for c in curves) for i in range(len(curves[0]))
                ],
                "curve_bytes": rs[0]["curve_bytes"],
            }
        )
    return configs


def _vs(config: dict[str, Any], ddp: dict[str, Any] | None) -> float | None:
    """Relative difference of the held-out loss to DDP's, on the seeds both have run (all of
    DDP's if they share none)."""
    if ddp is None:
        return None
    common = [s for s in config["by_seed"] if s in ddp["by_seed"]]
    ours = statistics.mean(config["by_seed"][s] for s in common) if common else None
    theirs = statistics.mean(ddp["by_seed"][s] for s in common) if common else None
    if ours is None or theirs is None:
        ours, theirs = config["loss_mean"], ddp["loss_mean"]
    return ours / theirs - 1


def best(configs: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Per (label, replicas), the configuration of lowest held-out loss: compared on the seeds
    that all of them have run, else on their means."""
    groups: dict[tuple[str, int], list[dict[str, Any]]] = {}
    for c in configs:
        groups.setdefault((c["label"], c["replicas"]), []).append(c)
    chosen = []
    for (_, _), cs in sorted(groups.items(), key=lambda kv: (kv[0][1] != 2, kv[0])):
        common = set.intersection(*(set(c["by_seed"]) for c in cs))

        def score(c: dict[str, Any], common: set[int] = common) -> tuple[float, int]:
            loss = statistics.mean(c["by_seed"][s] for s in common) if common else c["loss_mean"]
            return loss, -c["seeds"]

        chosen.append(min(cs, key=score))
    return chosen


def _ddp(configs: list[dict[str, Any]]) -> dict[str, Any] | None:
    ddp = [c for c in best(configs) if c["label"] == "DDP"]
    return min(ddp, key=lambda c: (c["replicas"] != 2, -c["seeds"])) if ddp else None


def published_table(configs: list[dict[str, Any]]) -> str:
    """The final table: per method and replica count, its best setting, held-out loss (mean ±
    std over seeds), difference to DDP, bytes per rank and their ratio, rounds, wall time."""
    ddp = _ddp(configs)
    lines = [
        "| method | M | inner lr | outer lr / momentum | seeds | held-out loss, nats/byte "
        "(mean ± std) | vs DDP | bytes per rank | DDP bytes / ours | peak bytes a step | "
        "rounds | wall s |",
        "|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for c in best(configs):
        vs = _vs(c, ddp)
        diff = f"{100 * vs:+.2f}%" if vs is not None else "n/a"
        ratio = f"{ddp['bytes'] / c['bytes']:.1f}x" if ddp and c["bytes"] else "none sent"
        peak = "-" if c.get("peak_step_bytes") is None else f"{c['peak_step_bytes']:,}"
        lines.append(
            f"| {c['label']} | {c['replicas']} | {c['lr']:g} | {_outer(c['method'])} | "
            f"{c['seeds']} | {c['loss_mean']:.4f} ± {c['loss_std']:.4f} | {diff} | "
            f"{c['bytes']:,} | {ratio} | {peak} | {c['rounds']} | {c['seconds']:.0f} |"
        )
    return "\n".join(lines)


# Fewer bits and lower peaks, against full-precision DiLoCo at the same settings and seeds:
# (suffix, largest held-out loss difference, largest bytes ratio, smallest peak reduction).
COMPRESSION_TARGETS = (
    ("int8", 0.002, 0.27, None),
    ("int4", 0.005, 0.14, None),
    ("F=4", 0.005, None, 4.0),
)


def compression_targets(configs: list[dict[str, Any]]) -> list[str]:
    """8-bit, 4-bit and fragmented DiLoCo at M = 2 against full-precision DiLoCo with the same
    outer settings, inner lr and seeds: held-out loss, bytes and peak bytes a step."""
    lines = []
    for suffix, loss_limit, bytes_limit, peak_limit in COMPRESSION_TARGETS:
        runs = [c for c in configs if c["replicas"] == 2 and c["label"] == f"DiLoCo H=32 {suffix}"]
        pairs = []
        for c in runs:
            plain = c["method"][: -len(suffix)].strip()
            pairs += [
                (c, b)
                for b in configs
                if b["method"] == plain and b["replicas"] == 2 and b["lr"] == c["lr"]
            ]
        if not pairs:
            lines.append(f"- DiLoCo H=32 {suffix} and its full-precision run at M=2: not run")
            continue
        c, base = max(pairs, key=lambda p: len(set(p[0]["by_seed"]) & set(p[1]["by_seed"])))
        seeds = sorted(set(c["by_seed"]) & set(base["by_seed"]))
        ours = statistics.mean(c["by_seed"][s] for s in seeds)
        theirs = statistics.mean(base["by_seed"][s] for s in seeds)
        gap = ours / theirs - 1
        checks = [gap <= loss_limit]
        parts = [f"{100 * gap:+.2f}% held-out loss (at most +{100 * loss_limit:g}%)"]
        if bytes_limit is not None:
            ratio = c["bytes"] / base["bytes"]
            checks.append(ratio <= bytes_limit)
            parts.append(f"{ratio:.3f}x the bytes (at most {bytes_limit:g}x)")
        if peak_limit is not None and c.get("peak_step_bytes"):
            # Runs saved before the peak was recorded: every round of an unfragmented run
            # sends the same bytes, so its peak is bytes per round.
            base_peak = base.get("peak_step_bytes") or base["bytes"] // base["rounds"]
            # Each round starts with its header (6 int64 a rank): the payload is what the
            # fragments divide; the header comes with every fragment's round.
            header = 6 * 8 * c["replicas"]
            lower = base_peak / c["peak_step_bytes"]
            payload = (base_peak - header) / (c["peak_step_bytes"] - header)
            checks.append(payload >= peak_limit)
            parts.append(
                f"peak bytes a step {lower:.4f}x lower, its payload {payload:.4f}x (at least "
                f"{peak_limit:g}x; each round also sends its {header}-byte header)"
            )
        verdict = "met" if all(checks) else "MISSED"
        lines.append(
            f"- {c['method']} against {base['method']}, M=2, seeds {seeds}: {verdict} "
            f"({'; '.join(parts)})"
        )
    return lines


def published_sweep(configs: list[dict[str, Any]]) -> str:
    """Every configuration run: held-out loss by seed and against DDP's best."""
    ddp = _ddp(configs)
    lines = [
        "| method | M | inner lr | outer lr / momentum | held-out loss by seed | vs DDP |",
        "|---|---:|---:|---:|---|---:|",
    ]
    order = sorted(
        configs, key=lambda c: (c["replicas"] != 2, c["label"], c["replicas"], c["loss_mean"])
    )
    for c in order:
        vs = _vs(c, ddp)
        seeds = ", ".join(f"{s}: {x:.4f}" for s, x in sorted(c["by_seed"].items()))
        diff = f"{100 * vs:+.2f}%" if vs is not None else "n/a"
        lines.append(
            f"| {c['label']} | {c['replicas']} | {c['lr']:g} | {_outer(c['method'])} | "
            f"{seeds} | {diff} |"
        )
    return "\n".join(lines)


def published_targets(configs: list[dict[str, Any]]) -> list[str]:
    """The issue's targets, met or missed, with the numbers."""
    ddp = _ddp(configs)
    if ddp is None:
        return ["no DDP run: targets not checked"]
    by = {(c["label"], c["replicas"]): c for c in best(configs)}
    lines = []
    for name, dtype in (("DiLoCo H=32", "float32"), ("DiLoCo H=32 bf16", "bf16")):
        c = by.get((name, 2))
        if c is None:
            lines.append(f"- {name}, M=2: not run")
            continue
        gap, ratio = _vs(c, ddp), ddp["bytes"] / c["bytes"]
        assert gap is not None
        met = gap <= PARITY and ratio >= PARITY_RATIO[dtype]
        lines.append(
            f"- {name}, M=2, within {100 * PARITY:g}% of DDP with at least "
            f"{PARITY_RATIO[dtype]}x fewer bytes: {'met' if met else 'MISSED'} "
            f"({100 * gap:+.2f}% over {c['seeds']} seed(s); {ratio:.1f}x fewer bytes)"
        )
    c = by.get(("DiLoCo H=32", 1))
    if c is None:
        lines.append("- DiLoCo H=32, M=1: not run")
    else:
        gap = _vs(c, ddp)
        assert gap is not None
        verdict = "met" if gap <= 0 else "MISSED"
        lines.append(
            f"- DiLoCo H=32, M=1, no worse than DDP: {verdict} ({100 * gap:+.2f}% over "
            f"{c['seeds']} seed(s))"
        )
    return lines


def describe_published(setting: dict[str, Any]) -> str:
    """One line: data, model, batch, steps and optimizer settings."""
    return (
        f"byte-level LM on {setting['text'].split(' of ')[0]} of Python {sys.version.split()[0]}'s "
        f"stdlib source, {setting['layers']}x{setting['d_model']} "
        f"transformer ({setting['parameters']:,} params), {setting['steps']} steps of "
        f"{_lm.PUBLISHED_GLOBAL_BATCH}x{setting['context']} bytes split across M replicas, "
        f"AdamW (warm-up, cosine, clip {setting['clip']:g}); unigram entropy "
        f"{setting['unigram_entropy']:.3f} nats/byte"
    )


def show_published(saved: dict[str, Any], png: str | None) -> None:
    """Print the tables and targets of the saved runs; write the plot of the final table."""
    configs = published_configs(saved["runs"])
    print(describe_published(saved["setting"]) + "\n")
    print(published_table(configs) + "\n")
    print("\n".join(published_targets(configs) + compression_targets(configs)) + "\n")
    print(published_sweep(configs))
    if png is not None:
        rows = [c | {"method": f"{c['label']}, M={c['replicas']}"} for c in best(configs)]
        plot(rows, png, describe_published(saved["setting"]))
        print(f"\nwrote {os.path.relpath(png)}")


def main_published(args: argparse.Namespace) -> None:
    """``--regime published``: run what is asked and not yet saved, then show the tables."""
    steps = 128 if args.quick else args.steps or _lm.PUBLISHED.steps
    path = args.json if args.json is not None else None if args.quick else PUBLISHED_JSON
    setting = dataclasses.asdict(dataclasses.replace(_lm.PUBLISHED, steps=steps)) | {
        "parameters": _lm.parameter_count(_lm.PUBLISHED),
        "unigram_entropy": _lm.unigram_entropy(_lm.PUBLISHED.text_bytes),
        "text": _lm.text_fingerprint(_lm.PUBLISHED.text_bytes),
        "torch": torch.__version__,
    }
    saved: dict[str, Any] = {"setting": setting, "runs": []}
    if path is not None and os.path.exists(path):
        with open(path) as f:
            saved = json.load(f)
        kept = {k: saved["setting"].get(k) for k in ("steps", "context", "d_model", "layers")}
        if any(setting[k] != v for k, v in kept.items()):
            raise SystemExit(f"{path} holds runs of other settings ({kept}); pass --json")
    if not args.table:
        if args.quick:
            methods = ["DDP", "DiLoCo H=32 lr=0.7 m=0.9", "DiLoCo H=32 lr=0.7 m=0.9 bf16"]
        else:
            methods = [m.strip() for m in args.methods.split(",") if m.strip()]
        for m in methods:
            try:
                _lm.method_config(m)
            except (KeyError, ValueError):
                raise SystemExit(f"unknown method {m!r}") from None
        replicas = [int(x) for x in (args.replicas or "2").split(",")]
        lrs = [float(x) for x in (args.lrs or f"{_lm.PUBLISHED.lr:g}").split(",")]
        seeds = [int(x) for x in (args.seeds or "0").split(",")]
        start = time.perf_counter()
        run_published(methods, replicas, lrs, seeds, steps, saved, path, args.force)
        loads = ", ".join(f"{x:.1f}" for x in os.getloadavg())
        print(f"{time.perf_counter() - start:.0f} s in all, load average {loads}\n")
    show_published(saved, None if args.quick else args.png or PUBLISHED_PNG)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--regime", choices=("short", "published"), default="short")
    parser.add_argument("--seeds", default=None, help="comma-separated (default 0,1,2; sweep 0)")
    parser.add_argument("--methods", default=None, help="comma-separated")
    parser.add_argument("--sweep", action="store_true", help="the outer lr / momentum sweep")
    parser.add_argument("--steps", type=int, default=None)
    parser.add_argument("--lr", type=float, default=_lm.Hyper.lr)
    parser.add_argument("--batch-size", type=int, default=_lm.Hyper.batch_size)
    parser.add_argument("--json", default=None)
    parser.add_argument("--png", default=None)
    parser.add_argument(
        "--replot", action="store_true", help="redraw the PNG and tables from --json"
    )
    parser.add_argument("--replicas", default=None, help="published: comma-separated (2)")
    parser.add_argument("--lrs", default=None, help="published: inner peak lrs, comma-separated")
    parser.add_argument("--table", action="store_true", help="published: tables and plot only")
    parser.add_argument("--quick", action="store_true", help="published: 128 steps, no file")
    parser.add_argument("--force", action="store_true", help="published: rerun saved runs")
    args = parser.parse_args()
    if args.regime == "published":
        if args.methods is None:
            args.methods = ",".join(PUBLISHED_METHODS)
        main_published(args)
        return
    args.methods = args.methods or ",".join(_lm.METHODS)
    args.steps = args.steps or _lm.Hyper.steps
    args.json = args.json or os.path.join(_ROOT, "docs", "convergence_lm.json")
    args.png = args.png or os.path.join(_ROOT, "docs", "convergence_lm.png")
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
