"""Multi-rank behaviour on gloo: averaging against DDP and manual averaging, buffers, checkpoints,
DDP-wrapped models, and bad input raised on every rank."""

from __future__ import annotations

from typing import Any

import pytest
import torch
import torch.distributed as dist
from _common import (
    batch,
    bn_net,
    flat_params,
    loss_of,
    mlp,
    raised,
    rank,
    roundtrip,
    sgd_wrapper,
    train,
)
from torch import nn
from torch.nn.parallel import DistributedDataParallel as DDP

from local_sgd_optim import LocalSGDOptimizer

# --- functions run on every rank (module level, so worker processes can import them) ------


def _period_one_vs_ddp(steps: int) -> tuple[torch.Tensor, torch.Tensor]:
    ours_model, ddp_inner = mlp(seed=1), mlp(seed=1)
    ours = sgd_wrapper(ours_model, period=1, lr=0.2)
    ddp = DDP(ddp_inner)
    ddp_opt = torch.optim.SGD(ddp.parameters(), lr=0.2)
    for step in range(steps):
        train(ours_model, ours, 1, start=step)
        train(ddp, ddp_opt, 1, start=step)
    return flat_params(ours_model), flat_params(ddp_inner)


def _trace_rounds(period: int, accumulation: int, micro_steps: int) -> dict[str, Any]:
    """Per micro-step: parameters after the step, the local parameters right before any round
    (captured by a base-optimizer post hook), and the counters."""
    model = mlp(seed=rank() + 3)  # differently seeded ranks: broadcast_initial must align them
    base = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
    opt = LocalSGDOptimizer(base, model, period=period, accumulation_steps=accumulation)
    initial = flat_params(model)
    before_round: list[torch.Tensor] = []
    base.register_step_post_hook(lambda *_: before_round.append(flat_params(model)))
    trace = []
    for i in range(micro_steps):
        opt.zero_grad()
        loss_of(model, rank(), i).backward()
        rounds = opt.averaging_rounds
        opt.step()
        trace.append(
            {
                "params": flat_params(model),
                "local": before_round[-1] if before_round else None,
                "counters": (opt.micro_steps, opt.optimizer_steps, opt.averaging_rounds),
                "round": opt.averaging_rounds > rounds,
            }
        )
    return {"initial": initial, "trace": trace}


def _buffers(average_buffers: bool) -> dict[str, Any]:
    model = bn_net(seed=rank())
    opt = sgd_wrapper(model, period=2, average_buffers=average_buffers)
    bn = model[1]
    train(model, opt, 1)
    if rank() == 1:
        model(batch(1, 99)[0])  # an extra forward: num_batches_tracked now differs
    loss_of(model, rank(), 1).backward()
    before = {"mean": bn.running_mean.clone(), "var": bn.running_var.clone()}
    opt.step()  # the round
    return {
        "before": before,
        "mean": bn.running_mean.clone(),
        "var": bn.running_var.clone(),
        "tracked": int(bn.num_batches_tracked),
    }


def _straight_vs_resumed(accumulation: int) -> tuple[torch.Tensor, torch.Tensor]:
    def make(seed: int) -> tuple[nn.Module, LocalSGDOptimizer]:
        model = bn_net(seed)
        return model, sgd_wrapper(model, period=3, momentum=0.9, accumulation_steps=accumulation)

    model, opt = make(seed=0)
    train(model, opt, 8 * accumulation)
    straight = torch.cat([flat_params(model), model[1].running_mean])

    model, opt = make(seed=0)
    train(model, opt, 4 * accumulation)
    saved = roundtrip({"model": model.state_dict(), "opt": opt.state_dict()})
    model, opt = make(seed=123)  # a fresh start: different initial values everywhere
    model.load_state_dict(saved["model"])
    opt.load_state_dict(saved["opt"])
    train(model, opt, 4 * accumulation, start=4 * accumulation)
    resumed = torch.cat([flat_params(model), model[1].running_mean])
    return straight, resumed


