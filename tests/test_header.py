"""The round header alone: written by each rank, summed, read back exactly; the verdict."""

from __future__ import annotations

import pytest
import torch

from local_sgd_optim import RoundError
from local_sgd_optim.comm.header import RoundHeader


def _summed(
    world: int, steps: list[int], nonfinite: list[bool], dtype: torch.dtype
) -> torch.Tensor:
    """What an all-reduce of every rank's header would hold."""
    total = torch.zeros(RoundHeader(world, 0, "raise").numel, dtype=dtype)
    for rank in range(world):
        mine = torch.empty_like(total)
        RoundHeader(world, rank, "raise").write(mine, steps[rank], nonfinite[rank])
        total += mine
    return total


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
def test_steps_and_verdicts_arrive_exactly_in_every_wire_dtype(dtype: torch.dtype) -> None:
    steps = [2**32 - 1, 123_456_789, 0, 65_537]
    header = RoundHeader(4, 2, "raise")
    assert header.numel == 4 * 9
    nonfinite, read = header.read(_summed(4, steps, [False, True, False, True], dtype))
    assert read == steps and nonfinite == [1, 3]


def test_the_verdict_applies_skips_or_raises_the_same_on_every_rank() -> None:
    ok = _summed(2, [8, 8], [False, False], torch.float32)
    assert RoundHeader(2, 0, "raise").verdict(ok, 8) is True
    with pytest.raises(RoundError, match="rank 0 at step 8, rank 1 at step 9"):
        RoundHeader(2, 1, "raise").verdict(_summed(2, [8, 9], [False, False], torch.float32), 8)
    nan = _summed(2, [8, 8], [False, True], torch.float32)
    with pytest.raises(RoundError, match=r"rank\(s\) 1 at step 8; the round was not applied"):
        RoundHeader(2, 0, "raise").verdict(nan, 8)
    with pytest.warns(RuntimeWarning, match="non-finite values"):
        assert RoundHeader(2, 0, "skip").verdict(nan, 8) is False
