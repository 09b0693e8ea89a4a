"""Train a CIFAR-10 ResNet-18 with Local SGD: a complete, resumable ``torchrun`` training script.

Each rank trains its own copy of a plain (not DDP-wrapped) ResNet-18 on its shard of the data and
the ranks average their parameters every ``--period`` optimizer steps, instead of all-reducing
gradients at every step. What is not about Local SGD (the command line, the data with its
augmentation and resumable sharding, the ResNet, the metrics file) is in ``cifar10_utils.py``
next to this file.

The backend is NCCL with one GPU per rank when CUDA is available, otherwise gloo on CPU.

Offline, anywhere, in a minute or two on 2 CPU cores (a narrow ResNet-18 on synthetic
CIFAR-shaped data)::

    torchrun --standalone --nproc_per_node 2 examples/cifar10.py --data synthetic --width 16 \
        --epochs 1 --batch-size 32 --period 4

One node, one GPU per process (CIFAR-10 is downloaded into ``--data-dir``), then the synchronous
baseline (DistributedDataParallel, same flags, same loop) and a plot of both runs::

    torchrun --standalone --nproc_per_node 8 examples/cifar10.py --out-dir runs/local-sgd
    torchrun --standalone --nproc_per_node 8 benchmarks/cifar10_ddp.py --out-dir runs/ddp
    python examples/plot_metrics.py runs/local-sgd/metrics.jsonl runs/ddp/metrics.jsonl \
        --output comparison.png

Several nodes (run on every node; ``--checkpoint-dir`` must be on a filesystem they all share)::

    torchrun --nnodes 2 --nproc_per_node 8 --rdzv_backend c10d --rdzv_endpoint HOST:29500 \
        --rdzv_id cifar10 examples/cifar10.py --out-dir /shared/runs/local-sgd

CPU only, on a machine that has GPUs::

    CUDA_VISIBLE_DEVICES="" torchrun --standalone --nproc_per_node 4 examples/cifar10.py

Resume after an interruption with the same command plus ``--resume``: training continues from
the latest complete checkpoint in ``--checkpoint-dir`` with no step repeated or skipped.

Outputs, in ``--out-dir``: ``metrics.jsonl`` (one JSON object per line; plot it with
``examples/plot_metrics.py``), ``checkpoints/step-N/`` (each rank's ``rankN.pt`` and a
``COMPLETE`` marker written last, by ``local_sgd_optim.checkpoint``) and ``final_model.pt`` (the
averaged model, loadable with ``torch.load(..., weights_only=True)``).
"""

from __future__ import annotations

import argparse
import gc
import math
import os
import random
import sys
import warnings
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, ClassVar

import torch
import torch.distributed as dist
import torch.nn.functional as F
from cifar10_utils import (
    Clock,
    Data,
    MetricsLog,
    ResNet18,
    make_data,
    normalize,
    parse_args,
    progress_bar,
)
from torch import Tensor, nn
from torch.optim import Optimizer
from torch.optim.lr_scheduler import LambdaLR
from torch.utils.data import DataLoader
from tqdm import tqdm

from local_sgd_optim import LocalSGDOptimizer, checkpoint

COMM_DTYPES = {"fp32": None, "bf16": torch.bfloat16, "fp16": torch.float16}
# Settings that decide which sample comes next and what the state means: a checkpoint taken with
# other values cannot be continued exactly.
RESUME_MUST_MATCH = ("data", "synthetic_size", "width", "batch_size", "accumulation_steps", "seed")


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv, __doc__, out_dir="runs/cifar10-local-sgd")
    rank, world_size, device = setup_distributed(args.backend)
    data = make_data(args, rank, world_size, device)  # this rank's shard, and the test set's
    net = make_model(args, device)
    opt = make_optimizer(args, net, world_size)
    scheduler = make_scheduler(args, opt, data.steps_per_epoch)
    run = Run(args, rank, world_size, device, net, opt, scheduler, data)
    # After the optimizer is built: its initial broadcast (every rank starts from rank 0's
    # model) must not overwrite what each rank saved.
    resumed = resume(run)
    log_start(run, resumed=resumed is not None)

    test_accuracy = train(run)  # epochs of steps, checkpoints, evaluations, final round

    if rank == 0:
        torch.save(net.state_dict(), args.out_dir / "final_model.pt")  # the averaged model
    print_summary(run, test_accuracy)
    del run, opt, scheduler  # nothing of the optimizer left for interpreter shutdown to free
    shutdown_distributed()


