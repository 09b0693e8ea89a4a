"""Resuming with changed settings: the constructor's settings apply, the checkpoint's state stays.

A user who resumes with ``period=16`` from a ``period=8`` run gets 16, with a warning naming the
change; what cannot be carried over to the new settings is refused with the fix named.
"""

from __future__ import annotations

import warnings
from typing import Any

import pytest
import torch
from _common import flat_params, loss_of, mlp, raised, roundtrip, sgd_wrapper, train


def test_constructor_period_wins_and_next_round_follows_the_last_one() -> None:
    model = mlp()
    first = sgd_wrapper(model, period=4)
    train(model, first, 10, zero_grad_first=True)  # rounds at 4 and 8; the next would be at 12
    saved = roundtrip(first.state_dict())
    assert saved["local_sgd"]["next_round_step"] == 12

    opt = sgd_wrapper(model, period=16)
    with pytest.warns(UserWarning, match=r"period=16 \(checkpoint: 4\)") as record:
        opt.load_state_dict(saved)
    assert len(record) == 1
    assert opt.period == 16
    assert (opt.optimizer_steps, opt.averaging_rounds) == (10, 2)
    assert opt.next_round_step == 8 + 16  # a new period after the last round
    train(model, opt, 14, start=10, zero_grad_first=True)
    assert (opt.optimizer_steps, opt.averaging_rounds) == (24, 3)

    # Unchanged settings load silently, and the resumed run's own checkpoint resumes as is.
    again = sgd_wrapper(model, period=16)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        again.load_state_dict(roundtrip(opt.state_dict()))
    assert again.next_round_step == 40


def test_a_shorter_period_already_past_rounds_at_the_next_step() -> None:
    model = mlp()
    first = sgd_wrapper(model, period=8)
    train(model, first, 13, zero_grad_first=True)  # round at 8, next at 16
    opt = sgd_wrapper(model, period=2)
    with pytest.warns(UserWarning, match=r"period=2 \(checkpoint: 8\)"):
        opt.load_state_dict(first.state_dict())
    assert opt.next_round_step == 10  # already past: the next step rounds
    train(model, opt, 1, start=13, zero_grad_first=True)
    assert (opt.averaging_rounds, opt.next_round_step) == (2, 16)


def test_warmup_change_moves_the_first_round() -> None:
    model = mlp()
    first = sgd_wrapper(model, period=4)
    train(model, first, 2, zero_grad_first=True)
    opt = sgd_wrapper(model, period=4, warmup_steps=6)
    with pytest.warns(UserWarning, match=r"warmup_steps=6 \(checkpoint: 0\)"):
        opt.load_state_dict(first.state_dict())
    assert opt.next_round_step == 10


def test_accumulation_changes_at_a_window_boundary_and_windows_stay_whole() -> None:
    model = mlp()
    first = sgd_wrapper(model, period=100, accumulation_steps=2)
    train(model, first, 6, zero_grad_first=True)  # three whole windows
    saved = roundtrip(first.state_dict())

    reference = mlp()
    reference.load_state_dict(model.state_dict())
    ref_opt = torch.optim.SGD(reference.parameters(), lr=0.1)

    opt = sgd_wrapper(model, period=100, accumulation_steps=3)
    with pytest.warns(UserWarning, match=r"accumulation_steps=3 \(checkpoint: 2\)"):
        opt.load_state_dict(saved)
    train(model, opt, 3, start=6, zero_grad_first=True)  # one window of three micro-batches
    assert (opt.micro_steps, opt.optimizer_steps) == (9, 4)
    for i in range(6, 9):
        loss_of(reference, 0, i).backward()
    for p in reference.parameters():
        p.grad.div_(3)
    ref_opt.step()
    torch.testing.assert_close(flat_params(model), flat_params(reference), rtol=0, atol=1e-7)

    # The moved grid is saved: a later resume with the same setting keeps windows of three.
    later = sgd_wrapper(model, period=100, accumulation_steps=3)
    later.load_state_dict(roundtrip(opt.state_dict()))
    train(model, later, 2, start=9, zero_grad_first=True)
    assert later.optimizer_steps == 4
    train(model, later, 1, start=11, zero_grad_first=True)
    assert later.optimizer_steps == 5


def test_accumulation_change_in_the_middle_of_a_window_is_refused() -> None:
    model = mlp()
    first = sgd_wrapper(model, period=4, accumulation_steps=2)
    train(model, first, 5, zero_grad_first=True)  # half-way through the third window
    opt = sgd_wrapper(model, period=4, accumulation_steps=4)
    with pytest.raises(ValueError, match=r"middle of an accumulation window .* resume with "):
        opt.load_state_dict(first.state_dict())
    assert opt.micro_steps == 0  # nothing was applied


def _resume_with_other_communication() -> dict[str, Any]:
    """2 ranks: bf16 deltas and period 2, then resumed in full precision, other buckets and
    period 3."""
    model = mlp()
    first = sgd_wrapper(model, period=2, comm_dtype=torch.bfloat16)
    train(model, first, 5, zero_grad_first=True)  # rounds at 2 and 4
    saved = roundtrip(first.state_dict())
    opt = sgd_wrapper(model, period=3, bucket_cap_mb=0.0001, broadcast_initial=False)
    with warnings.catch_warnings(record=True) as record:
        warnings.simplefilter("always")
        opt.load_state_dict(saved)
    before_round = []
    opt.base_optimizer.register_step_post_hook(lambda *_: before_round.append(flat_params(model)))
    train(model, opt, 2, start=5, zero_grad_first=True)  # round at 4 + 3 = 7
    return {
        "warnings": [str(w.message) for w in record],
        "rounds": opt.averaging_rounds,
        "local": before_round[-1],
        "after": flat_params(model),
    }


def _resume_a_round_in_flight(overlap_steps: int) -> tuple[str, str]:
    model = mlp()
    first = sgd_wrapper(model, period=3, overlap_steps=1)
    train(model, first, 3, zero_grad_first=True)  # the round of step 3 is in flight
    saved = roundtrip(first.state_dict())
    assert saved["local_sgd"]["pending"] is not None
    opt = sgd_wrapper(model, period=3, overlap_steps=overlap_steps, broadcast_initial=False)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        result = raised(opt.load_state_dict, saved)
    if not result[0]:
        train(model, opt, 2, start=3, zero_grad_first=True)  # lands at 3 + overlap_steps
        opt.close()
    return result


def test_communication_settings_change_between_runs_on_two_ranks(ranks: Any) -> None:
    r0, r1 = ranks.run(_resume_with_other_communication)
    for r in (r0, r1):
        assert len(r["warnings"]) == 1, r["warnings"]
        assert "period=3 (checkpoint: 2)" in r["warnings"][0]
        assert "bucket_cap_mb=0.0001 (checkpoint: 25.0)" in r["warnings"][0]
        assert "comm_dtype=None (checkpoint: torch.bfloat16)" in r["warnings"][0]
        assert r["rounds"] == 3
    assert not torch.equal(r0["local"], r1["local"])
    assert torch.equal(r0["after"], r1["after"])  # the round of step 7, in full precision
    torch.testing.assert_close(r0["after"], (r0["local"] + r1["local"]) / 2, rtol=0, atol=1e-6)


def test_a_round_in_flight_needs_overlap_to_resume(ranks: Any) -> None:
    for name, message in ranks.run(_resume_a_round_in_flight, 0):
        assert name == "ValueError"
        assert "round in flight" in message and "opt.average() before saving" in message
    assert ranks.run(_resume_a_round_in_flight, 2) == [("", ""), ("", "")]
