"""Benchmark 5: the extra memory an averaging round needs, in a fresh pair of processes each.

For each model and method, this script launches ``torchrun --standalone --nproc_per_node 2``
on itself (``--worker``). A worker builds the model, warms gloo up with a small all-reduce,
resets the kernel's peak-RSS mark (``echo 5 > /proc/self/clear_refs``), then builds the averager
and runs three rounds. The table shows rank 0's:

- peak: ``VmHWM`` after the rounds minus ``VmRSS`` before them, i.e. the most memory held at
  once beyond the model (including gloo's own buffers);
- held: ``VmRSS`` after the rounds minus before: what stays allocated between rounds;
- for ours, the bytes of the tensors the averager itself keeps (buffers reachable from it that
  are not the model's own storage), which does not depend on the allocator.

Methods: torch's ``average_parameters`` (a ``torch.cat`` copy of the model every round), the
floor (one preallocated flat fp32 buffer of the model's size), and ours
(``BucketedAverager``, the round of ``LocalSGDOptimizer``) in fp32 with the
default 25 MiB buckets and with 4 MiB buckets, and in bf16, on parameters in their own memory
(the default, ``parameters_as_bucket_view=False``) and, "placed", on parameters placed in
bucket storage (``parameters_as_bucket_view=True``), where a full-precision round needs no
buffer at all. Models: ResNet-18
(44.7 MB) and an MLP of 40 ``Linear(1024, 1024)`` (168 MB), where the bucket pool's bound
shows. Linux only; about a minute::

    python benchmarks/memory.py
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
from collections.abc import Callable, Iterator
from typing import Any

import torch
import torch.distributed as dist
from torch import nn

# Run from a checkout: this folder for _common, the repository root for local_sgd_optim.
_HERE = os.path.dirname(os.path.abspath(__file__))
sys.path[:0] = [_HERE, os.path.dirname(_HERE)]
import _common  # noqa: E402

from local_sgd_optim.averaging import BucketedAverager  # noqa: E402
from local_sgd_optim.comm.resident import Residence  # noqa: E402

MARK = "MEMORY_JSON "
METHODS = [
    "torch average_parameters",
    "floor",
    "ours fp32",
    "ours fp32 (4 MiB buckets)",
    "ours bf16",
    "ours fp32 placed",
    "ours bf16 placed",
]


def big_mlp() -> nn.Module:
    """40 ``Linear(1024, 1024)`` layers: 42M parameters, 168 MB."""
    layers: list[nn.Module] = []
    for _ in range(40):
        layers += [nn.Linear(1024, 1024), nn.ReLU()]
    return nn.Sequential(*layers[:-1])


MODELS: dict[str, Callable[[], nn.Module]] = {"resnet18": _common.resnet18, "mlp1024": big_mlp}


def _status(field: str) -> int:
    """A ``/proc/self/status`` field in bytes."""
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(field + ":"):
                return int(line.split()[1]) * 1024
    raise RuntimeError(f"/proc/self/status has no {field}")


def _tensors_in(obj: object, seen: set[int], depth: int = 0) -> Iterator[torch.Tensor]:
    """Tensors reachable from ``obj`` through attributes, lists, tuples and dicts."""
    if id(obj) in seen or depth > 6:
        return
    seen.add(id(obj))
    if isinstance(obj, torch.Tensor):
        yield obj
    elif isinstance(obj, (list, tuple)):
        for x in obj:
            yield from _tensors_in(x, seen, depth + 1)
    elif isinstance(obj, dict):
        for x in obj.values():
            yield from _tensors_in(x, seen, depth + 1)
    elif hasattr(obj, "__dict__") and not isinstance(obj, (nn.Module, type)):
        for x in vars(obj).values():
            yield from _tensors_in(x, seen, depth + 1)
    elif hasattr(obj, "__slots__"):
        for name in obj.__slots__:
            yield from _tensors_in(getattr(obj, name, None), seen, depth + 1)


def held_bytes(averager: object, model: nn.Module) -> int:
    """Bytes of distinct storages the averager keeps that are not the model's own."""
    own = {t.untyped_storage().data_ptr() for t in list(model.parameters()) + list(model.buffers())}
    storages: dict[int, int] = {}
    for t in _tensors_in(averager, set()):
        s = t.untyped_storage()
        if s.data_ptr() not in own and s.nbytes():
            storages[s.data_ptr()] = s.nbytes()
    return sum(storages.values())