# --- distributed setup ---------------------------------------------------------------------


def setup_distributed(backend: str) -> tuple[int, int, torch.device]:
    """Join the process group torchrun describes (if any); return rank, world size and device."""
    if torch.cuda.is_available():
        device = torch.device("cuda", int(os.environ.get("LOCAL_RANK", 0)))
        torch.cuda.set_device(device)
        torch.backends.cudnn.benchmark = True
    else:
        device = torch.device("cpu")
    if "RANK" not in os.environ:  # plain `python cifar10.py`: one process, no communication
        return 0, 1, device
    if backend == "auto":
        backend = "nccl" if device.type == "cuda" else "gloo"
    dist.init_process_group(backend, device_id=device if backend == "nccl" else None)
    return dist.get_rank(), dist.get_world_size(), device


def shutdown_distributed() -> None:
    if dist.is_initialized():
        # With gloo, a finished process can abort at exit when a rank tears down its
        # connections while another still finishes the last collective, or when objects of the
        # run are left for interpreter shutdown to free (docs/mixed-precision-and-faults.md).
        gc.collect()
        dist.barrier()
        dist.destroy_process_group()
        gc.collect()


def notice(text: str) -> None:
    """An event the user must see (a checkpoint skipped, a run re-sharded), on stderr: part of
    the script's output, so that silenced warnings cannot hide it."""
    print(f"note: {text}", file=sys.stderr, flush=True)


def print0(text: str) -> None:
    """Print on rank 0 only."""
    if not dist.is_initialized() or dist.get_rank() == 0:
        print(text, flush=True)


# --- model ---------------------------------------------------------------------------------


def make_model(args: argparse.Namespace, device: torch.device) -> nn.Module:
    """The same initial model on every rank: every rank uses the same seed."""
    torch.manual_seed(args.seed)
    random.seed(args.seed)
    return ResNet18(args.width).to(device).to(memory_format=torch.channels_last)


# --- optimizer and learning rate -----------------------------------------------------------


def make_optimizer(args: argparse.Namespace, net: nn.Module, world_size: int) -> LocalSGDOptimizer:
    """SGD, wrapped so that the ranks average their models every ``--period`` steps."""
    try:
        return LocalSGDOptimizer(
            make_sgd(args, net, world_size),
            net,
            period=args.period,
            accumulation_steps=args.accumulation_steps,
            bucket_cap_mb=args.bucket_cap_mb,
            comm_dtype=COMM_DTYPES[args.comm_dtype],
            overlap_steps=args.overlap_steps,
            warmup_steps=args.warmup_steps,
            outer_optimizer=outer_optimizer(args),
            local_period=args.local_period,
        )
    except ValueError as error:  # raised on every rank: a combination the library refuses
        raise SystemExit(f"invalid Local SGD options: {error}") from None


def make_sgd(args: argparse.Namespace, net: nn.Module, world_size: int) -> torch.optim.SGD:
    """The base optimizer, at ``--lr`` per 128 images of global batch."""
    return torch.optim.SGD(
        net.parameters(),
        lr=args.lr * global_batch(args, world_size) / 128,
        momentum=args.momentum,
        nesterov=args.nesterov,
        weight_decay=args.weight_decay,
    )


def global_batch(args: argparse.Namespace, world_size: int) -> int:
    return args.batch_size * args.accumulation_steps * world_size


def outer_optimizer(args: argparse.Namespace) -> Callable[[list[Tensor]], Optimizer] | None:
    """What builds the outer optimizer over the kept parameters, or None for plain averaging."""
    if args.outer_optimizer == "none":
        return None

    def build(params: list[Tensor]) -> Optimizer:
        return torch.optim.SGD(
            params,
            lr=args.outer_lr,
            momentum=args.outer_momentum,
            nesterov=args.outer_optimizer == "nesterov",
        )

    return build


