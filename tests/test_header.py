"""The header alone: each rank's slots, summed, read back exactly; the verdicts."""

from __future__ import annotations

import pytest
import torch

from local_sgd_optim import RoundError
from local_sgd_optim.comm.header import TOO_LARGE, HeaderView, RoundHeader


def _summed(world: int, kinds: list[str], steps: list[int], flags: list[bool]) -> HeaderView:
    """What every rank reads after an all-reduce of every rank's header."""
    total = torch.zeros(RoundHeader(None, world, 0, "raise").numel, dtype=torch.int64)
    for rank in range(world):
        header = RoundHeader(None, world, rank, "raise")
        total += header.encode(kinds[rank], steps[rank], flags[rank], 1000 + rank, rank % 2 == 0)
    return RoundHeader(None, world, 0, "raise").decode(total)


def test_every_rank_reads_every_ranks_slots_exactly() -> None:
    steps = [2**40 + 3, 123_456_789, 0, 65_537]
    view = _summed(4, ["round", "close()", "average()", "local round"], steps, [0, 1, 0, 1])
    assert view.steps == steps
    assert view.kinds == ["round", "close()", "average()", "local round"]
    assert view.flags == [0, 1, 0, 1]
    assert view.fingerprints == [1000, 1001, 1002, 1003]
    assert view.changed == [True, False, True, False]


def test_ranks_doing_different_things_or_at_different_steps_raise_alike() -> None:
    header = RoundHeader(None, 2, 0, "raise")
    header.check(_summed(2, ["round", "round"], [8, 8], [False, False]), 8)
    with pytest.raises(RoundError, match="rank 0 at round of step 8, rank 1 at round of step 9"):
        header.check(_summed(2, ["round", "round"], [8, 9], [False, False]), 8)
    with pytest.raises(RoundError, match="rank 0 at close\\(\\) of step 7, rank 1 at round of"):
        header.check(_summed(2, ["close()", "round"], [7, 8], [False, False]), 7)


def test_the_finite_verdict_applies_skips_or_raises() -> None:
    nan = _summed(2, ["round", "round"], [8, 8], [False, True])
    assert RoundHeader(None, 2, 0, "raise").finite_verdict(
        _summed(2, ["round", "round"], [8, 8], [False, False]), 8
    )
    with pytest.raises(RoundError, match=r"rank\(s\) 1 at step 8; the round was not applied"):
        RoundHeader(None, 2, 0, "raise").finite_verdict(nan, 8)
    with pytest.warns(RuntimeWarning, match="non-finite values"):
        assert RoundHeader(None, 2, 0, "skip").finite_verdict(nan, 8) is False


def test_identical_ranks_raise_only_when_every_rank_changed() -> None:
    header = RoundHeader(None, 2, 0, "raise")
    same = HeaderView(["round"] * 2, [8, 8], [0] * 2, [7, 7], [True, True], [5, 5])
    with pytest.raises(RoundError, match=r"bitwise identical parameters .*attach_ddp"):
        header.check_diverged(same, 8)
    header.check_diverged(
        HeaderView(["round"] * 2, [8] * 2, [0] * 2, [7, 7], [True, False], [5, 5]), 8
    )
    header.check_diverged(
        HeaderView(["round"] * 2, [8] * 2, [0] * 2, [7, 6], [True, True], [5, 5]), 8
    )
    RoundHeader(None, 1, 0, "raise").check_diverged(
        HeaderView(["round"], [8], [0], [7], [True], [5]), 8
    )


def test_ranks_that_average_different_tensors_raise_alike() -> None:
    header = RoundHeader(None, 2, 0, "raise")
    differ = HeaderView(["round"] * 2, [8, 8], [0] * 2, [7, 6], [False] * 2, [5, 6])
    with pytest.raises(RoundError, match=r"average different tensors .*add_param_group"):
        header.check(differ, 8)


def test_a_delta_too_large_for_float16_raises_whatever_on_nonfinite_says() -> None:
    view = HeaderView(["round"] * 2, [8, 8], [TOO_LARGE, 0], [7, 6], [False] * 2, [5, 5])
    with pytest.raises(RoundError, match=r"does not fit float16 .*bfloat16"):
        RoundHeader(None, 2, 0, "skip").finite_verdict(view, 8)
