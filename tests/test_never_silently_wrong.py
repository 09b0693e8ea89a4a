"""What the wrapper assumed when it was built, broken as frameworks and users break it.

Each case ends in one of two ways on every rank: the model is averaged correctly, or the same
clear exception is raised, with no process aborted inside a collective and nothing hanging.
"""

from __future__ import annotations

from typing import Any

import pytest
import torch
import torch.distributed as dist
from _common import flat_params, loss_of, mlp, raised, rank, sgd_wrapper, train
from torch import nn
from torch.nn.parallel import DistributedDataParallel as DDP

from local_sgd_optim import LocalSGDOptimizer


def _step_on(model: nn.Module, opt: LocalSGDOptimizer, batch_rank: int, i: int) -> torch.Tensor:
    """One step on ``batch_rank``'s batch; this rank's parameters after its own base step."""
    local: list[torch.Tensor] = []
    handle = opt.base_optimizer.register_step_post_hook(lambda *_: local.append(flat_params(model)))
    loss_of(model, batch_rank, i).backward()
    opt.step()
    opt.zero_grad()
    handle.remove()
    return local[-1]


# --- 1. the model moves after the wrapper is built ---------------------------------------


def _moved_after_construction(how: str) -> dict[str, Any]:
    torch.manual_seed(0)
    model: nn.Module = nn.Sequential(nn.Linear(6, 3))  # no buffer to give the move away
    opt = sgd_wrapper(model, period=1, lr=0.5)
    if how == "to":  # what accelerator.prepare and transformers' Trainer do under torchrun
        model.to(torch.device("cpu", 0))
    elif how == "dtype":
        model.double()
    pointers = [p.data_ptr() for p in model.parameters()]
    x, y = torch.randn(8, 6, dtype=next(model.parameters()).dtype), torch.randint(0, 3, (8,))
    local = []
    opt.base_optimizer.register_step_post_hook(lambda *_: local.append(flat_params(model)))
    nn.functional.cross_entropy(model(x * (rank() + 1)), y).backward()
    opt.step()
    return {
        "moved": pointers != [p.data_ptr() for p in model.parameters()] or how == "none",
        "local": local[-1],
        "after": flat_params(model),
        "rounds": opt.averaging_rounds,
    }


@pytest.mark.parametrize("how", ["to", "dtype"])
def test_a_model_moved_after_construction_is_averaged_where_it_lives(ranks: Any, how: str) -> None:
    r0, r1 = ranks.run(_moved_after_construction, how)
    assert r0["rounds"] == r1["rounds"] == 1
    assert not torch.equal(r0["local"], r1["local"])
    assert torch.equal(r0["after"], r1["after"])
    mean = (r0["local"] + r1["local"]) / 2
    torch.testing.assert_close(r0["after"], mean, rtol=0, atol=1e-7)


def _replaced_buffer_and_compiled() -> dict[str, Any]:
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(6, 8), nn.BatchNorm1d(8), nn.ReLU(), nn.Linear(8, 3))
    opt = sgd_wrapper(model, period=2)
    model[1].running_mean = torch.full((8,), float(rank()))  # a new buffer object
    compiled = torch.compile(model, backend="eager")  # compiled after the wrapper was built
    for i in range(2):
        loss_of(compiled, rank(), i).backward()
        opt.step()
        opt.zero_grad()
    return {"params": flat_params(model), "mean": model[1].running_mean.clone()}


def test_a_replaced_buffer_and_a_model_compiled_later_are_averaged(ranks: Any) -> None:
    r0, r1 = ranks.run(_replaced_buffer_and_compiled)
    assert torch.equal(r0["params"], r1["params"])
    assert torch.equal(r0["mean"], r1["mean"])  # the new buffer, not the old one, averaged


def _assigned_parameters() -> tuple[str, str]:
    model = mlp()
    opt = sgd_wrapper(model, period=2)
    model.load_state_dict(mlp(seed=1).state_dict(), assign=True)  # new Parameter objects
    return raised(train, model, opt, 2)


def test_parameters_replaced_under_the_optimizer_raise_on_every_rank(ranks: Any) -> None:
    for name, message in ranks.run(_assigned_parameters):
        assert name == "RuntimeError"
        assert "replaced after the optimizer was built" in message
        assert "assign=True" in message


# --- 2. DDP built after the wrapper, or ranks that never diverge ---------------------------


def _ddp_built_after(wrap: str) -> dict[str, Any]:
    model = mlp()
    opt = sgd_wrapper(model, period=4, lr=0.2)
    ddp = DDP(model)
    forward = torch.compile(ddp, backend="eager") if wrap == "compiled" else ddp
    trace = [_step_on(forward, opt, rank(), i) for i in range(8)]
    plain = mlp()
    reference = sgd_wrapper(plain, period=4, lr=0.2)
    expected = [_step_on(plain, reference, rank(), i) for i in range(8)]
    return {
        "same_as_plain_local_sgd": [torch.equal(a, b) for a, b in zip(trace, expected)],
        "params": flat_params(model),
        "local": trace,
        "hooks": len(ddp._comm_hooks),
        "broadcast_buffers": ddp.broadcast_buffers,
    }


@pytest.mark.parametrize("wrap", ["eager", "compiled"])
def test_ddp_built_after_the_wrapper_is_found_and_kept_local(ranks: Any, wrap: str) -> None:
    r0, r1 = ranks.run(_ddp_built_after, wrap)
    for r in (r0, r1):
        assert all(r["same_as_plain_local_sgd"]), r["same_as_plain_local_sgd"]
        assert r["hooks"] == 1 and r["broadcast_buffers"] is False
    assert not torch.equal(r0["local"][2], r1["local"][2])  # local steps between rounds
    assert torch.equal(r0["params"], r1["params"])  # step 8 was a round


