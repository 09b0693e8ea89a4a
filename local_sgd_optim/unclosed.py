"""A warning, on every rank, for a wrapper that ends without its final round.

Without ``close()`` (or ``with opt:``) the steps since the last round are never averaged, so
training ends with each rank holding its own model, and nothing else says so. The check runs
when the wrapper is garbage-collected or, if it is still alive then, at interpreter exit; it
reads the wrapper's counters and closed flag, never the wrapper itself, so that watching does
not keep the wrapper alive.

Where warnings are errors (``python -W error``, pytest's ``-W error`` or ``filterwarnings =
error``) the warning is raised inside a finalizer, where no caller can catch it: Python prints
it as "Exception ignored in: <finalize object ...>" (at exit: as a traceback), the script goes
on and its exit status is unchanged; under pytest the test during which the wrapper was
collected fails with ``PytestUnraisableExceptionWarning``. The log line goes first, so the
message also stands on a line of its own.
"""

from __future__ import annotations

import logging
import warnings
import weakref

from local_sgd_optim.arguments import Ownership
from local_sgd_optim.clock import Clock

__all__ = ["watch_for_unclosed"]

_LOG = logging.getLogger("local_sgd_optim")


def watch_for_unclosed(wrapper: object, clock: Clock, ownership: Ownership, rank: int) -> None:
    """Warn when ``wrapper`` goes away, or the interpreter exits, unclosed after a step that no
    round followed.

    Args:
        wrapper (object): the :class:`~local_sgd_optim.LocalSGDOptimizer` to watch.
        clock (Clock): its counters.
        ownership (Ownership): its closed flag.
        rank (int): this rank in the wrapper's group, for the message.
    """
    weakref.finalize(wrapper, _warn_if_unclosed, clock, ownership, rank)


def _warn_if_unclosed(clock: Clock, ownership: Ownership, rank: int) -> None:
    unaveraged = clock.optimizer_steps - clock.last_round_step
    if ownership.closed or unaveraged <= 0:
        return
    message = (
        f"LocalSGDOptimizer on rank {rank} was not closed: its last {unaveraged} optimizer "
        f"step(s) (of {clock.optimizer_steps}) were never averaged, so this rank's model "
        "differs from the other ranks'. Call opt.close() on every rank when training ends, "
        "or train inside `with opt:`"
    )
    # Both: a log line for those who silence warnings (PYTHONWARNINGS=ignore) but keep the
    # library's logs, and a warning for those who filter them or turn them into errors. The
    # log line first: a warning turned into an error ends this function.
    _LOG.warning(message)
    warnings.warn(message, RuntimeWarning, stacklevel=1)  # no caller of the user's to name
