"""Run every (method, seed) of a convergence benchmark on gloo ranks spawned once.

Shared by ``convergence_digits.py`` and ``convergence_lm.py``: each passes its module-level
``train(method, seed, hyper) -> dict`` and gets back, per run, every rank's dict.
"""

from __future__ import annotations

import json
import os
import tempfile
from datetime import timedelta
from typing import Any, Callable

import torch
import torch.distributed as dist
import torch.multiprocessing as mp

Train = Callable[[str, int, Any], dict[str, Any]]
Progress = Callable[[str, int, dict[str, Any]], str]


def _worker(
    rank: int,
    world_size: int,
    init_file: str,
    out: str,
    train: Train,
    runs: list[tuple[str, int]],
    hyper: Any,
    progress: Progress | None,
) -> None:
    torch.set_num_threads(1)  # the ranks share the machine's cores
    dist.init_process_group(
        "gloo",
        init_method=f"file://{init_file}",
        rank=rank,
        world_size=world_size,
        timeout=timedelta(seconds=300),
    )
    try:
        results = []
        for method, seed in runs:
            mine = train(method, seed, hyper)
            everyone: list[Any] = [None] * world_size
            dist.all_gather_object(everyone, mine)
            results.append(everyone)
            if rank == 0 and progress is not None:
                print(progress(method, seed, mine), flush=True)
        if rank == 0:
            with open(out, "w") as f:
                json.dump(results, f)
        # Avoids torch 2.14's exit-time gloo abort (docs/mixed-precision-and-faults.md).
        dist.barrier()
    finally:
        dist.destroy_process_group()


def run_all(
    train: Train,
    methods: list[str],
    seeds: list[int],
    hyper: Any,
    world_size: int,
    progress: Progress | None = None,
) -> list[list[dict[str, Any]]]:
    """Spawn ``world_size`` gloo ranks and train every (method, seed); the per-rank results."""
    runs = [(m, s) for s in seeds for m in methods]
    with tempfile.TemporaryDirectory(prefix="convergence_") as tmp:
        out = os.path.join(tmp, "results.json")
        args = (world_size, os.path.join(tmp, "store"), out, train, runs, hyper, progress)
        mp.spawn(_worker, args=args, nprocs=world_size, join=True)
        with open(out) as f:
            result: list[list[dict[str, Any]]] = json.load(f)
            return result