def _ddp_keeps_gradients_local(style: str) -> dict[str, Any]:
    """A DDP-wrapped model under LocalSGD against the same model unwrapped, step by step."""
    accumulation = 2
    plain = bn_net(seed=5)
    flags = {"find_unused_parameters": True, "gradient_as_bucket_view": True}
    wrapped = DDP(bn_net(seed=5), **(flags if style == "flags" else {}))
    opts = [
        sgd_wrapper(m, period=4, momentum=0.9, accumulation_steps=accumulation)
        for m in (plain, wrapped)
    ]
    same_as_plain = []
    for i in range(8 * accumulation):
        last_micro = (i + 1) % accumulation == 0
        for model, opt in zip((plain, wrapped), opts):
            if model is wrapped and style == "require_sync":
                model.require_backward_grad_sync = True  # scripts that force DDP's sync
            if model is wrapped and style == "no_sync" and not last_micro:
                with model.no_sync():
                    loss_of(model, rank(), i).backward()
            else:
                loss_of(model, rank(), i).backward()
            opt.step()
            opt.zero_grad()
        same_as_plain.append(
            torch.equal(flat_params(plain), flat_params(wrapped.module))
            and torch.equal(plain[1].running_mean, wrapped.module[1].running_mean)
        )
    return {
        "same_as_plain": same_as_plain,
        "params": flat_params(wrapped.module),
        "rounds": opts[1].averaging_rounds,
    }


def _construct(kind: str) -> tuple[str, str]:
    model = mlp()
    period = 4
    if kind == "shape" and rank() == 1:
        model = nn.Sequential(nn.Linear(6, 16), nn.Tanh(), nn.Linear(16, 4))
    if kind == "count" and rank() == 1:
        model = nn.Sequential(nn.Linear(6, 16), nn.Tanh(), nn.Linear(16, 3), nn.Linear(3, 3))
    if kind == "dtype" and rank() == 1:
        model = mlp().double()
    if kind == "period" and rank() == 1:
        period = 8
    if kind == "bad_period" or (kind == "bad_period_on_rank_1" and rank() == 1):
        period = 0
    params = list(model.parameters())
    if kind == "foreign_on_rank_1" and rank() == 1:
        params.append(nn.Parameter(torch.zeros(2)))
    if kind == "ddp_with_hook":
        model = DDP(model)
        model.register_comm_hook(None, _allreduce_hook)
    base = torch.optim.SGD(params, lr=0.1)
    return raised(LocalSGDOptimizer, base, model, period)


def _allreduce_hook(state: object, bucket: dist.GradBucket) -> torch.futures.Future[torch.Tensor]:
    return dist.all_reduce(bucket.buffer(), async_op=True).get_future().then(lambda f: f.value()[0])


_allreduce_hook.__annotations__ = {}


def _add_param_group_and_unfreeze() -> dict[str, Any]:
    model = mlp(seed=rank())
    model[0].weight.requires_grad_(False)  # frozen, yet held by the optimizer as is common
    opt = sgd_wrapper(model, period=2)
    initial = flat_params(model)
    with torch.no_grad():
        model[0].weight.add_(rank())  # the frozen copies now differ across ranks
    torch.manual_seed(rank() + 50)
    extra = nn.Parameter(torch.randn(5))  # outside the model, different on each rank
    opt.add_param_group({"params": [extra], "lr": 0.5})
    extra_after_add = extra.detach().clone()

    def two_steps(start: int) -> None:
        for i in range(start, start + 2):
            (loss_of(model, rank(), i) + (extra * (rank() + 1)).sum()).backward()
            opt.step()
            opt.zero_grad()

    two_steps(0)
    after_first_round = {
        "frozen": model[0].weight.detach().clone(),
        "extra": extra.detach().clone(),
        "head": flat_params(model[2]),
    }
    model[0].weight.requires_grad_(True)  # unfrozen: joins the next round
    two_steps(2)
    return {
        "initial": initial,
        "extra_after_add": extra_after_add,
        "first": after_first_round,
        "params": flat_params(model),
        "extra": extra.detach().clone(),
    }


