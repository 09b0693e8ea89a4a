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
- ours int8 and int4 (``comm_dtype="int8"``/``"int4"``), through each of the two reductions of
  quantized deltas (``quantized_reduction="all_gather"`` and ``"reduce_scatter"``), parameters
  in their own memory;
- the floor.

Methods run interleaved, in a rotated order each repeat; a repeat times ``--rounds`` rounds back
to back; the table shows medians over repeats, and the bytes one rank sent per round (what it
wrote to its sockets, from ``/proc/self/io``: headers and every step of a collective included),
also against the floor's. Run on 2 ranks (about a minute and a half on 2 cores), or 4::

    torchrun --standalone --nproc_per_node 2 benchmarks/round_cost.py
    torchrun --standalone --nproc_per_node 2 benchmarks/round_cost.py --repeats 11 --rounds 10
    torchrun --standalone --nproc_per_node 4 benchmarks/round_cost.py --models resnet18
    torchrun --standalone --nproc_per_node 2 benchmarks/round_cost.py --only int8,int4
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
    model: nn.Module,
    comm_dtype: torch.dtype | str | None,
    in_place: bool,
    reduction: str = "auto",
) -> Callable[[], object]:
    """Our averager; ``in_place``: parameters placed in bucket storage first, as
    ``LocalSGDOptimizer(..., parameters_as_bucket_view=True)`` does; ``reduction``: of
    quantized deltas."""
    params = [p for p in model.parameters() if p.requires_grad]
    if in_place:
        Residence(params, list(model.parameters()))
    averager = BucketedAverager(params, None, comm_dtype=comm_dtype, quantized_reduction=reduction)
    return averager.average


def floor_round(model: nn.Module) -> Callable[[], None]:
    flat = torch.zeros(_common.averaged_numel(model, buffers=False))

    def run() -> None:
        dist.all_reduce(flat)

    return run


def measure(
    name: str, repeats: int, rounds: int, rank: int, only: list[str] | None = None
) -> list[list[object]]:
    torch.manual_seed(0)
    base = _common.MODELS[name]()
    methods: dict[str, Callable[[], object]] = {}
    label, fn = per_tensor_round(copy.deepcopy(base))
    methods[label] = fn
    methods["torch `average_parameters`"] = average_parameters_round(copy.deepcopy(base))
    for label, dtype in (("fp32", None), ("bf16", torch.bfloat16)):
        methods[f"ours {label}"] = ours_round(copy.deepcopy(base), dtype, in_place=False)
        placed = ours_round(copy.deepcopy(base), dtype, in_place=True)
        methods[f"ours {label}, `parameters_as_bucket_view=True`"] = placed
    for quantized in ("int8", "int4"):
        for reduction in ("all_gather", "reduce_scatter"):
            methods[f"ours {quantized}, {reduction}"] = ours_round(
                copy.deepcopy(base), quantized, in_place=False, reduction=reduction
            )
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
    if only:
        methods = {n: fn for n, fn in methods.items() if any(part in n for part in only)}
    methods["floor: one all-reduce of a flat fp32 buffer"] = floor_round(base)

    names = list(methods)
    for method in methods.values():  # first-round allocations are not measured
        method()
    times: dict[str, list[float]] = {n: [] for n in names}
    sent: dict[str, int] = dict.fromkeys(names, 0)
    for r in range(repeats):
        order = names[r % len(names) :] + names[: r % len(names)]
        for n in order:
            before = _common.bytes_sent()
            times[n].append(_common.timed(methods[n], rounds))
            after = _common.bytes_sent()
            if before is not None and after is not None:
                sent[n] += after - before
    # Every rank's clock saw the same rounds; rank 0's medians are the table.
    medians = {n: _common.median(t) for n, t in times.items()}
    floor = medians[names[-1]]
    per_round = {n: sent[n] / (repeats * rounds) for n in names}
    floor_bytes = per_round[names[-1]] or 1.0
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
                per_round[n] / 1e6,
                per_round[n] / floor_bytes,
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
    parser.add_argument(
        "--only",
        default="",
        help="comma-separated parts of method names to keep, e.g. 'int8,int4' (the floor stays)",
    )
    args = parser.parse_args()
    rank, world = _common.init_distributed()
    only = [part for part in args.only.split(",") if part]
    rows: list[list[object]] = []
    for name in args.models.split(","):
        rows += measure(name, args.repeats, args.rounds, rank, only)
    if rank == 0:
        print(
            f"Averaging round, {world} ranks, gloo, {args.link}; median of {args.repeats} "
            f"interleaved repeats of {args.rounds} rounds; ratio to the floor (lower is better)\n"
        )
        headers = ["model", "method", "ms per round", "x floor", "MB sent by rank 0", "x floor"]
        print(_common.markdown_table(headers, rows))
        print(f"machine: {_common.machine()}")
    _common.shutdown()


if __name__ == "__main__":
    main()
