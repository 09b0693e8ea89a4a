"""The settings alone: one definition from which checks, agreement, state and repr derive."""

from __future__ import annotations

import dataclasses

import pytest
import torch

from local_sgd_optim import LocalSGDOptimizer
from local_sgd_optim.outer import OuterOptimizer
from local_sgd_optim.settings import Settings


def test_every_constructor_setting_is_a_field_and_every_field_a_constructor_argument() -> None:
    import inspect

    fields = [f.name for f in dataclasses.fields(Settings)]
    arguments = list(inspect.signature(LocalSGDOptimizer).parameters)
    others = {"base_optimizer", "model", "process_group"}
    assert [a for a in arguments if a not in others] == fields


def test_describe_lists_every_setting_and_callables_by_what_they_produce() -> None:
    def nesterov(ps: list[torch.Tensor]) -> torch.optim.Optimizer:
        return torch.optim.SGD(ps, lr=0.7, momentum=0.9, nesterov=True)

    def doubling(step: int) -> int:
        return 2 * (step + 1)

    settings = Settings.from_arguments(period=doubling, outer_optimizer=nesterov, warmup_steps=3)
    lines = settings.describe()
    assert len(lines) == len(dataclasses.fields(Settings))
    assert "setting warmup_steps=3" in lines and "setting enabled=True" in lines
    [outer] = [line for line in lines if "outer_optimizer" in line]
    assert outer.startswith("setting outer_optimizer=SGD(")
    assert "lr=0.7" in outer and "momentum=0.9" in outer and "nesterov=True" in outer
    [period] = [line for line in lines if line.startswith("setting period=")]
    assert period.endswith("doubling giving [2, 4, 6, 8] at steps 0-3")
    assert "0x" not in " ".join(lines)  # no address, which differs between ranks
    # Two factories that build the same optimizer agree; another learning rate does not.
    same = Settings.from_arguments(
        period=doubling, warmup_steps=3, outer_optimizer=lambda ps: nesterov(ps)
    )
    assert same.describe() == lines
    other = Settings.from_arguments(
        period=doubling,
        warmup_steps=3,
        outer_optimizer=lambda ps: torch.optim.SGD(ps, lr=0.5, momentum=0.9, nesterov=True),
    )
    assert other.describe() != lines


def test_state_keeps_the_saved_settings_and_round_trips() -> None:
    settings = Settings.from_arguments(period=8, comm_dtype=torch.bfloat16, local_period=2)
    state = settings.to_state()
    assert state["comm_dtype"] == "bfloat16" and state["period"] == 8
    assert (
        set(state) == {f.name for f in dataclasses.fields(Settings) if f.metadata["saved"]}
        and "enabled" not in state
    )
    assert settings.changed_from(Settings.from_state(state)) == []
    other = Settings.from_arguments(period=16, local_period=2)
    assert other.changed_from(Settings.from_state(state)) == ["period", "comm_dtype"]
    schedule = Settings.from_arguments(period=lambda step: 4)
    assert schedule.to_state()["period"] is None
    assert schedule.changed_from(Settings.from_state(schedule.to_state())) == []


def test_older_states_take_defaults_and_the_newest_must_be_complete() -> None:
    state = Settings.from_arguments(period=8).to_state()
    for name in ("bucket_cap_mb", "comm_dtype", "overlap_steps", "on_nonfinite", "warmup_steps"):
        del state[name]
    assert Settings.missing_from_state(state, version=1) == []
    assert Settings.missing_from_state(state, version=3) == [
        "bucket_cap_mb",
        "comm_dtype",
        "overlap_steps",
        "on_nonfinite",
    ]
    assert Settings.from_state(state)["comm_dtype"] is None
    with pytest.raises(ValueError, match="setting is invalid: comm_dtype must be one of"):
        Settings.from_state({**state, "comm_dtype": "int2"})


@pytest.mark.parametrize(
    ("arguments", "error", "message"),
    [
        ({"period": 0}, ValueError, "period must be a positive integer, got 0"),
        ({"period": 4, "average_buffers": 1}, TypeError, "average_buffers must be a bool"),
        ({"period": 4, "overlap_steps": 4}, ValueError, "overlap_steps must be smaller than"),
        ({"period": 4, "local_period": 4}, ValueError, "local_period must be smaller than"),
        ({"period": 4, "local_group": "node"}, ValueError, "local_group was given without"),
        ({"period": 4, "comm_dtype": torch.int8}, ValueError, "comm_dtype must be None"),
        ({"period": 4, "on_nonfinite": "ignore"}, ValueError, "on_nonfinite must be 'raise'"),
        ({"period": 4, "local_group": 3}, TypeError, "local_group must be a torch.distributed"),
    ],
)
def test_bad_settings_name_the_problem(
    arguments: dict[str, object], error: type[Exception], message: str
) -> None:
    with pytest.raises(error, match=message):
        Settings.from_arguments(**arguments)


