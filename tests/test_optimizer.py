"""Single-process behaviour: the Optimizer API, counters, accumulation, state, bad input."""

from __future__ import annotations

import logging
import warnings
from typing import Any, Callable

import pytest
import torch
from _common import flat_params, loss_of, mlp, roundtrip, sgd_wrapper, train
from torch import nn

from local_sgd_optim import LocalSGDOptimizer

OPTIMIZERS: dict[str, Callable[[Any], torch.optim.Optimizer]] = {
    "sgd": lambda ps: torch.optim.SGD(ps, lr=0.1),
    "sgd_momentum": lambda ps: torch.optim.SGD(ps, lr=0.1, momentum=0.9, weight_decay=1e-4),
    "adamw": lambda ps: torch.optim.AdamW(ps, lr=1e-2),
}


def _train_reference(
    make_opt: Callable[[Any], torch.optim.Optimizer], accumulation: int, steps: int
) -> torch.Tensor:
    """The base optimizer alone, accumulating by hand: sum the micro-batch gradients, divide."""
    model = mlp()
    opt = make_opt(model.parameters())
    for step in range(steps):
        for micro in range(accumulation):
            loss_of(model, 0, step * accumulation + micro).backward()
        for p in model.parameters():
            p.grad.div_(accumulation)
        opt.step()
        opt.zero_grad()
    return flat_params(model)


def _train_wrapped(
    make_opt: Callable[[Any], torch.optim.Optimizer], accumulation: int, steps: int, **kwargs: Any
) -> tuple[torch.Tensor, LocalSGDOptimizer]:
    model = mlp()
    opt = LocalSGDOptimizer(
        make_opt(model.parameters()), model, period=2, accumulation_steps=accumulation, **kwargs
    )
    # zero_grad() every micro-batch, as many loops do: must not break accumulation.
    train(model, opt, steps * accumulation, zero_grad_first=True)
    return flat_params(model), opt


@pytest.mark.parametrize("name", sorted(OPTIMIZERS))
@pytest.mark.parametrize("accumulation", [1, 3])
@pytest.mark.parametrize("enabled", [True, False])
def test_without_process_group_matches_base_optimizer(
    name: str, accumulation: int, enabled: bool
) -> None:
    expected = _train_reference(OPTIMIZERS[name], accumulation, steps=5)
    got, opt = _train_wrapped(OPTIMIZERS[name], accumulation, steps=5, enabled=enabled)
    assert torch.equal(got, expected)
    assert opt.world_size == 1
    assert opt.optimizer_steps == 5 and opt.micro_steps == 5 * accumulation


def test_group_of_one_matches_base_optimizer(single_rank_group: None) -> None:
    expected = _train_reference(OPTIMIZERS["sgd_momentum"], 2, steps=6)
    got, opt = _train_wrapped(OPTIMIZERS["sgd_momentum"], 2, steps=6)
    assert torch.equal(got, expected)
    assert opt.world_size == 1
    assert opt.averaging_rounds == 3  # the average of one copy is itself: counted, free


def test_shares_base_optimizer_objects() -> None:
    model = mlp()
    base = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
    opt = LocalSGDOptimizer(base, model, period=4)
    assert isinstance(opt, torch.optim.Optimizer)
    assert opt.base_optimizer is base
    assert opt.param_groups is base.param_groups
    assert opt.state is base.state
    assert opt.defaults is base.defaults
    opt.param_groups[0]["lr"] = 0.5
    assert base.param_groups[0]["lr"] == 0.5


def test_counters_and_accumulation_windows() -> None:
    model = mlp()
    opt = sgd_wrapper(model, period=3, accumulation_steps=2)
    seen = []
    for i in range(13):
        train(model, opt, 1, start=i)
        seen.append((opt.micro_steps, opt.optimizer_steps, opt.averaging_rounds))
    assert seen[-1] == (13, 6, 2)
    assert [s[1] for s in seen] == [0, 1, 1, 2, 2, 3, 3, 4, 4, 5, 5, 6, 6]
    assert [s[2] for s in seen] == [0, 0, 0, 0, 0, 1, 1, 1, 1, 1, 1, 2, 2]
    with pytest.raises(AttributeError):
        opt.micro_steps = 0  # type: ignore[misc]


