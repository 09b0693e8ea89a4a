"""The synchronous baseline of ``examples/cifar10.py``: its training, flags and outputs, with DDP.

Gradients are all-reduced at every optimizer step by ``DistributedDataParallel``, once per
accumulation window (``no_sync()`` on the window's other micro-batches). Everything else is the
example's own code: flags, data, model, base optimizer (wrapped with ``enabled=False``, which is
exactly the base optimizer, accumulation included), schedule, loop, checkpoints and metrics. So
the two runs differ only in how the ranks communicate, and ``examples/plot_metrics.py`` can draw
them side by side. The Local SGD flags are accepted, so that one command line serves both
scripts, and ignored.

The bytes each rank sends are counted by a DDP communication hook (DDP does not report the time
spent waiting on them, so ``comm_seconds`` is null in the metrics)::

    torchrun --standalone --nproc_per_node 8 examples/cifar10.py --out-dir runs/local-sgd
    torchrun --standalone --nproc_per_node 8 benchmarks/cifar10_ddp.py --out-dir runs/ddp
    python examples/plot_metrics.py runs/local-sgd/metrics.jsonl runs/ddp/metrics.jsonl \
        --output comparison.png
"""

from __future__ import annotations

import contextlib
import sys
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
from torch import Tensor
from torch.distributed.algorithms.ddp_comm_hooks import default_hooks
from torch.nn.parallel import DistributedDataParallel

from local_sgd_optim import LocalSGDOptimizer

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "examples"))
import cifar10  # examples/cifar10.py: this baseline runs its code
from cifar10_utils import make_data, parse_args


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv, __doc__, out_dir="runs/cifar10-ddp")
    rank, world_size, device = cifar10.setup_distributed(args.backend)
    data = make_data(args, rank, world_size, device)
    net = cifar10.make_model(args, device)
    base = cifar10.make_sgd(args, net, world_size)
    # The wrapper with enabled=False never communicates; DDP does, in DDPRun.forward.
    opt = LocalSGDOptimizer(
        base, net, period=args.period, accumulation_steps=args.accumulation_steps, enabled=False
    )
    scheduler = cifar10.make_scheduler(args, opt, data.steps_per_epoch)
    run = DDPRun(args, rank, world_size, device, net, opt, scheduler, data)
    resumed = cifar10.resume(run)
    run.bytes_before = 0 if resumed is None else resumed["bytes_communicated"]
    cifar10.log_start(run, resumed=resumed is not None)

    test_accuracy = cifar10.train(run)

    if rank == 0:
        torch.save(net.state_dict(), args.out_dir / "final_model.pt")
    cifar10.print_summary(run, test_accuracy)
    cifar10.shutdown_distributed()


class ByteCounter:
    """State of a DDP communication hook that counts the gradient bytes it all-reduces."""

    def __init__(self) -> None:
        self.bytes = 0


def counting_allreduce_hook(state: ByteCounter, bucket: Any) -> torch.futures.Future[Tensor]:
    state.bytes += bucket.buffer().numel() * bucket.buffer().element_size()
    return default_hooks.allreduce_hook(None, bucket)


# DDP checks a hook's annotations as objects; postponed annotations would be strings.
counting_allreduce_hook.__annotations__ = {
    "state": ByteCounter,
    "bucket": dist.GradBucket,  # type: ignore[attr-defined]
    "return": torch.futures.Future[Tensor],
}


class DDPRun(cifar10.Run):
    """The example's run, its training forward pass going through DDP (with several ranks)."""

    mode = "ddp"

    def __post_init__(self) -> None:
        super().__post_init__()
        self.counter = ByteCounter()
        self.bytes_before = 0  # counted by the runs before a resume
        self.micro_batches = 0
        self.ddp: DistributedDataParallel | None = None
        if self.world_size > 1:
            cuda = self.device.type == "cuda"
            self.ddp = DistributedDataParallel(self.net, device_ids=[self.device] if cuda else None)
            self.ddp.register_comm_hook(self.counter, counting_allreduce_hook)

    def forward(self, inputs: Tensor) -> Tensor:
        if self.ddp is None:
            return super().forward(inputs)
        # All-reduce on the backward of an accumulation window's last micro-batch only. A
        # resumed run starts at a window's start: checkpoints are taken at optimizer steps.
        self.micro_batches += 1
        window_ends = self.micro_batches % self.args.accumulation_steps == 0
        with contextlib.nullcontext() if window_ends else self.ddp.no_sync():
            return self.ddp(inputs)

    def communicated(self) -> tuple[int, float | None]:
        if self.ddp is None:
            return super().communicated()
        return self.bytes_before + self.counter.bytes, None


if __name__ == "__main__":
    main()
