"""Train a CIFAR-10 ResNet-18 with Local SGD: a complete, resumable ``torchrun`` training script.

Each rank trains its own copy of a plain (not DDP-wrapped) ResNet-18 on its shard of the data and
the ranks average their parameters every ``--period`` optimizer steps, instead of all-reducing
gradients at every step. ``--mode ddp`` runs the synchronous baseline (DistributedDataParallel)
with the same model, data, schedule and batch sizes, so the two can be compared; plot the metrics
of both runs with ``examples/plot_metrics.py``.

The backend is NCCL with one GPU per rank when CUDA is available, otherwise gloo on CPU.

Offline, anywhere, in a minute or two on 2 CPU cores (a narrow ResNet-18 on synthetic
CIFAR-shaped data)::

    torchrun --standalone --nproc_per_node 2 examples/cifar10.py --data synthetic --width 16 \
        --epochs 1 --batch-size 32 --period 4

One node, one GPU per process (CIFAR-10 is downloaded into ``--data-dir``)::

    torchrun --standalone --nproc_per_node 8 examples/cifar10.py --out-dir runs/local-sgd
    torchrun --standalone --nproc_per_node 8 examples/cifar10.py --mode ddp --out-dir runs/ddp
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
import contextlib
import json
import math
import os
import random
import sys
import time
import urllib.error
import warnings
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import Tensor, nn
from torch.distributed.algorithms.ddp_comm_hooks import default_hooks
from torch.nn.parallel import DistributedDataParallel
from torch.optim import Optimizer
from torch.utils.data import DataLoader, Dataset, DistributedSampler, Subset

from local_sgd_optim import LocalSGDOptimizer, checkpoint

CIFAR10_MEAN = (0.4914, 0.4822, 0.4465)
CIFAR10_STD = (0.2470, 0.2435, 0.2616)
COMM_DTYPES = {"fp32": None, "bf16": torch.bfloat16, "fp16": torch.float16}
# Settings that decide which sample comes next and what the state means: a checkpoint taken with
# other values cannot be continued exactly.
RESUME_MUST_MATCH = (
    "mode",
    "data",
    "synthetic_size",
    "width",
    "batch_size",
    "accumulation_steps",
    "seed",
)


class _HelpFormatter(argparse.ArgumentDefaultsHelpFormatter):
    """Show each default, except flags' and those computed at run time (the help explains)."""

    def _get_help_string(self, action: argparse.Action) -> str | None:
        if action.default is None or isinstance(action.default, bool):
            return action.help
        return super()._get_help_string(action)


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        description=__doc__.split("\n\n")[0], formatter_class=_HelpFormatter
    )
    add = parser.add_argument
    add(
        "--mode",
        choices=("local-sgd", "ddp"),
        default="local-sgd",
        help="local-sgd: average parameters every --period steps; ddp: all-reduce gradients "
        "every step (the synchronous baseline)",
    )
    add(
        "--backend",
        choices=("auto", "nccl", "gloo"),
        default="auto",
        help="torch.distributed backend; auto is nccl when CUDA is available, else gloo",
    )
    add(
        "--data",
        choices=("cifar10", "synthetic"),
        default="cifar10",
        help="CIFAR-10 from torchvision, or deterministic CIFAR-shaped synthetic data that "
        "needs no download",
    )
    add("--data-dir", default="data", help="where CIFAR-10 is (or is downloaded to)")
    add(
        "--no-download",
        dest="download",
        action="store_false",
        help="fail instead of downloading CIFAR-10 when it is not in --data-dir",
    )
    add(
        "--synthetic-size",
        type=int,
        default=10000,
        help="training images of --data synthetic (the test set is a fifth of it)",
    )
    add(
        "--workers",
        type=int,
        default=None,
        help="data-loading processes per rank (default: 4 with CUDA, else 0)",
    )
    add("--epochs", type=int, default=30, help="passes over the training set")
    add(
        "--max-steps",
        type=int,
        default=None,
        help="stop after this many optimizer steps in all, as if interrupted: the learning-rate "
        "schedule still spans --epochs, and --resume continues from there",
    )
    add("--batch-size", type=int, default=128, help="micro-batch size per rank")
    add(
        "--accumulation-steps",
        type=int,
        default=1,
        help="micro-batches per optimizer step (gradients are averaged over them)",
    )
    add(
        "--lr",
        type=float,
        default=0.1,
        help="peak learning rate per 128 images of global batch; the rate used is scaled "
        "linearly by batch-size x accumulation-steps x world-size / 128",
    )
    add(
        "--lr-warmup-epochs",
        type=float,
        default=2.0,
        help="epochs of linear learning-rate warm-up before the cosine decay (at most a fifth "
        "of --epochs)",
    )
    add("--momentum", type=float, default=0.9, help="SGD momentum")
    add("--nesterov", action="store_true", help="use Nesterov momentum")
    add("--weight-decay", type=float, default=5e-4, help="SGD weight decay")
    add(
        "--width",
        type=int,
        default=64,
        help="channels of the first ResNet stage (64 is ResNet-18; 16 is 16x cheaper)",
    )
    add(
        "--amp",
        action=argparse.BooleanOptionalAction,
        default=None,
        help="bf16 autocast (default: on with CUDA, off on CPU)",
    )
    local = parser.add_argument_group("Local SGD (ignored with --mode ddp)")
    local.add_argument(
        "--period", type=int, default=8, help="optimizer steps between averaging rounds"
    )
    local.add_argument(
        "--comm-dtype",
        choices=tuple(COMM_DTYPES),
        default="fp32",
        help="precision of the averaged payload",
    )
    local.add_argument(
        "--overlap-steps",
        type=int,
        default=0,
        help="apply each round this many steps late, overlapping it with "
        "compute (0: synchronous rounds)",
    )
    local.add_argument(
        "--warmup-steps",
        type=int,
        default=0,
        help="synchronous steps (gradients all-reduced, as DDP) before local SGD starts: "
        "post-local SGD",
    )
    local.add_argument(
        "--outer-optimizer",
        choices=("none", "nesterov", "heavy-ball"),
        default="none",
        help="at each round, step the kept parameters with the ranks' mean change through an "
        "outer SGD: nesterov is DiLoCo, heavy-ball is SlowMo; none averages plainly",
    )
    local.add_argument("--outer-lr", type=float, default=0.7, help="outer learning rate")
    local.add_argument("--outer-momentum", type=float, default=0.9, help="outer momentum")
    local.add_argument(
        "--local-period",
        type=int,
        default=None,
        help="two-level averaging: also average among the ranks of each node every this many "
        "steps (less than --period)",
    )
    local.add_argument(
        "--bucket-cap-mb",
        type=float,
        default=25.0,
        help="size of the buckets the averaged tensors are packed into",
    )
    add(
        "--seed",
        type=int,
        default=0,
        help="seeds the initial model, the data order, augmentation and synthetic data",
    )
    add(
        "--out-dir",
        default=None,
        help="where metrics.jsonl and final_model.pt go (default: runs/cifar10-MODE)",
    )
    add("--checkpoint-dir", help="where checkpoints go (default: OUT_DIR/checkpoints)")
    add(
        "--checkpoint-every",
        type=int,
        default=0,
        help="also checkpoint every this many optimizer steps (0: only at epoch ends)",
    )
    add("--keep-checkpoints", type=int, default=2, help="complete checkpoints kept on disk")
    add(
        "--resume",
        nargs="?",
        const="latest",
        default=None,
        metavar="CHECKPOINT",
        help="continue from the latest complete checkpoint in --checkpoint-dir, or from the "
        "given step-N directory",
    )
    add(
        "--reshard",
        action="store_true",
        help="allow resuming a checkpoint taken with another world size: the ranks' models and "
        "optimizer states are averaged and the epoch restarts at the nearest batch (not exact)",
    )
    add(
        "--eval-every",
        type=int,
        default=0,
        help="also evaluate every this many optimizer steps (0: only at epoch ends)",
    )
    add(
        "--log-every",
        type=int,
        default=20,
        help="optimizer steps between progress updates and metrics lines",
    )
    add("--no-progress", dest="progress", action="store_false", help="no progress bar")
    args = parser.parse_args(argv)

    for name in ("epochs", "batch_size", "accumulation_steps", "period", "width", "log_every"):
        if getattr(args, name) < 1:
            parser.error(f"--{name.replace('_', '-')} must be at least 1")
    if args.overlap_steps < 0 or (args.overlap_steps and args.overlap_steps >= args.period):
        parser.error("--overlap-steps must be at least 0 and less than --period")
    if args.warmup_steps < 0:
        parser.error("--warmup-steps must be at least 0")
    if args.local_period is not None and not 1 <= args.local_period < args.period:
        parser.error("--local-period must be at least 1 and less than --period")
    if args.max_steps is not None and args.max_steps < 1:
        parser.error("--max-steps must be at least 1")
    args.out_dir = Path(args.out_dir or f"runs/cifar10-{args.mode}")
    args.checkpoint_dir = Path(args.checkpoint_dir or args.out_dir / "checkpoints")
    return args


