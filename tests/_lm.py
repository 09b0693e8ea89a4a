"""Byte-level language model training shared by ``tests/test_convergence_lm.py`` and
``benchmarks/convergence_lm.py``.

The text is the Python standard library's own source, which every machine with Python has
offline: the top-level ``*.py`` files of ``sysconfig.get_paths()["stdlib"]``, sorted by name, then
those of its packages (site-packages excluded), sorted by path, joined; the first
``Hyper.text_bytes`` bytes (2,000,000 in the short regime, all top-level files; 16,000,000 in the
published one). The last :data:`HELD_OUT_BYTES` of those are held out (a fixed split); held-out
loss is the mean cross-entropy, in nats per byte, over fixed non-overlapping windows of that
part. The exact text depends on the Python version, so figures
are comparable within one interpreter; :func:`text_fingerprint` names it.

The model is a small decoder-only transformer (pre-norm, causal attention, tied embeddings,
vocabulary of the 256 byte values). At each step every rank takes its own slice of one seeded
draw of random windows of the training part, as a sampler over shards would: every method sees
the same tokens at the same step. AdamW with linear warm-up and cosine decay is the base (inner)
optimizer for every method, each rank keeping its own state; only the way ranks communicate
changes. :data:`PUBLISHED` holds the settings of the regime where the DiLoCo papers reach DDP's
loss (many rounds, few replicas, gradient clipping); ``Hyper()`` those of the short regime.

:func:`train` runs one method for one seed on the calling rank of an initialised process group
and returns plain numbers. It lives in ``tests/`` so that the sdist's test suite has it; the
benchmark imports it from there.
"""

from __future__ import annotations

import glob
import hashlib
import math
import os
import sysconfig
import time
from dataclasses import dataclass
from functools import lru_cache
from typing import Any

import torch
import torch.distributed as dist
import torch.nn.functional as F
from _digits import ByteCounter, counting_allreduce
from torch import Tensor, nn
from torch.nn.parallel import DistributedDataParallel

from local_sgd_optim import LocalSGDOptimizer

TEXT_BYTES = 2_000_000
HELD_OUT_BYTES = 200_000
VOCAB = 256


@dataclass(frozen=True)
class Hyper:
    """Training settings, the same for every method (tuned a little on DDP only).

    Args:
        steps (int): optimizer steps on each rank.
        batch_size (int): windows per rank per step.
        context (int): bytes per window (the model predicts each from those before it).
        lr (float): AdamW's peak learning rate: linear warm-up, then cosine decay to 10%.
        warmup (float): fraction of ``steps`` spent warming the learning rate up.
        weight_decay (float): AdamW's weight decay.
        d_model (int): width of the transformer.
        layers (int): transformer blocks.
        heads (int): attention heads.
        eval_every (int): steps between held-out evaluations for the loss curve (0: none).
        eval_windows (int): held-out windows for the curve; the final model is scored on all.
        clip (float): clip each rank's gradient norm to this before the inner step (0: never).
        text_bytes (int): bytes of source text, the held-out part included.
    """

    steps: int = 512
    batch_size: int = 8
    context: int = 64
    lr: float = 3e-3
    warmup: float = 0.05
    weight_decay: float = 0.1
    d_model: int = 64
    layers: int = 2
    heads: int = 4
    eval_every: int = 64
    eval_windows: int = 256
    clip: float = 0.0
    text_bytes: int = TEXT_BYTES


# The published regime (``benchmarks/convergence_lm.py --regime published``): 2,048 steps of 16
# windows of 128 bytes in all (split across the replicas: ``batch_size`` is set per world size),
# 64 rounds at H = 32, a 445,952-parameter model, 16 MB of text so that it stays underfit
# (4.2 MB of it seen per run), gradients clipped at 1.0 as in the DiLoCo papers.
PUBLISHED_GLOBAL_BATCH = 16
PUBLISHED = Hyper(
    steps=2048,
    batch_size=PUBLISHED_GLOBAL_BATCH // 2,
    context=128,
    lr=2e-3,
    d_model=128,
    layers=2,
    heads=4,
    eval_every=256,
    eval_windows=256,
    clip=1.0,
    text_bytes=16_000_000,
)


