"""Checkpoints through ``torch.distributed.checkpoint`` (DCP): ``get_state_dict``, ``dcp.save``,
``dcp.load`` and ``set_state_dict`` keep the wrapper's counters, outer state, 16-bit anchor and a
round in flight, and a resumed run equals an uninterrupted one, bitwise; DCP's fake step with
zero gradients is not counted; a checkpoint that lost a replica's values is refused, its
optimizer state at the load and its model parameters at the first step."""

from __future__ import annotations

import warnings
from typing import Any

import pytest
import torch
import torch.distributed as dist
import torch.distributed.checkpoint as dcp
from _common import flat_params, mlp, raised, rank, train
from torch import Tensor, nn
from torch.distributed.checkpoint.state_dict import (
    get_state_dict,
    set_optimizer_state_dict,
    set_state_dict,
)

from local_sgd_optim import LocalSGDOptimizer
from local_sgd_optim.checkpoint.dcp import per_replica


def _nesterov(params: list[Tensor]) -> torch.optim.Optimizer:
    return torch.optim.SGD(params, lr=0.7, momentum=0.9, nesterov=True)


# name: (base optimizer, wrapper settings, steps before the checkpoint, steps after)
CONFIGS: dict[str, tuple[str, dict[str, Any], int, int]] = {
    # DiLoCo with 16-bit deltas (the anchor), saved 1 step after a round.
    "diloco_bf16": (
        "sgd_momentum",
        {"period": 3, "comm_dtype": torch.bfloat16, "outer_optimizer": _nesterov},
        7,
        5,
    ),
    # A round in flight at the checkpoint (started at step 4, lands at step 6), Adam inside.
    "overlap_in_flight": (
        "adam",
        {
            "period": 4,
            "overlap_steps": 2,
            "comm_dtype": torch.bfloat16,
            "outer_optimizer": _nesterov,
        },
        5,
        6,
    ),
    # Stateless SGD and accumulation: DCP's fake step runs when saving, and must not count.
    "stateless_accumulating": ("sgd", {"period": 3, "accumulation_steps": 2}, 10, 8),
}


def _build(config: str, seed: int) -> tuple[nn.Module, LocalSGDOptimizer]:
    base_name, settings, _, _ = CONFIGS[config]
    model = mlp(seed)
    if base_name == "adam":
        base: torch.optim.Optimizer = torch.optim.Adam(model.parameters(), lr=0.01)
    else:
        momentum = 0.9 if base_name == "sgd_momentum" else 0.0
        base = torch.optim.SGD(model.parameters(), lr=0.1, momentum=momentum)
    return model, LocalSGDOptimizer(base, model, **settings)


def _observe(model: nn.Module, opt: LocalSGDOptimizer) -> dict[str, Any]:
    """What must match an uninterrupted run: parameters, counters, base and outer state."""
    base_state = [
        {k: v.clone() for k, v in state.items() if isinstance(v, Tensor)}
        for state in opt.base_optimizer.state.values()
    ]
    outer = opt.outer_optimizer
    outer_state = (
        []
        if outer is None
        else [
            {k: v.clone() for k, v in state.items() if isinstance(v, Tensor)}
            for state in outer.state.values()
        ]
    )
    kept = (
        []
        if outer is None
        else [p.detach().clone() for g in outer.param_groups for p in g["params"]]
    )
    return {
        "params": flat_params(model),
        "counters": (
            opt.micro_steps,
            opt.optimizer_steps,
            opt.averaging_rounds,
            opt.next_round_step,
        ),
        "base_state": base_state,
        "outer_state": outer_state,
        "kept": kept,
    }


def _train(model: nn.Module, opt: LocalSGDOptimizer, config: str, micro: int, start: int) -> None:
    train(model, opt, micro, start)


