"""Algorithms on top of plain averaging: post-local warm-up, outer optimizers (DiLoCo,
SlowMo), period schedules and two-level averaging, each against a reference on gloo ranks."""

from __future__ import annotations

from typing import Any

import pytest
import torch
import torch.distributed as dist
from _common import bn_net, flat_params, loss_of, mlp, raised, rank, roundtrip, sgd_wrapper, train
from torch.nn.parallel import DistributedDataParallel as DDP

from local_sgd_optim import LocalSGDOptimizer
from local_sgd_optim.schedules import MultiStepPeriod, QuadraticSyncPeriod

# --- functions run on every rank -----------------------------------------------------------


def _warmup(wrap_ddp: bool, accumulation: int) -> dict[str, Any]:
    """Warm-up steps against DDP proper; then local steps, which must differ across ranks."""
    model = mlp(seed=rank() + 1)  # differently seeded: the initial broadcast aligns them
    ours_model = DDP(model) if wrap_ddp else model
    opt = sgd_wrapper(
        ours_model, period=4, momentum=0.9, warmup_steps=3, accumulation_steps=accumulation
    )
    reference_inner = mlp(seed=1)
    reference = DDP(reference_inner)
    reference_opt = torch.optim.SGD(reference.parameters(), lr=0.1, momentum=0.9)
    trace = []
    for step in range(6):
        for micro in range(accumulation):
            i = step * accumulation + micro
            loss_of(ours_model, rank(), i).backward()
            opt.step()
            if micro < accumulation - 1:
                with reference.no_sync():
                    loss_of(reference, rank(), i).backward()
            else:
                loss_of(reference, rank(), i).backward()
        opt.zero_grad()
        for p in reference.parameters():
            p.grad.div_(accumulation)
        reference_opt.step()
        reference_opt.zero_grad()
        trace.append(
            {
                "params": flat_params(model),
                "reference": flat_params(reference_inner),
                "bytes": opt.stats.bytes_communicated,
            }
        )
    return {"trace": trace, "rounds": opt.averaging_rounds, "next": opt.next_round_step}


def _outer_identity() -> dict[str, Any]:
    """Outer SGD with lr 1 and no momentum is plain averaging."""
    results = {}
    for name, outer in (("plain", None), ("outer", lambda ps: torch.optim.SGD(ps, lr=1.0))):
        model = mlp(seed=2)
        opt = sgd_wrapper(model, period=3, momentum=0.9, outer_optimizer=outer)
        train(model, opt, 9)
        results[name] = flat_params(model)
    return results


def _outer_nesterov(steps: int, save_at: int | None) -> dict[str, Any]:
    """DiLoCo's outer step; optionally checkpointed mid-run and resumed in a fresh process state."""

    def make(seed: int) -> tuple[Any, LocalSGDOptimizer]:
        model = bn_net(seed=seed)
        opt = LocalSGDOptimizer(
            torch.optim.AdamW(model.parameters(), lr=1e-2),
            model,
            period=MultiStepPeriod({0: 2, 4: 3}),
            warmup_steps=2,
            outer_optimizer=lambda ps: torch.optim.SGD(ps, lr=0.7, momentum=0.9, nesterov=True),
        )
        return model, opt

    model, opt = make(0)
    rounds_at = []
    for i in range(steps):
        if save_at is not None and i == save_at:
            saved = roundtrip({"model": model.state_dict(), "opt": opt.state_dict()})
            model, opt = make(123)
            model.load_state_dict(saved["model"])
            opt.load_state_dict(saved["opt"])
        before = opt.averaging_rounds
        train(model, opt, 1, start=i)
        if opt.averaging_rounds > before:
            rounds_at.append(opt.optimizer_steps)
    return {"params": flat_params(model), "rounds_at": rounds_at}


def _overlapped_outer(
    comm_dtype: torch.dtype | None, outer_lr: float, momentum: float, save_at: int | None
) -> dict[str, Any]:
    """Overlapped rounds with an outer optimizer; optionally resumed from a checkpoint taken
    with a round in flight."""

    def make(seed: int) -> tuple[Any, LocalSGDOptimizer]:
        model = bn_net(seed=seed)
        outer = None
        if outer_lr:
            outer = lambda ps: torch.optim.SGD(ps, lr=outer_lr, momentum=momentum)  # noqa: E731
        opt = sgd_wrapper(
            model,
            period=4,
            momentum=0.9,
            overlap_steps=2,
            comm_dtype=comm_dtype,
            outer_optimizer=outer,
            bucket_cap_mb=1 / 1024,  # many buckets: a parameter spans several
        )
        return model, opt

    model, opt = make(0)
    for i in range(15):
        if i == save_at:
            saved = roundtrip({"model": model.state_dict(), "opt": opt.state_dict()})
            assert saved["opt"]["local_sgd"]["pending"] is not None
            model, opt = make(99)
            model.load_state_dict(saved["model"])
            opt.load_state_dict(saved["opt"])
        train(model, opt, 1, start=i)
    opt.close()
    return {"params": torch.cat([flat_params(model), model[1].running_mean])}


