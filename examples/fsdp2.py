"""Local SGD (or DiLoCo) across replicas of a model sharded with FSDP2 inside each replica.

The ranks form a 2-D mesh ``(replicate, shard)``: ``--replicas`` groups of ranks, each holding
one copy of the model sharded with ``fully_shard(module, mesh=mesh["shard"])``, so that every
step's all-gathers and reduce-scatters stay inside a replica (the fast link). Across replicas
(the slow link) nothing moves between rounds: every ``--period`` optimizer steps each rank
averages its local shards with the ranks of the other replicas that hold the same shard,
``process_group=mesh["replicate"].get_group()``. The one line that differs from plain FSDP2
training is the one that builds the optimizer.

Run it on 4 CPU processes (gloo: 2 replicas of 2 shards), or one GPU per process (NCCL, picked
automatically)::

    torchrun --standalone --nproc_per_node 4 examples/fsdp2.py --replicas 2
    torchrun --standalone --nproc_per_node 4 examples/fsdp2.py --replicas 2 --diloco
    torchrun --standalone --nproc_per_node 8 examples/fsdp2.py --replicas 2 --period 16

It prints the loss every ``--log-every`` steps and, at the end, the bytes this rank sent across
replicas (``opt.stats.bytes_communicated``) against what HSDP on the same mesh would have sent
(one all-reduce of the rank's gradient shards per step), the test accuracy, and whether the
replicas hold the same parameters after the final round.
"""

from __future__ import annotations

import argparse
import gc
import os
import time

import torch
import torch.distributed as dist
from torch import nn
from torch.distributed.device_mesh import init_device_mesh
from torch.distributed.fsdp import fully_shard

# The same learnable synthetic task as the minimal example (this folder is on sys.path when
# the script runs).
from train_minimal import Teacher

from local_sgd_optim import LocalSGDOptimizer


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--replicas", type=int, default=2, help="model copies (slow-link groups)")
    parser.add_argument("--steps", type=int, default=200, help="optimizer steps per rank")
    parser.add_argument("--period", type=int, default=8, help="optimizer steps between rounds")
    parser.add_argument("--diloco", action="store_true", help="Nesterov outer optimizer (DiLoCo)")
    parser.add_argument("--outer-lr", type=float, default=0.7)
    parser.add_argument("--lr", type=float, default=3e-3, help="AdamW's learning rate")
    parser.add_argument("--batch-size", type=int, default=32, help="batch size per rank")
    parser.add_argument("--width", type=int, default=128)
    parser.add_argument("--blocks", type=int, default=3)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--log-every", type=int, default=50)
    return parser.parse_args()


class Block(nn.Module):
    """A pre-norm residual MLP block, the unit FSDP2 shards and gathers one at a time."""

    def __init__(self, width: int) -> None:
        super().__init__()
        self.norm = nn.LayerNorm(width)
        self.mlp = nn.Sequential(
            nn.Linear(width, 4 * width), nn.GELU(), nn.Linear(4 * width, width)
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x + self.mlp(self.norm(x))


def build_model(features: int, width: int, blocks: int, classes: int) -> nn.Sequential:
    return nn.Sequential(
        nn.Linear(features, width),
        *(Block(width) for _ in range(blocks)),
        nn.LayerNorm(width),
        nn.Linear(width, classes),
    )


def main() -> None:
    args = parse_args()
    cuda = torch.cuda.is_available()
    dist.init_process_group("nccl" if cuda else "gloo")
    rank, world_size = dist.get_rank(), dist.get_world_size()
    if world_size % args.replicas:
        raise SystemExit(f"--replicas {args.replicas} does not divide {world_size} ranks")
    if cuda:
        device = torch.device("cuda", int(os.environ.get("LOCAL_RANK", 0)))
        torch.cuda.set_device(device)
    else:
        device = torch.device("cpu")
    shards = world_size // args.replicas
    mesh = init_device_mesh(
        device.type, (args.replicas, shards), mesh_dim_names=("replicate", "shard")
    )
    replica = mesh["replicate"].get_local_rank()

    teacher = Teacher()
    data = torch.Generator().manual_seed(args.seed * 1000 + rank)  # each rank its own data
    torch.manual_seed(args.seed)  # one initialisation; the wrapper broadcasts it anyway
    model = build_model(teacher.features, args.width, args.blocks, 10).to(device)
    for block in model[1 : 1 + args.blocks]:
        fully_shard(block, mesh=mesh["shard"])  # sharded inside the replica only
    fully_shard(model, mesh=mesh["shard"])

    base = torch.optim.AdamW(model.parameters(), lr=args.lr, weight_decay=0.01)
    outer = None
    if args.diloco:

        def outer(params: list[torch.Tensor]) -> torch.optim.Optimizer:
            return torch.optim.SGD(params, lr=args.outer_lr, momentum=0.9, nesterov=True)

    # The one line: average local shards across replicas every --period steps.
    opt = LocalSGDOptimizer(
        base,
        model,
        period=args.period,
        process_group=mesh["replicate"].get_group(),
        outer_optimizer=outer,
    )

    start = time.perf_counter()
    with opt:  # a final averaging round on the way out
        for step in range(1, args.steps + 1):
            x, y = (t.to(device) for t in teacher.batch(args.batch_size, data))
            loss = nn.functional.cross_entropy(model(x), y)
            loss.backward()
            opt.step()
            opt.zero_grad()
            if rank == 0 and (step % args.log_every == 0 or step == 1):
                print(
                    f"step {step:5d}  loss {loss.item():.4f}  rounds {opt.stats.rounds}  "
                    f"bytes across replicas {opt.stats.bytes_communicated:,}",
                    flush=True,
                )
    elapsed = time.perf_counter() - start

    with torch.no_grad():
        x, y = (t.to(device) for t in teacher.batch(2048, torch.Generator().manual_seed(99)))
        accuracy = (model(x).argmax(dim=1) == y).float().mean().item()
        model.reshard()  # a forward without backward leaves the root's parameters unsharded
        shard_values = torch.cat([p.to_local().reshape(-1) for p in model.parameters()])
        low, high = shard_values.clone(), shard_values.clone()
        dist.all_reduce(low, op=dist.ReduceOp.MIN, group=mesh["replicate"].get_group())
        dist.all_reduce(high, op=dist.ReduceOp.MAX, group=mesh["replicate"].get_group())
        identical = bool(torch.equal(low, high))
        # HSDP on this mesh all-reduces each rank's gradient shard across replicas every step.
        hsdp_bytes = shard_values.numel() * shard_values.element_size() * opt.optimizer_steps
    sent = opt.stats.bytes_communicated
    if rank == 0:
        print(
            f"done: {args.replicas} replica(s) x {shards} shard(s), "
            f"{'DiLoCo' if args.diloco else 'Local SGD'}, {opt.optimizer_steps} steps, "
            f"{opt.stats.rounds} rounds, {opt.optimizer_steps / elapsed:.1f} steps/s, "
            f"bytes across replicas {sent:,} (HSDP: {hsdp_bytes:,}, "
            f"{hsdp_bytes / max(sent, 1):.1f}x more), test accuracy {accuracy:.3f}, "
            f"replica {replica}'s shards equal the other replicas': {'yes' if identical else 'no'}",
            flush=True,
        )
    # Leave nothing of the wrapper for interpreter shutdown to free, and let no rank tear down
    # its connections while another still finishes the last collective: with gloo, either can
    # abort a finished process at exit (docs/mixed-precision-and-faults.md).
    del opt
    gc.collect()
    dist.barrier()
    dist.destroy_process_group()
    gc.collect()


if __name__ == "__main__":
    main()
