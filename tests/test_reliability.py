"""Faults a training job meets: a rank whose gradients overflow under GradScaler, non-finite
parameters on one rank, ranks out of step, an optimizer wrapped twice, a checkpoint from another
world size. Each is provoked on gloo ranks; every rank must end the same way, none may hang."""

from __future__ import annotations

import warnings
from typing import Any

import pytest
import torch
from _common import bn_net, flat_params, loss_of, mlp, raised, rank, roundtrip, sgd_wrapper, train

from local_sgd_optim import LocalSGDOptimizer, RoundError

# --- functions run on every rank -----------------------------------------------------------


def _grad_scaler(unscale_first: bool) -> dict[str, Any]:
    """Rank 1's gradients overflow at step 2; a base optimizer under its own scaler is the
    reference for what one rank's numbers must be before the first round."""
    model, reference_model = mlp(seed=3), mlp(seed=3)
    opt = sgd_wrapper(model, period=4, momentum=0.9)
    reference = torch.optim.SGD(reference_model.parameters(), lr=0.1, momentum=0.9)
    scaler, reference_scaler = (torch.amp.GradScaler("cpu", init_scale=1024.0) for _ in "ab")
    history = []
    for step in range(8):
        for m, o, s in ((model, opt, scaler), (reference_model, reference, reference_scaler)):
            s.scale(loss_of(m, rank(), step)).backward()
            if step == 2 and rank() == 1:
                next(m.parameters()).grad[0, 0] = float("inf")
            if unscale_first:
                s.unscale_(o)  # as scripts that clip gradients do
                torch.nn.utils.clip_grad_norm_(m.parameters(), 10.0)
            before = flat_params(m)
            s.step(o)
            s.update()
            o.zero_grad()
            if o is opt:
                history.append(
                    {
                        "changed": not torch.equal(before, flat_params(m)),
                        "counters": (opt.micro_steps, opt.optimizer_steps, opt.averaging_rounds),
                        "scale": scaler.get_scale(),
                    }
                )
        if step == 2:
            # Before the first round, this rank's numbers are a lone base optimizer's.
            same_as_reference = torch.equal(flat_params(model), flat_params(reference_model))
    return {
        "history": history,
        "same_as_reference": same_as_reference,
        "params": flat_params(model),
    }


def _nonfinite(
    on_nonfinite: str, comm_dtype: torch.dtype | None, overlap_steps: int, outer: bool = False
) -> Any:
    """Rank 1's parameters turn NaN right before the round of step 4."""
    model = bn_net(seed=rank())
    base = torch.optim.SGD(model.parameters(), lr=0.1)
    opt = LocalSGDOptimizer(
        base,
        model,
        period=4,
        on_nonfinite=on_nonfinite,
        comm_dtype=comm_dtype,
        overlap_steps=overlap_steps,
        outer_optimizer=(lambda ps: torch.optim.SGD(ps, lr=0.7, momentum=0.9)) if outer else None,
    )
    local: list[torch.Tensor] = []

    def poison(*_: Any) -> None:
        if opt.optimizer_steps == 3 and rank() == 1:  # the base step of step 4 just ran
            with torch.no_grad():
                model[0].weight[0, 0] = float("nan")
        local.append(flat_params(model))

    base.register_step_post_hook(poison)
    outcome: dict[str, Any] = {"error": ("", "")}
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        try:
            for i in range(4 + overlap_steps):
                loss_of(model, rank(), i).backward()
                opt.step()
                opt.zero_grad()
        except RoundError as error:
            outcome["error"] = (type(error).__name__, str(error))
    outcome["warnings"] = [str(w.message) for w in caught if w.category is RuntimeWarning]
    outcome["params"] = flat_params(model)
    outcome["local"] = local[-1]
    outcome["counters"] = (opt.optimizer_steps, opt.averaging_rounds, opt.stats.rounds)
    return outcome


def _out_of_step() -> tuple[str, str]:
    """Rank 1 resumes from an older checkpoint than rank 0: its counters lag by one period."""
    model = mlp()
    opt = sgd_wrapper(model, period=4)
    state = opt.state_dict()
    steps = 8 if rank() == 0 else 4
    state["local_sgd"].update(optimizer_steps=steps, micro_steps=steps, next_round_step=steps + 4)
    opt.load_state_dict(state)
    before = flat_params(model)
    outcome = raised(train, model, opt, 4)
    # Both ranks raise at their first round, before any parameter changes hands.
    assert opt.optimizer_steps == (12 if rank() == 0 else 8)
    assert not torch.equal(before, flat_params(model))
    return outcome


def _average_on_one_rank_only() -> tuple[str, str]:
    model = mlp()
    opt = sgd_wrapper(model, period=4)

    def four_steps() -> None:
        for i in range(4):
            train(model, opt, 1, start=i)
            if i == 1 and rank() == 0:
                opt.average()  # a stray synchronisation that rank 1 never makes

    return raised(four_steps)


def _uneven_batches_at_close() -> dict[str, Any]:
    """Rank 1 gets one batch more than rank 0, as an uneven data split would give it."""
    model = mlp()
    opt = sgd_wrapper(model, period=4)
    train(model, opt, 4 + rank())
    before = flat_params(model)
    outcome = raised(opt.close)
    return {"error": outcome, "unchanged": torch.equal(before, flat_params(model))}


def _world_size_changed() -> tuple[str, str]:
    model = mlp()
    opt = sgd_wrapper(model, period=4)
    state = roundtrip(opt.state_dict())
    state["local_sgd"]["world_size"] = 4
    return raised(opt.load_state_dict, state)


