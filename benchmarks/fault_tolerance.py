"""Benchmark: a round through torchft's quorum, ours against torchft's ``LocalSGD`` and ``DiLoCo``.

Two replica groups of one process each (this script with ``--replica``), a lighthouse, and a
fresh torchft ``Manager`` per method, all on one host over gloo. Each method averages a
70-tensor, 9.2M-parameter MLP (35 ``Linear(512, 512)``), and each round includes what the
method does around its collectives (a quorum, a commit, copies):

- floor: one all-reduce of a preallocated flat fp32 buffer of the model's size on the
  Manager's process group, after a quorum (the quorum not timed);
- quorum + commit: ``start_quorum()`` and ``should_commit()`` alone, no collective;
- torchft ``LocalSGD.sync()`` (one all-reduce per tensor), and torchft ``DiLoCo`` with
  ``sync_every=1`` (an inner step that syncs, less the inner step's own median time), without
  and with its bucketization;
- ours: ``LocalSGDOptimizer(..., fault_tolerance=manager).average()`` in fp32, bf16 and int8,
  and with DiLoCo's Nesterov outer step (``diloco()``) in fp32 and bf16; and, for what the
  quorum adds, the fp32 round on a fixed gloo group of the same two processes, without fault
  tolerance.

Methods run one after another (each needs a Manager of its own); the table shows the median of
``--rounds`` rounds after 3 warm-up rounds, and each as a multiple of the floor. About two
minutes on 2 cores::

    python benchmarks/fault_tolerance.py
    python benchmarks/fault_tolerance.py --rounds 20
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from datetime import timedelta
from pathlib import Path
from typing import Any

import torch
from torch import nn

_HERE = os.path.dirname(os.path.abspath(__file__))
sys.path[:0] = [_HERE, os.path.dirname(_HERE)]

from _common import machine  # noqa: E402

METHODS = [
    "floor",
    "quorum + commit",
    "torchft LocalSGD",
    "torchft DiLoCo",
    "torchft DiLoCo, buckets",
    "ours fp32",
    "ours bf16",
    "ours int8",
    "ours DiLoCo fp32",
    "ours DiLoCo bf16",
    "ours fp32, fixed group",
]


def _model() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(*[nn.Linear(512, 512) for _ in range(35)])


def _median_ms(run: Callable[[], None], rounds: int, warmup: int = 3) -> float:
    times = []
    for i in range(warmup + rounds):
        began = time.perf_counter()
        run()
        if i >= warmup:
            times.append(time.perf_counter() - began)
    return 1e3 * statistics.median(times)


def _measure(method: str, manager: Any, rounds: int) -> float:
    from torch.distributed.distributed_c10d import AllreduceOptions
    from torchft.local_sgd import DiLoCo, LocalSGD

    from local_sgd_optim import LocalSGDOptimizer, diloco

    model = _model()
    inner = torch.optim.SGD(model.parameters(), lr=1e-3)
    if method == "floor":
        flat = torch.zeros(sum(p.numel() for p in model.parameters()))
        manager.start_quorum()
        pg = manager._pg
        ms = _median_ms(lambda: pg.allreduce([flat], AllreduceOptions()).wait(), rounds)
        manager.should_commit()
        return ms
    if method == "quorum + commit":
        return _median_ms(lambda: (manager.start_quorum(), manager.should_commit()), rounds)
    if method == "torchft LocalSGD":
        local_sgd = LocalSGD(manager, model, inner, sync_every=1)
        return _median_ms(local_sgd.sync, rounds)
    if method.startswith("torchft DiLoCo"):
        for p in model.parameters():
            p.grad = torch.zeros_like(p)
        step_alone = _median_ms(inner.step, rounds)
        outer = torch.optim.SGD(model.parameters(), lr=0.7, momentum=0.9, nesterov=True)
        buckets = method.endswith("buckets")
        with DiLoCo(manager, [model], inner, outer, sync_every=1, use_bucketization=buckets):
            return _median_ms(inner.step, rounds) - step_alone
    options: dict[str, Any] = {"average_buffers": False}
    if "bf16" in method:
        options["comm_dtype"] = torch.bfloat16
    if "int8" in method:
        options["comm_dtype"] = "int8"
    if "DiLoCo" in method:
        options["outer_optimizer"] = diloco()
    if method.endswith("fixed group"):
        opt = LocalSGDOptimizer(inner, model, period=10**6, **options)
    else:
        opt = LocalSGDOptimizer(inner, model, period=10**6, fault_tolerance=manager, **options)
    return _median_ms(opt.average, rounds)


def replica(index: int, lighthouse: str, out: Path, rounds: int) -> None:
    from torchft import Manager, ProcessGroupGloo

    torch.set_num_threads(1)
    store = torch.distributed.TCPStore("127.0.0.1", 0, is_master=True, wait_for_workers=False)
    # The fixed group of the last method, without fault tolerance.
    init = f"file://{out.parent / 'group'}"
    torch.distributed.init_process_group("gloo", init_method=init, rank=index, world_size=2)
    results = {}
    for method in METHODS:
        manager = Manager(
            pg=ProcessGroupGloo(timeout=timedelta(seconds=60)),
            load_state_dict=None,
            state_dict=None,
            min_replica_size=2,
            use_async_quorum=False,
            timeout=timedelta(seconds=60),
            quorum_timeout=timedelta(seconds=120),
            rank=0,
            world_size=1,
            store_addr="127.0.0.1",
            store_port=store.port,
            lighthouse_addr=lighthouse,
            replica_id=f"replica_{index}_{METHODS.index(method)}",
            init_sync=False,  # both build the same model: no state to send at the start
        )
        if not method.startswith("ours"):  # ours registers its own state
            manager.register_state_dict_fn("unused", lambda _: None, lambda: {})
        results[method] = _measure(method, manager, rounds)
        manager.shutdown(wait=False)
    out.write_text(json.dumps(results))


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--rounds", type=int, default=10)
    parser.add_argument("--replica", type=int)
    parser.add_argument("--lighthouse")
    parser.add_argument("--out")
    args = parser.parse_args()
    if args.replica is not None:
        replica(args.replica, args.lighthouse, Path(args.out), args.rounds)
        return
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    binary = shutil.which("torchft_lighthouse")
    binary = binary or str(Path(sys.executable).parent / "torchft_lighthouse")
    lighthouse = subprocess.Popen(
        [
            binary,
            "--min_replicas",
            "2",
            "--quorum_tick_ms",
            "100",
            "--join_timeout_ms",
            "60000",
            "--heartbeat_timeout_ms",
            "1000",
            "--bind",
            f"[::]:{port}",
        ],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    work = Path(tempfile.mkdtemp())
    env = {**os.environ, "OMP_NUM_THREADS": "1", "CUDA_VISIBLE_DEVICES": ""}
    try:
        procs = [
            subprocess.Popen(
                [
                    sys.executable,
                    sys.argv[0],
                    "--replica",
                    str(i),
                    "--rounds",
                    str(args.rounds),
                    "--lighthouse",
                    f"http://localhost:{port}",
                    "--out",
                    str(work / f"{i}.json"),
                ],
                env=env,
                stdout=(work / f"{i}.log").open("wb"),
                stderr=subprocess.STDOUT,
            )
            for i in range(2)
        ]
        for i, p in enumerate(procs):
            if p.wait() != 0:
                raise SystemExit(f"replica {i} failed (exit {p.returncode}): see {work}/{i}.log")
    finally:
        lighthouse.kill()
    results = [json.loads((work / f"{i}.json").read_text()) for i in range(2)]
    floor = max(r["floor"] for r in results)
    print(f"{machine()}; 2 replica groups of 1 process, gloo, median of {args.rounds} rounds\n")
    print("| method | ms per round (replica 0 / 1) | x floor |")
    print("|---|---|---|")
    for method in METHODS:
        ms = [r[method] for r in results]
        print(f"| {method} | {ms[0]:.1f} / {ms[1]:.1f} | {max(ms) / floor:.2f} |")


if __name__ == "__main__":
    main()