# Each method: how the ranks communicate. "ddp" is torch's DistributedDataParallel; every other
# entry is keyword arguments for LocalSGDOptimizer, with "outer" an (lr, momentum) pair for a
# Nesterov SGD outer optimizer (DiLoCo, arXiv 2311.08105) and "warmup_steps": "quarter" the
# first quarter of training synchronous (post-local SGD, arXiv 1808.07217).
METHODS: dict[str, dict[str, Any]] = {
    "DDP": {"ddp": True},
    "local SGD H=8": {"period": 8},
    "local SGD H=32": {"period": 32},
    "post-local SGD H=32": {"period": 32, "warmup_steps": "quarter"},
    "DiLoCo H=32": {"period": 32, "outer": (0.7, 0.9)},
    "DiLoCo H=128": {"period": 128, "outer": (0.7, 0.9)},
}

# The outer learning rates and momenta of the sweep at H = 32 (``--sweep``).
SWEEP_LRS = (0.3, 0.5, 0.7, 1.0)
SWEEP_MOMENTA = (0.7, 0.9)


def diloco(period: int, lr: float, momentum: float) -> dict[str, Any]:
    """The method entry for DiLoCo at ``period`` with outer Nesterov SGD (``lr``, ``momentum``)."""
    return {"period": period, "outer": (lr, momentum)}


def method_config(method: str) -> dict[str, Any]:
    """:data:`METHODS`' entry, or the entry a name spells: ``"DDP"``, ``"local SGD H=32"``,
    ``"post-local SGD H=32"`` (the first quarter synchronous), ``"DiLoCo H=32 lr=0.5 m=0.8"``
    (outer Nesterov lr and momentum), each with a trailing ``bf16``, ``int8`` or ``int4`` for
    16-, 8- or 4-bit deltas, and ``F=4`` for four streaming fragments."""
    words = method.split()
    for word, dtype in (("bf16", torch.bfloat16), ("int8", "int8"), ("int4", "int4")):
        if word in words:
            words.remove(word)
            return method_config(" ".join(words)) | {"comm_dtype": dtype}
    fragments = [w for w in words if w.startswith("F=")]
    if fragments:
        words.remove(fragments[0])
        return method_config(" ".join(words)) | {"fragments": int(fragments[0][2:])}
    if method in METHODS:
        return METHODS[method]
    options = dict(w.split("=") for w in words if "=" in w)
    name = " ".join(w for w in words if "=" not in w)
    if name == "local SGD":
        return {"period": int(options["H"])}
    if name == "post-local SGD":
        return {"period": int(options["H"]), "warmup_steps": "quarter"}
    if name == "DiLoCo":
        return diloco(int(options["H"]), float(options["lr"]), float(options["m"]))
    raise KeyError(method)


def _stdlib_files() -> list[str]:
    """The top-level sources sorted by name (the short regime's text), then the packages'."""
    root = sysconfig.get_paths()["stdlib"]
    top = sorted(glob.glob(os.path.join(root, "*.py")))
    nested = sorted(
        path
        for path in glob.glob(os.path.join(root, "*", "**", "*.py"), recursive=True)
        if "site-packages" not in path and "dist-packages" not in path
    )
    return top + nested


@lru_cache(maxsize=2)
def load_text(text_bytes: int = TEXT_BYTES) -> bytes:
    """The first ``text_bytes`` of the standard library's sources (:func:`_stdlib_files`),
    joined."""
    parts, size = [], 0
    for path in _stdlib_files():
        with open(path, "rb") as f:
            data = f.read()
        parts.append(data)
        size += len(data) + 1
        if size >= text_bytes:
            break
    text = b"\n".join(parts)[:text_bytes]
    if len(text) < text_bytes:
        raise RuntimeError(f"only {len(text)} bytes of standard library source found")
    return text


