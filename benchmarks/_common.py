"""Helpers shared by the benchmark scripts: process group, models, timing, tables, the machine.

Not a benchmark itself; each script in this folder imports it from its own directory.
"""

from __future__ import annotations

import os
import platform
import statistics
import subprocess
import time
from collections.abc import Callable, Sequence

import torch
import torch.distributed as dist
from torch import nn

import local_sgd_optim


def init_distributed() -> tuple[int, int]:
    """Join the gloo process group that torchrun describes; one compute thread per CPU share.

    Returns:
        (rank, world size).
    """
    if not dist.is_initialized():
        dist.init_process_group("gloo")
    local = int(os.environ.get("LOCAL_WORLD_SIZE", dist.get_world_size()))
    # Ranks on one host share its cores; more threads than cores would measure contention.
    # run_link.sh sets LSGD_BENCH_THREADS when two simulated hosts share this machine's cores.
    threads = os.environ.get("LSGD_BENCH_THREADS")
    torch.set_num_threads(int(threads) if threads else max(1, (os.cpu_count() or 1) // local))
    # Denormal weights would slow some configurations' arithmetic and not others'.
    torch.set_flush_denormal(True)
    return dist.get_rank(), dist.get_world_size()


def shutdown() -> None:
    """Barrier, then destroy the group: avoids torch 2.14's exit-time gloo abort (README)."""
    if dist.is_initialized():
        dist.barrier()
        dist.destroy_process_group()


def resnet18() -> nn.Module:
    """torchvision ResNet-18 with 10 classes: 62 parameter tensors, 11.17M parameters."""
    from torchvision.models import resnet18 as build

    return build(num_classes=10)


def mlp() -> nn.Module:
    """40 ``Linear(256, 256)`` layers with ReLU: 80 parameter tensors, 2.63M parameters."""
    layers: list[nn.Module] = []
    for _ in range(40):
        layers += [nn.Linear(256, 256), nn.ReLU()]
    return nn.Sequential(*layers[:-1])


MODELS: dict[str, Callable[[], nn.Module]] = {"resnet18": resnet18, "mlp": mlp}


def averaged_numel(model: nn.Module, buffers: bool = True) -> int:
    """Elements that Local SGD averages: trainable float parameters, float buffers."""
    n = sum(p.numel() for p in model.parameters() if p.requires_grad and p.is_floating_point())
    if buffers:
        n += sum(b.numel() for b in model.buffers() if b.is_floating_point())
    return n


def median(values: Sequence[float]) -> float:
    return statistics.median(values)


def timed(fn: Callable[[], object], repeat: int = 1, barrier: bool = True) -> float:
    """Seconds per call of ``fn`` over ``repeat`` calls, started together on every rank."""
    if barrier and dist.is_initialized():
        dist.barrier()
    start = time.perf_counter()
    for _ in range(repeat):
        fn()
    return (time.perf_counter() - start) / repeat


def bytes_sent() -> int | None:
    """Bytes this process has written so far (``wchar`` of ``/proc/self/io``, which counts
    writes to sockets): during a timed loop of collectives, what this rank sent over the link.
    Checked on gloo: an all-reduce of 4 MB adds 4.0 MB on each of 2 ranks and 6.0 MB on each of
    4, an all-gather of 4 MB from each of 4 ranks adds 12.0 MB. ``None`` where the file does
    not exist (not Linux)."""
    try:
        with open("/proc/self/io") as f:
            for line in f:
                if line.startswith("wchar:"):
                    return int(line.split()[1])
    except OSError:
        pass
    return None


def markdown_table(headers: Sequence[str], rows: Sequence[Sequence[object]]) -> str:
    """A GitHub markdown table; numbers right-aligned."""
    align = [
        "---:" if rows and isinstance(rows[0][i], (int, float)) else "---"
        for i in range(len(headers))
    ]
    lines = ["| " + " | ".join(headers) + " |", "|" + "|".join(align) + "|"]
    for row in rows:
        lines.append("| " + " | ".join(_cell(x) for x in row) + " |")
    return "\n".join(lines)


def _cell(x: object) -> str:
    if isinstance(x, float):
        return f"{x:.3g}" if abs(x) < 1000 else f"{x:.0f}"
    return str(x)


def machine() -> str:
    """One line: CPU model, cores, memory, OS, Python, torch, load average now."""
    cpu = platform.processor() or "unknown CPU"
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    cpu = line.split(":", 1)[1].strip()
                    break
    except OSError:
        pass
    mem = ""
    try:
        with open("/proc/meminfo") as f:
            kib = int(f.readline().split()[1])
        mem = f", {kib / 2**20:.0f} GiB"
    except (OSError, ValueError, IndexError):
        pass
    load = ", ".join(f"{x:.2f}" for x in os.getloadavg())
    return (
        f"{cpu}, {os.cpu_count()} cores{mem}; {platform.system()} {platform.release()}; "
        f"Python {platform.python_version()}, torch {torch.__version__}, "
        f"local_sgd_optim {local_sgd_optim.__version__} at {_revision()}; load average {load}"
    )


def _revision() -> str:
    """The checkout's commit, and whether the package's sources differ from it."""
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    try:
        commit = subprocess.run(
            ["git", "rev-parse", "--short", "HEAD"],
            cwd=root,
            capture_output=True,
            text=True,
            timeout=10,
            check=True,
        ).stdout.strip()
        dirty = subprocess.run(
            ["git", "status", "--porcelain", "--", "local_sgd_optim"],
            cwd=root,
            capture_output=True,
            text=True,
            timeout=10,
            check=True,
        ).stdout.strip()
    except (OSError, subprocess.SubprocessError):
        return "unknown commit"
    return f"{commit}{' + uncommitted changes' if dirty else ''}"