def _exception_inside_with() -> dict[str, Any]:
    """Rank 1 fails inside ``with``; rank 0 never calls close(). Had rank 1's exit run a final
    round, it would wait for a partner that never comes and fail with a gloo error instead."""
    model = mlp(seed=rank())
    opt = sgd_wrapper(model, period=4)
    if rank() == 0:
        train(model, opt, 3)
        return {"raised": False, "rounds": opt.averaging_rounds}
    try:
        with opt:
            train(model, opt, 3)
            raise KeyError("only rank 1 fails")
    except KeyError:
        return {"raised": True, "rounds": opt.averaging_rounds}


def _broadcast_initial(flag: bool) -> torch.Tensor:
    model = mlp(seed=rank())
    sgd_wrapper(model, period=2, broadcast_initial=flag)
    return flat_params(model)


# --- tests: assertions in the parent ----------------------------------------------------


def test_period_one_equals_ddp(ranks: Any) -> None:
    for ours, ddp in ranks.run(_period_one_vs_ddp, 10):
        torch.testing.assert_close(ours, ddp, rtol=0, atol=1e-6)


@pytest.mark.parametrize("world_size", [2, 4])
def test_rounds_equal_manual_average_and_never_split_a_window(ranks: Any, world_size: int) -> None:
    period, accumulation, micro_steps = 3, 2, 20
    results = ranks.run(_trace_rounds, period, accumulation, micro_steps, world_size=world_size)
    for r in results[1:]:
        assert torch.equal(r["initial"], results[0]["initial"]), "broadcast_initial failed"
    for i in range(micro_steps):
        entries = [r["trace"][i] for r in results]
        micro, optimizer_steps, rounds = entries[0]["counters"]
        assert all(e["counters"] == entries[0]["counters"] for e in entries)
        assert micro == i + 1
        assert optimizer_steps == (i + 1) // accumulation
        assert rounds == optimizer_steps // period
        if entries[0]["round"]:
            assert micro % accumulation == 0, "a round landed inside an accumulation window"
            assert optimizer_steps % period == 0
            for e in entries[1:]:
                assert torch.equal(e["params"], entries[0]["params"]), "not bitwise equal"
            manual = torch.stack([e["local"] for e in entries]).sum(0) / world_size
            torch.testing.assert_close(entries[0]["params"], manual, rtol=0, atol=1e-7)
            assert not all(torch.equal(e["local"], entries[0]["local"]) for e in entries[1:])
        elif optimizer_steps % period != 0:
            assert not torch.equal(entries[1]["params"], entries[0]["params"])
    assert results[0]["trace"][-1]["counters"] == (20, 10, 3)


def test_float_buffers_averaged_integer_buffers_untouched(ranks: Any) -> None:
    r0, r1 = ranks.run(_buffers, True)
    assert not torch.equal(r0["before"]["mean"], r1["before"]["mean"])
    for key in ("mean", "var"):
        assert torch.equal(r0[key], r1[key])
        torch.testing.assert_close(
            r0[key], (r0["before"][key] + r1["before"][key]) / 2, rtol=0, atol=1e-7
        )
    assert (r0["tracked"], r1["tracked"]) == (2, 3)

    r0, r1 = ranks.run(_buffers, False)
    assert not torch.equal(r0["mean"], r1["mean"])


@pytest.mark.parametrize("accumulation", [1, 2])
def test_checkpoint_resume_is_bitwise_on_every_rank(ranks: Any, accumulation: int) -> None:
    results = ranks.run(_straight_vs_resumed, accumulation)
    for straight, resumed in results:
        assert torch.equal(straight, resumed)
    assert not torch.equal(results[0][0], results[1][0]), "ranks should differ after 8 steps"


@pytest.mark.parametrize("style", ["plain", "require_sync", "no_sync", "flags"])
def test_ddp_model_has_no_gradient_allreduce_between_rounds(ranks: Any, style: str) -> None:
    r0, r1 = ranks.run(_ddp_keeps_gradients_local, style)
    for r in (r0, r1):
        assert all(r["same_as_plain"]), r["same_as_plain"]
        assert r["rounds"] == 2
    # 8 optimizer steps with period 4: the last step was a round, so ranks agree bitwise.
    assert torch.equal(r0["params"], r1["params"])