def text_fingerprint(text_bytes: int = TEXT_BYTES) -> str:
    """Where the text came from, and the first 12 hex digits of its SHA-256."""
    text = load_text(text_bytes)
    where = "*.py" if text_bytes <= TEXT_BYTES else "*.py then **/*.py"
    return (
        f"{len(text):,} bytes of {sysconfig.get_paths()['stdlib']}/{where}, "
        f"sha256 {hashlib.sha256(text).hexdigest()[:12]}"
    )


@lru_cache(maxsize=2)
def split(text_bytes: int = TEXT_BYTES) -> tuple[Tensor, Tensor]:
    """``(train, held_out)``: the text as int64 byte tensors, the last part held out."""
    data = torch.frombuffer(bytearray(load_text(text_bytes)), dtype=torch.uint8).long()
    return data[:-HELD_OUT_BYTES], data[-HELD_OUT_BYTES:]


def unigram_entropy(text_bytes: int = TEXT_BYTES) -> float:
    """Entropy of the training part's byte frequencies, in nats per byte: the best loss of a
    model that ignores context."""
    counts = torch.bincount(split(text_bytes)[0], minlength=VOCAB).double()
    p = counts[counts > 0] / counts.sum()
    return -(p * p.log()).sum().item()


def held_out_windows(
    context: int, limit: int | None = None, text_bytes: int = TEXT_BYTES
) -> Tensor:
    """Non-overlapping windows of ``context + 1`` bytes of the held-out part (the first
    ``limit``, if given), one per row."""
    held = split(text_bytes)[1]
    n = len(held) // (context + 1)
    windows = held[: n * (context + 1)].view(n, context + 1)
    return windows if limit is None else windows[:limit]


def batch(step: int, seed: int, rank: int, world_size: int, hyper: Hyper) -> Tensor:
    """This rank's windows at ``step``: its slice of one seeded draw shared by all ranks."""
    train = split(hyper.text_bytes)[0]
    g = torch.Generator().manual_seed(1_000_003 * seed + step)
    starts = torch.randint(
        0, len(train) - hyper.context - 1, (world_size * hyper.batch_size,), generator=g
    )
    mine = starts[rank * hyper.batch_size : (rank + 1) * hyper.batch_size]
    return torch.stack([train[s : s + hyper.context + 1] for s in mine.tolist()])


class Block(nn.Module):
    """Pre-norm transformer block: causal self-attention, then a 4x GELU MLP."""

    def __init__(self, d_model: int, heads: int) -> None:
        super().__init__()
        self.heads = heads
        self.norm1 = nn.LayerNorm(d_model)
        self.qkv = nn.Linear(d_model, 3 * d_model)
        self.proj = nn.Linear(d_model, d_model)
        self.norm2 = nn.LayerNorm(d_model)
        self.mlp = nn.Sequential(
            nn.Linear(d_model, 4 * d_model), nn.GELU(), nn.Linear(4 * d_model, d_model)
        )

    def forward(self, x: Tensor) -> Tensor:
        b, t, d = x.shape
        q, k, v = self.qkv(self.norm1(x)).view(b, t, 3, self.heads, d // self.heads).unbind(2)
        y = F.scaled_dot_product_attention(
            q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2), is_causal=True
        )
        x = x + self.proj(y.transpose(1, 2).reshape(b, t, d))
        return x + self.mlp(self.norm2(x))