def _overlapped_outer_step_by_hand(alpha: float) -> dict[str, Any]:
    """The first overlapped round with outer SGD(lr=alpha) against the formula: each rank ends
    at its progress since the snapshot plus the outer step from the mean of the snapshots."""
    model = mlp(seed=rank() + 5)
    base = torch.optim.SGD(model.parameters(), lr=0.1)
    opt = LocalSGDOptimizer(
        base,
        model,
        period=4,
        overlap_steps=2,
        outer_optimizer=lambda ps: torch.optim.SGD(ps, lr=alpha),
        bucket_cap_mb=1 / 1024,
    )
    initial = flat_params(model)
    after_base_step: dict[int, torch.Tensor] = {}
    base.register_step_post_hook(
        lambda *_: after_base_step.__setitem__(opt.optimizer_steps + 1, flat_params(model))
    )
    train(model, opt, 6)
    mean = after_base_step[4].clone()
    dist.all_reduce(mean)
    mean /= dist.get_world_size()
    kept = initial + alpha * (mean - initial)
    return {"got": flat_params(model), "expected": after_base_step[6] - after_base_step[4] + kept}


def _two_level() -> dict[str, Any]:
    local, _ = dist.new_subgroups(group_size=2)
    model = mlp(seed=rank())
    opt = sgd_wrapper(model, period=6, local_period=2, local_group=local)
    trace = []
    for i in range(7):
        train(model, opt, 1, start=i)
        trace.append((flat_params(model), opt.local_rounds, opt.averaging_rounds))
    return {"trace": trace}


def _bad_subgroups() -> tuple[str, str]:
    # Ranks 0 and 1 think their subgroup includes rank 2; rank 2 thinks it is with rank 3.
    groups = [dist.new_group([0, 1, 2]), dist.new_group([2, 3])]
    mine = groups[0] if rank() in (0, 1) else groups[1]
    model = mlp()
    return raised(
        LocalSGDOptimizer,
        torch.optim.SGD(model.parameters(), lr=0.1),
        model,
        period=4,
        local_period=2,
        local_group=mine,
    )


def _schedule_returning_zero() -> tuple[str, str]:
    model = mlp()
    opt = sgd_wrapper(model, period=lambda step: 2 if step < 2 else 0)
    return raised(train, model, opt, 4)


def _quadratic_sync_rounds() -> list[int]:
    model = mlp()
    base = torch.optim.SGD(model.parameters(), lr=0.1)
    scheduler = torch.optim.lr_scheduler.StepLR(base, step_size=6, gamma=0.1)
    opt = LocalSGDOptimizer(base, model, period=QuadraticSyncPeriod(base, 2, growth=0.05))
    rounds_at = []
    for i in range(20):
        before = opt.averaging_rounds
        train(model, opt, 1, start=i)
        scheduler.step()
        if opt.averaging_rounds > before:
            rounds_at.append(opt.optimizer_steps)
    return rounds_at


# --- tests ---------------------------------------------------------------------------------


@pytest.mark.parametrize(("wrap_ddp", "accumulation"), [(False, 1), (False, 2), (True, 2)])
def test_warmup_is_data_parallel_then_local(ranks: Any, wrap_ddp: bool, accumulation: int) -> None:
    r0, r1 = ranks.run(_warmup, wrap_ddp, accumulation)
    n = sum(p.numel() for p in mlp().parameters())
    # The gradients, and on a plain module the header before them (2 ranks x 6 int64 slots);
    # DDP's own bucket carries no header.
    per_step = n * 4 + (0 if wrap_ddp else 2 * 6 * 8)
    for step, (a, b) in enumerate(zip(r0["trace"], r1["trace"])):
        if step < 3:
            assert torch.equal(a["params"], b["params"])  # bitwise, after every warm-up step
            torch.testing.assert_close(a["params"], a["reference"], rtol=0, atol=1e-6)
            # One all-reduce of the gradients per optimizer step, whatever the accumulation.
            assert a["bytes"] == (step + 1) * per_step
        else:
            assert not torch.equal(a["params"], b["params"])  # local steps: no more all-reduce
            assert a["bytes"] == 3 * per_step  # nothing between rounds
    assert r0["rounds"] == 0 and r0["next"] == 7  # the first round: warm-up + period


