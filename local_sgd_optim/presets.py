"""Ready-made ``outer_optimizer`` factories: a published method's outer step in one call.

DiLoCo (Douillard et al., https://arxiv.org/abs/2311.08105) is Local SGD with AdamW inside and
Nesterov SGD outside; the outer learning rate and momentum decide whether it matches synchronous
training, and the papers tune them per run. :func:`diloco` carries the values that won on this
project's language-model benchmark, with the paper's beside them, so that asking for DiLoCo does
not mean reading three papers first.
"""

from __future__ import annotations

import functools
from typing import Callable

import torch
from torch import Tensor
from torch.optim import Optimizer

__all__ = ["diloco"]

OuterFactory = Callable[[list[Tensor]], Optimizer]


def diloco(lr: float = 0.8, momentum: float = 0.5) -> OuterFactory:
    """The outer optimizer of DiLoCo: Nesterov SGD on the averaged pseudo-gradient.

    DiLoCo (Douillard et al. 2023, https://arxiv.org/abs/2311.08105) trains 8 replicas with
    AdamW for H = 500 inner steps between rounds, 128 rounds after a synchronous start, and
    steps the pseudo-gradient with Nesterov SGD at learning rate 0.7 and momentum 0.9:
    ``diloco(lr=0.7, momentum=0.9)``. The follow-ups tune the outer learning rate between 0.2
    and 1.0, and it rises with the number of replicas and with H (Scaling Laws for DiLoCo,
    https://arxiv.org/abs/2503.09799).

    The defaults are what won on ``benchmarks/convergence_lm.py --regime published`` (2
    replicas, H = 32, 64 rounds from scratch, a 446k-parameter model; BENCHMARKS.md): outer lr
    0.8 with momentum 0.5. There momentum 0.9 lost to plain averaging at every outer learning
    rate from 0.2 to 0.8, and lowering the momentum helped at every learning rate tried. With
    hundreds of rounds on a large model, start from the paper's values instead.

    Args:
        lr (float): outer learning rate; ``1.0`` with ``momentum=0`` is plain averaging
            (default: ``0.8``).
        momentum (float): Nesterov momentum, in ``[0, 1)`` (default: ``0.5``).

    Returns:
        A picklable callable ``params -> torch.optim.SGD`` for ``outer_optimizer``.

    Raises:
        ValueError: ``lr`` is not positive or ``momentum`` is outside ``[0, 1)``.

    Example::

        >>> from local_sgd_optim import LocalSGDOptimizer, diloco
        >>> base = torch.optim.AdamW(model.parameters(), lr=2e-3)
        >>> opt = LocalSGDOptimizer(base, model, period=32, outer_optimizer=diloco())
        >>> paper = diloco(lr=0.7, momentum=0.9)  # DiLoCo's published setting
    """
    if not lr > 0:
        raise ValueError(f"lr must be positive, got {lr!r}")
    if not 0 <= momentum < 1:
        raise ValueError(f"momentum must be in [0, 1), got {momentum!r}")
    # torch refuses Nesterov without momentum; plain SGD is the same step then.
    return functools.partial(
        torch.optim.SGD, lr=float(lr), momentum=float(momentum), nesterov=momentum > 0
    )