SHAPE = "rank 0 has parameter '2.weight' of shape (3, 16), torch.float32; rank 1 has parameter "
RANK_1_FAILED = "LocalSGDOptimizer could not be built on rank 1 ("


@pytest.mark.parametrize(
    "kind, errors, patterns",
    [
        ("shape", ["RuntimeError"] * 2, [SHAPE + "'2.weight' of shape (4, 16)"] * 2),
        ("count", ["RuntimeError"] * 2, ["rank 1 has parameter '3.weight' of shape (3, 3)"] * 2),
        (
            "dtype",
            ["RuntimeError"] * 2,
            ["rank 1 has parameter '0.weight' of shape (16, 6), torch.float64"] * 2,
        ),
        (
            "period",
            ["RuntimeError"] * 2,
            ["rank 0 has setting period=4; rank 1 has setting period=8"] * 2,
        ),
        ("bad_period", ["ValueError"] * 2, ["period must be a positive integer, got 0"] * 2),
        (
            "bad_period_on_rank_1",
            ["RuntimeError", "ValueError"],
            [
                RANK_1_FAILED + "ValueError: period must be a positive integer, got 0)",
                "period must be a positive integer, got 0",
            ],
        ),
        (
            "foreign_on_rank_1",
            ["RuntimeError", "ValueError"],
            [
                RANK_1_FAILED + "ValueError: base_optimizer holds 1 parameter(s) that are not",
                "base_optimizer holds 1 parameter(s) that are not parameters of model",
            ],
        ),
        ("ddp_with_hook", ["RuntimeError"] * 2, ["already has a communication hook"] * 2),
    ],
)
def test_bad_input_raises_on_every_rank(
    ranks: Any, kind: str, errors: list[str], patterns: list[str]
) -> None:
    results = ranks.run(_construct, kind, timeout=60)
    for (type_name, message), error, pattern in zip(results, errors, patterns):
        assert type_name == error, message
        assert pattern in message, message


def test_model_mismatch_on_four_ranks_names_the_odd_rank(ranks: Any) -> None:
    results = ranks.run(_construct, "shape", world_size=4, timeout=60)
    assert [type_name for type_name, _ in results] == ["RuntimeError"] * 4
    assert all("rank 1 has parameter '2.weight' of shape (4, 16)" in m for _, m in results)


def test_added_and_unfrozen_parameters_join_averaging(ranks: Any) -> None:
    r0, r1 = ranks.run(_add_param_group_and_unfreeze)
    assert torch.equal(r0["initial"], r1["initial"]), "broadcast_initial covers frozen ones too"
    assert torch.equal(r0["extra_after_add"], r1["extra_after_add"])
    assert not torch.equal(r0["first"]["frozen"], r1["first"]["frozen"]), "frozen was averaged"
    assert torch.equal(r0["first"]["extra"], r1["first"]["extra"])
    assert torch.equal(r0["first"]["head"], r1["first"]["head"])
    assert torch.equal(r0["params"], r1["params"]), "the unfrozen parameter did not join"
    assert torch.equal(r0["extra"], r1["extra"])


def test_exception_inside_with_skips_the_final_round(ranks: Any) -> None:
    r0, r1 = ranks.run(_exception_inside_with, timeout=60, pg_timeout=10)
    assert (r0["raised"], r1["raised"]) == (False, True)
    assert r1["rounds"] == 0


@pytest.mark.parametrize("flag", [True, False])
def test_broadcast_initial(ranks: Any, flag: bool) -> None:
    r0, r1 = ranks.run(_broadcast_initial, flag)
    assert torch.equal(r0, r1) is flag


def _load_order(model_first: bool) -> list[str]:
    """Resume from a checkpoint taken between rounds, loading the model before or after
    constructing the optimizer; return the warnings raised."""
    import warnings

    model = mlp(seed=rank())
    opt = sgd_wrapper(model, period=4)
    train(model, opt, 2)
    saved = roundtrip({"model": model.state_dict(), "opt": opt.state_dict()})
    fresh = mlp(seed=rank() + 10)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        if model_first:
            fresh.load_state_dict(saved["model"])
        fresh_opt = sgd_wrapper(fresh, period=4)
        if not model_first:
            fresh.load_state_dict(saved["model"])
        fresh_opt.load_state_dict(saved["opt"])
    return [str(w.message) for w in caught]