def test_zero_grad_clears_only_after_optimizer_step() -> None:
    model = mlp()
    opt = sgd_wrapper(model, period=1, accumulation_steps=2)
    loss_of(model, 0, 0).backward()
    first = model[0].weight.grad.clone()
    opt.step()
    opt.zero_grad()
    assert torch.equal(model[0].weight.grad, first), "zero_grad inside a window cleared grads"
    train(model, opt, 1, start=1)
    assert model[0].weight.grad is None


def test_closure_returns_loss_and_is_rejected_with_accumulation() -> None:
    model = mlp()
    opt = sgd_wrapper(model, period=1)

    def closure() -> torch.Tensor:
        opt.zero_grad()
        loss = loss_of(model, 0, 0)
        loss.backward()
        return loss

    loss = opt.step(closure)
    assert isinstance(loss, torch.Tensor) and loss.item() > 0
    lbfgs = LocalSGDOptimizer(torch.optim.LBFGS(model.parameters(), max_iter=3), model, period=1)
    assert lbfgs.step(closure) is not None
    accumulating = sgd_wrapper(model, period=1, accumulation_steps=2)
    with pytest.raises(ValueError, match="closure cannot be combined with accumulation_steps"):
        accumulating.step(closure)


def _schedulers() -> dict[str, Callable[[torch.optim.Optimizer], Any]]:
    S = torch.optim.lr_scheduler
    return {
        "step": lambda o: S.StepLR(o, step_size=2, gamma=0.5),
        "onecycle": lambda o: S.OneCycleLR(o, max_lr=0.5, total_steps=10),
        "lambda": lambda o: S.LambdaLR(o, lambda e: 1.0 / (1 + e)),
        "cosine": lambda o: S.CosineAnnealingLR(o, T_max=6),
    }


@pytest.mark.parametrize("name", sorted(_schedulers()))
def test_schedulers_drive_the_base_optimizer(name: str) -> None:
    make = _schedulers()[name]
    ref_model, model = mlp(), mlp()
    ref_opt = torch.optim.SGD(ref_model.parameters(), lr=0.1, momentum=0.9)
    opt = sgd_wrapper(model, period=2, momentum=0.9)
    ref_sched, sched = make(ref_opt), make(opt)
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # e.g. "scheduler.step() before optimizer.step()"
        for i in range(8):
            train(ref_model, ref_opt, 1, start=i)
            ref_sched.step()
            train(model, opt, 1, start=i)
            sched.step()
            assert opt.base_optimizer.param_groups[0]["lr"] == ref_opt.param_groups[0]["lr"]
            assert (
                opt.base_optimizer.param_groups[0]["momentum"]
                == ref_opt.param_groups[0]["momentum"]
            )
    assert torch.equal(flat_params(model), flat_params(ref_model))


def test_step_hooks_fire() -> None:
    model = mlp()
    base = torch.optim.SGD(model.parameters(), lr=0.1)
    opt = LocalSGDOptimizer(base, model, period=2, accumulation_steps=2)
    calls: list[str] = []
    opt.register_step_pre_hook(lambda o, a, k: calls.append("pre"))
    opt.register_step_post_hook(lambda o, a, k: calls.append("post"))
    base.register_step_post_hook(lambda o, a, k: calls.append("base"))
    train(model, opt, 4)
    assert calls == ["pre", "post", "pre", "base", "post"] * 2


def test_add_param_group_reaches_base_optimizer() -> None:
    model = mlp()
    base = torch.optim.SGD(model[0].parameters(), lr=0.1)
    opt = LocalSGDOptimizer(base, model, period=2)
    opt.add_param_group({"params": model[2].parameters(), "lr": 0.01})
    assert len(base.param_groups) == 2 and base.param_groups[1]["lr"] == 0.01
    before = model[2].weight.detach().clone()
    loss_of(model, 0, 0).backward()
    opt.step()
    assert not torch.equal(model[2].weight, before)


