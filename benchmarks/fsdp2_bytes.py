"""Benchmark: bytes crossing replicas with FSDP2, Local SGD against HSDP, and a round's cost.

Four ranks form a mesh ``(replicate=2, shard=2)``; the model (``_common.mlp()``, 40
``Linear(256, 256)`` layers, each sharded as its own FSDP2 unit) trains on random batches.
Every collective's input bytes are added up by the group it runs on, by wrapping the
``torch.distributed`` functions that FSDP2 and the wrapper call (``all_reduce``,
``reduce_scatter_single``, ``all_gather_single``, ...), so both methods are measured by the same
counter:

- HSDP: ``fully_shard(module, mesh=mesh)`` on the 2-D mesh: a reduce-scatter inside the replica
  and an all-reduce of the gradient shards across replicas at every step;
- Local SGD: ``fully_shard(module, mesh=mesh["shard"])`` and
  ``LocalSGDOptimizer(..., process_group=mesh["replicate"].get_group())`` with ``--period`` H,
  in full precision, with bfloat16 deltas, and as DiLoCo (Nesterov outer optimizer).

The second table times one round (``opt.average()``) against its floor: one ``all_reduce`` of a
preallocated flat fp32 buffer as large as the rank's local shards, over the same replicate
group. Methods run interleaved, medians over repeats. Run on 4 CPU ranks (about two minutes on
2 cores)::

    torchrun --standalone --nproc_per_node 4 benchmarks/fsdp2_bytes.py
    torchrun --standalone --nproc_per_node 4 benchmarks/fsdp2_bytes.py --period 16 --steps 32
"""

from __future__ import annotations

import argparse
import functools
import os
import sys
from collections import defaultdict
from collections.abc import Callable
from typing import Any

import torch
import torch.distributed as dist
from torch import Tensor, nn
from torch.distributed.device_mesh import DeviceMesh, init_device_mesh
from torch.distributed.fsdp import fully_shard

# Run from a checkout: this folder for _common, the repository root for local_sgd_optim.
_HERE = os.path.dirname(os.path.abspath(__file__))
sys.path[:0] = [_HERE, os.path.dirname(_HERE)]
import _common  # noqa: E402

from local_sgd_optim import LocalSGDOptimizer  # noqa: E402

# The collectives FSDP2 and the wrapper reach through the torch.distributed module; for each,
# the argument (position, name) whose bytes this rank puts in.
_INPUTS: dict[str, tuple[int, str]] = {
    "all_reduce": (0, "tensor"),
    "broadcast": (0, "tensor"),
    "all_gather_single": (1, "input_tensor"),
    "all_gather_into_tensor": (1, "input_tensor"),
    "reduce_scatter_single": (1, "input"),
    "reduce_scatter_tensor": (1, "input"),
}


class ByteCounter:
    """Input bytes of every collective, summed by the ranks of its group."""

    def __init__(self) -> None:
        self.bytes: defaultdict[tuple[int, ...], int] = defaultdict(int)
        self._originals: dict[str, Callable[..., Any]] = {}

    def __enter__(self) -> ByteCounter:
        for name, (position, keyword) in _INPUTS.items():
            if hasattr(dist, name):
                self._originals[name] = fn = getattr(dist, name)
                setattr(dist, name, self._wrap(fn, position, keyword))
        return self

    def __exit__(self, *exc: object) -> None:
        for name, fn in self._originals.items():
            setattr(dist, name, fn)

    def _wrap(self, fn: Callable[..., Any], position: int, keyword: str) -> Callable[..., Any]:
        @functools.wraps(fn)
        def counted(*args: Any, **kwargs: Any) -> Any:
            tensor = args[position] if len(args) > position else kwargs[keyword]
            group = kwargs.get("group")
            ranks = (
                tuple(range(dist.get_world_size()))
                if group is None
                else tuple(dist.get_process_group_ranks(group))
            )
            self.bytes[ranks] += tensor.numel() * tensor.element_size()
            return fn(*args, **kwargs)

        return counted


def sharded_mlp(mesh: DeviceMesh) -> nn.Module:
    torch.manual_seed(0)
    model = _common.mlp()
    for layer in model:
        if isinstance(layer, nn.Linear):
            fully_shard(layer, mesh=mesh)
    fully_shard(model, mesh=mesh)
    return model


def train(model: nn.Module, opt: torch.optim.Optimizer, steps: int, rank: int) -> None:
    data = torch.Generator().manual_seed(rank)
    for _ in range(steps):
        x, y = torch.randn(2, 32, 256, generator=data)
        nn.functional.mse_loss(model(x), y).backward()
        opt.step()
        opt.zero_grad()


