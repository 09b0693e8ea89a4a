"""The multi-process harness, now public as :mod:`local_sgd_optim.testing`.

The suite loads it as a pytest plugin (``tests/conftest.py``), which provides the session-wide
``ranks`` fixture. This module keeps the names the tests have always imported from here.
"""

from __future__ import annotations

from local_sgd_optim.testing import (
    DEFAULT_TIMEOUT,
    Ranks,
    RanksFailed,
    RemoteError,
    WorkerPool,
)

Pools = Ranks  # the harness's name for one pool per world size

__all__ = ["DEFAULT_TIMEOUT", "Pools", "Ranks", "RanksFailed", "RemoteError", "WorkerPool"]
