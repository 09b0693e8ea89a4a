"""Benchmark 2: training throughput, ResNet-18 on CIFAR-shaped batches, every method in one run.

Each rank trains torchvision's ResNet-18 (10 classes) with SGD (momentum 0.9) on random
CIFAR-shaped batches (32 images of 3x32x32 per rank). Configurations, each on its own copy of
the model and all in the same processes:

- no communication at all: the compute floor, ``c`` seconds per step;
- DDP (``DistributedDataParallel``, gradients all-reduced every step);
- Accelerate ``LocalSGD`` (``Accelerator(cpu=True)``, ``local_sgd_steps=period``), if installed;
- PyTorch ``PostLocalSGDOptimizer`` + ``PeriodicModelAverager`` with DDP's
  ``post_localSGD_hook`` (gradients reduced within a one-rank subgroup, i.e. kept local);
- ours: ``LocalSGDOptimizer`` fp32, bf16 (``comm_dtype``) and overlap (``overlap_steps``), and
  8- and 4-bit deltas (``comm_dtype="int8"``/``"int4"``), the last also with 4 streaming
  fragments and ``overlap_steps=1`` (``fragments=4``);
- the floor all-reduce ``f``: one ``all_reduce`` of a preallocated flat fp32 buffer the size of
  what ours averages (parameters and BatchNorm statistics).

After a warm-up of 12 steps, each repeat times every configuration for ``--window`` steps (a
multiple of the period, so each window holds the same number of rounds and no overlapped round
is in flight at its edges), in a rotated order so that noise from other processes hits all
alike. Ratios are taken within each repeat (against that repeat's ``c``, fp32 bound
``1 / (c + f / period)`` and best anchor), and the table shows their medians over repeats, the
median steps/s with its range, and what ``local_sgd_optim.plan`` predicts from ``c`` and ``f``.

Over a 1 Gbit/s link (a network namespace, see DEVELOPERS.md; about 6 minutes)::

    bash benchmarks/run_link.sh --rate 1gbit -- benchmarks/throughput.py

Over 100 Mbit/s (about 15 minutes; DDP takes seconds a step there)::

    bash benchmarks/run_link.sh --rate 100mbit -- benchmarks/throughput.py --repeats 5 \
        --link "100 Mbit/s, one shared capped link"

Uncapped loopback (about 4 minutes)::

    torchrun --standalone --nproc_per_node 2 benchmarks/throughput.py

The last lines print, for the 4-bit configurations, how long a period's 4-bit bytes take on this
link (the fp32 all-reduce time ``f`` scaled by the bytes ``opt.stats`` counted per round) against
a period's compute (``period * c``): overlap can only hide a round whose bytes take less time
than the compute it travels behind.
"""

from __future__ import annotations

import argparse
import copy
import os
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch
import torch.distributed as dist
from torch import nn
from torch.nn.parallel import DistributedDataParallel

# Run from a checkout: this folder for _common, the repository root for local_sgd_optim.
_HERE = os.path.dirname(os.path.abspath(__file__))
sys.path[:0] = [_HERE, os.path.dirname(_HERE)]
import _common  # noqa: E402

from local_sgd_optim import LocalSGDOptimizer, plan  # noqa: E402

WARMUP_STEPS = 12  # a round at step 8 (and, with overlap 2, its landing at 10) is warm-up


@dataclass
class Config:
    name: str
    step: Callable[[], None]
    kind: str  # "none", "ddp", "anchor", "fp32", "bf16", "overlap", "bf16+overlap", "int8", ...
    close: Callable[[], None] = lambda: None
    optimizer: LocalSGDOptimizer | None = None  # ours, for opt.stats


def _sgd(model: nn.Module) -> torch.optim.Optimizer:
    return torch.optim.SGD(model.parameters(), lr=0.01, momentum=0.9)


class Trainer:
    """One forward-backward on a fixed pool of random batches; the caller steps the optimizer."""

    def __init__(self, batch: int, rank: int) -> None:
        g = torch.Generator().manual_seed(100 + rank)
        self.batches = [
            (
                torch.randn(batch, 3, 32, 32, generator=g),
                torch.randint(0, 10, (batch,), generator=g),
            )
            for _ in range(4)
        ]
        self.i = 0
        self.loss = nn.CrossEntropyLoss()

    def backward(self, model: nn.Module) -> None:
        x, y = self.batches[self.i % len(self.batches)]
        self.i += 1
        self.loss(model(x), y).backward()


