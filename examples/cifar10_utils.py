"""What ``examples/cifar10.py`` needs that has nothing to do with Local SGD.

The command line; the data (CIFAR-10 or a synthetic stand-in, augmentation, each rank's shard,
an epoch that can start part-way); a CIFAR ResNet-18; the metrics file, a clock and a progress
bar. Every rank holds the whole (small) dataset as uint8 tensors and reads its own shard of it.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
import urllib.error
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import Tensor, nn
from torch.utils.data import DataLoader, Dataset, DistributedSampler, Subset
from tqdm import tqdm

CIFAR10_MEAN = (0.4914, 0.4822, 0.4465)
CIFAR10_STD = (0.2470, 0.2435, 0.2616)


# --- command line --------------------------------------------------------------------------


class _HelpFormatter(argparse.ArgumentDefaultsHelpFormatter):
    """Show each default, except flags' and those computed at run time (the help explains)."""

    def _get_help_string(self, action: argparse.Action) -> str | None:
        if action.default is None or isinstance(action.default, bool):
            return action.help
        return super()._get_help_string(action)


def parse_args(argv: list[str] | None, doc: str, out_dir: str) -> argparse.Namespace:
    """The command line of ``examples/cifar10.py`` (and of its DDP baseline), checked.

    ``doc`` is the script's docstring (its first paragraph describes the script in ``--help``)
    and ``out_dir`` the default of ``--out-dir``.
    """
    parser = argparse.ArgumentParser(
        description=doc.split("\n\n")[0], formatter_class=_HelpFormatter
    )
    add_data_flags(parser)
    add_training_flags(parser)
    add_local_sgd_flags(parser)
    add_output_flags(parser, out_dir)
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
    args.out_dir = Path(args.out_dir)
    args.checkpoint_dir = Path(args.checkpoint_dir or args.out_dir / "checkpoints")
    return args


def add_data_flags(parser: argparse.ArgumentParser) -> None:
    add = parser.add_argument_group("data").add_argument
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
    add(
        "--seed",
        type=int,
        default=0,
        help="seeds the initial model, the data order, augmentation and synthetic data",
    )


