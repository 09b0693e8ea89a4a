"""Small models, data and helpers shared by the tests (importable from worker processes)."""

from __future__ import annotations

import io
import os
import subprocess
import sys
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch
import torch.distributed as dist
from torch import Tensor, nn

if TYPE_CHECKING:
    from local_sgd_optim import LocalSGDOptimizer

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


class Launched(subprocess.CompletedProcess[str]):
    """A finished :func:`torchrun`: the last attempt's process, and how long that attempt took."""

    seconds: float = 0.0


def torchrun_command(
    script: str | Path,
    *args: str,
    nproc: int = 2,
    launcher_args: Sequence[str] = ("--standalone",),
) -> list[str]:
    """``python -m torch.distributed.run [launcher_args] --nproc_per_node N script args``."""
    launcher = [*launcher_args, "--nproc_per_node", str(nproc)]
    return [sys.executable, "-m", "torch.distributed.run", *launcher, str(script), *args]


def torchrun(
    script: str | Path,
    *args: str,
    nproc: int = 2,
    launcher_args: Sequence[str] = ("--standalone",),
    env: dict[str, str] | None = None,
    timeout: float = 240,
    finished: str | Callable[[str], bool] = "RESULT ",
    retries_on_teardown_abort: int = 1,
    before_retry: Callable[[], None] | None = None,
) -> Launched:
    """Run ``script`` under torchrun on ``nproc`` CPU processes from the repository root, with
    :func:`launcher_env` unless ``env`` is given; capture its output as text.

    torch 2.14's gloo can abort a process at interpreter exit after its work is done
    (pytorch/pytorch#179291; seen in up to 1 run in 8 here under load). A run that failed with
    exactly that, after it had ``finished`` (a string its stdout holds, or a test of its stdout),
    is run again, up to ``retries_on_teardown_abort`` times, calling ``before_retry`` first (to
    start again from the same files). Callers still assert on a clean exit of the last run.
    """
    cmd = torchrun_command(script, *args, nproc=nproc, launcher_args=launcher_args)
    done = (lambda out: finished in out) if isinstance(finished, str) else finished
    for attempt in range(retries_on_teardown_abort + 1):
        if attempt and before_retry is not None:
            before_retry()
        began = time.monotonic()
        proc = subprocess.run(
            cmd,
            capture_output=True,
            text=True,
            timeout=timeout,
            env=launcher_env() if env is None else env,
            cwd=ROOT,
        )
        launched = Launched(proc.args, proc.returncode, proc.stdout, proc.stderr)
        launched.seconds = time.monotonic() - began
        if proc.returncode == 0 or not (TEARDOWN_ABORT in proc.stderr and done(proc.stdout)):
            break
    return launched


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


def sgd_wrapper(
    model: nn.Module, period: Any, lr: float = 0.1, momentum: float = 0.0, **kwargs: Any
) -> LocalSGDOptimizer:
    """``LocalSGDOptimizer(SGD(model.parameters(), lr, momentum), model, period, **kwargs)``."""
    from local_sgd_optim import LocalSGDOptimizer

    base = torch.optim.SGD(model.parameters(), lr=lr, momentum=momentum)
    return LocalSGDOptimizer(base, model, period=period, **kwargs)


def train(
    model: nn.Module,
    opt: torch.optim.Optimizer,
    steps: int,
    start: int = 0,
    *,
    zero_grad_first: bool = False,
) -> None:
    """``steps`` calls of backward on :func:`loss_of` this rank's batches ``start``,
    ``start + 1``, ..., then ``opt.step()`` and ``opt.zero_grad()`` (or ``zero_grad()`` before
    the backward, as many loops do, with ``zero_grad_first``)."""
    for i in range(start, start + steps):
        if zero_grad_first:
            opt.zero_grad()
        loss_of(model, rank(), i).backward()
        opt.step()
        if not zero_grad_first:
            opt.zero_grad()


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