def test_summary_shows_period_accumulation_and_what_is_off_default() -> None:
    settings = Settings.from_arguments(period=8, comm_dtype=torch.float16, overlap_steps=2)
    assert settings.summary() == [
        "period=8",
        "accumulation_steps=1",
        "comm_dtype=torch.float16",
        "overlap_steps=2",
    ]


def _diloco_run(cpu_offload: bool, device: str = "cpu") -> tuple[torch.Tensor, LocalSGDOptimizer]:
    """Ten steps of DiLoCo (Adam outer, so the outer optimizer has state) on one rank."""
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(6, 16), torch.nn.Tanh(), torch.nn.Linear(16, 3))
    model.to(device)
    opt = LocalSGDOptimizer(
        torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9),
        model,
        period=3,
        outer_optimizer=lambda ps: torch.optim.Adam(ps, lr=0.05),
        cpu_offload=cpu_offload,
    )
    for step in range(10):
        g = torch.Generator().manual_seed(step)
        x, y = torch.randn(8, 6, generator=g).to(device), torch.randint(0, 3, (8,), generator=g)
        torch.nn.functional.cross_entropy(model(x), y.to(device)).backward()
        opt.step()
        opt.zero_grad()
    return torch.cat([p.detach().reshape(-1).cpu() for p in model.parameters()]), opt


def _outer_tensors(opt: LocalSGDOptimizer) -> list[torch.Tensor]:
    outer = opt.outer_optimizer
    assert outer is not None
    kept = [p for g in outer.param_groups for p in g["params"]]
    state = [v for s in outer.state.values() for v in s.values() if isinstance(v, torch.Tensor)]
    return kept + [p.grad for p in kept if p.grad is not None] + [v for v in state if v.dim()]


def test_cpu_offload_is_a_setting_kept_in_the_state_that_may_change_on_resume() -> None:
    settings = Settings.from_arguments(period=4, cpu_offload=True)
    assert settings.cpu_offload is True and settings.to_state()["cpu_offload"] is True
    assert "cpu_offload=True" in settings.summary()
    older = Settings.from_arguments(period=4).to_state()
    del older["cpu_offload"]
    assert Settings.missing_from_state(older, version=3) == []  # older entries lack it
    assert Settings.from_state(older)["cpu_offload"] is False
    assert settings.changed_from(Settings.from_state(older)) == ["cpu_offload"]
    with pytest.raises(TypeError, match="cpu_offload must be a bool"):
        Settings.from_arguments(period=4, cpu_offload=1)
    # A run resumed with the other value continues, naming the change.
    _, offloaded = _diloco_run(cpu_offload=True)
    _, plain = _diloco_run(cpu_offload=False)
    with pytest.warns(UserWarning, match=r"cpu_offload=False \(checkpoint: True\)"):
        plain.load_state_dict(offloaded.state_dict())


def test_cpu_offload_keeps_outer_state_in_cpu_memory_with_the_same_numbers() -> None:
    params, offloaded = _diloco_run(cpu_offload=True)
    reference, plain = _diloco_run(cpu_offload=False)
    assert offloaded.averaging_rounds == 3
    assert torch.equal(params, reference)
    kept = _outer_tensors(offloaded)
    assert len(kept) > 6 and all(t.device.type == "cpu" for t in kept)  # copy, grads, Adam
    for a, b in zip(kept, _outer_tensors(plain)):
        assert torch.equal(a, b)


def test_offloaded_state_visits_the_device_and_comes_back_with_the_same_numbers(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    # On CPU the visit is skipped (the device is the CPU); forced, it takes the GPU's path.
    monkeypatch.setattr(OuterOptimizer, "_visit_cpu", True)
    params, offloaded = _diloco_run(cpu_offload=True)
    monkeypatch.setattr(OuterOptimizer, "_visit_cpu", False)
    reference, plain = _diloco_run(cpu_offload=False)
    assert torch.equal(params, reference)
    kept = _outer_tensors(offloaded)
    for a, b in zip(kept, _outer_tensors(plain)):
        assert torch.equal(a, b)
    # After each round, the copy, its gradient and the Adam state created at the first outer
    # step all live in the reused home buffers.
    outer = offloaded._rounds.outer
    assert outer is not None
    homes = {buffer.data_ptr() for buffer in outer._host.values()}
    assert len(kept) > 6 and all(t.data_ptr() in homes for t in kept)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA: offloading from a GPU")
def test_cpu_offload_from_a_gpu_keeps_outer_state_pinned_with_the_same_numbers() -> None:
    params, offloaded = _diloco_run(cpu_offload=True, device="cuda")
    reference, plain = _diloco_run(cpu_offload=False, device="cuda")
    assert torch.equal(params, reference)
    kept = _outer_tensors(offloaded)
    assert all(t.device.type == "cpu" and t.is_pinned() for t in kept)
    assert all(t.device.type == "cuda" for t in _outer_tensors(plain))
    for a, b in zip(kept, _outer_tensors(plain)):
        assert torch.equal(a, b.cpu())
    # A checkpoint moves between the two: offloaded state loads into a GPU-resident wrapper.
    plain.load_state_dict(offloaded.state_dict())
    assert all(t.device.type == "cuda" for t in _outer_tensors(plain))