# --- distributed setup ---------------------------------------------------------------------


def setup_distributed(backend: str) -> tuple[int, int, torch.device]:
    """Join the process group torchrun describes (if any); return rank, world size and device."""
    if torch.cuda.is_available():
        device = torch.device("cuda", int(os.environ.get("LOCAL_RANK", 0)))
        torch.cuda.set_device(device)
    else:
        device = torch.device("cpu")
    if "RANK" not in os.environ:  # plain `python cifar10.py`: one process, no communication
        return 0, 1, device
    if backend == "auto":
        backend = "nccl" if device.type == "cuda" else "gloo"
    dist.init_process_group(backend, device_id=device if backend == "nccl" else None)
    return dist.get_rank(), dist.get_world_size(), device


def all_ranks_ok(ok: bool) -> bool:
    """Whether ``ok`` holds on every rank; lets a failure on one rank stop all of them."""
    if not dist.is_initialized():
        return ok
    flag = torch.tensor([int(ok)], device=collective_device())
    dist.all_reduce(flag, op=dist.ReduceOp.MIN)
    return bool(flag.item())


def collective_device() -> torch.device:
    if dist.is_initialized() and dist.get_backend() == "nccl":
        return torch.device("cuda", torch.cuda.current_device())
    return torch.device("cpu")