class ByteLM(nn.Module):
    """Decoder-only transformer over bytes: learned positions, tied input and output embedding."""

    def __init__(self, hyper: Hyper) -> None:
        super().__init__()
        self.embed = nn.Embedding(VOCAB, hyper.d_model)
        self.pos = nn.Parameter(torch.zeros(hyper.context, hyper.d_model))
        self.blocks = nn.ModuleList(Block(hyper.d_model, hyper.heads) for _ in range(hyper.layers))
        self.norm = nn.LayerNorm(hyper.d_model)
        nn.init.normal_(self.embed.weight, std=0.02)
        nn.init.normal_(self.pos, std=0.02)

    def forward(self, tokens: Tensor) -> Tensor:
        x = self.embed(tokens) + self.pos[: tokens.shape[1]]
        for block in self.blocks:
            x = block(x)
        return self.norm(x) @ self.embed.weight.t()


def model(seed: int, hyper: Hyper) -> ByteLM:
    """The transformer, initialised from ``seed`` (the same on every rank)."""
    torch.manual_seed(seed)
    return ByteLM(hyper)


def parameter_count(hyper: Hyper | None = None) -> int:
    return sum(p.numel() for p in ByteLM(hyper or Hyper()).parameters())


def lm_loss(net: nn.Module, windows: Tensor) -> Tensor:
    """Mean next-byte cross-entropy (nats) of ``net`` on ``windows``."""
    logits = net(windows[:, :-1])
    return F.cross_entropy(logits.reshape(-1, VOCAB), windows[:, 1:].reshape(-1))


def held_out_loss(net: nn.Module, windows: Tensor, chunk: int = 256) -> float:
    """Mean held-out loss over ``windows``, evaluated in chunks without gradients."""
    was_training = net.training
    net.eval()
    total = 0.0
    with torch.no_grad():
        for i in range(0, len(windows), chunk):
            part = windows[i : i + chunk]
            total += lm_loss(net, part).item() * len(part)
    net.train(was_training)
    return total / len(windows)


def _local_sgd_kwargs(config: dict[str, Any], steps: int) -> dict[str, Any]:
    kwargs = dict(config)
    if kwargs.get("warmup_steps") == "quarter":
        kwargs["warmup_steps"] = steps // 4
    outer = kwargs.pop("outer", None)
    if outer is not None:
        lr, momentum = outer

        def nesterov(params: list[Tensor]) -> torch.optim.Optimizer:
            return torch.optim.SGD(params, lr=lr, momentum=momentum, nesterov=True)

        kwargs["outer_optimizer"] = nesterov
    return kwargs


def _schedule(hyper: Hyper) -> Any:
    warm = max(1, round(hyper.warmup * hyper.steps))

    def factor(step: int) -> float:
        if step < warm:
            return (step + 1) / warm
        progress = (step - warm) / max(1, hyper.steps - warm)
        return 0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * progress))

    return factor


