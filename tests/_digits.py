"""Digits training shared by ``tests/test_convergence.py`` and ``benchmarks/convergence_digits.py``.

scikit-learn's bundled digits (1,797 8x8 images, no download), standardised, split once into
1,437 training and 360 test images (stratified, ``random_state=0``). Each epoch every rank takes a
disjoint shard of the same seeded shuffle, as ``DistributedSampler`` does, and steps on batches of
``batch_size``; every method therefore sees the same samples in the same number of steps. The
model is an MLP 64-128-10 trained with SGD and momentum; only the way ranks communicate changes
from one method to the next.

:func:`train` runs one method for one seed on the calling rank of an initialised process group
and returns plain numbers. It lives in ``tests/`` so that the sdist's test suite has it; the
benchmark imports it from there.
"""

from __future__ import annotations

import inspect
import time
from dataclasses import dataclass
from functools import lru_cache
from typing import Any

import torch
import torch.distributed as dist
from torch import Tensor, nn
from torch.distributed.algorithms.ddp_comm_hooks import default_hooks
from torch.nn.parallel import DistributedDataParallel

from local_sgd_optim import LocalSGDOptimizer

TRAIN_SIZE = 1437
TEST_SIZE = 360


@dataclass(frozen=True)
class Hyper:
    """Training settings, the same for every method (tuned on DDP only).

    Args:
        epochs (int): passes over the training set.
        batch_size (int): samples per rank per optimizer step.
        lr (float): SGD learning rate, decayed by cosine annealing to zero.
        momentum (float): SGD momentum.
        hidden (int): width of the MLP's hidden layer.
    """

    epochs: int = 32
    batch_size: int = 16
    lr: float = 0.05
    momentum: float = 0.9
    hidden: int = 128


# Each method: how the ranks communicate. "ddp" is torch's DistributedDataParallel; every other
# entry is keyword arguments for LocalSGDOptimizer, with "outer" naming the outer optimizer and
# "local_group" a subgroup of 2 ranks (two-level averaging), both built on the rank.
METHODS: dict[str, dict[str, Any]] = {
    "DDP": {"ddp": True},
    "local SGD H=1": {"period": 1},
    "local SGD H=4": {"period": 4},
    "local SGD H=16": {"period": 16},
    "local SGD H=64": {"period": 64},
    "post-local SGD H=16": {"period": 16, "warmup_steps": "quarter"},
    "outer Nesterov H=16": {"period": 16, "outer": "nesterov"},
    "outer Nesterov H=64": {"period": 64, "outer": "nesterov"},
    "two-level 4 / 16": {"period": 16, "local_period": 4, "local_group": "pairs"},
}

# Keywords a method needs that older checkouts of LocalSGDOptimizer lack.
_NEEDS = {
    "warmup_steps": "warmup_steps",
    "outer": "outer_optimizer",
    "local_period": "local_period",
}


def missing_features(method: str) -> list[str]:
    """Keywords of ``LocalSGDOptimizer`` that ``method`` needs and this checkout lacks."""
    accepted = inspect.signature(LocalSGDOptimizer.__init__).parameters
    config = METHODS[method]
    return [kw for key, kw in _NEEDS.items() if key in config and kw not in accepted]


@lru_cache(maxsize=1)
def load_digits_split() -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """The standardised digits split: ``(x_train, y_train, x_test, y_test)``, float32 / int64.

    The scaler is fitted on the training images only.
    """
    from sklearn.datasets import load_digits
    from sklearn.model_selection import train_test_split
    from sklearn.preprocessing import StandardScaler

    x, y = load_digits(return_X_y=True)
    x_train, x_test, y_train, y_test = train_test_split(
        x, y, test_size=TEST_SIZE, stratify=y, random_state=0
    )
    scaler = StandardScaler().fit(x_train)
    return (
        torch.as_tensor(scaler.transform(x_train), dtype=torch.float32),
        torch.as_tensor(y_train, dtype=torch.int64),
        torch.as_tensor(scaler.transform(x_test), dtype=torch.float32),
        torch.as_tensor(y_test, dtype=torch.int64),
    )


