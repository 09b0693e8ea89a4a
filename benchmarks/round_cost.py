"""Benchmark 1: the cost of one averaging round, as a multiple of the link's floor.

The floor is one ``all_reduce`` of a preallocated flat fp32 buffer holding as many elements as
the model's parameters: no method that averages fp32 parameters can beat it. Every method
averages the parameters of its own copy of the model (buffers are left out, as the anchors
leave them out):

- per-tensor: Accelerate's ``LocalSGD`` itself when ``accelerate`` is installed (a barrier, then
  one all-reduce per parameter tensor), else the same loop written here;
- ``average_parameters`` from ``torch.distributed.algorithms.model_averaging.utils`` (a
  ``torch.cat`` copy, one all-reduce, parameters re-pointed into it);
- ours fp32 and bf16: ``local_sgd_optim.averaging.BucketedAverager(...).average()`` on
  parameters that keep their own memory (the default of ``LocalSGDOptimizer``: copied into a
  wire buffer and back) and on parameters placed in bucket storage
  (``parameters_as_bucket_view=True``: the all-reduce runs on the parameters' own memory); and
  the fp32 round through ``LocalSGDOptimizer(..., average_buffers=False).average()``, both
  ways;
- the floor.

Methods run interleaved, in a rotated order each repeat; a repeat times ``--rounds`` rounds back
to back; the table shows medians over repeats. Run on 2 ranks (about a minute on 2 cores)::

    torchrun --standalone --nproc_per_node 2 benchmarks/round_cost.py
    torchrun --standalone --nproc_per_node 2 benchmarks/round_cost.py --repeats 11 --rounds 10
"""

from __future__ import annotations

import argparse
import copy
import os
import sys
from collections.abc import Callable

import torch
import torch.distributed as dist
from torch import nn

# Run from a checkout: this folder for _common, the repository root for local_sgd_optim.
_HERE = os.path.dirname(os.path.abspath(__file__))
sys.path[:0] = [_HERE, os.path.dirname(_HERE)]
import _common  # noqa: E402

from local_sgd_optim import LocalSGDOptimizer  # noqa: E402
from local_sgd_optim.averaging import BucketedAverager  # noqa: E402
from local_sgd_optim.comm.resident import Residence  # noqa: E402


def per_tensor_round(model: nn.Module) -> tuple[str, Callable[[], None]]:
    """Accelerate's ``LocalSGD`` averaging every step, or the same per-tensor loop."""
    try:
        from accelerate import Accelerator
        from accelerate.local_sgd import LocalSGD
    except ImportError:
        world = dist.get_world_size()

        @torch.no_grad()
        def loop() -> None:
            dist.barrier()
            for p in model.parameters():
                dist.all_reduce(p.data)
                p.data.div_(world)

        return "per-tensor all-reduce (written here)", loop
    accelerator = Accelerator(cpu=True)
    local_sgd = LocalSGD(accelerator=accelerator, model=model, local_sgd_steps=1)
    # With local_sgd_steps=1 every step() is one round; the context (no_sync) is not needed.
    return "per-tensor all-reduce (Accelerate `LocalSGD`)", local_sgd.step


def average_parameters_round(model: nn.Module) -> Callable[[], None]:
    from torch.distributed.algorithms.model_averaging.utils import average_parameters

    def run() -> None:
        average_parameters(model.parameters(), None)  # type: ignore[arg-type]

    return run


def ours_round(
    model: nn.Module, comm_dtype: torch.dtype | None, in_place: bool
) -> Callable[[], object]:
    """Our averager; ``in_place``: parameters placed in bucket storage first, as
    ``LocalSGDOptimizer(..., parameters_as_bucket_view=True)`` does."""
    params = [p for p in model.parameters() if p.requires_grad]
    if in_place:
        Residence(params, list(model.parameters()))
    return BucketedAverager(params, None, comm_dtype=comm_dtype).average


def floor_round(model: nn.Module) -> Callable[[], None]:
    flat = torch.zeros(_common.averaged_numel(model, buffers=False))

    def run() -> None:
        dist.all_reduce(flat)

    return run


def measure(name: str, repeats: int, rounds: int, rank: int) -> list[list[object]]:
    torch.manual_seed(0)
    base = _common.MODELS[name]()
    methods: dict[str, Callable[[], None]] = {}
    label, fn = per_tensor_round(copy.deepcopy(base))
    methods[label] = fn
    methods["torch `average_parameters`"] = average_parameters_round(copy.deepcopy(base))
    for label, dtype in (("fp32", None), ("bf16", torch.bfloat16)):
        methods[f"ours {label}"] = ours_round(copy.deepcopy(base), dtype, in_place=False)
        placed = ours_round(copy.deepcopy(base), dtype, in_place=True)
        methods[f"ours {label}, `parameters_as_bucket_view=True`"] = placed
    # The same round through the optimizer: what a training loop pays at a period boundary.
    for placed_too in (False, True):
        model = copy.deepcopy(base)
        opt = LocalSGDOptimizer(
            torch.optim.SGD(model.parameters(), lr=0.1),
            model,
            period=10**9,
            average_buffers=False,
            broadcast_initial=False,
            parameters_as_bucket_view=placed_too,
        )
        suffix = ", `parameters_as_bucket_view=True`" if placed_too else ""
        methods[f"ours fp32, `LocalSGDOptimizer.average()`{suffix}"] = opt.average
    methods["floor: one all-reduce of a flat fp32 buffer"] = floor_round(base)

    names = list(methods)
    for fn in methods.values():  # first-round allocations are not what we measure
        fn()
    times: dict[str, list[float]] = {n: [] for n in names}
    for r in range(repeats):
        order = names[r % len(names) :] + names[: r % len(names)]
        for n in order:
            times[n].append(_common.timed(methods[n], rounds))
    # Every rank's clock saw the same rounds; rank 0's medians are the table.
    medians = {n: _common.median(t) for n, t in times.items()}
    floor = medians[names[-1]]
    model = _common.MODELS[name]()
    tensors = sum(1 for p in model.parameters() if p.requires_grad)
    numel = _common.averaged_numel(model, buffers=False)
    rows: list[list[object]] = []
    for n in names:
        rows.append(
            [
                f"{name} ({tensors} tensors, {numel / 1e6:.2f}M)",
                n,
                medians[n] * 1e3,
                medians[n] / floor,
            ]
        )
    del rank
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--models", default="resnet18,mlp", help="comma-separated: resnet18,mlp")
    parser.add_argument("--repeats", type=int, default=9, help="interleaved repeats per method")
    parser.add_argument("--rounds", type=int, default=10, help="rounds timed per repeat")
    parser.add_argument("--link", default="loopback, uncapped", help="for the table's title")
    args = parser.parse_args()
    rank, world = _common.init_distributed()
    rows: list[list[object]] = []
    for name in args.models.split(","):
        rows += measure(name, args.repeats, args.rounds, rank)
    if rank == 0:
        print(
            f"Averaging round, {world} ranks, gloo, {args.link}; median of {args.repeats} "
            f"interleaved repeats of {args.rounds} rounds; ratio to the floor (lower is better)\n"
        )
        print(_common.markdown_table(["model", "method", "ms per round", "x floor"], rows))
        print(f"machine: {_common.machine()}")
    _common.shutdown()


if __name__ == "__main__":
    main()
