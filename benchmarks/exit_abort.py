"""How often a finished 2-rank gloo job exits uncleanly, for each way of ending the script.

Each run starts two fresh Python processes (rank 0 hosts the TCP store, as with
``--standalone``), each wraps a tiny model in :class:`~local_sgd_optim.LocalSGDOptimizer`, trains
a few rounds, closes the optimizer, and then ends the way the variant says:

- ``before``: ``dist.barrier()`` then ``dist.destroy_process_group()``, what the examples did.
- ``after``: the ending the README recommends now: ``del opt`` and ``gc.collect()`` (nothing
  of the wrapper or its buffers left for interpreter shutdown to free), then the barrier and
  ``dist.destroy_process_group()``, then ``gc.collect()`` again.

A run is unclean when a rank's exit status is not 0 (SIGABRT is -6) or its stderr holds
"terminate called". The training itself must succeed in every run (each rank prints ``ok``); a
run where it does not is counted apart, as a failure of the job rather than of its exit. Both
variants end with ``close()``, so both include what ``close()`` lets go of; the table's first
line names the machine, Python and torch, for quoting the figures.

Run it (3 to 10 s per job on 2 shared cores)::

    python benchmarks/exit_abort.py --runs 50
"""

from __future__ import annotations

import argparse
import os
import platform
import socket
import subprocess
import sys
import tempfile
import time

_WORKER = r"""
import os, sys
import torch
import torch.distributed as dist
from torch import nn
from local_sgd_optim import LocalSGDOptimizer

variant = sys.argv[1]
torch.set_num_threads(1)
dist.init_process_group("gloo")
rank = dist.get_rank()
torch.manual_seed(rank)
model = nn.Sequential(nn.Linear(16, 32), nn.BatchNorm1d(32), nn.ReLU(), nn.Linear(32, 4))
opt = LocalSGDOptimizer(torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9), model, period=4)
with opt:
    for _ in range(24):
        x = torch.randn(32, 16)
        nn.functional.cross_entropy(model(x), x[:, :4].argmax(dim=1)).backward()
        opt.step()
        opt.zero_grad()
print("ok", flush=True)
if variant == "before":
    dist.barrier()
    dist.destroy_process_group()
else:
    import gc
    del opt  # the wrapper, its buffers and anything it holds of the process group
    gc.collect()
    dist.barrier()
    dist.destroy_process_group()
    gc.collect()
"""


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _machine() -> str:
    """The CPU, core count, Python and torch this runs on."""
    import torch

    cpu = platform.processor() or platform.machine()
    try:
        with open("/proc/cpuinfo") as f:
            cpu = next(line.split(":", 1)[1].strip() for line in f if line.startswith("model name"))
    except (OSError, StopIteration):
        pass
    python = platform.python_version()
    return f"{cpu}, {os.cpu_count()} cores; Python {python}, torch {torch.__version__}, gloo"


def run_once(variant: str, script: str, timeout: float) -> str:
    """One 2-rank job: ``"clean"``, ``"unclean"`` (its exit) or ``"failed"`` (its training)."""
    port = _free_port()
    procs = []
    for rank in range(2):
        env = dict(
            os.environ,
            RANK=str(rank),
            LOCAL_RANK=str(rank),
            WORLD_SIZE="2",
            LOCAL_WORLD_SIZE="2",
            MASTER_ADDR="127.0.0.1",
            MASTER_PORT=str(port),
            OMP_NUM_THREADS="1",
        )
        procs.append(
            subprocess.Popen(
                [sys.executable, script, variant],
                env=env,
                stdout=subprocess.PIPE,
                stderr=subprocess.PIPE,
                text=True,
            )
        )
    outcome = "clean"
    for p in procs:
        try:
            out, err = p.communicate(timeout=timeout)
        except subprocess.TimeoutExpired:
            p.kill()
            out, err = p.communicate()
            return "failed"
        if "ok" not in out.split():
            return "failed"
        if p.returncode != 0 or "terminate called" in err:
            outcome = "unclean"
    return outcome


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--runs", type=int, default=50, help="jobs per variant")
    parser.add_argument("--timeout", type=float, default=120.0, help="seconds per job")
    parser.add_argument("--variants", nargs="+", default=["before", "after"])
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        script = os.path.join(tmp, "exit_worker.py")
        with open(script, "w") as f:
            f.write(_WORKER)
        counts = {v: {"clean": 0, "unclean": 0, "failed": 0} for v in args.variants}
        began = time.perf_counter()
        # Interleaved, so that a busy spell on the machine falls on both variants alike.
        for i in range(args.runs):
            for variant in args.variants:
                counts[variant][run_once(variant, script, args.timeout)] += 1
            print(
                f"\r{i + 1}/{args.runs} runs per variant, {time.perf_counter() - began:.0f} s",
                end="",
                file=sys.stderr,
                flush=True,
            )
        print(file=sys.stderr)
    print(_machine())
    print(f"{'variant':<8} {'runs':>5} {'unclean exits':>14} {'failed jobs':>12}")
    for variant, c in counts.items():
        total = sum(c.values())
        print(f"{variant:<8} {total:>5} {c['unclean']:>14} {c['failed']:>12}")


if __name__ == "__main__":
    main()