def train(method: str, seed: int, hyper: Hyper | None = None) -> dict[str, Any]:
    """Train ``method`` for ``seed`` on this rank; every rank of the world must call it.

    Args:
        method (str): a key of :data:`METHODS`, or a sweep point (:func:`method_config`).
        seed (int): seeds the initial model and the batches.
        hyper (Hyper, optional): training settings (default: ``Hyper()``).

    Returns:
        A dict: ``held_out_loss`` (the final model's, on every held-out window, the ranks
        scoring a share each: for Local SGD the averaged model after ``close()``), ``curve``
        (``[step, loss]`` pairs: the mean over ranks of each rank's current model on the first
        ``eval_windows`` windows, every ``eval_every`` steps; between rounds the ranks' models
        differ), ``bytes`` (payload bytes this rank all-reduced while training:
        ``opt.stats.bytes_communicated``, or what DDP handed to its all-reduces),
        ``curve_bytes`` (``bytes`` at each point of ``curve``), ``rounds`` (DDP: steps),
        ``steps``, ``world_size``, ``lr`` (the inner peak learning rate), ``seconds`` (wall
        time of training on this rank, evaluations excluded), ``train_loss`` (mean training
        loss of the last 10% of steps).
    """
    hyper = hyper or Hyper()
    rank, world = dist.get_rank(), dist.get_world_size()
    config = method_config(method)
    net_model = model(seed, hyper)
    decay = [p for p in net_model.parameters() if p.dim() >= 2]
    no_decay = [p for p in net_model.parameters() if p.dim() < 2]
    base = torch.optim.AdamW(
        [{"params": decay, "weight_decay": hyper.weight_decay}, {"params": no_decay}],
        lr=hyper.lr,
        betas=(0.9, 0.95),
        weight_decay=0.0,
    )
    counter: ByteCounter | None = None
    opt: LocalSGDOptimizer | None = None
    net: nn.Module = net_model
    step: Any = base
    if config.get("ddp"):
        net = DistributedDataParallel(net_model)
        counter = ByteCounter()
        net.register_comm_hook(counter, counting_allreduce)
    else:
        opt = LocalSGDOptimizer(base, net_model, **_local_sgd_kwargs(config, hyper.steps))
        step = opt
    schedule = torch.optim.lr_scheduler.LambdaLR(base, _schedule(hyper))
    curve_windows = held_out_windows(hyper.context, hyper.eval_windows, hyper.text_bytes)

    def sent() -> int:
        return opt.stats.bytes_communicated if opt is not None else counter.bytes  # type: ignore[union-attr]

    curve: list[list[float]] = []
    curve_bytes: list[int] = []
    mean_loss = torch.zeros(1)

    def evaluate(at: int) -> float:
        mean_loss[0] = held_out_loss(net_model, curve_windows)
        dist.all_reduce(mean_loss)  # not counted: the benchmark's own measurement
        curve.append([at, mean_loss.item() / world])
        curve_bytes.append(sent())
        return time.perf_counter()

    dist.barrier()
    if hyper.eval_every:
        evaluate(0)
    start = time.perf_counter()
    evaluating = 0.0
    tail = max(1, hyper.steps // 10)
    train_loss = 0.0
    for i in range(hyper.steps):
        loss = lm_loss(net, batch(i, seed, rank, world, hyper))
        loss.backward()
        if hyper.clip:
            torch.nn.utils.clip_grad_norm_(net_model.parameters(), hyper.clip)
        step.step()
        step.zero_grad()
        schedule.step()
        if i >= hyper.steps - tail:
            train_loss += loss.item() / tail
        if hyper.eval_every and (i + 1) % hyper.eval_every == 0 and i + 1 < hyper.steps:
            t0 = time.perf_counter()
            evaluating += evaluate(i + 1) - t0
    if opt is not None:
        opt.close()
    seconds = time.perf_counter() - start - evaluating

    # Every rank holds the same model now: each scores a quarter of the windows.
    windows = held_out_windows(hyper.context, text_bytes=hyper.text_bytes)
    total = torch.tensor(
        [held_out_loss(net_model, windows[rank::world]) * len(windows[rank::world])]
    )
    dist.all_reduce(total)  # not counted: the benchmark's own measurement
    final = total.item() / len(windows)
    if hyper.eval_every:
        mean_loss[0] = held_out_loss(net_model, curve_windows)
        dist.all_reduce(mean_loss)
        curve.append([hyper.steps, mean_loss.item() / world])
        curve_bytes.append(sent())
    return {
        "method": method,
        "seed": seed,
        "rank": rank,
        "held_out_loss": final,
        "curve": curve,
        "curve_bytes": curve_bytes,
        "bytes": sent(),
        "rounds": opt.averaging_rounds if opt is not None else hyper.steps,
        # The most bytes one step sent (DDP: every step sends the same).
        "peak_step_bytes": opt.stats.peak_step_bytes if opt is not None else sent() // hyper.steps,
        "steps": hyper.steps,
        "world_size": world,
        "lr": hyper.lr,
        "seconds": seconds,
        "train_loss": train_loss,
    }