def test_warns_when_initial_broadcast_replaced_a_loaded_checkpoint(ranks: Any) -> None:
    r0, r1 = ranks.run(_load_order, True)
    assert r0 == []  # rank 0's own parameters were kept
    assert len(r1) == 1 and "rank 0's initial broadcast" in r1[0]
    assert ranks.run(_load_order, False) == [[], []]


class _Mixed(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.full = nn.Linear(4, 4)
        self.half = nn.Linear(4, 4).to(torch.bfloat16)
        self.rotation = nn.Parameter(torch.randn(3, dtype=torch.complex64))
        self.register_buffer("scale", torch.ones(4))
        self.register_buffer("empty", torch.zeros(0))


def _mixed_dtypes() -> dict[str, Any]:
    model = _Mixed()
    opt = sgd_wrapper(model, period=1, average_buffers="all")  # "scale" is no statistic
    with torch.no_grad():
        for p in model.parameters():
            p.add_(rank() + 1)
    model.scale = torch.full((4,), float(rank()))  # a buffer replaced by a new tensor
    opt.average()
    state = {k: v.clone() for k, v in model.state_dict().items()}
    return {"state": state, "rounds": opt.averaging_rounds}


def test_mixed_dtypes_complex_and_replaced_buffers(ranks: Any) -> None:
    r0, r1 = ranks.run(_mixed_dtypes)
    assert r0["rounds"] == r1["rounds"] == 1
    for key, value in r0["state"].items():
        assert torch.equal(value, r1["state"][key]), key
    torch.testing.assert_close(r0["state"]["scale"], torch.full((4,), 0.5))
    assert r0["state"]["half.weight"].dtype == torch.bfloat16
    assert r0["state"]["rotation"].dtype == torch.complex64


def _dtensor_model() -> tuple[str, str]:
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.tensor import Shard, distribute_tensor

    mesh = init_device_mesh("cpu", (dist.get_world_size(),))
    model = nn.Linear(4, 4)
    model.weight = nn.Parameter(distribute_tensor(model.weight.detach(), mesh, [Shard(0)]))
    return raised(LocalSGDOptimizer, torch.optim.SGD(model.parameters(), lr=0.1), model, 2)


def test_dtensor_over_the_whole_world_without_a_group_is_rejected(ranks: Any) -> None:
    """Sharded over every rank, nothing holds the same shard to average with (FSDP2 across
    replica groups: tests/test_fsdp2.py)."""
    for type_name, message in ranks.run(_dtensor_model, timeout=60):
        assert type_name == "ValueError", message
        assert "parameter 'weight' is a DTensor" in message and "process_group=None" in message


class _TwoHeads(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.body = nn.Linear(6, 8)
        self.head_a = nn.Linear(8, 3)
        self.head_b = nn.Linear(8, 3)

    def forward(self, x: torch.Tensor, use_b: bool) -> torch.Tensor:
        h = torch.tanh(self.body(x))
        return self.head_b(h) if use_b else self.head_a(h)


def _gradient_sets_differ() -> dict[str, Any]:
    """Rank 1 never uses head_a, so its head_a.grad stays None: PyTorch's averager aborts on
    such ranks with a size mismatch; every trainable parameter must be averaged regardless."""
    torch.manual_seed(rank())
    model = _TwoHeads()
    opt = sgd_wrapper(model, period=2)
    for i in range(2):
        x, y = batch(rank(), i)
        nn.functional.cross_entropy(model(x, use_b=rank() == 1), y).backward()
        opt.step()
        opt.zero_grad()
    return {"params": flat_params(model)}


def test_ranks_with_different_gradient_sets_still_average_everything(ranks: Any) -> None:
    r0, r1 = ranks.run(_gradient_sets_differ)
    assert torch.equal(r0["params"], r1["params"])
