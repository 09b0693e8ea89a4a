"""How tensors are averaged across ranks (kept for imports written against earlier releases).

The code lives in :mod:`local_sgd_optim.comm`; these names are re-exported from there.
"""

from __future__ import annotations

from local_sgd_optim.comm.averager import BucketedAverager
from local_sgd_optim.comm.collectives import GradientAverager
from local_sgd_optim.comm.stats import CommStats, RoundError

__all__ = ["BucketedAverager", "CommStats", "GradientAverager", "RoundError"]