def broadcast_from_rank0(value: Any) -> Any:
    """Rank 0's ``value`` on every rank (small, JSON-like values only)."""
    if not dist.is_initialized():
        return value
    box = [value]
    dist.broadcast_object_list(box, src=0, device=collective_device())
    return box[0]


# --- data ----------------------------------------------------------------------------------


def load_cifar10(data_dir: str, download: bool, local_rank: int) -> tuple[Tensor, ...]:
    """CIFAR-10 as uint8 tensors (train images, train labels, test images, test labels).

    The first process on each node downloads; the others wait, then read the files. Every rank
    learns whether that worked, so an offline machine stops on all of them instead of hanging.
    """
    from torchvision.datasets import CIFAR10

    def read(download_now: bool) -> tuple[Tensor, ...]:
        train = CIFAR10(data_dir, train=True, download=download_now)
        test = CIFAR10(data_dir, train=False, download=download_now)
        return tuple(
            t
            for split in (train, test)
            for t in (
                torch.from_numpy(split.data).permute(0, 3, 1, 2).contiguous(),  # NHWC -> NCHW
                torch.tensor(split.targets),
            )
        )

    problem = None
    if local_rank == 0:
        try:
            read(download)
        except (RuntimeError, OSError, urllib.error.URLError) as error:
            problem = error
    if not all_ranks_ok(problem is None):
        reason = f": {problem}" if problem is not None else " on another rank"
        hint = "" if download else " (drop --no-download to fetch it)"
        raise SystemExit(
            f"could not load CIFAR-10 from {data_dir!r}{reason}{hint}. Offline, train on "
            "CIFAR-shaped synthetic data instead with --data synthetic"
        )
    return read(False)