def test_state_dict_roundtrip_and_plain_checkpoint() -> None:
    model = mlp()
    opt = sgd_wrapper(model, period=3, momentum=0.9, accumulation_steps=2)
    train(model, opt, 11)
    state = roundtrip(opt.state_dict())
    assert state["local_sgd"]["micro_steps"] == 11
    assert state["local_sgd"]["optimizer_steps"] == 5
    assert state["local_sgd"]["averaging_rounds"] == 1
    assert state["local_sgd"]["period"] == 3

    fresh = sgd_wrapper(model, period=3, momentum=0.9, accumulation_steps=2)
    fresh.load_state_dict(state)
    assert (fresh.micro_steps, fresh.optimizer_steps, fresh.averaging_rounds) == (11, 5, 1)
    for p in model.parameters():
        assert torch.equal(fresh.state[p]["momentum_buffer"], opt.state[p]["momentum_buffer"])

    plain = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
    plain.load_state_dict(state)  # our key does not disturb a plain optimizer
    with pytest.warns(UserWarning, match="no 'local_sgd' entry") as record:
        fresh.load_state_dict(plain.state_dict())
    assert len(record) == 1
    assert (fresh.micro_steps, fresh.optimizer_steps, fresh.averaging_rounds) == (0, 0, 0)


@pytest.mark.parametrize(
    "corrupt, message",
    [
        ({"optimizer_steps": -1}, "optimizer_steps must be a non-negative integer"),
        ({"micro_steps": 2.5}, "micro_steps must be a non-negative integer"),
        ({"period": 0}, "period must be a positive integer"),
        ({"last_round_step": 99}, "last_round_step 99 is after optimizer_steps"),
    ],
)
def test_load_state_dict_rejects_corrupted_counters(corrupt: dict[str, Any], message: str) -> None:
    model = mlp()
    opt = sgd_wrapper(model, period=2)
    state = opt.state_dict()
    state["local_sgd"].update(corrupt)
    with pytest.raises(ValueError, match=message):
        opt.load_state_dict(state)
    assert opt.optimizer_steps == 0


def test_close_and_context_manager() -> None:
    model = mlp()
    with sgd_wrapper(model, period=4) as opt:
        train(model, opt, 5)
    assert opt.averaging_rounds == 2  # the round at step 4 and the final one at close
    opt.close()  # idempotent
    assert opt.averaging_rounds == 2
    with pytest.raises(RuntimeError, match="step\\(\\) after close\\(\\)"):
        opt.step()

    exact = sgd_wrapper(model, period=2)
    for i in range(2):
        loss_of(model, 0, i).backward()
        exact.step()
    exact.close()
    assert exact.averaging_rounds == 1, "close() right after a round must not average again"

    failing = sgd_wrapper(model, period=4)
    with pytest.raises(KeyError), failing:
        loss_of(model, 0, 0).backward()
        failing.step()
        raise KeyError("boom")
    assert failing.averaging_rounds == 0


@pytest.mark.parametrize("value", [0, -1, 1.5, "8", True, None])
@pytest.mark.parametrize("name", ["period", "accumulation_steps"])
def test_rejects_bad_integers(name: str, value: Any) -> None:
    model = mlp()
    kwargs = {"period": 2, name: value}
    with pytest.raises(ValueError, match=f"{name} must be a positive integer, got {value!r}"):
        sgd_wrapper(model, **kwargs)


def test_rejects_bad_types_and_foreign_parameters() -> None:
    model = mlp()
    base = torch.optim.SGD(model.parameters(), lr=0.1)
    with pytest.raises(
        TypeError, match=r"base_optimizer must be a torch\.optim\.Optimizer, got list"
    ):
        LocalSGDOptimizer([], model, period=2)  # type: ignore[arg-type]
    with pytest.raises(TypeError, match=r"model must be a torch\.nn\.Module, got dict"):
        LocalSGDOptimizer(base, {}, period=2)  # type: ignore[arg-type]
    with pytest.raises(TypeError, match="average_buffers must be a bool"):
        LocalSGDOptimizer(base, model, period=2, average_buffers=1)  # type: ignore[arg-type]
    with pytest.raises(TypeError, match="already a LocalSGDOptimizer"):
        LocalSGDOptimizer(LocalSGDOptimizer(base, model, period=2), model, period=2)
    other = nn.Linear(3, 3)
    mixed = torch.optim.SGD(list(model.parameters()) + list(other.parameters()), lr=0.1)
    with pytest.raises(ValueError, match="holds 2 parameter\\(s\\) that are not parameters of"):
        LocalSGDOptimizer(mixed, model, period=2)