def _resume_matches_uninterrupted(config: str, path: str) -> dict[str, Any]:
    _, settings, before, after = CONFIGS[config]
    accumulation = settings.get("accumulation_steps", 1)
    model, opt = _build(config, seed=0)
    _train(model, opt, config, before + after, 0)
    reference = _observe(model, opt)

    model, opt = _build(config, seed=0)
    _train(model, opt, config, before, 0)
    counted = (opt.micro_steps, opt.optimizer_steps, opt.averaging_rounds)
    model_sd, optim_sd = get_state_dict(model, opt)
    saved_counters = (opt.micro_steps, opt.optimizer_steps, opt.averaging_rounds)
    in_flight = bool(opt._rounds.in_flight)
    at_save = flat_params(model)
    dcp.save(per_replica({"model": model_sd, "optim": optim_sd}), checkpoint_id=path)
    _train(model, opt, config, after, before)  # the saving run goes on as if nothing happened
    saving_run = _observe(model, opt)

    model, opt = _build(config, seed=1)  # another start: everything must come from the files
    model_sd, optim_sd = get_state_dict(model, opt)
    fresh_counters = (opt.micro_steps, opt.optimizer_steps, opt.averaging_rounds)
    dcp.load(per_replica({"model": model_sd, "optim": optim_sd}), checkpoint_id=path)
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # nothing to warn about: a complete, matching checkpoint
        set_state_dict(model, opt, model_state_dict=model_sd, optim_state_dict=optim_sd)
    loaded_counters = (opt.micro_steps, opt.optimizer_steps, opt.averaging_rounds)
    _train(model, opt, config, after, before)
    return {
        "reference": reference,
        "resumed": _observe(model, opt),
        "saving_run": saving_run,
        "counted": counted,
        "saved_counters": saved_counters,
        "fresh_counters": fresh_counters,
        "loaded_counters": loaded_counters,
        "in_flight": in_flight,
        "at_save": at_save,
        "accumulation": accumulation,
    }


def _assert_equal(a: Any, b: Any, where: str) -> None:
    if isinstance(a, Tensor):
        assert torch.equal(a, b), where
    elif isinstance(a, dict):
        assert a.keys() == b.keys(), where
        for key in a:
            _assert_equal(a[key], b[key], f"{where}.{key}")
    elif isinstance(a, (list, tuple)):
        assert len(a) == len(b), where
        for i, (x, y) in enumerate(zip(a, b)):
            _assert_equal(x, y, f"{where}[{i}]")
    else:
        assert a == b, where


def _all_configs(path: str) -> dict[str, dict[str, Any]]:
    return {name: _resume_matches_uninterrupted(name, f"{path}/{name}") for name in CONFIGS}


def test_dcp_resume_equals_an_uninterrupted_run(ranks: Any, tmp_path: Any) -> None:
    results = ranks.run(_all_configs, str(tmp_path), world_size=2)
    for name, (_, settings, before, _) in CONFIGS.items():
        per_rank = [r[name] for r in results]
        for r, got in enumerate(per_rank):
            where = f"{name} rank {r}"
            _assert_equal(got["resumed"], got["reference"], where)
            _assert_equal(got["saving_run"], got["reference"], f"{where} (the saving run)")
            # get_state_dict's fake step with zero gradients counted nothing, on either side.
            assert got["saved_counters"] == got["counted"], where
            assert got["fresh_counters"] == (0, 0, 0), where
            assert got["loaded_counters"] == got["counted"], where
        # Saved between rounds, the replicas differed: each got its own values back.
        assert not torch.equal(per_rank[0]["at_save"], per_rank[1]["at_save"])
        accumulation = settings.get("accumulation_steps", 1)
        assert per_rank[0]["counted"][1] == before // accumulation
        assert before // accumulation % settings["period"] != 0  # saved between rounds
    assert all(r["overlap_in_flight"]["in_flight"] for r in results)
    assert all(r["diloco_bf16"]["reference"]["outer_state"] for r in results)


def _one_key_for_every_replica(path: str) -> tuple[str, str]:
    """The torch recipe without per_replica: DCP keeps one replica's tensors for all."""
    model, opt = _build("diloco_bf16", seed=0)
    _train(model, opt, "diloco_bf16", 4, 0)
    model_sd, optim_sd = get_state_dict(model, opt)
    dcp.save({"model": model_sd, "optim": optim_sd}, checkpoint_id=path)
    model, opt = _build("diloco_bf16", seed=0)
    model_sd, optim_sd = get_state_dict(model, opt)
    dcp.load({"model": model_sd, "optim": optim_sd}, checkpoint_id=path)
    before = opt.optimizer_steps
    problem = raised(
        set_state_dict, model, opt, model_state_dict=model_sd, optim_state_dict=optim_sd
    )
    return problem[0], problem[1] if opt.optimizer_steps == before else "state changed"