def add_training_flags(parser: argparse.ArgumentParser) -> None:
    add = parser.add_argument_group("training").add_argument
    add(
        "--backend",
        choices=("auto", "nccl", "gloo"),
        default="auto",
        help="torch.distributed backend; auto is nccl when CUDA is available, else gloo",
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


def add_local_sgd_flags(parser: argparse.ArgumentParser) -> None:
    add = parser.add_argument_group("Local SGD").add_argument
    add("--period", type=int, default=8, help="optimizer steps between averaging rounds")
    add(
        "--comm-dtype",
        choices=("fp32", "bf16", "fp16"),
        default="fp32",
        help="precision of the averaged payload",
    )
    add(
        "--overlap-steps",
        type=int,
        default=0,
        help="apply each round this many steps late, overlapping it with "
        "compute (0: synchronous rounds)",
    )
    add(
        "--warmup-steps",
        type=int,
        default=0,
        help="synchronous steps (gradients all-reduced, as DDP) before local SGD starts: "
        "post-local SGD",
    )
    add(
        "--outer-optimizer",
        choices=("none", "nesterov", "heavy-ball"),
        default="none",
        help="at each round, step the kept parameters with the ranks' mean change through an "
        "outer SGD: nesterov is DiLoCo, heavy-ball is SlowMo; none averages plainly",
    )
    add("--outer-lr", type=float, default=0.7, help="outer learning rate")
    add("--outer-momentum", type=float, default=0.9, help="outer momentum")
    add(
        "--local-period",
        type=int,
        default=None,
        help="two-level averaging: also average among the ranks of each node every this many "
        "steps (less than --period)",
    )
    add(
        "--bucket-cap-mb",
        type=float,
        default=25.0,
        help="size of the buckets the averaged tensors are packed into",
    )


def add_output_flags(parser: argparse.ArgumentParser, out_dir: str) -> None:
    add = parser.add_argument_group("checkpoints, metrics and progress").add_argument
    add(
        "--out-dir",
        default=out_dir,
        help="where metrics.jsonl and final_model.pt go",
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


# --- data ----------------------------------------------------------------------------------


@dataclass
class Data:
    """This rank's data."""

    train_set: AugmentedImages
    sampler: ResumableDistributedSampler  # this rank's shard of the training set
    train_loader: DataLoader
    test_loader: DataLoader  # this rank's share of the test set
    steps_per_epoch: int  # optimizer steps: whole accumulation windows only


def make_data(args: argparse.Namespace, rank: int, world_size: int, device: torch.device) -> Data:
    """This rank's loaders: every rank holds the whole (small) dataset and reads its shard."""
    if args.data == "cifar10":
        local_rank = int(os.environ.get("LOCAL_RANK", 0))
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
    cuda = device.type == "cuda"
    workers = args.workers if args.workers is not None else (4 if cuda else 0)
    options: dict[str, Any] = {"num_workers": workers, "pin_memory": cuda}
    train_loader = DataLoader(
        train_set, args.batch_size, sampler=sampler, drop_last=True, **options
    )
    test_loader = DataLoader(test_set, 512, **options)
    # Whole accumulation windows only, so a window never spans two epochs.
    steps_per_epoch = sampler.num_samples // args.batch_size // args.accumulation_steps
    if steps_per_epoch == 0:
        raise SystemExit("--batch-size x --accumulation-steps is larger than a rank's shard")
    return Data(train_set, sampler, train_loader, test_loader, steps_per_epoch)


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


def all_ranks_ok(ok: bool) -> bool:
    """Whether ``ok`` holds on every rank; lets a failure on one rank stop all of them."""
    if not dist.is_initialized():
        return ok
    oks: list[Any] = [None] * dist.get_world_size()
    dist.all_gather_object(oks, ok)
    return all(oks)


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


# --- logging -------------------------------------------------------------------------------


class MetricsLog:
    """JSON lines in ``path``, written by rank 0 only (``enabled``)."""

    def __init__(self, path: Path, enabled: bool) -> None:
        self.path, self.enabled = path, enabled

    def begin(self, resume_step: int | None) -> None:
        """Empty the file, or after a resume drop only the lines after ``resume_step``."""
        if not self.enabled:
            return
        self.path.parent.mkdir(parents=True, exist_ok=True)
        if resume_step is None:
            self.path.write_text("")
        elif self.path.exists():
            kept = [
                line
                for line in self.path.read_text().splitlines()
                if line.strip() and json.loads(line)["step"] <= resume_step
            ]
            self.path.write_text("".join(line + "\n" for line in kept))

    def write(self, **record: Any) -> None:
        if self.enabled:
            with self.path.open("a") as f:
                f.write(json.dumps(record) + "\n")


class Clock:
    """Wall time (the runs before a resume included), and time spent in training steps alone."""

    def __init__(self) -> None:
        self.before = 0.0  # wall time of the runs before a resume
        self.started = time.perf_counter()
        self.steps = 0  # optimizer steps taken in this run
        self.step_seconds = 0.0
        self._since: float | None = None

    def wall_time(self) -> float:
        return self.before + time.perf_counter() - self.started

    def start(self) -> None:
        """From now until ``stop()``, time counts as spent in training steps."""
        self._since = time.perf_counter()

    def stop(self) -> None:
        if self._since is not None:
            self.step_seconds += time.perf_counter() - self._since
            self._since = None

    def steps_per_second(self) -> float:
        running = 0.0 if self._since is None else time.perf_counter() - self._since
        return self.steps / max(self.step_seconds + running, 1e-9)


def progress_bar(total: int, initial: int, desc: str, enabled: bool) -> tqdm:
    """A tqdm bar of optimizer steps on stderr; a no-op bar when not ``enabled``."""
    return tqdm(
        total=total,
        initial=initial,
        desc=desc,
        unit="step",
        file=sys.stderr,
        dynamic_ncols=True,
        mininterval=1.0,
        disable=not enabled,
    )
