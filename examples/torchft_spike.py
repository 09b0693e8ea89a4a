"""Feasibility spike: plain torchft (no local_sgd_optim), 3 replica groups of 1 process, gloo.

What it answers, printed as it runs:

- how to run a collective of our own on the Manager's reconfigurable process group
  (``dist.all_reduce(t, group=pg, async_op=True)``, ``pg.allreduce``, all-gather, all-to-all,
  broadcast) with no ``init_process_group`` at all, and what ``pg.rank()`` / ``pg.size()`` say;
- what a quorum looks like (``participating_rank``, ``num_participants``) after a SIGKILL;
- how healing moves state: the state-dict callback of a live peer, over HTTP.

Command (about 40 s on 2 cores)::

    python examples/torchft_spike.py

It starts ``torchft_lighthouse``, 3 replicas (this script with ``--replica i``), SIGKILLs
replica 2 between rounds, restarts it, and prints each replica's round times.
"""

from __future__ import annotations

import argparse
import os
import signal
import socket
import subprocess
import sys
import tempfile
import time
from datetime import timedelta

import torch
import torch.distributed as dist
from torch import nn
from torch.distributed.distributed_c10d import AllgatherOptions


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _probe(pg: dist.ProcessGroup, rank: int, size: int) -> list[str]:
    """Try each collective our averager uses on torchft's group; what worked and what did not."""
    results = []

    def attempt(name: str, run: object) -> None:
        try:
            value = run()  # type: ignore[operator]
            results.append(f"{name}: ok {value}")
        except Exception as e:
            results.append(f"{name}: FAILED {type(e).__name__}: {str(e).splitlines()[0][:120]}")

    attempt("pg.rank(), pg.size()", lambda: (pg.rank(), pg.size()))
    attempt("pg.parent.rank()", lambda: pg.parent.rank())  # type: ignore[attr-defined]
    attempt("dist.get_world_size(pg)", lambda: dist.get_world_size(pg))
    attempt("dist.get_rank(pg)", lambda: dist.get_rank(pg))
    attempt("dist.get_backend(pg)", lambda: dist.get_backend(pg))
    attempt("pg.name()", lambda: pg.name())

    def all_reduce() -> float:
        t = torch.full((4,), float(rank + 1))
        work = dist.all_reduce(t, group=pg, async_op=True)
        assert work is not None
        work.wait()
        return float(t[0])

    attempt("dist.all_reduce(async)", all_reduce)

    def all_gather_into_tensor() -> list[float]:
        out = torch.empty(size * 2)
        dist.all_gather_into_tensor(out, torch.full((2,), float(rank)), group=pg)
        return out.tolist()

    attempt("dist.all_gather_into_tensor", all_gather_into_tensor)

    def all_gather_list() -> list[float]:
        out = torch.empty(size * 2)
        work = pg.allgather(
            [list(out.chunk(size))], [torch.full((2,), float(rank))], AllgatherOptions()
        )
        work.wait()
        return out.tolist()

    attempt("pg.allgather(list of views)", all_gather_list)

    def all_to_all() -> list[float]:
        out = torch.empty(size)
        dist.all_to_all_single(out, torch.full((size,), float(rank)), group=pg)
        return out.tolist()

    attempt("dist.all_to_all_single", all_to_all)

    def broadcast() -> float:
        t = torch.full((2,), float(rank))
        dist.broadcast(t, group=pg, group_src=0)
        return float(t[0])

    attempt("dist.broadcast(group_src=0)", broadcast)
    return results