def synthetic_cifar(size: int, seed: int) -> tuple[Tensor, ...]:
    """Deterministic CIFAR-shaped data (3x32x32 uint8, 10 classes) that a CNN can learn.

    Each class has a smooth colour pattern (low spatial frequencies, mirror-symmetric, so the
    random crops and flips of augmentation keep it recognisable); each image is its class's
    pattern at a random contrast, plus a smooth pattern of another class, plus pixel noise.
    The same ``seed`` gives the same images on every rank and every run.
    """
    g = torch.Generator().manual_seed(seed)

    def smooth(n: int) -> Tensor:
        coarse = torch.randn(n, 3, 4, 4, generator=g)
        return F.interpolate(coarse, size=(32, 32), mode="bicubic", align_corners=False)

    prototypes = smooth(10)
    prototypes = (prototypes + prototypes.flip(-1)) / 2
    prototypes /= prototypes.std(dim=(1, 2, 3), keepdim=True)

    def make(n: int) -> tuple[Tensor, Tensor]:
        labels = torch.randint(0, 10, (n,), generator=g)
        distractors = torch.randint(0, 10, (n,), generator=g)
        contrast = 0.6 + 0.8 * torch.rand(n, 1, 1, 1, generator=g)
        images = (
            contrast * prototypes[labels]
            + 0.5 * prototypes[distractors]
            + 0.8 * smooth(n)
            + 0.8 * torch.randn(n, 3, 32, 32, generator=g)
        )
        return (images * 40 + 128).clamp(0, 255).to(torch.uint8), labels

    return (*make(size), *make(max(size // 5, 1)))


class AugmentedImages(Dataset):
    """uint8 images with random crop (4 pixels of zero padding) and horizontal flip.

    The crop offsets and flips are drawn per epoch from ``seed`` and the epoch, indexed by
    sample, rather than from a global random state: a resumed run, any number of loader
    workers and any world size see exactly the augmentation an uninterrupted run would.
    """

    def __init__(self, images: Tensor, labels: Tensor, seed: int, augment: bool) -> None:
        self.images, self.labels = images, labels
        self.seed, self.augment = seed, augment
        self.set_epoch(0)

    def set_epoch(self, epoch: int) -> None:
        g = torch.Generator().manual_seed(self.seed * 100_003 + epoch)
        n = len(self.labels)
        self.offsets = torch.randint(0, 9, (n, 2), generator=g).tolist()
        self.flips = (torch.rand(n, generator=g) < 0.5).tolist()

    def __len__(self) -> int:
        return len(self.labels)

    def __getitem__(self, index: int) -> tuple[Tensor, Tensor]:
        image = self.images[index]
        if self.augment:
            dy, dx = self.offsets[index]
            image = F.pad(image, (4, 4, 4, 4))[:, dy : dy + 32, dx : dx + 32]
            if self.flips[index]:
                image = image.flip(-1)
        return image, self.labels[index]


class ResumableDistributedSampler(DistributedSampler):
    """A ``DistributedSampler`` that can start an epoch part-way, after ``start`` samples."""

    def __init__(self, dataset: Dataset, **kwargs: Any) -> None:
        super().__init__(dataset, **kwargs)
        self.start = 0

    def __iter__(self) -> Iterator[int]:
        return iter(list(super().__iter__())[self.start :])

    def __len__(self) -> int:
        return self.num_samples - self.start


def normalize(images: Tensor, device: torch.device) -> Tensor:
    """uint8 NCHW images on the host -> normalised float images on ``device``."""
    mean = torch.tensor(CIFAR10_MEAN, device=device).view(1, 3, 1, 1)
    std = torch.tensor(CIFAR10_STD, device=device).view(1, 3, 1, 1)
    return (images.to(device, non_blocking=True).float().div_(255) - mean) / std


# --- model ---------------------------------------------------------------------------------


class BasicBlock(nn.Module):
    def __init__(self, in_channels: int, channels: int, stride: int) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(in_channels, channels, 3, stride, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(channels)
        self.conv2 = nn.Conv2d(channels, channels, 3, 1, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(channels)
        self.shortcut = nn.Sequential()
        if stride != 1 or in_channels != channels:
            self.shortcut = nn.Sequential(
                nn.Conv2d(in_channels, channels, 1, stride, bias=False), nn.BatchNorm2d(channels)
            )

    def forward(self, x: Tensor) -> Tensor:
        out = F.relu(self.bn1(self.conv1(x)))
        return F.relu(self.bn2(self.conv2(out)) + self.shortcut(x))


class ResNet18(nn.Module):
    """ResNet-18 for 32x32 images: a 3x3 stem and no max-pool, as in the CIFAR literature."""

    def __init__(self, width: int = 64, num_classes: int = 10) -> None:
        super().__init__()
        self.stem = nn.Sequential(
            nn.Conv2d(3, width, 3, 1, 1, bias=False), nn.BatchNorm2d(width), nn.ReLU()
        )
        layers: list[nn.Module] = []
        in_channels = width
        for stage, stride in enumerate((1, 2, 2, 2)):
            channels = width * 2**stage
            layers += [BasicBlock(in_channels, channels, stride), BasicBlock(channels, channels, 1)]
            in_channels = channels
        self.layers = nn.Sequential(*layers)
        self.fc = nn.Linear(in_channels, num_classes)

    def forward(self, x: Tensor) -> Tensor:
        x = self.layers(self.stem(x))
        return self.fc(torch.flatten(F.adaptive_avg_pool2d(x, 1), 1))


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


# --- communication accounting --------------------------------------------------------------


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


class CommTracker:
    """Bytes this rank contributed to all-reduces so far, and seconds spent waiting on them.

    Local SGD reports its own in ``opt.stats``, which its state dict saves and restores. DDP's
    are counted by a communication hook (it does not report waiting time), and the total of
    the runs before a resume comes from the checkpoint.
    """

    def __init__(self, opt: LocalSGDOptimizer, counter: ByteCounter | None) -> None:
        self.opt, self.counter = opt, counter
        self.bytes_before = 0

    @property
    def bytes(self) -> int:
        if self.counter is None:
            return self.opt.stats.bytes_communicated
        return self.bytes_before + self.counter.bytes

    @property
    def seconds(self) -> float | None:
        return self.opt.stats.comm_seconds if self.counter is None else None


# --- checkpoints ---------------------------------------------------------------------------


def find_checkpoint(args: argparse.Namespace, rank: int) -> Path | None:
    """The checkpoint ``--resume`` names: the newest complete one, or the directory given.

    Rank 0 looks (incomplete or truncated checkpoints are skipped with a warning) and tells
    the others, so that every rank resumes from the same one.
    """
    if args.resume != "latest":
        return Path(args.resume)
    found = checkpoint.latest(args.checkpoint_dir) if rank == 0 else None
    path = broadcast_from_rank0(None if found is None else str(found[1]))
    return None if path is None else Path(path)


def load_checkpoint(
    path: Path, args: argparse.Namespace, rank: int, world_size: int
) -> dict[str, Any]:
    """This rank's state from ``path``; with ``--reshard``, the mean over the old ranks."""
    try:
        state = checkpoint.load(path, reshard=args.reshard)
    except ValueError as error:
        raise SystemExit(f"{error}. From this script: pass --reshard") from None
    saved = state["args"]
    different = [k for k in RESUME_MUST_MATCH if saved.get(k) != getattr(args, k)]
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
        if rank == 0:
            warnings.warn(
                f"re-sharded {path} from {state['world_size']} to {world_size} rank(s): models "
                "and optimizer states averaged; the run is not an exact continuation",
                stacklevel=2,
            )
    return state


# --- metrics -------------------------------------------------------------------------------


class MetricsLog:
    """Appends JSON lines to ``path`` on rank 0; a resume drops the lines after its step."""

    def __init__(self, path: Path, rank: int, resume_step: int | None) -> None:
        self.path, self.enabled = path, rank == 0
        if not self.enabled:
            return
        path.parent.mkdir(parents=True, exist_ok=True)
        if resume_step is None:
            path.write_text("")
        elif path.exists():
            kept = [
                line
                for line in path.read_text().splitlines()
                if line.strip() and json.loads(line)["step"] <= resume_step
            ]
            path.write_text("".join(line + "\n" for line in kept))

    def write(self, **record: Any) -> None:
        if self.enabled:
            with self.path.open("a") as f:
                f.write(json.dumps(record) + "\n")


def mean_over_ranks(values: list[float], device: torch.device) -> list[float]:
    totals = torch.tensor(values, dtype=torch.float64, device=device)
    if dist.is_initialized():
        dist.all_reduce(totals)
        totals /= dist.get_world_size()
    return totals.tolist()


@torch.no_grad()
def evaluate(
    model: nn.Module, loader: DataLoader, device: torch.device, amp: bool
) -> tuple[float, float]:
    """Test loss and accuracy, each rank scoring its own model on its shard, summed over ranks."""
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


# --- training ------------------------------------------------------------------------------


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    rank, world_size, device = setup_distributed(args.backend)
    local_rank = int(os.environ.get("LOCAL_RANK", 0))
    amp = device.type == "cuda" if args.amp is None else args.amp
    workers = args.workers if args.workers is not None else (4 if device.type == "cuda" else 0)
    if device.type == "cuda":
        torch.backends.cudnn.benchmark = True

    # Data: every rank holds the whole (small) dataset and reads its own shard of it.
    if args.data == "cifar10":
        train_x, train_y, test_x, test_y = load_cifar10(args.data_dir, args.download, local_rank)
    else:
        train_x, train_y, test_x, test_y = synthetic_cifar(args.synthetic_size, args.seed)
    train_set = AugmentedImages(train_x, train_y, args.seed, augment=True)
    test_set = Subset(
        AugmentedImages(test_x, test_y, args.seed, augment=False),
        range(rank, len(test_y), world_size),
    )
    sampler = ResumableDistributedSampler(
        train_set, num_replicas=world_size, rank=rank, shuffle=True, seed=args.seed
    )
    loader_options: dict[str, Any] = {
        "num_workers": workers,
        "pin_memory": device.type == "cuda",
    }
    train_loader = DataLoader(
        train_set, args.batch_size, sampler=sampler, drop_last=True, **loader_options
    )
    test_loader = DataLoader(test_set, 512, **loader_options)
    # Whole accumulation windows only, so a window never spans two epochs.
    steps_per_epoch = sampler.num_samples // args.batch_size // args.accumulation_steps
    if steps_per_epoch == 0:
        raise SystemExit("--batch-size x --accumulation-steps is larger than a rank's shard")
    total_steps = args.epochs * steps_per_epoch
    max_steps = min(total_steps, args.max_steps or total_steps)

    # Model and optimizer. The same seed on every rank gives the same initial model.
    torch.manual_seed(args.seed)
    random.seed(args.seed)
    net = ResNet18(args.width).to(device).to(memory_format=torch.channels_last)
    model: nn.Module = net
    counter = None
    if args.mode == "ddp" and world_size > 1:
        model = DistributedDataParallel(net, device_ids=[device] if device.type == "cuda" else None)
        counter = ByteCounter()
        model.register_comm_hook(counter, counting_allreduce_hook)
    global_batch = args.batch_size * args.accumulation_steps * world_size
    lr = args.lr * global_batch / 128
    base = torch.optim.SGD(
        net.parameters(),
        lr=lr,
        momentum=args.momentum,
        nesterov=args.nesterov,
        weight_decay=args.weight_decay,
    )
    # One training loop for both modes: with enabled=False the wrapper is exactly the base
    # optimizer (accumulation included) and DDP does the communication.
    local_sgd = args.mode == "local-sgd"
    options: dict[str, Any] = {}
    if local_sgd:
        options = {
            "bucket_cap_mb": args.bucket_cap_mb,
            "comm_dtype": COMM_DTYPES[args.comm_dtype],
            "overlap_steps": args.overlap_steps,
            "warmup_steps": args.warmup_steps,
            "outer_optimizer": outer_optimizer(args),
            "local_period": args.local_period,
        }
    try:
        opt = LocalSGDOptimizer(
            base,
            net,
            period=args.period,
            accumulation_steps=args.accumulation_steps,
            enabled=local_sgd,
            **options,
        )
    except ValueError as error:  # raised on every rank: a combination the library refuses
        raise SystemExit(f"invalid Local SGD options: {error}") from None
    # A short run (a few epochs) must still get its cosine decay: cap warm-up at a fifth of it.
    warmup = min(round(args.lr_warmup_epochs * steps_per_epoch), total_steps // 5)

    def lr_factor(step: int) -> float:
        if step < warmup:
            return (step + 1) / warmup
        return 0.5 * (1 + math.cos(math.pi * (step - warmup) / max(total_steps - warmup, 1)))

    # Driven through the wrapper: opt.param_groups are the base optimizer's.
    scheduler = torch.optim.lr_scheduler.LambdaLR(opt, lr_factor)
    comm = CommTracker(opt, counter)

    # Resume: this rank's own parameters, optimizer state (momentum), counters, schedule,
    # position in the epoch and random state. Loaded after the optimizer is built, so its
    # initial broadcast does not overwrite what each rank saved.
    start_epoch, batches_done, wall_before = 0, 0, 0.0
    found = find_checkpoint(args, rank) if args.resume else None
    if args.resume and found is None and rank == 0:
        print(f"no complete checkpoint in {args.checkpoint_dir}; starting from scratch", flush=True)
    if found is not None:
        state = load_checkpoint(found, args, rank, world_size)
        net.load_state_dict(state["model"])
        opt.load_state_dict(state["optimizer"])
        scheduler.load_state_dict(state["scheduler"])
        if state["rng"] is not None:  # None after re-sharding
            checkpoint.set_rng_state(state["rng"])
        start_epoch, batches_done = state["epoch"], state["batches_done"]
        comm.bytes_before = state["bytes_communicated"]
        wall_before = state["wall_time"]
        if rank == 0:
            print(f"resumed from {found} at step {opt.optimizer_steps}", flush=True)
    metrics = MetricsLog(
        args.out_dir / "metrics.jsonl", rank, opt.optimizer_steps if found else None
    )
    metrics.write(
        kind="start",
        step=opt.optimizer_steps,
        world_size=world_size,
        device=str(device),
        global_batch=global_batch,
        peak_lr=lr,
        **{k: str(v) if isinstance(v, Path) else v for k, v in vars(args).items()},
    )
    if rank == 0:
        print(
            f"{args.mode} on {world_size} rank(s) ({device.type}, "
            f"{dist.get_backend() if dist.is_initialized() else 'no process group'}): "
            f"{args.data}, {len(train_y)} training images, {steps_per_epoch} steps per epoch, "
            f"global batch {global_batch}, peak lr {lr:g}",
            flush=True,
        )

    def save(epoch: int, batches: int) -> None:
        """Every rank saves its own state (they differ between rounds); rank 0 marks it done."""
        if batches == steps_per_epoch * args.accumulation_steps:
            epoch, batches = epoch + 1, 0  # an epoch's end is the next one's start
        state = {
            "world_size": world_size,
            "step": opt.optimizer_steps,
            "epoch": epoch,
            "batches_done": batches,
            "model": net.state_dict(),
            "optimizer": opt.state_dict(),
            "scheduler": scheduler.state_dict(),
            "rng": checkpoint.rng_state(),
            "bytes_communicated": comm.bytes,
            "wall_time": wall_before + time.perf_counter() - started,
            "args": {k: getattr(args, k) for k in RESUME_MUST_MATCH},
        }
        checkpoint.save(args.checkpoint_dir, opt.optimizer_steps, state, keep=args.keep_checkpoints)

    def test(**extra: Any) -> tuple[float, float]:
        """Evaluate on the test set and write an ``eval`` metrics record."""
        test_loss, test_accuracy = evaluate(net, test_loader, device, amp)
        metrics.write(
            kind="eval",
            epoch=opt.optimizer_steps / steps_per_epoch,
            step=opt.optimizer_steps,
            test_loss=test_loss,
            test_accuracy=test_accuracy,
            wall_time=wall_before + time.perf_counter() - started,
            bytes_communicated=comm.bytes,
            comm_seconds=comm.seconds,
            averaging_rounds=opt.averaging_rounds,
            **extra,
        )
        return test_loss, test_accuracy

    started = time.perf_counter()
    train_seconds = 0.0
    steps_this_run = 0
    test_accuracy = float("nan")
    saved_at = opt.optimizer_steps
    model.train()
    for epoch in range(start_epoch, args.epochs):
        if opt.optimizer_steps >= max_steps:
            break
        sampler.set_epoch(epoch)
        train_set.set_epoch(epoch)
        sampler.start = batches_done * args.batch_size
        running = torch.zeros(3, dtype=torch.float64, device=device)  # loss sum, correct, seen
        epoch_totals = torch.zeros(3, dtype=torch.float64, device=device)
        bar = _progress_bar(args, rank, epoch, steps_per_epoch, batches_done)
        tick = time.perf_counter()
        batch = batches_done
        for batch, (images, labels) in enumerate(train_loader, start=batches_done + 1):
            labels = labels.to(device, non_blocking=True)
            window_ends = batch % args.accumulation_steps == 0
            # DDP all-reduces on the backward of a window's last micro-batch only.
            no_sync = isinstance(model, DistributedDataParallel) and not window_ends
            with model.no_sync() if no_sync else contextlib.nullcontext():  # type: ignore[operator]
                with torch.autocast(device.type, dtype=torch.bfloat16, enabled=amp):
                    logits = model(
                        normalize(images, device).contiguous(memory_format=torch.channels_last)
                    )
                    loss = F.cross_entropy(logits.float(), labels)
                loss.backward()
            opt.step()  # divides accumulated gradients itself; averages every --period steps
            opt.zero_grad()
            with torch.no_grad():
                running += torch.stack(
                    [
                        loss.detach() * len(labels),
                        (logits.argmax(1) == labels).sum(),
                        torch.tensor(len(labels), device=device),
                    ]
                ).double()
            if not window_ends:
                continue
            scheduler.step()
            steps_this_run += 1
            step = opt.optimizer_steps
            if bar is not None:
                bar.update(1)
            if step % args.log_every == 0 or step == max_steps:
                train_seconds += time.perf_counter() - tick
                loss_mean, accuracy = _interval_means(running, device)
                epoch_totals += running
                running.zero_()
                record = {
                    "kind": "train",
                    "epoch": step / steps_per_epoch,
                    "step": step,
                    "loss": loss_mean,
                    "accuracy": accuracy,
                    "lr": scheduler.get_last_lr()[0],
                    "wall_time": wall_before + time.perf_counter() - started,
                    "bytes_communicated": comm.bytes,
                    "averaging_rounds": opt.averaging_rounds,
                    "steps_per_second": steps_this_run / max(train_seconds, 1e-9),
                }
                metrics.write(**record)
                if bar is not None:
                    bar.set_postfix(
                        loss=f"{loss_mean:.3f}",
                        acc=f"{accuracy:.3f}",
                        steps_s=f"{record['steps_per_second']:.2f}",
                        rounds=opt.averaging_rounds,
                    )
                tick = time.perf_counter()
            if (args.checkpoint_every and step % args.checkpoint_every == 0) or step == max_steps:
                save(epoch, batch)
                saved_at = step
            epoch_ends = batch >= steps_per_epoch * args.accumulation_steps
            if step >= max_steps or epoch_ends:
                break
            if args.eval_every and step % args.eval_every == 0:
                train_seconds += time.perf_counter() - tick
                test(final=False)  # each rank's own model: no averaging round is added
                tick = time.perf_counter()
        train_seconds += time.perf_counter() - tick
        epoch_totals += running
        if bar is not None:
            bar.close()
        if saved_at != opt.optimizer_steps:
            save(epoch, batch)
            saved_at = opt.optimizer_steps
        finished = opt.optimizer_steps >= max_steps
        if finished:
            opt.close()  # a final averaging round: every rank now holds the same model
        train_loss, train_accuracy = _interval_means(epoch_totals, device)
        test_loss, test_accuracy = test(
            train_loss=train_loss, train_accuracy=train_accuracy, final=finished
        )
        if rank == 0:
            print(
                f"epoch {epoch + 1}/{args.epochs}  step {opt.optimizer_steps}  "
                f"train loss {train_loss:.4f}  train acc {train_accuracy:.4f}  "
                f"test loss {test_loss:.4f}  test acc {test_accuracy:.4f}  "
                f"rounds {opt.averaging_rounds}",
                flush=True,
            )
        batches_done = 0
    opt.close()
    if math.isnan(test_accuracy):  # resumed from a run that had already finished
        test_accuracy = evaluate(net, test_loader, device, amp)[1]

    if rank == 0:
        torch.save(net.state_dict(), args.out_dir / "final_model.pt")
        megabytes = comm.bytes / 1e6
        print(
            f"done: {args.mode}, {world_size} rank(s), {opt.optimizer_steps} steps "
            f"({opt.optimizer_steps / steps_per_epoch:.2f} epochs), {opt.averaging_rounds} "
            f"averaging rounds, test accuracy {test_accuracy:.4f}, "
            f"{steps_this_run / max(train_seconds, 1e-9):.2f} steps/s, "
            f"{megabytes:.1f} MB communicated per rank, "
            f"{wall_before + time.perf_counter() - started:.0f} s",
            flush=True,
        )
    if dist.is_initialized():
        # Without a barrier, a rank that tears down its connections while another still
        # finishes the last collective can make gloo abort that process at exit.
        dist.barrier()
        dist.destroy_process_group()


def _interval_means(totals: Tensor, device: torch.device) -> tuple[float, float]:
    loss_sum, correct, seen = mean_over_ranks(totals.tolist(), device)
    return loss_sum / max(seen, 1), correct / max(seen, 1)


def _progress_bar(
    args: argparse.Namespace, rank: int, epoch: int, total: int, batches_done: int
) -> Any:
    """A tqdm bar of optimizer steps on rank 0, or None."""
    if rank != 0 or not args.progress:
        return None
    from tqdm import tqdm

    return tqdm(
        total=total,
        initial=batches_done // args.accumulation_steps,
        desc=f"epoch {epoch + 1}/{args.epochs}",
        unit="step",
        file=sys.stderr,
        dynamic_ncols=True,
        mininterval=1.0,
    )


if __name__ == "__main__":
    main()
