"""One replica group's process for tests/test_fault_tolerance.py: trains a tiny model with
``LocalSGDOptimizer(..., fault_tolerance=manager)`` on a torchft Manager, and appends one JSON
line per committed round to ``<dir>/log_<replica>_<group rank>.jsonl``.

The test drives it through files in ``<dir>``: every replica waits for ``start`` before it
builds its optimizer (unless ``--join``); it waits between steps while ``hold`` exists; it
trains until the step written in ``finish`` (or ``--steps``); and ``pause_<replica>`` makes it
stop at the start of its next round's collectives (after writing ``paused_<replica>``), for
the test to kill it there.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import time
from collections.abc import Callable
from datetime import timedelta
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn

import local_sgd_optim.rounds
from local_sgd_optim import LocalSGDOptimizer, RoundError


def digest(value: Any, skip: frozenset[str] = frozenset({"stats"})) -> str:
    """A hash of every tensor's bytes and every plain value in ``value`` (stats left out: they
    hold each replica's own timings)."""
    h = hashlib.sha256()

    def walk(v: Any) -> None:
        if isinstance(v, Tensor):
            h.update(str((v.dtype, tuple(v.shape))).encode())
            h.update(v.detach().cpu().contiguous().view(torch.uint8).numpy().tobytes())
        elif isinstance(v, dict):
            for k in sorted(v, key=str):
                if k not in skip:
                    h.update(str(k).encode())
                    walk(v[k])
        elif isinstance(v, (list, tuple)):
            for item in v:
                walk(item)
        else:
            h.update(repr(v).encode())

    walk(value)
    return h.hexdigest()[:16]


def flat(model: nn.Module) -> list[float]:
    return torch.cat([p.detach().reshape(-1) for p in model.parameters()]).tolist()


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--replica", type=int, required=True)
    parser.add_argument("--dir", required=True)
    parser.add_argument("--lighthouse", required=True)
    parser.add_argument("--steps", type=int, default=1000)
    parser.add_argument("--period", type=int, default=4)
    parser.add_argument("--step-sleep", type=float, default=0.02)
    parser.add_argument("--timeout", type=float, default=3.0)
    parser.add_argument("--quorum-timeout", type=float, default=10.0)
    parser.add_argument("--min-replicas", type=int, default=1)
    parser.add_argument("--comm-dtype", default="")
    parser.add_argument("--outer", action="store_true")
    parser.add_argument("--join", action="store_true", help="a restart: no start barrier")
    parser.add_argument("--incarnation", type=int, default=0, help="how many starts before")
    args = parser.parse_args()
    from torchft import Manager, ProcessGroupGloo

    work = Path(args.dir)
    group_rank = int(os.environ.get("RANK", "0"))
    group_size = int(os.environ.get("WORLD_SIZE", "1"))
    name = f"{args.replica}_{group_rank}"
    if group_size > 1:  # torchrun's agent store serves the replica group
        store_addr, store_port = os.environ["MASTER_ADDR"], int(os.environ["MASTER_PORT"])
    else:
        store = torch.distributed.TCPStore("127.0.0.1", 0, is_master=True, wait_for_workers=False)
        store_addr, store_port = "127.0.0.1", store.port
    timeout = timedelta(seconds=args.timeout)
    manager = Manager(
        pg=ProcessGroupGloo(timeout=timeout),
        load_state_dict=None,
        state_dict=None,
        min_replica_size=args.min_replicas,
        use_async_quorum=False,
        timeout=timeout,
        quorum_timeout=timedelta(seconds=args.quorum_timeout),
        connect_timeout=timedelta(seconds=10),
        rank=group_rank,
        world_size=group_size,
        store_addr=store_addr,
        store_port=store_port,
        lighthouse_addr=args.lighthouse,
        replica_id=f"replica_{args.replica}",
    )
    (work / f"ready_{name}").write_text(str(os.getpid()))
    while not args.join and not (work / "start").exists():
        time.sleep(0.02)

    # Each attempt of a round records the state it starts from; the pause hook stops there.
    attempts: list[str] = []
    run = local_sgd_optim.rounds.Rounds.run

    def recorded_run(self: Any, *a: Any, **k: Any) -> None:
        # What a round changes: the model, the 16-bit anchors, the outer optimizer's state.
        attempts.append(digest({"model": model.state_dict(), "rounds": self.state_tensors()}))
        if (work / f"pause_{args.replica}").exists():
            (work / f"paused_{args.replica}").touch()
            time.sleep(60)
        run(self, *a, **k)

    local_sgd_optim.rounds.Rounds.run = recorded_run  # type: ignore[method-assign]

    torch.manual_seed(1234)  # every replica builds the same model; data differs
    model = nn.Sequential(nn.Linear(8, 16), nn.Tanh(), nn.Linear(16, 1))
    base = torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9)
    options: dict[str, Any] = {"bucket_cap_mb": 256 / 2**20}  # several buckets of 256 bytes
    if args.comm_dtype:
        options["comm_dtype"] = getattr(torch, args.comm_dtype, args.comm_dtype)
    if args.outer:
        options["outer_optimizer"] = lambda ps: torch.optim.SGD(
            ps, lr=0.7, momentum=0.9, nesterov=True
        )
    log = work / f"log_{name}.jsonl"

    def record(event: str, **fields: Any) -> None:
        fields.update(
            event=event,
            incarnation=args.incarnation,
            step=opt.optimizer_steps,
            rounds=opt.averaging_rounds,
            size=opt.world_size,
            torchft_step=manager.current_step(),
            digest=digest({"model": model.state_dict(), "opt": opt.state_dict()}),
            wall=time.time(),
        )
        with log.open("a") as f:
            f.write(json.dumps(fields) + "\n")

    began = time.perf_counter()
    opt = LocalSGDOptimizer(base, model, period=args.period, fault_tolerance=manager, **options)
    record("built", seconds=time.perf_counter() - began, attempts=attempts, after=flat(model))
    try:
        train(args, work, model, opt, attempts, record)
    except RoundError as error:
        with (work / f"error_{name}.json").open("w") as f:
            json.dump({"wall": time.time(), "error": str(error)}, f)
        raise
    manager.shutdown(wait=False)


def train(
    args: argparse.Namespace,
    work: Path,
    model: nn.Module,
    opt: LocalSGDOptimizer,
    attempts: list[str],
    record: Callable[..., None],
) -> None:
    """Steps until the step in ``finish`` (or ``--steps``), logging each committed round."""
    group_rank = int(os.environ.get("RANK", "0"))
    generator = torch.Generator().manual_seed(100 * args.replica + group_rank + int(time.time()))
    target = torch.linspace(-1, 1, 8).unsqueeze(1)

    def final() -> int:
        finish = work / "finish"
        return int(finish.read_text()) if finish.exists() else args.steps

    while opt.optimizer_steps < final():
        while (work / "hold").exists():
            time.sleep(0.01)
        x = torch.randn(32, 8, generator=generator)
        loss = (model(x) - x @ target).pow(2).mean()
        loss.backward()
        rounds = opt.averaging_rounds
        attempts.clear()
        began = time.perf_counter()
        opt.step()
        seconds = time.perf_counter() - began
        opt.zero_grad()
        if opt.averaging_rounds != rounds:
            record("round", seconds=seconds, attempts=attempts, after=flat(model))
        time.sleep(args.step_sleep)
    opt.close()
    record("done", loss=float(loss))


if __name__ == "__main__":
    main()
