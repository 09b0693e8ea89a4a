"""The package's exceptions, named where users import them from (``local_sgd_optim.RoundError``)."""

from __future__ import annotations

__all__ = ["RoundError"]


class RoundError(RuntimeError):
    """An averaging round could not be applied; raised on every rank of the group alike.

    Raised when ranks are out of step, when a rank's parameters hold NaN or inf (with
    ``on_nonfinite="raise"``), or when the round's collective fails (a rank exited or timed
    out). In the first two cases no rank's parameters changed.

    Args:
        message (str): what happened and what to do about it.

    Example::

        >>> try:
        ...     opt.step()
        ... except RoundError as error:
        ...     print(f"rank {dist.get_rank()}: {error}")  # the same on every rank
        ...     raise
    """

    def __init__(self, message: str) -> None:
        super().__init__(message)


# Tracebacks and reprs name the class where users import it from, and pickling (an error sent
# from a spawned process) finds it there.
RoundError.__module__ = "local_sgd_optim"