def build_configs(base: nn.Module, trainer: Trainer, period: int, overlap: int) -> list[Config]:
    configs: list[Config] = []

    def plain(
        model: nn.Module, opt: torch.optim.Optimizer, after: Callable[[], object] | None = None
    ) -> Callable[[], None]:
        def step() -> None:
            trainer.backward(model)
            opt.step()
            opt.zero_grad()
            if after is not None:
                after()

        return step

    model = copy.deepcopy(base)
    configs.append(Config("no communication (compute floor)", plain(model, _sgd(model)), "none"))

    ddp = DistributedDataParallel(copy.deepcopy(base))
    configs.append(Config("DDP", plain(ddp, _sgd(ddp)), "ddp"))

    try:
        from accelerate import Accelerator
        from accelerate.local_sgd import LocalSGD
    except ImportError:
        pass
    else:
        accelerator = Accelerator(cpu=True)
        acc_model = accelerator.prepare(copy.deepcopy(base))
        acc_opt = accelerator.prepare(_sgd(acc_model))
        local_sgd = LocalSGD(accelerator=accelerator, model=acc_model, local_sgd_steps=period)
        local_sgd.__enter__()  # no_sync for the whole run; its exit would add a final sync
        configs.append(
            Config("Accelerate `LocalSGD`", plain(acc_model, acc_opt, local_sgd.step), "anchor")
        )

    from torch.distributed.algorithms.ddp_comm_hooks.post_localSGD_hook import (
        PostLocalSGDState,
        post_localSGD_hook,
    )
    from torch.distributed.algorithms.model_averaging.averagers import PeriodicModelAverager
    from torch.distributed.optim import PostLocalSGDOptimizer

    # Every rank its own subgroup: after start_localSGD_iter the hook reduces gradients there,
    # i.e. keeps them local, which is plain local SGD.
    alone, _ = dist.new_subgroups(group_size=1)
    pt_model = DistributedDataParallel(copy.deepcopy(base))
    pt_model.register_comm_hook(
        PostLocalSGDState(process_group=None, subgroup=alone, start_localSGD_iter=0),
        post_localSGD_hook,
    )
    pt_opt = PostLocalSGDOptimizer(
        _sgd(pt_model), PeriodicModelAverager(period=period, warmup_steps=0)
    )
    configs.append(Config("PyTorch `PostLocalSGDOptimizer`", plain(pt_model, pt_opt), "anchor"))

    variants: list[tuple[str, str, dict[str, object]]] = [
        ("ours fp32", "fp32", {}),
        ("ours bf16", "bf16", {"comm_dtype": torch.bfloat16}),
    ]
    if overlap > 0:
        variants.append((f"ours fp32, overlap {overlap}", "overlap", {"overlap_steps": overlap}))
        variants.append(
            (
                f"ours bf16, overlap {overlap}",
                "bf16+overlap",
                {"comm_dtype": torch.bfloat16, "overlap_steps": overlap},
            )
        )
    variants += [
        ("ours int8", "int8", {"comm_dtype": "int8"}),
        ("ours int4", "int4", {"comm_dtype": "int4"}),
    ]
    if period % 4 == 0 and period >= 8:
        variants.append(
            (
                "ours int4, 4 fragments, overlap 1",
                "int4+fragments+overlap",
                {"comm_dtype": "int4", "fragments": 4, "overlap_steps": 1},
            )
        )
    for name, kind, kwargs in variants:
        model = copy.deepcopy(base)
        opt = LocalSGDOptimizer(_sgd(model), model, period, **kwargs)  # type: ignore[arg-type]
        configs.append(Config(name, plain(model, opt), kind, close=opt.close, optimizer=opt))
    return configs


