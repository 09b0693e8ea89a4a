"""Benchmark 3: what a ``step()`` that does not average costs over the bare base optimizer step.

One model, one base optimizer (SGD with momentum, torch's default foreach implementation) and
one ``LocalSGDOptimizer`` around it with a period so long that no round happens. Gradients are
set once; blocks of ``--block`` calls of ``opt.base_optimizer.step()`` (bare) and of
``opt.step()`` (wrapped) alternate on the same parameters, in a rotated order, and the table
shows the median time per step over ``--repeats`` blocks of each and the median ratio of
adjacent blocks, both in wall-clock time and in the CPU time of the stepping thread
(``time.thread_time``; each rank computes on one thread), which time spent descheduled by
other processes on a busy machine does not inflate. Two models:
ResNet-18 (62 tensors, a step of milliseconds) and the 80-tensor MLP (a cheaper step, so a fixed
per-call overhead shows more).

Run on 2 ranks, as in training (each rank times its own steps; rank 0 prints; about a minute)::

    torchrun --standalone --nproc_per_node 2 benchmarks/step_overhead.py
"""

from __future__ import annotations

import argparse
import os
import sys
import time

import torch

# Run from a checkout: this folder for _common, the repository root for local_sgd_optim.
_HERE = os.path.dirname(os.path.abspath(__file__))
sys.path[:0] = [_HERE, os.path.dirname(_HERE)]
import _common  # noqa: E402

from local_sgd_optim import LocalSGDOptimizer  # noqa: E402


def measure(name: str, repeats: int, block: int) -> list[object]:
    torch.manual_seed(0)
    model = _common.MODELS[name]()
    for p in model.parameters():
        p.grad = torch.randn_like(p) * 1e-3
    base = torch.optim.SGD(model.parameters(), lr=1e-3, momentum=0.9)
    opt = LocalSGDOptimizer(base, model, period=10**9)
    calls = {"bare base step": base.step, "LocalSGDOptimizer.step": opt.step}
    for fn in calls.values():  # momentum buffers and first-call paths are warm-up
        for _ in range(3):
            fn()
    wall: dict[str, list[float]] = {n: [] for n in calls}
    cpu: dict[str, list[float]] = {n: [] for n in calls}
    names = list(calls)
    for r in range(repeats):
        for n in names[r % 2 :] + names[: r % 2]:
            fn = calls[n]
            start, start_cpu = time.perf_counter(), time.thread_time()
            for _ in range(block):
                fn()
            cpu[n].append((time.thread_time() - start_cpu) / block)
            wall[n].append((time.perf_counter() - start) / block)
    if opt.averaging_rounds:
        raise RuntimeError("a round ran: this benchmark times steps that do not average")
    tensors = sum(1 for _ in model.parameters())
    row: list[object] = [f"{name} ({tensors} tensors)"]
    for times in (wall, cpu):
        bare = _common.median(times["bare base step"])
        wrapped = _common.median(times["LocalSGDOptimizer.step"])
        # Ratios of adjacent bare/wrapped blocks cancel slow drifts from other processes.
        ratios = [w / b for b, w in zip(times["bare base step"], times["LocalSGDOptimizer.step"])]
        row += [bare * 1e6, wrapped * 1e6, f"{_common.median(ratios):.3f}"]
    return row


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--models", default="resnet18,mlp")
    parser.add_argument("--repeats", type=int, default=41, help="blocks of each, alternating")
    parser.add_argument("--block", type=int, default=20, help="steps per block")
    args = parser.parse_args()
    rank, world = _common.init_distributed()
    rows = [measure(name, args.repeats, args.block) for name in args.models.split(",")]
    if rank == 0:
        print(
            f"Non-averaging step() against the bare base step (SGD, momentum 0.9), {world} ranks "
            f"each timing its own; median of {args.repeats} alternating blocks of {args.block} "
            "steps\n"
        )
        print(
            _common.markdown_table(
                [
                    "model",
                    "bare, wall (us)",
                    "wrapped, wall (us)",
                    "ratio, wall",
                    "bare, CPU (us)",
                    "wrapped, CPU (us)",
                    "ratio, CPU",
                ],
                rows,
            )
        )
        print(f"machine: {_common.machine()}")
    _common.shutdown()


if __name__ == "__main__":
    main()
