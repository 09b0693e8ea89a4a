"""Test a training loop on N gloo ranks on one machine: a pytest plugin and its assertions.

Opt in from the ``conftest.py`` at the root of your tests (or with ``pytest -p
local_sgd_optim.testing``); nothing is registered for pytest runs that do not ask::

    pytest_plugins = ["local_sgd_optim.testing"]

It provides the ``ranks`` fixture (a session-wide :class:`Ranks`) and the command-line option
``--ranks-launcher {pool,torchrun}``: run every ``ranks.run`` call in long-lived spawned worker
processes (the default, fast) or launch it with ``torchrun``. The assertions
(:func:`assert_ranks_equal`, :func:`assert_counters_equal`, :func:`assert_resumed_equal`) check
what the ranks returned. See ``docs/testing.md`` for a complete example.
"""

from __future__ import annotations

from collections.abc import Iterator

import pytest

from local_sgd_optim.testing.asserts import (
    COUNTERS,
    assert_counters_equal,
    assert_ranks_equal,
    assert_resumed_equal,
    counters_of,
)
from local_sgd_optim.testing.pool import (
    DEFAULT_TIMEOUT,
    Ranks,
    RanksFailed,
    RemoteError,
    WorkerPool,
)
from local_sgd_optim.testing.torchrun import run_under_torchrun

__all__ = [
    "COUNTERS",
    "DEFAULT_TIMEOUT",
    "Ranks",
    "RanksFailed",
    "RemoteError",
    "WorkerPool",
    "assert_counters_equal",
    "assert_ranks_equal",
    "assert_resumed_equal",
    "counters_of",
    "run_under_torchrun",
]


def pytest_addoption(parser: pytest.Parser) -> None:
    """The plugin's command-line option (a pytest hook)."""
    group = parser.getgroup("local_sgd_optim", "Local SGD: tests on N gloo ranks")
    group.addoption(
        "--ranks-launcher",
        choices=("pool", "torchrun"),
        default="pool",
        help="how the ranks fixture starts ranks: spawned worker processes kept for the "
        "session (pool, default) or a torchrun launch per call (torchrun)",
    )


@pytest.fixture(scope="session")
def ranks(request: pytest.FixtureRequest) -> Iterator[Ranks]:
    """Run a module-level function on N gloo ranks: ``ranks.run(fn, *args, world_size=2)``.

    One :class:`Ranks` for the whole session; see :meth:`Ranks.run`.
    """
    # The option exists only if the plugin was loaded before the command line was parsed (a
    # test module's own pytest_plugins comes too late): fall back to the default then.
    launcher = request.config.getoption("ranks_launcher", default="pool")
    with Ranks(launcher=launcher) as session_ranks:
        yield session_ranks