def _stats(config: Config) -> tuple[float, float, float] | None:
    """(rounds, bytes sent, seconds waited) from ``opt.stats``, for our configurations."""
    if config.optimizer is None:
        return None
    stats = config.optimizer.stats
    return (float(stats.rounds), float(stats.bytes_communicated), float(stats.comm_seconds))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--period", type=int, default=8)
    parser.add_argument("--overlap-steps", type=int, default=2)
    parser.add_argument("--batch-size", type=int, default=32, help="per rank")
    parser.add_argument("--window", type=int, default=8, help="steps timed per repeat")
    parser.add_argument("--repeats", type=int, default=7)
    parser.add_argument("--floor-reps", type=int, default=3, help="all-reduces per floor sample")
    parser.add_argument("--link", default="loopback, uncapped", help="for the table's title")
    args = parser.parse_args()
    if args.window % args.period:
        parser.error("--window must be a multiple of --period")

    rank, world = _common.init_distributed()
    torch.manual_seed(0)
    base = _common.resnet18()
    trainer = Trainer(args.batch_size, rank)
    configs = build_configs(base, trainer, args.period, args.overlap_steps)
    numel = _common.averaged_numel(base)
    flat = torch.zeros(numel)

    def floor_sample() -> float:
        return _common.timed(lambda: dist.all_reduce(flat), args.floor_reps)

    started = time.perf_counter()
    for config in configs:
        for _ in range(WARMUP_STEPS):
            config.step()
    floor_sample()
    after_warmup = {c.name: _stats(c) for c in configs}
    steps_per_s: dict[str, list[float]] = {c.name: [] for c in configs}
    floors: list[float] = []
    slots = len(configs) + 1  # the floor takes a turn in the rotation too
    for r in range(args.repeats):
        for slot in [(r + i) % slots for i in range(slots)]:
            if slot == len(configs):
                floors.append(floor_sample())
                continue
            config = configs[slot]
            dist.barrier()
            t0 = time.perf_counter()
            for _ in range(args.window):
                config.step()
            dist.barrier()  # the window ends when the slowest rank is done
            steps_per_s[config.name].append(args.window / (time.perf_counter() - t0))
        if rank == 0:
            print(
                f"repeat {r + 1}/{args.repeats} done, {time.perf_counter() - started:.0f} s",
                file=sys.stderr,
            )
    stats_lines = []
    sent_per_round: dict[str, float] = {}  # in the timed windows, from opt.stats
    for config in configs:
        now, then = _stats(config), after_warmup[config.name]
        if now is not None and then is not None and now[0] > then[0]:
            rounds, sent, waited = (a - b for a, b in zip(now, then))
            sent_per_round[config.name] = sent / rounds
            stats_lines.append(
                f"{config.name}: {rounds:.0f} timed rounds, {sent / rounds / 1e6:.1f} MB sent "
                f"and {waited / rounds * 1e3:.0f} ms waiting on communication per round "
                "(opt.stats)"
            )
        config.close()

    # Ratios are paired within a repeat (each repeat's own c, f and anchors), then the median
    # is taken: load from other processes that drifts over minutes cancels out.
    med = _common.median
    by_kind = {c.kind: c.name for c in configs}
    anchors = [c.name for c in configs if c.kind in ("ddp", "anchor")]
    repeats = range(args.repeats)
    c_r = [1.0 / steps_per_s[by_kind["none"]][r] for r in repeats]
    bound_r = [1.0 / (c_r[r] + floors[r] / args.period) for r in repeats]
    anchor_r = [max(steps_per_s[n][r] for n in anchors) for r in repeats]
    rate = {name: med(v) for name, v in steps_per_s.items()}
    c, f = med(c_r), med(floors)
    bound = 1.0 / (c + f / args.period)
    best_anchor = max(rate[n] for n in anchors)

    # The cost model, from c and f alone: f calibrates the link's bandwidth.
    model_bytes = 4.0 * numel
    latency = min(plan.DEFAULT_LATENCY_S, f / 2)
    gbps = plan.effective_gbps(model_bytes, world, f, latency_s=latency)
    link: dict[str, Any] = {"ranks": world, "gbps": gbps, "latency_s": latency}
    link["bucket_cap_mb"] = None
    predicted: dict[str, float] = {
        "none": 1.0 / c,
        "ddp": plan.predict_ddp_steps_per_second(step_seconds=c, model_bytes=model_bytes, **link),
    }
    for kind, bits, k in (
        ("fp32", 32, 0),
        ("bf16", 16, 0),
        ("overlap", 32, args.overlap_steps),
        ("bf16+overlap", 16, args.overlap_steps),
    ):
        predicted[kind] = plan.predict_steps_per_second(
            step_seconds=c,
            model_bytes=model_bytes,
            period=args.period,
            comm_bits=bits,
            overlap_steps=k,
            **link,
        )

    rows: list[list[object]] = []
    for config in configs:
        v = steps_per_s[config.name]
        p = predicted.get(config.kind)
        rows.append(
            [
                config.name,
                rate[config.name],
                f"{min(v):.3g}-{max(v):.3g}",
                med([v[r] * c_r[r] for r in repeats]),
                med([v[r] / bound_r[r] for r in repeats]),
                med([v[r] / anchor_r[r] for r in repeats]),
                "-"
                if p is None
                else f"{p:.3g} ({(p - rate[config.name]) / rate[config.name]:+.0%})",
            ]
        )
    if rank == 0:
        print(
            f"\nThroughput, ResNet-18, batch {args.batch_size} per rank, {world} ranks, gloo, "
            f"{args.link}, period {args.period}; median of {args.repeats} interleaved repeats of "
            f"{args.window} steps; ratios paired within each repeat\n"
        )
        print(
            _common.markdown_table(
                [
                    "method",
                    "steps/s",
                    "range",
                    "x compute floor 1/c",
                    "x fp32 bound",
                    "x best anchor",
                    "model predicts",
                ],
                rows,
            )
        )
        print(
            f"\nc = {c * 1e3:.0f} ms per step (no communication); f = {f * 1e3:.0f} ms, one "
            f"all-reduce of {model_bytes / 1e6:.1f} MB fp32 (calibrates the model: "
            f"{gbps:.3g} Gbit/s effective); fp32 bound 1/(c + f/{args.period}) = {bound:.3g} "
            f"steps/s; best anchor {best_anchor:.3g} steps/s (medians)"
        )
        for line in stats_lines:
            print(line)
        for config in configs:
            if config.kind.startswith("int4") and config.name in sent_per_round:
                # The 4-bit bytes of one period (a round per fragment) against the fp32
                # all-reduce of the model, both the payload this rank hands over.
                assert config.optimizer is not None
                per_period = sent_per_round[config.name] * config.optimizer.fragments
                link_s = f * per_period / model_bytes
                print(
                    f"{config.name}: a period's 4-bit bytes ({per_period / 1e6:.2f} MB) take "
                    f"{link_s:.2f} s on this link (f scaled by bytes); a period's compute "
                    f"takes {args.period * c:.2f} s: "
                    f"{'less' if link_s < args.period * c else 'more'} than the compute"
                )
        print(f"machine: {_common.machine()}")
    _common.shutdown()


if __name__ == "__main__":
    main()
