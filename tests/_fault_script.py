"""A small Local SGD training run with periodic checkpoints and an injectable fault.

Used by ``tests/test_faults.py``. Deterministic: each rank's batches come from generators seeded
by (rank, step); dropout, Python's ``random`` and NumPy add noise from the global generators,
whose states the checkpoints carry, so a resumed run repeats an uninterrupted one bit for bit::

    python -m torch.distributed.run --standalone --nproc_per_node 2 --max-restarts 1 \\
        tests/_fault_script.py --checkpoint-dir /tmp/ckpt --die-at-step 22 --die-rank 1

``--die-at-step N --die-rank R`` makes rank R kill itself (``--die-how kill``: SIGKILL,
``exit``: ``os._exit(1)``, ``stop``: SIGSTOP, a peer that hangs) when it reaches step N, once:
a marker file (``--die-marker``, default ``CHECKPOINT_DIR/died``) keeps a restarted attempt
alive. Every rank ends by printing ``RESULT {json}`` with a digest of its final parameters (and
writes them to ``--results-dir``); a rank that fails prints ``ERROR t=<unix time> <exception>``
to stderr before the traceback.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import random
import signal
import sys
import time
from datetime import timedelta
from pathlib import Path

import numpy as np
import torch
import torch.distributed as dist
from torch import nn

from local_sgd_optim import LocalSGDOptimizer, checkpoint


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    add = parser.add_argument
    add("--checkpoint-dir", type=Path, required=True)
    add("--steps", type=int, default=28)
    add("--period", type=int, default=4)
    add("--overlap-steps", type=int, default=0)
    add("--comm-dtype", choices=["bfloat16", "float16"], default=None)
    add("--checkpoint-every", type=int, default=5)
    add("--die-at-step", type=int, default=None)
    add("--die-rank", type=int, default=1)
    add("--die-how", choices=["kill", "exit", "stop"], default="kill")
    add("--die-marker", type=Path, default=None)
    add("--pg-timeout", type=float, default=20.0, help="process group timeout, seconds")
    add("--init-file", default=None, help="file:// rendezvous; RANK, WORLD_SIZE from the env")
    add("--results-dir", type=Path, default=None, help="write rank{R}.json with the parameters")
    return parser.parse_args()


def batch(rank: int, step: int) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(1000 * rank + step)
    x = torch.randn(16, 8, generator=g)
    y = torch.randint(0, 4, (16,), generator=g)
    # Noise from the global generators: a resume must restore their states to repeat this.
    x = x + random.gauss(0.0, 0.1) + float(np.random.normal(0.0, 0.1))
    return x, y


def die(how: str, rank: int, step: int, marker: Path) -> None:
    marker.parent.mkdir(parents=True, exist_ok=True)
    marker.write_text(f"rank {rank} step {step}\n")
    print(f"DYING rank={rank} step={step} pid={os.getpid()} t={time.time():.3f}", flush=True)
    sys.stderr.flush()
    if how == "exit":
        os._exit(1)
    os.kill(os.getpid(), signal.SIGSTOP if how == "stop" else signal.SIGKILL)


def main() -> None:
    args = parse_args()
    torch.set_num_threads(1)
    timeout = timedelta(seconds=args.pg_timeout)
    if args.init_file:
        dist.init_process_group(
            "gloo",
            init_method=f"file://{args.init_file}",
            rank=int(os.environ["RANK"]),
            world_size=int(os.environ["WORLD_SIZE"]),
            timeout=timeout,
        )
    else:
        dist.init_process_group("gloo", timeout=timeout)
    rank, world_size = dist.get_rank(), dist.get_world_size()
    marker = args.die_marker or args.checkpoint_dir / "died"

    torch.manual_seed(0)
    model = nn.Sequential(
        nn.Linear(8, 32), nn.BatchNorm1d(32), nn.ReLU(), nn.Dropout(0.2), nn.Linear(32, 4)
    )
    base = torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9)
    opt = LocalSGDOptimizer(
        base,
        model,
        period=args.period,
        overlap_steps=args.overlap_steps,
        comm_dtype=getattr(torch, args.comm_dtype) if args.comm_dtype else None,
    )
    scheduler = torch.optim.lr_scheduler.StepLR(opt, step_size=10, gamma=0.5)
    random.seed(1 + rank)
    np.random.seed(2 + rank)
    torch.manual_seed(3 + rank)  # dropout differs by rank

    start = 0
    found = checkpoint.latest(args.checkpoint_dir)
    if found is not None:
        state = checkpoint.load(found[1])
        model.load_state_dict(state["model"])
        opt.load_state_dict(state["optimizer"])
        scheduler.load_state_dict(state["scheduler"])
        checkpoint.set_rng_state(state["rng"])
        start = state["step"]
        print(f"RESUMED rank={rank} step={start} from={found[1]}", flush=True)

    with opt:
        for step in range(start, args.steps):
            if step == args.die_at_step and rank == args.die_rank and not marker.exists():
                die(args.die_how, rank, step, marker)
            x, y = batch(rank, step)
            nn.functional.cross_entropy(model(x), y).backward()
            opt.step()
            opt.zero_grad()
            scheduler.step()
            if (step + 1) % args.checkpoint_every == 0:
                checkpoint.save(
                    args.checkpoint_dir,
                    step + 1,
                    {
                        "model": model.state_dict(),
                        "optimizer": opt.state_dict(),
                        "scheduler": scheduler.state_dict(),
                        "rng": checkpoint.rng_state(),
                        "step": step + 1,
                    },
                )

    flat = torch.cat([t.detach().reshape(-1) for t in model.state_dict().values()]).double()
    result = {
        "rank": rank,
        "world_size": world_size,
        "start": start,
        "optimizer_steps": opt.optimizer_steps,
        "averaging_rounds": opt.averaging_rounds,
        "sha256": hashlib.sha256(flat.numpy().tobytes()).hexdigest(),
    }
    if args.results_dir is not None:
        args.results_dir.mkdir(parents=True, exist_ok=True)
        path = args.results_dir / f"rank{rank}.json"
        path.write_text(json.dumps({**result, "params": flat.tolist()}))
    # One short line, written at once: lines from several ranks do not interleave.
    print("RESULT " + json.dumps(result), flush=True)
    # torch 2.14's gloo can abort at exit without this (pytorch/pytorch#179291).
    dist.barrier()
    dist.destroy_process_group()


if __name__ == "__main__":
    try:
        main()
    except Exception as exc:
        print(f"ERROR t={time.time():.3f} {type(exc).__name__}: {exc}", file=sys.stderr, flush=True)
        raise
    # Finished: leave without interpreter finalisation, where torch 2.14's gloo can still abort
    # a process whose work is done (pytorch/pytorch#179291, about 1 run in 8 here under load).
    sys.stdout.flush()
    os._exit(0)