def test_a_checkpoint_without_per_replica_keys_is_refused_where_it_lost_values(
    ranks: Any, tmp_path: Any
) -> None:
    outcomes = ranks.run(_one_key_for_every_replica, str(tmp_path), world_size=2)
    # DCP saved each momentum buffer from one rank: the other rank's is not its own.
    refused = [o for o in outcomes if o[0] == "ValueError"]
    assert refused, outcomes
    for _, message in refused:
        assert "not the one it saved" in message and "per_replica" in message
    assert all(o[0] in ("", "ValueError") for o in outcomes), outcomes


def _stateless_model_without_per_replica(path: str) -> dict[str, Any]:
    """Stateless SGD saved between rounds without per_replica: nothing in the optimizer's
    state tells, and set_state_dict loads the model after the optimizer; the first step()
    must refuse, on every rank, before anything changes."""
    config = "stateless_accumulating"
    model, opt = _build(config, seed=0)
    _train(model, opt, config, 10, 0)  # 5 optimizer steps, period 3: replicas differ
    saved = flat_params(model)
    model_sd, optim_sd = get_state_dict(model, opt)
    dcp.save({"model": model_sd, "optim": optim_sd}, checkpoint_id=path)

    model, opt = _build(config, seed=0)
    model_sd, optim_sd = get_state_dict(model, opt)
    dcp.load({"model": model_sd, "optim": optim_sd}, checkpoint_id=path)
    set_state_dict(model, opt, model_state_dict=model_sd, optim_state_dict=optim_sd)
    loaded = flat_params(model)
    counters = (opt.micro_steps, opt.optimizer_steps, opt.averaging_rounds)
    first_step = raised(_train, model, opt, config, 1, 10)
    average = raised(opt.average)  # still refused: the model is still wrong
    untouched = torch.equal(flat_params(model), loaded) and counters == (
        opt.micro_steps,
        opt.optimizer_steps,
        opt.averaging_rounds,
    )

    # On purpose: weights loaded into the model before the optimizer's state are kept.
    _, optim_sd = get_state_dict(model, opt)
    dcp.load({"optim": optim_sd}, checkpoint_id=path)
    set_optimizer_state_dict(model, opt, optim_state_dict=optim_sd)
    _train(model, opt, config, 2, 10)
    return {
        "replica_kept": torch.equal(loaded, saved),
        "first_step": first_step,
        "average": average,
        "untouched": untouched,
        "steps_after_opt_out": opt.optimizer_steps,
    }


def test_a_model_without_per_replica_keys_is_refused_at_the_first_step(
    ranks: Any, tmp_path: Any
) -> None:
    outcomes = ranks.run(_stateless_model_without_per_replica, str(tmp_path), world_size=2)
    # DCP kept one replica's parameters (all of one rank's, or some of each).
    assert not all(o["replica_kept"] for o in outcomes), outcomes
    for r, o in enumerate(outcomes):
        for kind, message in (o["first_step"], o["average"]):
            assert kind == "ValueError", (r, kind, message)
            assert "model parameters" in message and "not the ones" in message, message
            assert "per_replica" in message, message
        assert o["untouched"], r
        assert o["steps_after_opt_out"] == 6, r


@pytest.mark.filterwarnings("ignore:torch.distributed is disabled:UserWarning")
def test_other_weights_loaded_after_the_optimizer_are_refused_without_communication(
    tmp_path: Any,
) -> None:
    """One process, no collective: the same check, raised locally, and again until fixed."""
    config = "stateless_accumulating"
    model, opt = _build(config, seed=0)
    _train(model, opt, config, 2, 0)
    dcp.save(dict(zip(("model", "optim"), get_state_dict(model, opt))), checkpoint_id=tmp_path)
    model, opt = _build(config, seed=0)
    model_sd, optim_sd = get_state_dict(model, opt)
    dcp.load({"model": model_sd, "optim": optim_sd}, checkpoint_id=tmp_path)
    set_state_dict(model, opt, model_state_dict=model_sd, optim_state_dict=optim_sd)
    saved = {k: v.clone() for k, v in model.state_dict().items()}
    model.load_state_dict(mlp(1).state_dict())  # after the optimizer: refused
    for _ in range(2):
        with pytest.raises(ValueError, match="not the ones this rank saved"):
            opt.step()
    model.load_state_dict(saved)  # the saved weights back: accepted
    opt.step()
    assert opt.micro_steps == 3