def replica(index: int, lighthouse: str, steps: int, period: int, progress: str) -> None:
    from torchft import Manager, ProcessGroupGloo

    torch.manual_seed(index)
    model = nn.Linear(8, 1)
    opt = torch.optim.SGD(model.parameters(), lr=0.05)
    healed = []

    def load(state: dict[str, object]) -> None:
        model.load_state_dict(state["model"])  # type: ignore[arg-type]
        opt.load_state_dict(state["optim"])  # type: ignore[arg-type]
        healed.append(True)

    def save() -> dict[str, object]:
        return {"model": model.state_dict(), "optim": opt.state_dict()}

    store = dist.TCPStore("127.0.0.1", 0, is_master=True, wait_for_workers=False)
    pg = ProcessGroupGloo(timeout=timedelta(seconds=5))
    manager = Manager(
        pg=pg,
        load_state_dict=load,
        state_dict=save,
        min_replica_size=1,
        use_async_quorum=False,
        timeout=timedelta(seconds=5),
        quorum_timeout=timedelta(seconds=30),
        connect_timeout=timedelta(seconds=10),
        rank=0,
        world_size=1,
        store_addr="127.0.0.1",
        store_port=store.port,
        lighthouse_addr=lighthouse,
        replica_id=f"replica_{index}",
    )
    print(f"[{index}] manager up", flush=True)
    probed = False
    for step in range(1, steps + 1):
        x = torch.randn(16, 8)
        loss = (model(x) - x.sum(1, keepdim=True)).pow(2).mean()
        opt.zero_grad()
        loss.backward()
        opt.step()
        time.sleep(0.05)
        if step % period:
            continue
        began = time.perf_counter()
        manager.start_quorum()
        quorum = time.perf_counter() - began
        rank, size = manager.participating_rank(), manager.num_participants()
        # Every round runs the same collectives in the same order: replicas that meet in
        # mismatched collectives make gloo abort the process.
        probe = _probe(pg, rank or 0, size)
        if size > 1 and not probed:
            for line in probe:
                print(f"[{index}] probe {line}", flush=True)
            probed = True
        flat = torch.cat([p.detach().reshape(-1) for p in model.parameters()])
        work = dist.all_reduce(flat, group=pg, async_op=True)
        assert work is not None
        try:
            work.wait()
        except Exception as e:
            manager.report_error(e)
        commit = manager.should_commit()
        if commit:
            flat /= size
            torch.nn.utils.vector_to_parameters(flat, model.parameters())
        print(
            f"[{index}] step {step} manager_step {manager.current_step()} rank {rank}/{size} "
            f"healed {bool(healed)} commit {commit} quorum {quorum:.2f}s round "
            f"{time.perf_counter() - began:.2f}s loss {loss.item():.3f}",
            flush=True,
        )
        healed.clear()
        with open(os.path.join(progress, str(index)), "w") as f:
            f.write(str(manager.current_step()))
    manager.shutdown(wait=False)
    print(f"[{index}] done", flush=True)


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--replica", type=int)
    parser.add_argument("--lighthouse")
    parser.add_argument("--steps", type=int, default=120)
    parser.add_argument("--period", type=int, default=4)
    parser.add_argument("--progress")
    args = parser.parse_args()
    if args.replica is not None:
        replica(args.replica, args.lighthouse, args.steps, args.period, args.progress)
        return
    port = _free_port()
    lighthouse = subprocess.Popen(
        [
            "torchft_lighthouse",
            "--min_replicas",
            "1",
            "--quorum_tick_ms",
            "100",
            "--join_timeout_ms",
            "1000",
            "--heartbeat_timeout_ms",
            "2000",
            "--bind",
            f"[::]:{port}",
        ],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    address = f"http://localhost:{port}"
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    progress = tempfile.mkdtemp()

    def start(i: int) -> subprocess.Popen[bytes]:
        command = [
            sys.executable,
            __file__,
            "--replica",
            str(i),
            "--lighthouse",
            address,
            "--progress",
            progress,
        ]
        return subprocess.Popen(command, env=env)

    def steps_of(i: int) -> int:
        try:
            with open(os.path.join(progress, str(i))) as f:
                return int(f.read() or 0)
        except (FileNotFoundError, ValueError):
            return 0

    def wait_for(condition: object) -> None:
        while not condition():  # type: ignore[operator]
            time.sleep(0.05)

    replicas = [start(i) for i in range(3)]
    try:
        wait_for(lambda: min(steps_of(i) for i in range(3)) >= 3)
        print(f"--- SIGKILL replica 2 at {time.strftime('%X')}", flush=True)
        replicas[2].send_signal(signal.SIGKILL)
        replicas[2].wait()
        killed_at = steps_of(0)
        wait_for(lambda: steps_of(0) >= killed_at + 3)
        print("--- restart replica 2", flush=True)
        os.remove(os.path.join(progress, "2"))
        replicas[2] = start(2)
        for p in replicas:
            p.wait(timeout=120)
    finally:
        for p in replicas:
            if p.poll() is None:
                p.kill()
        lighthouse.kill()


if __name__ == "__main__":
    main()
