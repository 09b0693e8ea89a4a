"""Benchmark: device memory of the outer optimizer with and without ``cpu_offload``.

DiLoCo's outer optimizer keeps a copy of the parameters and its own state (Nesterov momentum:
one more copy; Adam: two). ``cpu_offload=True`` keeps them in CPU memory between rounds and
moves them to the parameters' device for the outer step only. For a ~25M-parameter MLP (12
``Linear(1448, 1448)``) with an SGD-Nesterov and an Adam outer optimizer, on one rank, this
script reports after three rounds:

- held: the bytes of the outer optimizer's tensors (kept copy, its gradient, state) by device,
  counted from the tensors themselves;
- on CUDA also peak: ``torch.cuda.max_memory_allocated`` over the run minus the model, its
  gradients and the base optimizer's state (measured before the wrapper is built), which
  includes the transient copy during the outer step.

On a machine without CUDA there is no device memory to measure: the model is on the CPU, the
"device" is the CPU and both rows hold the same bytes there; the held column then shows what
the wrapper keeps, the same with and without offloading. About a minute on an idle 2-core CPU::

    python benchmarks/offload_memory.py
"""

from __future__ import annotations

import argparse
import time
from typing import Any

import torch
from torch import Tensor, nn

from local_sgd_optim import LocalSGDOptimizer

_OUTERS: dict[str, Any] = {
    "SGD nesterov": lambda ps: torch.optim.SGD(ps, lr=0.7, momentum=0.9, nesterov=True),
    "Adam": lambda ps: torch.optim.Adam(ps, lr=1e-3),
}


def _model(device: torch.device) -> nn.Module:
    torch.manual_seed(0)
    layers = [nn.Linear(1448, 1448) for _ in range(12)]
    return nn.Sequential(*layers).to(device)


def _held_by_device(opt: LocalSGDOptimizer) -> dict[str, int]:
    """Bytes of the outer optimizer's tensors (copy, its gradient, state), by device type."""
    outer = opt.outer_optimizer
    assert outer is not None
    tensors: list[Tensor] = []
    for group in outer.param_groups:
        for kept in group["params"]:
            tensors.append(kept)
            if kept.grad is not None:
                tensors.append(kept.grad)
            tensors += [v for v in outer.state[kept].values() if isinstance(v, Tensor)]
    held: dict[str, int] = {}
    for t in tensors:
        held[t.device.type] = held.get(t.device.type, 0) + t.numel() * t.element_size()
    return held


def _measure(outer: str, offload: bool, device: torch.device) -> dict[str, Any]:
    model = _model(device)
    base = torch.optim.SGD(model.parameters(), lr=1e-3, momentum=0.9)
    x = torch.randn(16, 1448, device=device)
    model(x).square().mean().backward()
    base.step()  # the base optimizer's state exists before we measure from here
    base.zero_grad(set_to_none=False)
    cuda = device.type == "cuda"
    if cuda:
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        before = torch.cuda.memory_allocated()
    opt = LocalSGDOptimizer(
        base, model, period=2, outer_optimizer=_OUTERS[outer], cpu_offload=offload
    )
    began = time.perf_counter()
    for _ in range(6):  # three rounds
        model(x).square().mean().backward()
        opt.step()
        opt.zero_grad(set_to_none=False)
    if cuda:
        torch.cuda.synchronize()
    seconds = time.perf_counter() - began
    result = {
        "params": sum(p.numel() for p in model.parameters()),
        "held": _held_by_device(opt),
        "seconds": seconds,
        "rounds": opt.averaging_rounds,
    }
    if cuda:
        result["peak"] = torch.cuda.max_memory_allocated() - before
        result["after"] = torch.cuda.memory_allocated() - before
    return result


def _mib(n: int) -> str:
    return f"{n / 2**20:8.1f}"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    device = torch.device(parser.parse_args().device)
    rows = []
    for outer in _OUTERS:
        for offload in (False, True):
            rows.append((outer, offload, _measure(outer, offload, device)))
    params = rows[0][2]["params"]
    print(
        f"device: {device}, model: {params / 1e6:.1f}M fp32 parameters "
        f"({_mib(4 * params).strip()} MiB), 3 rounds of period 2, one rank"
    )
    header = f"{'outer':<14}{'cpu_offload':>12}{'held on device MiB':>20}{'held on CPU MiB':>17}"
    if device.type == "cuda":
        header += f"{'peak MiB':>10}{'after MiB':>11}"
    header += f"{'time s':>8}"
    print(header)
    for outer, offload, r in rows:
        on_device = r["held"].get(device.type, 0)
        on_cpu = r["held"].get("cpu", 0)
        line = f"{outer:<14}{offload!s:>12}{_mib(on_device):>20}{_mib(on_cpu):>17}"
        if device.type == "cuda":
            line += f"{_mib(r['peak']):>10}{_mib(r['after']):>11}"
        line += f"{r['seconds']:>8.2f}"
        print(line)
    if device.type == "cpu":
        print("(on CPU the parameters' device is the CPU: both columns are the same memory)")


if __name__ == "__main__":
    main()