def _same_data_everywhere(allow: bool) -> tuple[str, str]:
    model = mlp()
    opt = sgd_wrapper(model, period=2, allow_identical_ranks=allow)

    def run() -> None:
        for i in range(8):
            loss_of(model, 0, i).backward()  # rank 0's batch on every rank
            opt.step()
            opt.zero_grad()
        opt.close()

    return raised(run)


def test_ranks_that_stay_identical_raise_on_every_rank_unless_allowed(ranks: Any) -> None:
    for name, message in ranks.run(_same_data_everywhere, False):
        assert name == "RoundError"
        assert "bitwise identical parameters at the round of step 4" in message
        assert "DistributedSampler" in message and "allow_identical_ranks=True" in message
    assert ranks.run(_same_data_everywhere, True) == [("", ""), ("", "")]


# --- 3. several processes, no process group ------------------------------------------------


def test_several_processes_without_a_process_group_are_refused(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setenv("WORLD_SIZE", "2")
    model = mlp()
    with pytest.raises(RuntimeError, match=r"WORLD_SIZE=2 .*init_process_group\(\) before"):
        LocalSGDOptimizer(torch.optim.SGD(model.parameters(), lr=0.1), model, period=4)
    alone = LocalSGDOptimizer(
        torch.optim.SGD(model.parameters(), lr=0.1), model, period=4, enabled=False
    )
    assert alone.world_size == 1
    monkeypatch.setenv("WORLD_SIZE", "1")  # torchrun with one process: fine
    other = mlp()
    LocalSGDOptimizer(torch.optim.SGD(other.parameters(), lr=0.1), other, period=4)


# --- 4. settings that differ across ranks --------------------------------------------------


def _differing(setting: str) -> tuple[str, str]:
    model = mlp()
    kwargs: dict[str, Any] = {}
    if rank() == 1:
        kwargs = {
            "warmup_steps": {"warmup_steps": 3},
            "enabled": {"enabled": False},
            "outer_optimizer": {"outer_optimizer": lambda ps: torch.optim.SGD(ps, lr=0.7)},
            "outer_lr": {"outer_optimizer": lambda ps: torch.optim.SGD(ps, lr=0.5)},
            "schedule": {"period": lambda step: 4 if step < 2 else 8},
        }[setting]
    if rank() == 0 and setting in ("outer_lr",):
        kwargs = {"outer_optimizer": lambda ps: torch.optim.SGD(ps, lr=0.7)}
    if rank() == 0 and setting == "schedule":
        kwargs = {"period": lambda step: 4}
    base = torch.optim.SGD(model.parameters(), lr=0.1)
    return raised(LocalSGDOptimizer, base, model, **{"period": 4, **kwargs})


@pytest.mark.parametrize(
    ("setting", "first_difference"),
    [
        ("warmup_steps", "rank 0 has setting warmup_steps=0; rank 1 has setting warmup_steps=3"),
        ("enabled", "rank 0 has setting enabled=True; rank 1 has setting enabled=False"),
        ("outer_optimizer", "rank 0 has setting outer_optimizer=None; rank 1 has setting oute"),
        ("outer_lr", "lr=0.7"),
        ("schedule", "giving [4, 4, 4, 4] at steps 0-3; rank 1 has setting period="),
    ],
)
def test_settings_that_differ_across_ranks_raise_on_every_rank(
    ranks: Any, setting: str, first_difference: str
) -> None:
    for name, message in ranks.run(_differing, setting, timeout=60):
        assert name == "RuntimeError", message
        assert "the model or settings differ across ranks" in message
        assert first_difference in message


# --- 5. ranks out of step ------------------------------------------------------------------


def _skipped_step(then: str) -> dict[str, Any]:
    model = mlp()
    opt = sgd_wrapper(model, period=4)
    calls = 8 if rank() == 0 else 7  # rank 1 skipped one step() call

    def run() -> None:
        train(model, opt, calls)
        if then == "average":
            opt.average()
        opt.close()

    name, message = raised(run)
    return {"error": (name, message), "rounds": opt.averaging_rounds}


@pytest.mark.parametrize("then", ["close", "average"])
def test_a_rank_that_skipped_a_step_gets_a_round_error_not_an_abort(ranks: Any, then: str) -> None:
    r0, r1 = ranks.run(_skipped_step, then, timeout=60)
    for r in (r0, r1):
        name, message = r["error"]
        assert name == "RoundError", message
        assert "ranks are out of step" in message
    # Rank 0 went into the round of step 8; rank 1 into close() (or average()) at step 7.
    assert "rank 0 at round of step 8, rank 1 at" in r0["error"][1]
    assert r0["error"][1] == r1["error"][1]
    assert r0["rounds"] == r1["rounds"] == 1  # the round of step 4 only


def _then_train_on() -> list[float]:
    """After a RoundError the process group still works: the harness's next test runs."""
    t = torch.ones(1) * (rank() + 1)
    dist.all_reduce(t)
    return t.tolist()


def test_the_group_is_usable_after_a_round_error(ranks: Any) -> None:
    ranks.run(_skipped_step, "close", timeout=60)
    assert ranks.run(_then_train_on) == [[3.0], [3.0]]