def test_outer_sgd_with_lr_one_is_plain_averaging(ranks: Any) -> None:
    for result in ranks.run(_outer_identity):
        torch.testing.assert_close(result["outer"], result["plain"], rtol=0, atol=1e-6)


def test_outer_optimizer_on_one_rank_is_lookahead() -> None:
    model = mlp(seed=4)
    lookahead = 0.5
    opt = sgd_wrapper(model, period=3, outer_optimizer=lambda ps: torch.optim.SGD(ps, lr=lookahead))
    reference = mlp(seed=4)
    fast = torch.optim.SGD(reference.parameters(), lr=0.1)
    slow = [p.detach().clone() for p in reference.parameters()]
    for i in range(9):
        train(model, opt, 1, start=i)
        train(reference, fast, 1, start=i)
        if (i + 1) % 3 == 0:  # Lookahead (Zhang et al., arXiv 1907.08610): slow += a (fast - slow)
            with torch.no_grad():
                for s, p in zip(slow, reference.parameters()):
                    s.add_(p - s, alpha=lookahead)
                    p.copy_(s)
    torch.testing.assert_close(flat_params(model), flat_params(reference), rtol=0, atol=1e-6)


def test_outer_nesterov_schedule_and_warmup_resume_bitwise(ranks: Any) -> None:
    straight = ranks.run(_outer_nesterov, 13, None)
    resumed = ranks.run(_outer_nesterov, 13, 5)  # mid-schedule, after warm-up and one round
    for a, b in zip(straight, resumed):
        assert torch.equal(a["params"], b["params"])
    assert torch.equal(straight[0]["params"], straight[1]["params"])
    # Warm-up 2, then every 2 steps until step 4, every 3 from then on.
    assert straight[0]["rounds_at"] == straight[1]["rounds_at"] == [4, 7, 10, 13]
    early = ranks.run(_outer_nesterov, 13, 1)  # mid-warm-up
    assert torch.equal(early[0]["params"], straight[0]["params"])


def test_two_level_rounds_land_on_the_right_groups_and_steps(ranks: Any) -> None:
    results = ranks.run(_two_level, world_size=4)
    traces = [r["trace"] for r in results]
    for step in range(7):
        params = [t[step][0] for t in traces]
        local_rounds, rounds = traces[0][step][1], traces[0][step][2]
        assert all(t[step][1:] == (local_rounds, rounds) for t in traces)
        if step + 1 in (2, 4):  # a subgroup round: pairs agree, the pairs differ
            assert torch.equal(params[0], params[1]) and torch.equal(params[2], params[3])
            assert not torch.equal(params[0], params[2])
        elif step + 1 == 6:  # the global round
            assert all(torch.equal(params[0], p) for p in params[1:])
        else:
            assert not torch.equal(params[0], params[1])
    assert traces[0][6][1:] == (2, 1)  # rounds at 2 and 4 inside pairs; 6 across all


def test_subgroups_that_do_not_split_the_world_are_refused_on_every_rank(ranks: Any) -> None:
    for name, message in ranks.run(_bad_subgroups, world_size=4):
        assert name == "ValueError"
        assert "local_group must split the ranks into disjoint subgroups" in message
        assert "rank 0's subgroup [0, 1, 2] is not the same on its members" in message


def test_a_schedule_returning_zero_is_refused_on_every_rank(ranks: Any) -> None:
    for name, message in ranks.run(_schedule_returning_zero):
        assert name == "ValueError"
        assert "returned 0 at optimizer step 2; it must return a positive integer" in message


def test_quadratic_sync_period_follows_the_learning_rate(ranks: Any) -> None:
    r0, r1 = ranks.run(_quadratic_sync_rounds)
    # lr 0.1: (0.05 / 0.1)^2 < 2, so every 2 steps. StepLR decays the rate after 6 steps, so
    # the round of step 8 reads lr 0.01: (0.05 / 0.01)^2 = 25 steps, the next at step 33.
    assert r0 == r1 == [2, 4, 6, 8]


@pytest.mark.parametrize(
    ("kwargs", "error", "message"),
    [
        ({"warmup_steps": -1}, ValueError, "warmup_steps must be a non-negative integer, got -1"),
        ({"outer_optimizer": "sgd"}, TypeError, "outer_optimizer must be a callable"),
        ({"local_period": 4}, ValueError, "local_period must be smaller than period"),
        ({"local_period": 0}, ValueError, "local_period must be a positive integer, got 0"),
        (
            {"local_period": 2, "local_group": 3},
            TypeError,
            "local_group must be a torch.distributed.ProcessGroup",
        ),
        ({"local_group": "node"}, ValueError, "local_group was given without local_period"),
        (
            {"overlap_steps": 1, "local_period": 2},
            ValueError,
            "overlap_steps cannot be combined with local_period",
        ),
    ],
)
def test_rejects_bad_algorithm_settings(
    kwargs: dict[str, Any], error: type[Exception], message: str
) -> None:
    model = mlp()
    with pytest.raises(error, match=message):
        sgd_wrapper(model, period=4, **kwargs)