def _wrapped_twice() -> tuple[str, str]:
    model = mlp()
    base = torch.optim.SGD(model.parameters(), lr=0.1)
    first = LocalSGDOptimizer(base, model, period=4)
    outcome = raised(LocalSGDOptimizer, base, model, period=4)
    first.close()
    return outcome


# --- tests ---------------------------------------------------------------------------------


def _same(a: torch.Tensor, b: torch.Tensor) -> bool:
    """Bitwise equal, NaN where NaN."""
    return bool(torch.equal(a.isnan(), b.isnan()) and torch.equal(a.nan_to_num(), b.nan_to_num()))


@pytest.mark.parametrize("unscale_first", [False, True])
def test_grad_scaler_overflow_on_one_rank_skips_only_its_step(
    ranks: Any, unscale_first: bool
) -> None:
    r0, r1 = ranks.run(_grad_scaler, unscale_first)
    for r in (r0, r1):
        assert r["same_as_reference"]
        # Every rank counts every step, skipped or not: rounds at steps 4 and 8 on both.
        assert [h["counters"] for h in r["history"]] == [(s, s, s // 4) for s in range(1, 9)]
    assert [h["changed"] for h in r1["history"]][:3] == [True, True, False]  # step 3 skipped
    assert all(h["changed"] for h in r0["history"])
    assert r1["history"][2]["scale"] == 512.0 and r0["history"][2]["scale"] == 1024.0
    assert torch.equal(r0["params"], r1["params"])  # the round of step 8 joined them


@pytest.mark.parametrize(
    ("comm_dtype", "overlap_steps"), [(None, 0), (torch.bfloat16, 0), (None, 2)]
)
def test_nonfinite_parameters_raise_on_every_rank_and_change_nothing(
    ranks: Any, comm_dtype: torch.dtype | None, overlap_steps: int
) -> None:
    results = ranks.run(_nonfinite, "raise", comm_dtype, overlap_steps)
    for r in results:
        name, message = r["error"]
        assert name == "RoundError"
        assert "non-finite values (NaN or inf)" in message and "rank(s) 1 at step 4" in message
        assert "on_nonfinite='skip'" in message
        assert _same(r["params"], r["local"])  # as before the round, NaN included
    assert results[0]["params"].isfinite().all()  # rank 0 was not poisoned


@pytest.mark.parametrize(("overlap_steps", "outer"), [(0, False), (0, True), (2, True)])
def test_nonfinite_parameters_can_skip_the_round_with_a_warning(
    ranks: Any, overlap_steps: int, outer: bool
) -> None:
    # With an outer optimizer, a skipped round must not feed it a pseudo-gradient either.
    results = ranks.run(_nonfinite, "skip", None, overlap_steps, outer)
    for r in results:
        assert r["error"] == ("", "")
        assert any("rank(s) 1 at step 4" in w for w in r["warnings"])
        assert _same(r["params"], r["local"])
        # The round is counted by schedule, not applied.
        assert r["counters"] == (4 + overlap_steps, 1, 0)
    assert results[0]["params"].isfinite().all()


def test_ranks_out_of_step_raise_on_every_rank(ranks: Any) -> None:
    for name, message in ranks.run(_out_of_step):
        assert name == "RoundError"
        assert "ranks are out of step" in message
        assert "rank 0 at round of step 12, rank 1 at round of step 8" in message


def test_a_synchronisation_made_by_one_rank_only_is_caught(ranks: Any) -> None:
    for name, message in ranks.run(_average_on_one_rank_only):
        assert name == "RoundError"
        assert "rank 0 at average() of step 2, rank 1 at round of step 4" in message


def test_checkpoint_from_another_world_size_is_refused(ranks: Any) -> None:
    for name, message in ranks.run(_world_size_changed):
        assert name == "ValueError"
        assert "taken with world_size=4, but this LocalSGDOptimizer averages over 2" in message
        assert "reshard_state_dicts" in message


def test_an_optimizer_wrapped_twice_is_refused_on_every_rank(ranks: Any) -> None:
    for name, message in ranks.run(_wrapped_twice):
        assert name == "ValueError"
        assert "already wrapped by another LocalSGDOptimizer" in message


def test_grad_scaler_with_wrapper_accumulation_is_refused() -> None:
    model = mlp()
    opt = sgd_wrapper(model, period=2, accumulation_steps=2)
    scaler = torch.amp.GradScaler("cpu")
    scaler.scale(loss_of(model, 0, 0)).backward()
    with pytest.raises(ValueError, match=r"GradScaler cannot drive .* accumulation_steps > 1"):
        scaler.step(opt)


def test_a_closed_wrapper_releases_its_base_optimizer() -> None:
    model = mlp()
    base = torch.optim.SGD(model.parameters(), lr=0.1)
    LocalSGDOptimizer(base, model, period=2).close()
    LocalSGDOptimizer(base, model, period=2)  # allowed: the first is closed


def test_uneven_step_counts_fail_at_close_instead_of_hanging(ranks: Any) -> None:
    # Rank 1 alone would want a final round; rank 0 would skip it and leave rank 1 waiting.
    for r in ranks.run(_uneven_batches_at_close, timeout=60):
        name, message = r["error"]
        assert name == "RoundError"
        assert "rank 0 at close() of step 4, rank 1 at close() of step 5" in message
        assert r["unchanged"]