def test_accepts_numpy_integers() -> None:
    np = pytest.importorskip("numpy")
    model = mlp()
    opt = sgd_wrapper(model, period=np.int64(4), accumulation_steps=np.int32(2))
    assert (opt.period, opt.accumulation_steps) == (4, 2)
    assert type(opt.period) is int


@pytest.mark.parametrize(
    ("kwargs", "error", "message"),
    [
        ({"bucket_cap_mb": 0}, ValueError, "bucket_cap_mb must be a positive number of MiB, got 0"),
        ({"bucket_cap_mb": float("nan")}, ValueError, "bucket_cap_mb must be a positive number"),
        ({"bucket_cap_mb": "25"}, ValueError, "bucket_cap_mb must be a positive number"),
        ({"comm_dtype": torch.float32}, ValueError, "comm_dtype must be None .* got torch.float32"),
        ({"comm_dtype": "bf16"}, ValueError, "comm_dtype must be None .* got 'bf16'"),
        ({"comm_dtype": 16}, TypeError, "comm_dtype must be None .* got int"),
        ({"overlap_steps": -1}, ValueError, "overlap_steps must be a non-negative integer, got -1"),
        ({"overlap_steps": 1.0}, ValueError, "overlap_steps must be a non-negative integer"),
        ({"overlap_steps": 4}, ValueError, "overlap_steps must be smaller than period, got"),
        ({"on_nonfinite": "ignore"}, ValueError, "on_nonfinite must be 'raise' or 'skip'"),
    ],
)
def test_rejects_bad_communication_settings(
    kwargs: dict[str, Any], error: type[Exception], message: str
) -> None:
    model = mlp()
    with pytest.raises(error, match=message):
        sgd_wrapper(model, period=4, **kwargs)


@pytest.mark.parametrize(
    "kwargs",
    [
        {"comm_dtype": torch.bfloat16},
        {"comm_dtype": torch.float16, "overlap_steps": 1},
        {"overlap_steps": 1, "bucket_cap_mb": 0.001},
    ],
)
def test_communication_settings_change_nothing_on_one_rank(
    single_rank_group: None, kwargs: dict[str, Any]
) -> None:
    expected = _train_reference(OPTIMIZERS["sgd_momentum"], 2, steps=6)
    got, opt = _train_wrapped(OPTIMIZERS["sgd_momentum"], 2, steps=6, **kwargs)
    assert torch.equal(got, expected)
    assert opt.averaging_rounds == 3 and opt.stats.bytes_communicated == 0
    saved = roundtrip(opt.state_dict())["local_sgd"]
    assert (
        saved["comm_dtype"]
        == {None: None, torch.bfloat16: "bfloat16", torch.float16: "float16"}[opt.comm_dtype]
    )
    assert saved["overlap_steps"] == opt.overlap_steps


def test_loads_a_version_one_checkpoint_with_default_communication_settings() -> None:
    model = mlp()
    opt = sgd_wrapper(model, period=4)
    old = opt.state_dict()
    for key in ("bucket_cap_mb", "comm_dtype", "overlap_steps", "on_nonfinite", "stats"):
        del old["local_sgd"][key]
    for key in ("next_round_step", "local_rounds", "warmup_steps", "local_period"):
        del old["local_sgd"][key]
    old["local_sgd"]["version"] = 1
    old["local_sgd"]["optimizer_steps"] = old["local_sgd"]["micro_steps"] = 9
    opt.load_state_dict(old)
    assert opt.optimizer_steps == 9 and opt.comm_dtype is None and opt.overlap_steps == 0
    assert opt.next_round_step == 12  # rounds on multiples of the period, as version 1 had them
    old["local_sgd"]["version"] = 3  # a version 3 checkpoint must have them
    with pytest.raises(ValueError, match="lacks bucket_cap_mb, comm_dtype, overlap_steps, on_non"):
        opt.load_state_dict(old)


def test_logs_settings_once_at_info_and_never_prints(
    caplog: pytest.LogCaptureFixture, capsys: pytest.CaptureFixture[str]
) -> None:
    model = mlp()
    with caplog.at_level(logging.INFO, logger="local_sgd_optim"):
        opt = sgd_wrapper(model, period=4)
        train(model, opt, 8)
    [record] = caplog.records
    assert record.name == "local_sgd_optim" and record.levelno == logging.INFO
    assert "period=4, accumulation_steps=1, world_size=1" in record.getMessage()
    assert capsys.readouterr() == ("", "")
