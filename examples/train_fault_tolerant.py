"""Local SGD (or DiLoCo) that survives a dead replica group: torchft's lighthouse and Manager.

One lighthouse for the job, then one ``torchrun`` per replica group (here 2 groups of 1 process
on one CPU host; kill one with ``kill -9`` and the other trains on; start it again and it
catches up from the live one)::

    torchft_lighthouse --min_replicas 1 --quorum_tick_ms 100 --join_timeout_ms 10000 \\
        --heartbeat_timeout_ms 2000 &
    export TORCHFT_LIGHTHOUSE=http://localhost:29510
    REPLICA_GROUP_ID=0 torchrun --standalone --nproc_per_node 1 \\
        examples/train_fault_tolerant.py --steps 400 &
    REPLICA_GROUP_ID=1 torchrun --standalone --nproc_per_node 1 \\
        examples/train_fault_tolerant.py --steps 400

On GPUs, each group's ranks train on their own GPU (``LOCAL_RANK``) and the groups average
over NCCL (``torchft.ProcessGroupNCCL``); ``--diloco`` adds the Nesterov outer step. Each
process prints its loss every 50 steps and a ``done:`` line. More: docs/fault-tolerance.md.
"""

from __future__ import annotations

import argparse
import os
import time
from datetime import timedelta

import torch
from torch import nn

from local_sgd_optim import LocalSGDOptimizer, diloco


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=400)
    parser.add_argument("--period", type=int, default=8)
    parser.add_argument("--diloco", action="store_true", help="Nesterov outer step (DiLoCo)")
    parser.add_argument("--step-seconds", type=float, default=0.01, help="sleep per step")
    args = parser.parse_args()
    from torchft import Manager, ProcessGroupGloo, ProcessGroupNCCL

    if torch.cuda.is_available():
        device = torch.device("cuda", int(os.environ.get("LOCAL_RANK", "0")))
        torch.cuda.set_device(device)
        pg = ProcessGroupNCCL(timeout=timedelta(seconds=10))
    else:
        device = torch.device("cpu")
        pg = ProcessGroupGloo(timeout=timedelta(seconds=10))
    # torchrun's store (MASTER_ADDR, MASTER_PORT), RANK and WORLD_SIZE describe this replica
    # group; TORCHFT_LIGHTHOUSE names the lighthouse.
    manager = Manager(
        pg=pg,
        load_state_dict=None,
        state_dict=None,
        min_replica_size=1,
        use_async_quorum=False,  # a replica behind the others catches up before its round
        timeout=timedelta(seconds=10),
        quorum_timeout=timedelta(seconds=60),  # above the time between two rounds
        replica_id=f"group_{os.environ.get('REPLICA_GROUP_ID', '0')}",
    )
    torch.manual_seed(0)  # the model; the data differs per replica group and rank
    model = nn.Sequential(nn.Linear(32, 64), nn.Tanh(), nn.Linear(64, 1)).to(device)
    base = torch.optim.AdamW(model.parameters(), lr=1e-3)
    outer = {"outer_optimizer": diloco()} if args.diloco else {}
    opt = LocalSGDOptimizer(base, model, period=args.period, fault_tolerance=manager, **outer)
    seed = int(os.environ.get("REPLICA_GROUP_ID", "0")) * 1000 + int(os.environ.get("RANK", "0"))
    generator = torch.Generator().manual_seed(seed)
    target = torch.linspace(-1, 1, 32, device=device).unsqueeze(1)
    while opt.optimizer_steps < args.steps:  # a replica that caught up starts further on
        x = torch.randn(64, 32, generator=generator).to(device)
        loss = (model(x) - x @ target).pow(2).mean()
        loss.backward()
        opt.step()
        opt.zero_grad()
        if opt.optimizer_steps % 50 == 0:
            print(f"step {opt.optimizer_steps} loss {loss.item():.4f} replicas {opt.world_size}")
        time.sleep(args.step_seconds)  # a stand-in for a real step's compute
    opt.close()
    rounds = opt.averaging_rounds
    print(f"done: {opt.optimizer_steps} steps, {rounds} rounds, loss {loss.item():.4f}")
    manager.shutdown(wait=False)


if __name__ == "__main__":
    main()
