"""Tests of train_minimal.py's training loop on 2 and 4 gloo ranks, on one CPU-only machine.

The ``ranks`` fixture comes from the plugin that ``conftest.py`` next to this file loads. Run them
with pytest, in worker processes kept for the session or with a torchrun launch per call::

    pytest examples/test_train_minimal.py
    pytest examples/test_train_minimal.py --ranks-launcher torchrun

They check that the ranks end identical after ``close()``, that rounds run every ``period``
steps and at the same step on every rank, and that a run resumed from a checkpoint ends bit for
bit where the uninterrupted run ends. See docs/testing.md.
"""

from __future__ import annotations

import os
from typing import Any

import pytest
import torch
import torch.distributed as dist
from torch import nn
from train_minimal import Teacher  # the script under test, next to this file

from local_sgd_optim import LocalSGDOptimizer
from local_sgd_optim.testing import (
    assert_counters_equal,
    assert_ranks_equal,
    assert_resumed_equal,
    counters_of,
)

PERIOD = 4
STEPS = 18  # not a multiple of PERIOD: close() has a final round to run


def train(
    steps: int, period: int = PERIOD, checkpoint_dir: str | None = None, stop_after: int = 0
) -> dict[str, Any]:
    """train_minimal.py's loop as a function that every rank runs; returns what the test checks.

    With ``checkpoint_dir``, each rank resumes from its own checkpoint there if there is one,
    saves one every 3 steps, and with ``stop_after`` stops early (a job that dies at that step).
    """
    rank = dist.get_rank()
    teacher = Teacher()
    data = torch.Generator().manual_seed(rank)  # each rank its own shard
    torch.manual_seed(rank)  # ranks start apart; the wrapper broadcasts rank 0's
    model = nn.Sequential(
        nn.Linear(teacher.features, 128), nn.BatchNorm1d(128), nn.ReLU(), nn.Linear(128, 10)
    )
    base = torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9)
    opt = LocalSGDOptimizer(base, model, period=period)
    scheduler = torch.optim.lr_scheduler.CosineAnnealingLR(opt, T_max=steps)

    start = 0
    path = os.path.join(checkpoint_dir, f"rank{rank}.pt") if checkpoint_dir else None
    if path is not None and os.path.exists(path):
        state = torch.load(path, weights_only=True)  # this rank's own state
        model.load_state_dict(state["model"])
        opt.load_state_dict(state["optimizer"])
        scheduler.load_state_dict(state["scheduler"])
        data.set_state(state["data"])
        start = state["step"]

    rounds_after = []  # the steps whose opt.step() ran an averaging round
    with opt:  # close(): a final averaging round on the way out
        for step in range(start + 1, steps + 1):
            x, y = teacher.batch(64, data)
            nn.functional.cross_entropy(model(x), y).backward()
            rounds = opt.averaging_rounds
            opt.step()
            opt.zero_grad()
            scheduler.step()
            if opt.averaging_rounds > rounds:
                rounds_after.append(step)
            if path is not None and step % 3 == 0:
                state = {
                    "model": model.state_dict(),
                    "optimizer": opt.state_dict(),  # this rank's momentum and progress
                    "scheduler": scheduler.state_dict(),
                    "data": data.get_state(),
                    "step": step,
                }
                torch.save(state, path)
            if step == stop_after:
                break
        before_close = [p.detach().clone() for p in model.parameters()]
    return {
        "before_close": before_close,
        "model": model.state_dict(),
        "counters": counters_of(opt),
        "rounds_after": rounds_after,
    }


@pytest.mark.parametrize("world_size", [2, 4])
def test_ranks_meet_every_period_and_end_identical(ranks: Any, world_size: int) -> None:
    results = ranks.run(train, STEPS, world_size=world_size)
    # Each rank trained on its own data since the round at step 16: the check can fail.
    with pytest.raises(AssertionError, match="rank 1 vs rank 0"):
        assert_ranks_equal([r["before_close"] for r in results])
    assert_ranks_equal([r["model"] for r in results])  # bitwise, buffers included
    # Rounds after steps 4, 8, 12 and 16 on every rank, and close()'s final one.
    assert [r["rounds_after"] for r in results] == [[4, 8, 12, 16]] * world_size
    counters = [r["counters"] for r in results]
    assert_counters_equal(counters, optimizer_steps=STEPS, averaging_rounds=5)


@pytest.mark.parametrize("world_size", [2, 4])
def test_a_resumed_run_continues_exactly(ranks: Any, world_size: int, tmp_path: Any) -> None:
    uninterrupted = ranks.run(train, STEPS, world_size=world_size)
    ranks.run(train, STEPS, checkpoint_dir=str(tmp_path), stop_after=7, world_size=world_size)
    assert torch.load(tmp_path / "rank0.pt")["step"] == 6  # mid-period: local progress to keep
    resumed = ranks.run(train, STEPS, checkpoint_dir=str(tmp_path), world_size=world_size)
    assert [r["rounds_after"] for r in resumed] == [[8, 12, 16]] * world_size

    def final(results: list[dict[str, Any]]) -> list[dict[str, Any]]:
        return [{k: r[k] for k in ("before_close", "model", "counters")} for r in results]

    assert_resumed_equal(final(resumed), final(uninterrupted))