def make_scheduler(args: argparse.Namespace, opt: Optimizer, steps_per_epoch: int) -> LambdaLR:
    """Linear warm-up, then a cosine decay to zero at the end of ``--epochs``."""
    total_steps = args.epochs * steps_per_epoch
    # A short run (a few epochs) must still get its cosine decay: cap warm-up at a fifth of it.
    warmup = min(round(args.lr_warmup_epochs * steps_per_epoch), total_steps // 5)

    def lr_factor(step: int) -> float:
        if step < warmup:
            return (step + 1) / warmup
        return 0.5 * (1 + math.cos(math.pi * (step - warmup) / max(total_steps - warmup, 1)))

    # Driven through the wrapper: opt.param_groups are the base optimizer's.
    return LambdaLR(opt, lr_factor)


# --- the run -------------------------------------------------------------------------------


@dataclass
class Run:
    """A training run's pieces and where it stands; the functions below read and update it."""

    args: argparse.Namespace
    rank: int
    world_size: int
    device: torch.device
    net: nn.Module
    opt: LocalSGDOptimizer
    scheduler: LambdaLR
    data: Data
    epoch: int = 0  # where training continues: the epoch, and the micro-batches done in it
    batches_done: int = 0
    saved_step: int = 0  # the step of the newest checkpoint written or loaded
    clock: Clock = field(default_factory=Clock)
    mode: ClassVar[str] = "local-sgd"  # names the run in the metrics and the printed lines

    def __post_init__(self) -> None:
        self.metrics = MetricsLog(self.args.out_dir / "metrics.jsonl", enabled=self.rank == 0)

    @property
    def amp(self) -> bool:
        return self.device.type == "cuda" if self.args.amp is None else self.args.amp

    @property
    def max_steps(self) -> int:
        total_steps = self.args.epochs * self.data.steps_per_epoch
        return min(total_steps, self.args.max_steps or total_steps)

    def forward(self, inputs: Tensor) -> Tensor:
        """The training forward pass (``benchmarks/cifar10_ddp.py`` sends it through DDP)."""
        return self.net(inputs)

    def communicated(self) -> tuple[int, float | None]:
        """Bytes this rank has sent to all-reduces so far, and seconds it waited on them."""
        stats = self.opt.stats  # saved and restored with the optimizer's state dict
        return stats.bytes_communicated, stats.comm_seconds


# --- training ------------------------------------------------------------------------------


def train(run: Run) -> float:
    """Train to the end of ``--epochs`` (or ``--max-steps``); return the final test accuracy.

    Every epoch ends with a checkpoint and an evaluation over all ranks; the last one first runs
    the final averaging round, so that every rank then holds the same model.
    """
    args, opt = run.args, run.opt
    test_accuracy = float("nan")
    for epoch in range(run.epoch, args.epochs):
        if opt.optimizer_steps >= run.max_steps:
            break
        run.epoch = epoch
        train_loss, train_accuracy = train_epoch(run)
        save_checkpoint(run)
        finished = opt.optimizer_steps >= run.max_steps
        if finished:
            opt.close()  # the final averaging round
        test_loss, test_accuracy = evaluate_and_log(
            run, train_loss=train_loss, train_accuracy=train_accuracy, final=finished
        )
        print0(
            f"epoch {epoch + 1}/{args.epochs}  step {opt.optimizer_steps}  "
            f"train loss {train_loss:.4f}  train acc {train_accuracy:.4f}  "
            f"test loss {test_loss:.4f}  test acc {test_accuracy:.4f}  "
            f"rounds {opt.stats.rounds}"
        )
        run.batches_done = 0
    opt.close()
    if math.isnan(test_accuracy):  # resumed from a run that had already finished
        test_accuracy = evaluate(run.net, run.data.test_loader, run.device, run.amp)[1]
    return test_accuracy


def train_epoch(run: Run) -> tuple[float, float]:
    """Train from where ``run`` stands in its epoch to the epoch's end (or ``--max-steps``).

    Logs every ``--log-every`` steps, checkpoints every ``--checkpoint-every`` and evaluates
    every ``--eval-every``; returns the epoch's training loss and accuracy over all ranks.
    """
    args, opt, data = run.args, run.opt, run.data
    data.sampler.set_epoch(run.epoch)
    data.train_set.set_epoch(run.epoch)
    data.sampler.start = run.batches_done * args.batch_size  # what a resumed run has done
    interval = torch.zeros(3, dtype=torch.float64, device=run.device)  # loss sum, correct, seen
    epoch_totals = torch.zeros_like(interval)
    bar = progress_bar(
        total=data.steps_per_epoch,
        initial=run.batches_done // args.accumulation_steps,
        desc=f"epoch {run.epoch + 1}/{args.epochs}",
        enabled=run.rank == 0 and args.progress,
    )
    run.clock.start()
    for batch, (images, labels) in enumerate(data.train_loader, start=run.batches_done + 1):
        run.batches_done = batch
        interval += train_micro_batch(run, images, labels)
        if batch % args.accumulation_steps:
            continue  # inside an accumulation window: no optimizer step yet
        run.scheduler.step()
        run.clock.steps += 1
        bar.update(1)
        step = opt.optimizer_steps
        if step % args.log_every == 0 or step == run.max_steps:
            epoch_totals += interval
            log_train(run, interval, bar)
            interval.zero_()
        if (args.checkpoint_every and step % args.checkpoint_every == 0) or step == run.max_steps:
            save_checkpoint(run)
        if step >= run.max_steps or batch >= data.steps_per_epoch * args.accumulation_steps:
            break
        if args.eval_every and step % args.eval_every == 0:
            run.clock.stop()
            evaluate_and_log(run, final=False)  # the global model; training is unchanged
            run.clock.start()
    run.clock.stop()
    bar.close()
    return loss_and_accuracy(epoch_totals + interval)


def train_micro_batch(run: Run, images: Tensor, labels: Tensor) -> Tensor:
    """Forward, backward and ``opt.step()``; returns the loss sum, correct predictions, size."""
    labels = labels.to(run.device, non_blocking=True)
    with torch.autocast(run.device.type, dtype=torch.bfloat16, enabled=run.amp):
        inputs = normalize(images, run.device).contiguous(memory_format=torch.channels_last)
        logits = run.forward(inputs)
        loss = F.cross_entropy(logits.float(), labels)
    loss.backward()
    run.opt.step()  # divides accumulated gradients itself; averages every --period steps
    run.opt.zero_grad()
    with torch.no_grad():
        correct = (logits.argmax(1) == labels).sum()
        seen = torch.tensor(len(labels), device=run.device)
        return torch.stack([loss.detach() * len(labels), correct, seen]).double()


def loss_and_accuracy(totals: Tensor) -> tuple[float, float]:
    """Mean loss and accuracy over every rank, from (loss sum, correct, seen) totals."""
    totals = totals.clone()
    if dist.is_initialized():
        dist.all_reduce(totals)
    loss_sum, correct, seen = totals.tolist()
    return loss_sum / max(seen, 1), correct / max(seen, 1)


# --- evaluation ----------------------------------------------------------------------------


@torch.no_grad()
def evaluate(
    model: nn.Module, loader: DataLoader, device: torch.device, amp: bool
) -> tuple[float, float]:
    """Test loss and accuracy, each rank scoring ``model`` on its shard, summed over ranks."""
    model.eval()
    totals = torch.zeros(3, dtype=torch.float64, device=device)
    for images, labels in loader:
        labels = labels.to(device, non_blocking=True)
        with torch.autocast(device.type, dtype=torch.bfloat16, enabled=amp):
            logits = model(normalize(images, device))
        totals[0] += F.cross_entropy(logits.float(), labels, reduction="sum")
        totals[1] += (logits.argmax(dim=1) == labels).sum()
        totals[2] += len(labels)
    if dist.is_initialized():
        dist.all_reduce(totals)
    model.train()
    return (totals[0] / totals[2]).item(), (totals[1] / totals[2]).item()


def evaluate_and_log(run: Run, **extra: Any) -> tuple[float, float]:
    """Evaluate the global model (the ranks' mean, put back afterwards: evaluating does not
    change training) on the test set and write an ``eval`` metrics line; return loss and
    accuracy."""
    with run.opt.global_model():
        test_loss, test_accuracy = evaluate(run.net, run.data.test_loader, run.device, run.amp)
    bytes_communicated, comm_seconds = run.communicated()
    run.metrics.write(
        kind="eval",
        epoch=run.opt.optimizer_steps / run.data.steps_per_epoch,
        step=run.opt.optimizer_steps,
        test_loss=test_loss,
        test_accuracy=test_accuracy,
        wall_time=run.clock.wall_time(),
        bytes_communicated=bytes_communicated,
        comm_seconds=comm_seconds,
        averaging_rounds=run.opt.averaging_rounds,
        **extra,
    )
    return test_loss, test_accuracy


# --- checkpoints ---------------------------------------------------------------------------


def resume(run: Run) -> dict[str, Any] | None:
    """Continue from ``--resume``'s checkpoint: this rank's parameters, optimizer state
    (momentum), counters, schedule, position in the epoch and random state.

    Returns the state loaded, or None when the run starts from scratch.
    """
    args = run.args
    path = find_checkpoint(args, run.rank) if args.resume else None
    if path is None:
        if args.resume:
            print0(f"no complete checkpoint in {args.checkpoint_dir}; starting from scratch")
        return None
    state = load_checkpoint(path, run)
    run.net.load_state_dict(state["model"])
    run.opt.load_state_dict(state["optimizer"])
    run.scheduler.load_state_dict(state["scheduler"])
    if state["rng"] is not None:  # None after re-sharding
        checkpoint.set_rng_state(state["rng"])
    run.epoch, run.batches_done = state["epoch"], state["batches_done"]
    run.saved_step = run.opt.optimizer_steps
    run.clock.before = state["wall_time"]
    print0(f"resumed from {path} at step {run.opt.optimizer_steps}")
    return state


def find_checkpoint(args: argparse.Namespace, rank: int) -> Path | None:
    """The checkpoint ``--resume`` names: the newest complete one, or the directory given.

    Rank 0 looks (incomplete or truncated checkpoints are skipped with a warning) and tells
    the others, so that every rank resumes from the same one.
    """
    if args.resume != "latest":
        return Path(args.resume)
    found = None
    if rank == 0:
        # The library reports a skipped checkpoint with a warning; warnings are often silenced
        # (PYTHONWARNINGS=ignore) where libraries are noisy, so say it in the script's output.
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            found = checkpoint.latest(args.checkpoint_dir)
        for warning in caught:
            notice(str(warning.message))
    path = broadcast_from_rank0(None if found is None else str(found[1]))
    return None if path is None else Path(path)


def broadcast_from_rank0(value: Any) -> Any:
    """Rank 0's ``value`` on every rank (small, picklable values only)."""
    if not dist.is_initialized():
        return value
    box = [value]
    dist.broadcast_object_list(box, src=0)
    return box[0]


def load_checkpoint(path: Path, run: Run) -> dict[str, Any]:
    """This rank's state from ``path``; with ``--reshard``, the mean over the old ranks."""
    args, world_size = run.args, run.world_size
    try:
        state = checkpoint.load(path, reshard=args.reshard)
    except ValueError as error:
        raise SystemExit(f"{error}. From this script: pass --reshard") from None
    saved, ours = state["args"], resume_settings(run)
    different = [k for k in ours if saved.get(k) != ours[k]]
    if different:
        raise SystemExit(
            f"{path} was taken with different settings: "
            + ", ".join(f"--{k.replace('_', '-')} {saved.get(k)}" for k in different)
            + "; resume with the same ones"
        )
    if state["world_size"] != world_size:
        # Re-sharded: restart the epoch at the batch that covers as many samples as had been
        # consumed (the samples are dealt out to the ranks differently now).
        consumed = state["batches_done"] * args.batch_size * state["world_size"]
        window = args.batch_size * world_size * args.accumulation_steps
        state["batches_done"] = consumed // window * args.accumulation_steps
        if run.rank == 0:
            notice(
                f"re-sharded {path} from {state['world_size']} to {world_size} rank(s): models "
                "and optimizer states averaged; the run is not an exact continuation"
            )
    return state


def resume_settings(run: Run) -> dict[str, Any]:
    return {"mode": run.mode, **{k: getattr(run.args, k) for k in RESUME_MUST_MATCH}}


def save_checkpoint(run: Run) -> None:
    """Checkpoint this step, unless that is done. Every rank saves its own state (the ranks'
    models and momentum differ between rounds); rank 0 then marks the checkpoint complete."""
    args, opt = run.args, run.opt
    if run.saved_step == opt.optimizer_steps:
        return
    epoch, batches = run.epoch, run.batches_done
    if batches == run.data.steps_per_epoch * args.accumulation_steps:
        epoch, batches = epoch + 1, 0  # an epoch's end is the next one's start
    state = {
        "world_size": run.world_size,
        "step": opt.optimizer_steps,
        "epoch": epoch,
        "batches_done": batches,
        "model": run.net.state_dict(),
        "optimizer": opt.state_dict(),
        "scheduler": run.scheduler.state_dict(),
        "rng": checkpoint.rng_state(),
        "bytes_communicated": run.communicated()[0],
        "wall_time": run.clock.wall_time(),
        "args": resume_settings(run),
    }
    checkpoint.save(args.checkpoint_dir, opt.optimizer_steps, state, keep=args.keep_checkpoints)
    run.saved_step = opt.optimizer_steps


# --- metrics and printed lines -------------------------------------------------------------


def log_start(run: Run, resumed: bool) -> None:
    """Open the metrics file with a ``start`` line (every setting) and print what will run."""
    args, step = run.args, run.opt.optimizer_steps
    run.metrics.begin(step if resumed else None)
    batch, lr = global_batch(args, run.world_size), run.scheduler.base_lrs[0]
    run.metrics.write(
        kind="start",
        step=step,
        world_size=run.world_size,
        device=str(run.device),
        global_batch=batch,
        peak_lr=lr,
        mode=run.mode,
        **{k: str(v) if isinstance(v, Path) else v for k, v in vars(args).items()},
    )
    backend = dist.get_backend() if dist.is_initialized() else "no process group"
    print0(
        f"{run.mode} on {run.world_size} rank(s) ({run.device.type}, {backend}): "
        f"{args.data}, {len(run.data.train_set)} training images, "
        f"{run.data.steps_per_epoch} steps per epoch, global batch {batch}, peak lr {lr:g}"
    )


def log_train(run: Run, interval: Tensor, bar: tqdm) -> None:
    """A ``train`` metrics line for the steps since the previous one, and the bar's numbers."""
    loss, accuracy = loss_and_accuracy(interval)
    step, steps_per_second = run.opt.optimizer_steps, run.clock.steps_per_second()
    run.metrics.write(
        kind="train",
        epoch=step / run.data.steps_per_epoch,
        step=step,
        loss=loss,
        accuracy=accuracy,
        lr=run.scheduler.get_last_lr()[0],
        wall_time=run.clock.wall_time(),
        bytes_communicated=run.communicated()[0],
        averaging_rounds=run.opt.averaging_rounds,
        steps_per_second=steps_per_second,
    )
    bar.set_postfix(
        loss=f"{loss:.3f}",
        acc=f"{accuracy:.3f}",
        steps_s=f"{steps_per_second:.2f}",
        rounds=run.opt.stats.rounds,
    )


def print_summary(run: Run, test_accuracy: float) -> None:
    steps = run.opt.optimizer_steps
    print0(
        f"done: {run.mode}, {run.world_size} rank(s), {steps} steps "
        f"({steps / run.data.steps_per_epoch:.2f} epochs), {run.opt.stats.rounds} "
        f"averaging rounds, test accuracy {test_accuracy:.4f}, "
        f"{run.clock.steps_per_second():.2f} steps/s, "
        f"{run.communicated()[0] / 1e6:.1f} MB communicated per rank, "
        f"{run.clock.wall_time():.0f} s"
    )


if __name__ == "__main__":
    main()
