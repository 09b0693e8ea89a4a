"""Period schedules: how many optimizer steps to the next averaging round.

``LocalSGDOptimizer(period=...)`` takes an int or any callable ``step -> int``; it is called
right after each round with the optimizer step of that round, and the next round comes that many
steps later. Every rank must get the same answer, so a schedule may only read what all ranks
share: the step, and values such as the learning rate that a scheduler sets identically
everywhere.
"""

from __future__ import annotations

import math
from collections.abc import Mapping

from torch.optim import Optimizer

__all__ = ["MultiStepPeriod", "QuadraticSyncPeriod"]

_FOREVER = 2**31 - 1


class MultiStepPeriod:
    """A period that changes at given optimizer steps, piecewise constant.

    Short periods early, when the model moves fast and ranks drift apart quickly, and longer ones
    later are the pattern AdaComm (Wang and Joshi, https://arxiv.org/abs/1810.08313) argues for;
    this is its simplest, fixed form.

    Args:
        periods (Mapping[int, int]): ``{from_step: period}``; the entry with the largest
            ``from_step`` not after the current step applies. Must contain step ``0``.

    Raises:
        ValueError: ``periods`` has no entry for step 0, or a step or period is not valid.

    Example::

        >>> # every 2 steps until step 1000, every 8 until 5000, then every 32
        >>> period = MultiStepPeriod({0: 2, 1000: 8, 5000: 32})
        >>> opt = LocalSGDOptimizer(base, model, period=period)
    """

    def __init__(self, periods: Mapping[int, int]) -> None:
        if 0 not in periods:
            raise ValueError(f"periods must have an entry for step 0, got {dict(periods)!r}")
        for step, period in periods.items():
            if not isinstance(step, int) or isinstance(step, bool) or step < 0:
                raise ValueError(f"periods' steps must be non-negative integers, got {step!r}")
            if not isinstance(period, int) or isinstance(period, bool) or period < 1:
                raise ValueError(f"periods' values must be positive integers, got {period!r}")
        self.periods = dict(sorted(periods.items()))

    def __call__(self, step: int) -> int:
        current = self.periods[0]
        for start, period in self.periods.items():
            if start > step:
                break
            current = period
        return current

    def __repr__(self) -> str:
        return f"MultiStepPeriod({self.periods!r})"


class QuadraticSyncPeriod:
    """The quadratic synchronisation rule: a period that grows as the learning rate decays.

    ``H = max(base_period, floor((growth / lr) ** 2))`` with ``lr`` the base optimizer's current
    learning rate (first parameter group). Gu, Lyu, Arora, Huang and Wu, "A Quadratic
    Synchronization Rule for Distributed Deep Learning" (https://arxiv.org/abs/2310.14423),
    found that averaging rarely late in training, when the learning rate is small, keeps or even
    improves test accuracy while communicating far less.

    The rule reads the learning rate, so every rank must use the same learning-rate schedule
    (as it must anyway for the ranks to stay comparable).

    Args:
        optimizer (Optimizer): the optimizer whose ``param_groups[0]["lr"]`` is read (the base
            optimizer, or the ``LocalSGDOptimizer``, which shares its groups).
        base_period (int): the smallest period, used while the learning rate is large.
        growth (float): the rule's coefficient (``alpha`` in the paper); the period exceeds
            ``base_period`` once ``lr < growth / sqrt(base_period)``.
        max_period (int, optional): an upper bound on the period (default: none).

    Raises:
        ValueError: ``base_period`` or ``max_period`` is not a positive integer, or ``growth``
            is not a positive number.

    Example::

        >>> base = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
        >>> period = QuadraticSyncPeriod(base, base_period=4, growth=0.2)
        >>> opt = LocalSGDOptimizer(base, model, period=period)
        >>> # lr 0.1 -> period 4; lr 0.01 -> 400 once a scheduler has decayed it
    """

    def __init__(
        self,
        optimizer: Optimizer,
        base_period: int,
        growth: float,
        max_period: int | None = None,
    ) -> None:
        if not isinstance(base_period, int) or isinstance(base_period, bool) or base_period < 1:
            raise ValueError(f"base_period must be a positive integer, got {base_period!r}")
        if not isinstance(growth, (int, float)) or isinstance(growth, bool) or not growth > 0:
            raise ValueError(f"growth must be a positive number, got {growth!r}")
        if max_period is not None and (
            not isinstance(max_period, int) or isinstance(max_period, bool) or max_period < 1
        ):
            raise ValueError(f"max_period must be a positive integer or None, got {max_period!r}")
        self.optimizer = optimizer
        self.base_period = base_period
        self.growth = float(growth)
        self.max_period = max_period

    def __call__(self, step: int) -> int:
        lr = float(self.optimizer.param_groups[0]["lr"])
        ratio = (self.growth / lr) ** 2 if lr > 0 else math.inf
        # A learning rate of zero asks for no more rounds: the final one comes at close().
        period = max(self.base_period, math.floor(ratio) if math.isfinite(ratio) else _FOREVER)
        if self.max_period is not None:
            period = min(period, self.max_period)
        return period

    def __repr__(self) -> str:
        return (
            f"QuadraticSyncPeriod(base_period={self.base_period}, growth={self.growth}, "
            f"max_period={self.max_period})"
        )
