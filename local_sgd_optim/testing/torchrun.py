"""The same calls as the worker pool, launched by ``torchrun`` instead.

:func:`run_under_torchrun` writes the call to a temporary directory and starts
``python -m torch.distributed.run --standalone --nproc_per_node N -m local_sgd_optim.testing DIR``;
each rank (``local_sgd_optim/testing/__main__.py``) joins the process group torchrun set up,
runs the function and writes its outcome to ``DIR/rank{r}.pkl``, which the parent reads. Slower
than the pool (torch is imported afresh for every call), but it is the launcher of a real job.
"""

from __future__ import annotations

import contextlib
import os
import pickle
import signal
import subprocess
import sys
import tempfile
from collections.abc import Sequence
from typing import Any, Callable

from local_sgd_optim.testing.pool import DEFAULT_TIMEOUT, RanksFailed, _collect, _make_call

__all__ = ["run_under_torchrun"]

# Variables of an enclosing launcher that would confuse the one started here.
_LAUNCHER_VARIABLES = (
    "RANK",
    "WORLD_SIZE",
    "LOCAL_RANK",
    "LOCAL_WORLD_SIZE",
    "GROUP_RANK",
    "MASTER_ADDR",
    "MASTER_PORT",
    "TORCHELASTIC_RUN_ID",
)
_CALL_FILE = "call.pkl"
_OUTPUT_TAIL = 4000


def _outcome_file(directory: str, rank: int) -> str:
    return os.path.join(directory, f"rank{rank}.pkl")


def _read_outcomes(directory: str, nproc: int) -> dict[int, tuple[str, Any]]:
    """The outcomes the ranks wrote, by rank; a rank that wrote none is missing."""
    outcomes = {}
    for rank in range(nproc):
        path = _outcome_file(directory, rank)
        if os.path.exists(path):
            with open(path, "rb") as f:
                outcomes[rank] = pickle.load(f)
    return outcomes


def run_under_torchrun(
    fn: Callable[..., Any],
    *args: Any,
    nproc: int = 2,
    timeout: float = DEFAULT_TIMEOUT,
    pg_timeout: float | None = None,
    init_process_group: bool = True,
    return_exceptions: bool = False,
    launcher_args: Sequence[str] = ("--standalone",),
    **kwargs: Any,
) -> list[Any]:
    """Run ``fn(*args, **kwargs)`` on ``nproc`` ranks launched by torchrun; return their results.

    Behaves as :meth:`Ranks.run <local_sgd_optim.testing.Ranks.run>`: results in rank order, a
    :class:`~local_sgd_optim.testing.RanksFailed` with every failing rank's traceback, a
    ``TimeoutError`` naming the ranks that did not report. The ranks run on CPU with a gloo
    process group (``init_method="env://"``, from torchrun's variables) and see the caller's
    ``sys.path``. torchrun's own output comes with a failure.

    Args:
        fn (Callable): a module-level function, imported by name on every rank.
        *args: positional arguments for ``fn``, pickled.
        nproc (int): the number of ranks, ``--nproc_per_node`` (default: ``2``).
        timeout (float): seconds before the whole launch is killed (default: ``120``).
        pg_timeout (float, optional): the process group's timeout in seconds (default: half of
            ``timeout``, at least 5).
        init_process_group (bool): set up the gloo process group around ``fn`` (default:
            ``True``).
        return_exceptions (bool): return a :class:`~local_sgd_optim.testing.RemoteError` in
            place of a failing rank's result instead of raising (default: ``False``).
        launcher_args (Sequence[str]): torchrun arguments before ``--nproc_per_node`` (default:
            ``("--standalone",)``).
        **kwargs: keyword arguments for ``fn``, pickled.

    Raises:
        RanksFailed: a rank raised, or torchrun exited before every rank reported.
        TimeoutError: the launch took longer than ``timeout``.

    Example::

        >>> from local_sgd_optim.testing import run_under_torchrun
        >>> run_under_torchrun(train, steps=8, nproc=2)
        [{'loss': 0.31}, {'loss': 0.29}]
    """
    __tracebackhide__ = True  # pytest shows the caller's line
    if pg_timeout is None:
        pg_timeout = max(timeout / 2, 5.0)
    call = _make_call(fn, args, kwargs, pg_timeout, init_process_group)
    import local_sgd_optim

    # The ranks import this copy of the package, whatever the environment has installed.
    package_root = os.path.dirname(os.path.dirname(os.path.abspath(local_sgd_optim.__file__)))
    env = {k: v for k, v in os.environ.items() if k not in _LAUNCHER_VARIABLES}
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [package_root, env.get("PYTHONPATH")]))
    with tempfile.TemporaryDirectory(prefix="local_sgd_torchrun_") as directory:
        with open(os.path.join(directory, _CALL_FILE), "wb") as f:
            pickle.dump(call, f)
        command = [
            sys.executable,
            *("-m", "torch.distributed.run", *launcher_args),
            *("--nproc_per_node", str(nproc)),
            *("-m", "local_sgd_optim.testing", directory),
        ]
        # A session of its own, so that a timeout can kill torchrun and every rank it started.
        proc = subprocess.Popen(
            command,
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            text=True,
            env=env,
            start_new_session=True,
        )
        try:
            output, _ = proc.communicate(timeout=timeout)
            timed_out = False
        except subprocess.TimeoutExpired:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(proc.pid, signal.SIGKILL)
            output, _ = proc.communicate()
            timed_out = True
        outcomes = _read_outcomes(directory, nproc)
    missing = [rank for rank in range(nproc) if rank not in outcomes]
    tail = f"\ntorchrun's output (end):\n{output[-_OUTPUT_TAIL:]}"
    if timed_out:
        raise TimeoutError(
            f"{call.qualname} under torchrun on {nproc} ranks did not finish within "
            f"{timeout:g}s; ranks that did not report: {missing}" + tail
        )
    if missing:
        raise RanksFailed(
            f"torchrun exited with code {proc.returncode} before rank(s) {missing} reported "
            f"the outcome of {call.qualname}" + tail
        )
    return _collect(call.qualname, nproc, outcomes, return_exceptions)


def main(argv: Sequence[str]) -> None:
    """One rank of :func:`run_under_torchrun`: ``python -m local_sgd_optim.testing DIR``."""
    import torch

    from local_sgd_optim.testing.pool import _execute

    if len(argv) != 1:
        raise SystemExit("usage: python -m local_sgd_optim.testing DIR (run by torchrun)")
    directory = argv[0]
    rank, world_size = int(os.environ["RANK"]), int(os.environ["WORLD_SIZE"])
    torch.set_num_threads(1)
    with open(os.path.join(directory, _CALL_FILE), "rb") as f:
        call = pickle.load(f)

    def report(outcome: tuple[str, Any]) -> None:
        partial = _outcome_file(directory, rank) + ".partial"
        with open(partial, "wb") as f:
            pickle.dump(outcome, f)
        os.replace(partial, _outcome_file(directory, rank))  # never half a file to read

    _execute(call, rank, world_size, "env://", report)
    sys.stdout.flush()
    sys.stderr.flush()
    # The outcome is on disk and the group destroyed: skip the interpreter's teardown, where
    # torch 2.14's gloo can abort a finished process (pytorch/pytorch#179291).
    os._exit(0)