def test_per_replica_keys_by_rank_in_the_group() -> None:
    assert per_replica({"a": 1}) == {"replica_0": {"a": 1}}  # no process group: one replica
    with pytest.raises(TypeError, match="state must be a dict"):
        per_replica([])  # type: ignore[arg-type]


def test_fake_step_outside_dcp_is_a_real_step() -> None:
    """Only DCP's initialisation is passed through uncounted: a user's lr-0 zero-grad step
    on an optimizer without state is a step like any other."""
    model = mlp(0)
    opt = LocalSGDOptimizer(torch.optim.SGD(model.parameters(), lr=0.0), model, period=2)
    for p in model.parameters():
        p.grad = torch.zeros_like(p)
    opt.step()
    assert opt.optimizer_steps == 1
    assert not dist.is_initialized()
    assert rank() == 0


# --- FSDP2: 2 replicas x 2 shards ----------------------------------------------------------


def _fsdp2_resume(path: str) -> dict[str, Any]:
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import fully_shard

    mesh = init_device_mesh("cpu", (2, 2), mesh_dim_names=("replicate", "shard"))
    replicas = mesh["replicate"].get_group()

    def build(seed: int) -> tuple[nn.Module, LocalSGDOptimizer]:
        model = mlp(seed)
        fully_shard(model, mesh=mesh["shard"])
        base = torch.optim.AdamW(model.parameters(), lr=0.01)
        opt = LocalSGDOptimizer(
            base,
            model,
            period=3,
            process_group=replicas,
            comm_dtype=torch.bfloat16,
            outer_optimizer=_nesterov,
        )
        return model, opt

    replica = dist.get_rank(replicas)

    def run(model: nn.Module, opt: LocalSGDOptimizer, steps: int, start: int) -> None:
        for i in range(start, start + steps):
            g = torch.Generator().manual_seed(1000 * replica + i)  # data by replica
            x, y = torch.randn(8, 6, generator=g), torch.randint(0, 3, (8,), generator=g)
            nn.functional.cross_entropy(model(x), y).backward()
            opt.step()
            opt.zero_grad()

    def local(model: nn.Module) -> Tensor:
        return torch.cat([p.to_local().detach().reshape(-1).clone() for p in model.parameters()])

    model, opt = build(0)
    run(model, opt, 8, 0)
    reference = (local(model), opt.optimizer_steps, opt.averaging_rounds)

    model, opt = build(0)
    run(model, opt, 4, 0)
    model_sd, optim_sd = get_state_dict(model, opt)
    dcp.save(per_replica({"model": model_sd, "optim": optim_sd}, replicas), checkpoint_id=path)

    model, opt = build(1)
    model_sd, optim_sd = get_state_dict(model, opt)
    dcp.load(per_replica({"model": model_sd, "optim": optim_sd}, replicas), checkpoint_id=path)
    set_state_dict(model, opt, model_state_dict=model_sd, optim_state_dict=optim_sd)
    run(model, opt, 4, 4)
    return {
        "reference": reference,
        "resumed": (local(model), opt.optimizer_steps, opt.averaging_rounds),
    }


def test_fsdp2_replicas_resume_from_dcp(ranks: Any, tmp_path: Any) -> None:
    results = ranks.run(_fsdp2_resume, str(tmp_path), world_size=4, timeout=90)
    for r, got in enumerate(results):
        _assert_equal(got["resumed"], got["reference"], f"rank {r}")
    # Replicas differ between rounds (4 steps, period 3): each got its own shard back.
    assert not torch.equal(results[0]["resumed"][0], results[2]["resumed"][0])