def diloco(params: list[Tensor]) -> torch.optim.Optimizer:
    return torch.optim.SGD(params, lr=0.7, momentum=0.9, nesterov=True)


def build(method: str, mesh: DeviceMesh, period: int) -> tuple[nn.Module, torch.optim.Optimizer]:
    """The model and optimizer of ``method``; built outside the byte counter."""
    if method == "HSDP":
        model = sharded_mlp(mesh)
        return model, torch.optim.SGD(model.parameters(), lr=0.01)
    model = sharded_mlp(mesh["shard"])
    base = torch.optim.SGD(model.parameters(), lr=0.01)
    options: dict[str, Any] = {
        "Local SGD": {},
        "Local SGD, bf16 deltas": {"comm_dtype": torch.bfloat16},
        "DiLoCo": {"outer_optimizer": diloco},
    }[method]
    group = mesh["replicate"].get_group()
    return model, LocalSGDOptimizer(base, model, period, process_group=group, **options)


def bytes_per_step(method: str, mesh: DeviceMesh, period: int, steps: int, rank: int) -> list[Any]:
    model, opt = build(method, mesh, period)
    with ByteCounter() as counter:
        train(model, opt, steps, rank)
    across = tuple(dist.get_process_group_ranks(mesh["replicate"].get_group()))
    inside = tuple(dist.get_process_group_ranks(mesh["shard"].get_group()))
    unknown = set(counter.bytes) - {across, inside}
    if unknown:
        raise RuntimeError(f"{method}: collectives on unexpected groups {sorted(unknown)}")
    return [method, counter.bytes[across] / steps, counter.bytes[inside] / steps]


def round_cost(mesh: DeviceMesh, repeats: int, rounds: int) -> list[list[object]]:
    """Median seconds of ``opt.average()`` and of the floor, interleaved."""
    model = sharded_mlp(mesh["shard"])
    group = mesh["replicate"].get_group()
    base = torch.optim.SGD(model.parameters(), lr=0.01)
    opt = LocalSGDOptimizer(base, model, 1_000_000, process_group=group)
    numel = sum(p.to_local().numel() for p in model.parameters())  # type: ignore[operator]
    flat = torch.zeros(numel)

    def floor() -> None:
        dist.all_reduce(flat, group=group)

    methods = {"Local SGD round (opt.average())": opt.average, "floor (one all_reduce)": floor}
    times: dict[str, list[float]] = {name: [] for name in methods}
    for repeat in range(repeats):
        names = list(methods)
        order = names[repeat % len(names) :] + names[: repeat % len(names)]
        for name in order:
            times[name].append(_common.timed(methods[name], rounds))
    floor_s = _common.median(times["floor (one all_reduce)"])
    return [
        [name, numel * 4 / 2**20, 1e3 * _common.median(t), _common.median(t) / floor_s]
        for name, t in times.items()
    ]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--period", type=int, default=8, help="Local SGD's H")
    parser.add_argument("--steps", type=int, default=16, help="optimizer steps per method")
    parser.add_argument("--repeats", type=int, default=7, help="interleaved repeats (round cost)")
    parser.add_argument("--rounds", type=int, default=5, help="rounds timed per repeat")
    args = parser.parse_args()
    rank, world = _common.init_distributed()
    if world != 4:
        raise SystemExit(f"run on 4 ranks (2 replicas x 2 shards), got {world}")
    mesh = init_device_mesh("cpu", (2, 2), mesh_dim_names=("replicate", "shard"))
    methods = ["HSDP", "Local SGD", "Local SGD, bf16 deltas", "DiLoCo"]
    rows = [bytes_per_step(m, mesh, args.period, args.steps, rank) for m in methods]
    hsdp = rows[0][1]
    table = [[m, across / 2**20, inside / 2**20, across / hsdp] for m, across, inside in rows]
    cost = round_cost(mesh, args.repeats, args.rounds)
    if rank == 0:
        print(
            f"Bytes one rank puts into collectives per optimizer step, {args.steps} steps, "
            f"period {args.period}, 4 ranks (2 replicas x 2 shards), gloo; ratio to HSDP "
            "(lower is better)\n"
        )
        headers = ["method", "MiB/step across replicas", "MiB/step inside a replica", "x HSDP"]
        print(_common.markdown_table(headers, table))
        print(
            f"\nOne round over the replicate group, median of {args.repeats} interleaved "
            f"repeats of {args.rounds}; ratio to the floor (lower is better)\n"
        )
        print(_common.markdown_table(["method", "MiB", "ms", "x floor"], cost))
        print(f"machine: {_common.machine()}")
    _common.shutdown()


if __name__ == "__main__":
    main()
