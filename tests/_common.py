"""Small models, data and helpers shared by the tests (importable from worker processes)."""

from __future__ import annotations

import io
import os
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
from torch import Tensor, nn

ROOT = Path(__file__).resolve().parents[1]
# torch 2.14's gloo can abort a process at interpreter exit after its work is done
# (pytorch/pytorch#179291); tests that launch scripts rerun them on exactly this message.
TEARDOWN_ABORT = "terminate called without an active exception"


def launcher_env(**extra: str) -> dict[str, str]:
    """The environment for a script launched under torchrun by a test: CPU only (gloo, as in
    CI), none of an enclosing launcher's variables, and this checkout importable whatever the
    environment has installed."""
    drop = {"RANK", "WORLD_SIZE", "LOCAL_RANK", "LOCAL_WORLD_SIZE", "GROUP_RANK"}
    drop |= {"MASTER_ADDR", "MASTER_PORT", "GLOO_SOCKET_IFNAME"}
    env = {k: v for k, v in os.environ.items() if k not in drop}
    env["CUDA_VISIBLE_DEVICES"] = ""
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(ROOT), env.get("PYTHONPATH")]))
    env.update(extra)
    return env


def mlp(seed: int = 0) -> nn.Module:
    torch.manual_seed(seed)
    return nn.Sequential(nn.Linear(6, 16), nn.Tanh(), nn.Linear(16, 3))


def bn_net(seed: int = 0) -> nn.Module:
    torch.manual_seed(seed)
    return nn.Sequential(nn.Linear(6, 8), nn.BatchNorm1d(8), nn.ReLU(), nn.Linear(8, 3))


def batch(rank: int, step: int, n: int = 8) -> tuple[Tensor, Tensor]:
    """A deterministic batch that differs by rank and step."""
    g = torch.Generator().manual_seed(10_000 * rank + step)
    x = torch.randn(n, 6, generator=g)
    y = torch.randint(0, 3, (n,), generator=g)
    return x, y


def loss_of(model: nn.Module, rank: int, step: int) -> Tensor:
    x, y = batch(rank, step)
    return nn.functional.cross_entropy(model(x), y)


def flat_params(model: nn.Module) -> Tensor:
    return torch.cat([p.detach().reshape(-1).clone() for p in model.parameters()])


def rank() -> int:
    return dist.get_rank() if dist.is_initialized() else 0


def roundtrip(obj: Any) -> Any:
    """Save and load as a checkpoint would, with weights_only loading."""
    buffer = io.BytesIO()
    torch.save(obj, buffer)
    buffer.seek(0)
    return torch.load(buffer, weights_only=True)


def raised(fn: Any, *args: Any, **kwargs: Any) -> tuple[str, str]:
    """Call ``fn`` and return (exception type name, message); ("", "") when nothing was raised."""
    try:
        fn(*args, **kwargs)
    except Exception as exc:
        return type(exc).__name__, str(exc)
    return "", ""