def steps_per_epoch(hyper: Hyper, world_size: int) -> int:
    """Optimizer steps per epoch on each rank (the last, partial batch is dropped)."""
    return (TRAIN_SIZE // world_size) // hyper.batch_size


def shard(epoch: int, seed: int, rank: int, world_size: int) -> Tensor:
    """Indices this rank trains on in ``epoch``: a disjoint slice of one shared shuffle."""
    g = torch.Generator().manual_seed(1_000_003 * seed + epoch)
    order = torch.randperm(TRAIN_SIZE, generator=g)
    per_rank = TRAIN_SIZE // world_size
    return order[rank::world_size][:per_rank]


def mlp(seed: int, hidden: int = 128) -> nn.Module:
    """MLP 64-``hidden``-10 with ReLU, initialised from ``seed`` (the same on every rank)."""
    torch.manual_seed(seed)
    return nn.Sequential(nn.Linear(64, hidden), nn.ReLU(), nn.Linear(hidden, 10))


def accuracy(model: nn.Module, x: Tensor, y: Tensor) -> float:
    """Fraction of ``x`` that ``model`` classifies as ``y``."""
    with torch.no_grad():
        return (model(x).argmax(dim=1) == y).float().mean().item()


class ByteCounter:
    """The state of :func:`counting_allreduce`: payload bytes handed to all-reduces so far."""

    def __init__(self) -> None:
        self.bytes = 0


def counting_allreduce(counter: ByteCounter, bucket: Any) -> Any:
    """DDP's own all-reduce hook, counting the bytes of each gradient bucket first."""
    buffer = bucket.buffer()
    counter.bytes += buffer.numel() * buffer.element_size()
    return default_hooks.allreduce_hook(None, bucket)  # type: ignore[arg-type]


# DDP checks a hook's annotations as objects; this module's postponed annotations are strings.
counting_allreduce.__annotations__ = {
    "counter": object,
    "bucket": dist.GradBucket,  # type: ignore[attr-defined]
    "return": torch.futures.Future[Tensor],
}


def _pair_group() -> Any:
    """This rank's subgroup of 2 consecutive ranks (a collective: every rank must call it)."""
    group, _ = dist.new_subgroups(group_size=2)
    return group


def _nesterov(params: list[Tensor]) -> torch.optim.Optimizer:
    # DiLoCo's outer step (arXiv 2311.08105), not tuned here.
    return torch.optim.SGD(params, lr=0.7, momentum=0.9, nesterov=True)


def _local_sgd_kwargs(config: dict[str, Any], total_steps: int) -> dict[str, Any]:
    kwargs = dict(config)
    if kwargs.get("warmup_steps") == "quarter":
        # Synchronous for the first quarter of training, local SGD after (arXiv 1808.07217).
        kwargs["warmup_steps"] = total_steps // 4
    if kwargs.pop("outer", None) == "nesterov":
        kwargs["outer_optimizer"] = _nesterov
    if kwargs.get("local_group") == "pairs":
        kwargs["local_group"] = _pair_group()
    return kwargs


def train(method: str, seed: int, hyper: Hyper | None = None) -> dict[str, Any]:
    """Train ``method`` for ``seed`` on this rank; every rank of the world must call it.

    Args:
        method (str): a key of :data:`METHODS`.
        seed (int): seeds the initial model and the shuffles.
        hyper (Hyper, optional): training settings (default: ``Hyper()``).

    Returns:
        A dict: ``accuracy`` (test accuracy of the final model: the averaged one for Local SGD,
        after ``close()``), ``bytes`` (payload bytes this rank all-reduced while training:
        ``opt.stats.bytes_communicated``, or what DDP handed to its all-reduces),
        ``bytes_within_subgroup`` (the part of ``bytes`` sent in two-level averaging's rounds
        within the subgroup), ``rounds`` (rounds across all ranks; DDP: steps),
        ``steps``, ``seconds`` (wall time of the training loop and final round on this rank),
        ``final_loss`` (mean training loss of the last epoch on this rank).
    """
    hyper = hyper or Hyper()
    rank, world = dist.get_rank(), dist.get_world_size()
    x_train, y_train, x_test, y_test = load_digits_split()
    config = METHODS[method]
    model = mlp(seed, hyper.hidden)
    per_epoch = steps_per_epoch(hyper, world)
    total_steps = hyper.epochs * per_epoch

    counter: ByteCounter | None = None
    opt: LocalSGDOptimizer | None = None
    net: nn.Module = model
    base = torch.optim.SGD(model.parameters(), lr=hyper.lr, momentum=hyper.momentum)
    step: Any = base
    if config.get("ddp"):
        net = DistributedDataParallel(model)
        counter = ByteCounter()
        net.register_comm_hook(counter, counting_allreduce)
    else:
        opt = LocalSGDOptimizer(base, model, **_local_sgd_kwargs(config, total_steps))
        step = opt
    schedule = torch.optim.lr_scheduler.CosineAnnealingLR(base, T_max=total_steps)

    loss_fn = nn.CrossEntropyLoss()
    dist.barrier()
    start = time.perf_counter()
    last_epoch_loss = 0.0
    local_rounds = within_subgroup = sent_before = 0
    for epoch in range(hyper.epochs):
        order = shard(epoch, seed, rank, world)
        last_epoch_loss = 0.0
        for i in range(per_epoch):
            idx = order[i * hyper.batch_size : (i + 1) * hyper.batch_size]
            loss = loss_fn(net(x_train[idx]), y_train[idx])
            loss.backward()
            step.step()
            if opt is not None:
                sent_now = opt.stats.bytes_communicated
                if opt.local_rounds != local_rounds:
                    # This step ended in a round within the subgroup (two-level averaging).
                    local_rounds = opt.local_rounds
                    within_subgroup += sent_now - sent_before
                sent_before = sent_now
            step.zero_grad()
            schedule.step()
            last_epoch_loss += loss.item() / per_epoch
    if opt is not None:
        opt.close()
    seconds = time.perf_counter() - start

    if opt is not None:
        sent, rounds = opt.stats.bytes_communicated, opt.averaging_rounds
    else:
        assert counter is not None
        sent, rounds = counter.bytes, total_steps
    return {
        "method": method,
        "seed": seed,
        "rank": rank,
        "accuracy": accuracy(model, x_test, y_test),
        "bytes": sent,
        "bytes_within_subgroup": within_subgroup,
        "rounds": rounds,
        "steps": total_steps,
        "seconds": seconds,
        "final_loss": last_epoch_loss,
    }
