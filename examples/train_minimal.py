"""The smallest complete Local SGD training script: a classifier on synthetic data.

Each rank draws its own batches and trains its own copy of the model; every ``--period`` optimizer
steps the ranks average their parameters. The only line that differs from a plain PyTorch loop is
the one that builds the optimizer.

Run it on 2 CPU processes (gloo), on one GPU per process (NCCL, picked automatically), or alone::

    torchrun --standalone --nproc_per_node 2 examples/train_minimal.py
    torchrun --standalone --nproc_per_node 2 examples/train_minimal.py --period 4 \
        --accumulation-steps 2
    python examples/train_minimal.py

It prints the loss every ``--log-every`` steps and, at the end, the test accuracy and whether every
rank holds the same parameters after the final averaging round. The rounds it reports are those
that communicated (``opt.stats.rounds``): alone in one process there are none.
"""

from __future__ import annotations

import argparse
import gc
import os
import time

import torch
import torch.distributed as dist
from torch import nn

from local_sgd_optim import LocalSGDOptimizer


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--steps", type=int, default=300, help="optimizer steps per rank")
    parser.add_argument("--period", type=int, default=8, help="optimizer steps between rounds")
    parser.add_argument(
        "--accumulation-steps", type=int, default=1, help="micro-batches per optimizer step"
    )
    parser.add_argument("--batch-size", type=int, default=64, help="micro-batch size per rank")
    parser.add_argument("--lr", type=float, default=0.05)
    parser.add_argument("--momentum", type=float, default=0.9)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--log-every", type=int, default=50)
    return parser.parse_args()


class Teacher:
    """A fixed random two-layer network labelling Gaussian inputs: learnable, not trivially."""

    def __init__(self, features: int = 32, classes: int = 10) -> None:
        g = torch.Generator().manual_seed(1234)  # the same task on every rank
        self.w1 = torch.randn(features, 64, generator=g) / features**0.5
        self.w2 = torch.randn(64, classes, generator=g)
        self.features = features

    def batch(self, n: int, generator: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
        x = torch.randn(n, self.features, generator=generator)
        return x, (torch.tanh(x @ self.w1) @ self.w2).argmax(dim=1)


def main() -> None:
    args = parse_args()
    distributed = "RANK" in os.environ
    if distributed:
        dist.init_process_group("nccl" if torch.cuda.is_available() else "gloo")
    rank = dist.get_rank() if distributed else 0
    world_size = dist.get_world_size() if distributed else 1
    if torch.cuda.is_available():
        device = torch.device("cuda", int(os.environ.get("LOCAL_RANK", 0)))
        torch.cuda.set_device(device)
    else:
        device = torch.device("cpu")

    teacher = Teacher()
    data = torch.Generator().manual_seed(args.seed * 1000 + rank)  # each rank its own shard
    torch.manual_seed(args.seed + rank)  # ranks start apart; the wrapper broadcasts rank 0's
    model = nn.Sequential(
        nn.Linear(teacher.features, 128), nn.BatchNorm1d(128), nn.ReLU(), nn.Linear(128, 10)
    ).to(device)

    base = torch.optim.SGD(model.parameters(), lr=args.lr, momentum=args.momentum)
    opt = LocalSGDOptimizer(
        base, model, period=args.period, accumulation_steps=args.accumulation_steps
    )
    scheduler = torch.optim.lr_scheduler.CosineAnnealingLR(opt, T_max=args.steps)

    start = time.perf_counter()
    with opt:  # a final averaging round on the way out
        for step in range(1, args.steps + 1):
            for _ in range(args.accumulation_steps):
                x, y = (t.to(device) for t in teacher.batch(args.batch_size, data))
                loss = nn.functional.cross_entropy(model(x), y)
                loss.backward()
                opt.step()
                opt.zero_grad()
            scheduler.step()
            if rank == 0 and (step % args.log_every == 0 or step == 1):
                print(
                    f"step {step:5d}  loss {loss.item():.4f}  lr {scheduler.get_last_lr()[0]:.4f}"
                    f"  rounds {opt.stats.rounds}",
                    flush=True,
                )
    elapsed = time.perf_counter() - start

    model.eval()
    with torch.no_grad():
        x, y = (t.to(device) for t in teacher.batch(4096, torch.Generator().manual_seed(99)))
        accuracy = (model(x).argmax(dim=1) == y).float().mean().item()
        flat = torch.cat([p.reshape(-1) for p in model.parameters()])
        spread = torch.zeros(1, device=device)
        if distributed:
            low, high = flat.clone(), flat.clone()
            dist.all_reduce(low, op=dist.ReduceOp.MIN)
            dist.all_reduce(high, op=dist.ReduceOp.MAX)
            spread = (high - low).abs().max().reshape(1)
    if rank == 0:
        print(
            f"done: {world_size} rank(s), {opt.optimizer_steps} steps, "
            f"{opt.stats.rounds} averaging rounds, {opt.stats.bytes_communicated / 2**20:.2f} MiB "
            f"sent per rank, {opt.optimizer_steps / elapsed:.1f} "
            f"steps/s, test accuracy {accuracy:.3f}, "
            f"ranks identical: {'yes' if spread.item() == 0 else 'no'}",
            flush=True,
        )
    if distributed:
        # Leave nothing of the wrapper for interpreter shutdown to free, and let no rank tear
        # down its connections while another still finishes the last collective: with gloo,
        # either can abort a finished process at exit (docs/mixed-precision-and-faults.md).
        del opt, scheduler
        gc.collect()
        dist.barrier()
        dist.destroy_process_group()
        gc.collect()


if __name__ == "__main__":
    main()
