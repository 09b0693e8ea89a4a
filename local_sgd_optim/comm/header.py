"""The header every averaging round carries in its first collective.

Each rank writes, in its own slots, whether its tensors are finite and the optimizer step it is
at; the others write zeros, so after the all-reduce every rank reads every rank's values exactly,
whatever the wire dtype (the step goes as base-16 digits, exact even in bfloat16). From that,
every rank reaches the same verdict before any payload touches a tensor.
"""

from __future__ import annotations

import warnings

import torch
from torch import Tensor

from local_sgd_optim.comm.stats import RoundError

__all__ = ["RoundHeader"]

STEP_DIGITS = 8  # base-16 digits of the step: steps below 2**32


class RoundHeader:
    """Writes and reads a round's header for a group of ``world_size`` ranks.

    Args:
        world_size (int): ranks in the group.
        rank (int): this rank's index in the group.
        on_nonfinite (str): ``"raise"`` a :class:`RoundError` or ``"skip"`` the round with a
            warning when a rank reports NaN or inf.

    Example::

        >>> header = RoundHeader(world_size=2, rank=0, on_nonfinite="raise")
        >>> wire = torch.zeros(header.numel)
        >>> header.write(wire, step=8, nonfinite=False)
        >>> dist.all_reduce(wire)
        >>> header.verdict(wire, step=8)  # True: apply the round
    """

    def __init__(self, world_size: int, rank: int, on_nonfinite: str) -> None:
        self.world_size = world_size
        self.rank = rank
        self.on_nonfinite = on_nonfinite
        self.numel = world_size * (1 + STEP_DIGITS)

    def write(self, header: Tensor, step: int, nonfinite: bool) -> None:
        """Fill ``header`` (``numel`` elements) with this rank's verdict and step."""
        header.zero_()
        header[self.rank] = float(nonfinite)
        digits = [(step >> (4 * j)) & 15 for j in range(STEP_DIGITS)]
        start = self.world_size + self.rank * STEP_DIGITS
        header[start : start + STEP_DIGITS] = torch.tensor(digits, dtype=header.dtype)

    def read(self, header: Tensor) -> tuple[list[int], list[int]]:
        """The ranks that reported non-finite values, and every rank's step."""
        values = [round(v) for v in header.double().cpu().tolist()]
        world = self.world_size
        nonfinite = [r for r in range(world) if values[r]]
        steps = [
            sum(values[world + r * STEP_DIGITS + j] << (4 * j) for j in range(STEP_DIGITS))
            for r in range(world)
        ]
        return nonfinite, steps

    def verdict(self, header: Tensor, step: int) -> bool:
        """Whether the round may be applied; raises (on every rank alike) when it must not."""
        nonfinite, steps = self.read(header)
        if len(set(steps)) > 1:
            at = ", ".join(f"rank {r} at step {s}" for r, s in enumerate(steps))
            raise RoundError(
                f"ranks are out of step at an averaging round ({at}). Every rank must call "
                "step() the same number of times; nothing was averaged"
            )
        if nonfinite:
            names = ", ".join(map(str, nonfinite))
            message = (
                f"non-finite values (NaN or inf) in the averaged tensors of rank(s) {names} at "
                f"step {step}; the round was not applied, so no rank's values changed"
            )
            if self.on_nonfinite == "raise":
                raise RoundError(
                    message + ". Lower the learning rate or clip gradients, or pass "
                    "on_nonfinite='skip' to skip such rounds with a warning"
                )
            warnings.warn(message, RuntimeWarning, stacklevel=5)
            return False
        return True