def test_schedules_reject_bad_input_and_compute_periods() -> None:
    with pytest.raises(ValueError, match="must have an entry for step 0"):
        MultiStepPeriod({5: 2})
    schedule = MultiStepPeriod({0: 2, 10: 8, 100: 32})
    assert [schedule(s) for s in (0, 9, 10, 99, 100, 10_000)] == [2, 2, 8, 8, 32, 32]
    base = torch.optim.SGD(mlp().parameters(), lr=0.1)
    rule = QuadraticSyncPeriod(base, base_period=4, growth=0.2, max_period=1000)
    assert rule(0) == 4  # (0.2 / 0.1)^2 = 4
    base.param_groups[0]["lr"] = 0.01
    assert rule(0) == 400
    base.param_groups[0]["lr"] = 0.0
    assert rule(0) == 1000
    with pytest.raises(ValueError, match="growth must be a positive number"):
        QuadraticSyncPeriod(base, base_period=4, growth=0)


def test_load_state_dict_refuses_a_checkpoint_of_another_algorithm() -> None:
    def make(**kwargs: Any) -> LocalSGDOptimizer:
        model = mlp()
        return sgd_wrapper(model, 4, **kwargs)

    outer = {"outer_optimizer": lambda ps: torch.optim.SGD(ps, lr=0.5)}
    with_outer = roundtrip(make(**outer).state_dict())
    with pytest.raises(ValueError, match=r"taken with an outer_optimizer and this .* has none"):
        make().load_state_dict(with_outer)
    with pytest.raises(ValueError, match="taken without an outer_optimizer"):
        make(**outer).load_state_dict(roundtrip(make().state_dict()))
    two_level = roundtrip(make().state_dict())
    two_level["local_sgd"]["local_period"] = 2
    with pytest.raises(ValueError, match=r"taken with local_period=2, this .* local_period=None"):
        make().load_state_dict(two_level)
    shrunk = dict(with_outer, local_sgd=dict(with_outer["local_sgd"]))
    shrunk["local_sgd"]["outer"] = dict(shrunk["local_sgd"]["outer"], params=[torch.zeros(3)])
    with pytest.raises(ValueError, match="outer optimizer parameters do not match this model"):
        make(**outer).load_state_dict(shrunk)
    broken = roundtrip(make().state_dict())
    broken["local_sgd"]["pending"] = {"received": [], "sent": []}
    with pytest.raises(ValueError, match="pending must be None or a dict of 'step'"):
        make().load_state_dict(broken)


@pytest.mark.parametrize("comm_dtype", [None, torch.bfloat16])
def test_overlapped_rounds_with_an_outer_optimizer(
    ranks: Any, comm_dtype: torch.dtype | None
) -> None:
    plain = ranks.run(_overlapped_outer, comm_dtype, 0.0, 0.0, None)
    identity = ranks.run(_overlapped_outer, comm_dtype, 1.0, 0.0, None)
    for a, b in zip(plain, identity):  # outer SGD, lr 1, no momentum: the plain average
        torch.testing.assert_close(a["params"], b["params"], rtol=0, atol=1e-6)
    straight = ranks.run(_overlapped_outer, comm_dtype, 0.7, 0.9, None)
    resumed = ranks.run(_overlapped_outer, comm_dtype, 0.7, 0.9, 9)  # the round of 8 in flight
    assert torch.equal(straight[0]["params"], straight[1]["params"])  # close(): identical
    for a, b in zip(straight, resumed):
        assert torch.equal(a["params"], b["params"])
    assert not torch.allclose(straight[0]["params"], plain[0]["params"], atol=1e-3)


def test_overlapped_outer_step_follows_the_formula(ranks: Any) -> None:
    for r in ranks.run(_overlapped_outer_step_by_hand, 0.5):
        torch.testing.assert_close(r["got"], r["expected"], rtol=0, atol=1e-6)


def test_a_schedule_combines_with_overlap_and_each_period_is_checked() -> None:
    model = mlp()
    opt = sgd_wrapper(model, period=lambda step: 4 if step < 4 else 1, overlap_steps=2)
    train(model, opt, 3)
    assert opt.next_round_step == 4
    loss_of(model, 0, 3).backward()
    with pytest.raises(ValueError, match="returned 1 at optimizer step 4, not more than overlap"):
        opt.step()