def worker(model_name: str, method: str) -> None:
    rank, _ = _common.init_distributed()
    torch.manual_seed(0)
    model = MODELS[model_name]()
    params = [p for p in model.parameters() if p.requires_grad]
    numel = sum(p.numel() for p in params)
    if "placed" in method:  # done once at construction, so before the mark
        Residence(params, list(model.parameters()))
    dist.all_reduce(torch.ones(1024))
    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")
    before = _status("VmRSS")

    averager: Any = None
    if method == "torch average_parameters":
        from torch.distributed.algorithms.model_averaging.utils import average_parameters

        def round_() -> None:
            average_parameters(iter(params), None)  # type: ignore[arg-type]

    elif method == "floor":
        averager = torch.zeros(numel)

        def round_() -> None:
            dist.all_reduce(averager)

    else:
        kwargs: dict[str, Any] = {}
        if "bf16" in method:
            kwargs["comm_dtype"] = torch.bfloat16
        if "4 MiB" in method:
            kwargs["bucket_cap_mb"] = 4.0
        averager = BucketedAverager(params, None, **kwargs)
        round_ = averager.average
    for _ in range(3):
        round_()
    peak = _status("VmHWM") - before
    held = _status("VmRSS") - before
    result = {
        "model_bytes": 4 * numel,
        "peak": peak,
        "held": held,
        "tensors_held": None
        if method == "torch average_parameters"
        else held_bytes(averager, model),
    }
    if rank == 0:
        print(MARK + json.dumps(result), flush=True)
    _common.shutdown()


def driver(models: list[str], methods: list[str]) -> None:
    rows: list[list[object]] = []
    for model_name in models:
        for method in methods:
            command = [
                "torchrun", "--standalone", "--nproc_per_node", "2", os.path.abspath(__file__),
                "--worker", "--model", model_name, "--method", method,
            ]  # fmt: skip
            done = subprocess.run(command, capture_output=True, text=True, timeout=600, check=False)
            lines = [x for x in done.stdout.splitlines() if x.startswith(MARK)]
            if done.returncode != 0 or not lines:
                rows.append([model_name, method, "failed", "-", "-", "-"])
                print(done.stdout[-2000:] + done.stderr[-2000:], file=sys.stderr)
                continue
            r = json.loads(lines[-1][len(MARK) :])
            mb = r["model_bytes"]
            tensors = (
                "-"
                if r["tensors_held"] is None
                else f"{r['tensors_held'] / 1e6:.1f} ({r['tensors_held'] / mb:.2f}x)"
            )
            rows.append(
                [
                    f"{model_name} ({mb / 1e6:.1f} MB)",
                    method,
                    f"{r['peak'] / 1e6:.1f} ({r['peak'] / mb:.2f}x)",
                    f"{r['held'] / 1e6:.1f} ({r['held'] / mb:.2f}x)",
                    tensors,
                ]
            )
    print(
        "Extra memory of an averaging round, rank 0 of 2 (gloo); MB, and in parentheses as a "
        "multiple of the model's fp32 bytes\n"
    )
    print(
        _common.markdown_table(
            [
                "model",
                "method",
                "peak during rounds",
                "held between rounds",
                "tensors the averager keeps",
            ],
            rows,
        )
    )
    print(f"machine: {_common.machine()}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--worker", action="store_true", help="internal: one measurement")
    parser.add_argument("--model", default="resnet18")
    parser.add_argument("--method", default="ours fp32")
    parser.add_argument("--models", default="resnet18,mlp1024")
    parser.add_argument("--methods", default=",".join(METHODS))
    args = parser.parse_args()
    if args.worker:
        worker(args.model, args.method)
    else:
        driver(args.models.split(","), args.methods.split(","))


if __name__ == "__main__":
    main()
