"""Run a module-level function on N gloo ranks in long-lived worker processes.

Spawning a process that imports torch costs seconds, so a pool of workers per world size lives
as long as its :class:`Ranks` (the ``ranks`` fixture: the whole test session). Each call still
gets a fresh process group, set up with a ``file://`` init method in a temporary directory of its
own (no port races), and torn down afterwards. A call that does not finish within its timeout
kills the pool (the next call spawns a new one) and fails naming the ranks that were still
running and where they were; a rank that raises sends back its traceback. Results are pickled in
the worker and returned to the parent, which makes the assertions.
"""

from __future__ import annotations

import contextlib
import faulthandler
import functools
import importlib
import importlib.util
import inspect
import multiprocessing as mp
import os
import pickle
import queue
import shutil
import signal
import sys
import tempfile
import time
import traceback
from collections.abc import Sequence
from dataclasses import dataclass
from datetime import timedelta
from types import TracebackType
from typing import Any, Callable

__all__ = ["DEFAULT_TIMEOUT", "Ranks", "RanksFailed", "RemoteError", "WorkerPool"]

DEFAULT_TIMEOUT = 120.0
_STACK_SIGNAL = getattr(signal, "SIGUSR1", None)  # None on Windows: no stacks in timeouts


class RemoteError(Exception):
    """An exception that a function raised on one rank: its type, message and traceback.

    Returned in place of that rank's result by ``run(..., return_exceptions=True)``.

    Args:
        rank (int): the rank that raised.
        type_name (str): the exception's class name, e.g. ``"RoundError"``.
        message (str): ``str()`` of the exception.
        formatted (str): the traceback, formatted on the rank.

    Example::

        >>> results = ranks.run(train, return_exceptions=True)
        >>> [r.type_name for r in results if isinstance(r, RemoteError)]
        ['RoundError', 'RoundError']
    """

    def __init__(self, rank: int, type_name: str, message: str, formatted: str) -> None:
        super().__init__(f"rank {rank} raised {type_name}: {message}")
        self.rank = rank
        self.type_name = type_name
        self.message = message
        self.formatted = formatted


class RanksFailed(AssertionError):
    """One or more ranks raised, or a worker died: the message holds each failing rank's traceback.

    An ``AssertionError``, so that pytest reports it as a test failure, not an error.

    Args:
        message (str): the failing ranks, their errors and tracebacks.

    Example::

        >>> with pytest.raises(RanksFailed, match="raised RoundError: ranks are out of step"):
        ...     ranks.run(train_with_one_step_more_on_rank_1)
    """

    def __init__(self, message: str) -> None:
        super().__init__(message)


@dataclass(frozen=True)
class _Call:
    """What a rank needs to find and run the function: sent to every worker, pickled."""

    module: str
    qualname: str
    path: str | None  # the module's file, for test modules that are not importable by name
    sys_path: list[str]  # the parent's, at the time of the call
    payload: bytes  # pickled (args, kwargs)
    pg_timeout: float
    init_process_group: bool


def _make_call(
    fn: Callable[..., Any],
    args: tuple[Any, ...],
    kwargs: dict[str, Any],
    pg_timeout: float,
    init_process_group: bool,
) -> _Call:
    module = getattr(fn, "__module__", None)
    qualname = getattr(fn, "__qualname__", None)
    if not callable(fn) or module is None or qualname is None or "<" in qualname:
        raise TypeError(
            "the function must be defined at module level, where a spawned process can import "
            f"it by name (not a lambda, a nested function or a partial), got {fn!r}"
        )
    try:
        path = inspect.getsourcefile(fn)
    except TypeError:
        path = None
    return _Call(
        module,
        qualname,
        path,
        list(sys.path),
        pickle.dumps((args, kwargs)),
        pg_timeout,
        init_process_group,
    )


def _import_module(call: _Call) -> Any:
    """The function's module in this process: by name, as the parent found it, else by file.

    A test module that pytest imported with ``--import-mode=importlib``, or from a directory
    added to ``sys.path`` after the workers started, cannot be found by name alone.
    """
    for entry in call.sys_path:
        if entry not in sys.path:
            sys.path.append(entry)
    if call.module in sys.modules:
        return sys.modules[call.module]
    try:
        return importlib.import_module(call.module)
    except ModuleNotFoundError as error:
        missing = error.name or ""
        ours = missing == call.module or call.module.startswith(missing + ".")
        if call.path is None or not ours:
            raise
    spec = importlib.util.spec_from_file_location(call.module, call.path)
    if spec is None or spec.loader is None:
        raise ModuleNotFoundError(f"cannot import {call.module!r} from {call.path}")
    module = importlib.util.module_from_spec(spec)
    sys.modules[call.module] = module  # so that pickled arguments can name its classes
    directory = os.path.dirname(call.path)
    if directory not in sys.path:
        sys.path.append(directory)  # for its own imports of modules next to it
    try:
        spec.loader.exec_module(module)
    except BaseException:
        del sys.modules[call.module]
        raise
    return module


def _execute(
    call: _Call,
    rank: int,
    world_size: int,
    init_method: str,
    report: Callable[[tuple[str, Any]], None],
) -> None:
    """Run ``call`` on this rank and ``report`` the outcome, ``("ok", pickled result)`` or
    ``("error", (type, message, traceback))``, before the process group is torn down. Used by
    the pool's workers and by the torchrun runner alike."""
    import torch.distributed as dist

    try:
        if call.init_process_group:
            dist.init_process_group(
                "gloo",
                init_method=init_method,
                rank=rank,
                world_size=world_size,
                timeout=timedelta(seconds=call.pg_timeout),
            )
        fn = functools.reduce(getattr, call.qualname.split("."), _import_module(call))
        args, kwargs = pickle.loads(call.payload)
        outcome: tuple[str, Any] = ("ok", pickle.dumps(fn(*args, **kwargs)))
    except BaseException as exc:
        # From the frame below this one: the harness's own frame helps no reader.
        tb = exc.__traceback__.tb_next if exc.__traceback__ is not None else None
        formatted = "".join(traceback.format_exception(type(exc), exc, tb or exc.__traceback__))
        outcome = ("error", (type(exc).__name__, str(exc), formatted))
    try:
        # Before the barrier below: a rank still stuck in a collective must not hide the
        # outcome of the ranks that finished.
        report(outcome)
    finally:
        if dist.is_initialized():
            # Tearing down while a peer still finishes its last collective can make gloo
            # abort that peer; the barrier lets every rank finish first.
            with contextlib.suppress(Exception):
                dist.barrier()
            dist.destroy_process_group()


def _put(results: Any, call_id: int, rank: int, outcome: tuple[str, Any]) -> None:
    results.put((call_id, rank, *outcome))


def _worker_main(rank: int, world_size: int, tasks: Any, results: Any, stacks: str) -> None:
    import torch

    torch.set_num_threads(1)
    if _STACK_SIGNAL is not None:
        # The parent asks for this process's Python stack when a call times out.
        stack_file = open(stacks, "w")  # noqa: SIM115 (open for the process's lifetime)
        faulthandler.register(_STACK_SIGNAL, file=stack_file, all_threads=True)
    while True:
        task = tasks.get()
        if task is None:
            return
        call_id, call, init_method = task
        _execute(
            call, rank, world_size, init_method, functools.partial(_put, results, call_id, rank)
        )


def _collect(
    qualname: str,
    world_size: int,
    outcomes: dict[int, tuple[str, Any]],
    return_exceptions: bool,
) -> list[Any]:
    """Every rank's result in rank order, or :class:`RanksFailed` naming the ranks that raised."""
    __tracebackhide__ = True  # pytest shows the caller's line
    results: list[Any] = []
    failures: list[RemoteError] = []
    for rank in range(world_size):
        status, value = outcomes[rank]
        if status == "ok":
            results.append(pickle.loads(value))
        else:
            error = RemoteError(rank, *value)
            failures.append(error)
            results.append(error)
    if failures and not return_exceptions:
        raise RanksFailed(_failure_message(qualname, failures))
    return results


def _failure_message(qualname: str, failures: list[RemoteError]) -> str:
    """Each distinct error once, with the ranks that raised it, then one traceback of each."""
    groups: dict[tuple[str, str], list[RemoteError]] = {}
    for error in failures:
        groups.setdefault((error.type_name, error.message), []).append(error)
    lines = [f"{qualname} failed on rank(s) {[e.rank for e in failures]}:"]
    for (type_name, message), errors in groups.items():
        who = f"rank {errors[0].rank}" if len(errors) == 1 else f"ranks {[e.rank for e in errors]}"
        lines.append(f"  {who} raised {type_name}: {message}")
    for errors in groups.values():
        others = [e.rank for e in errors[1:]]
        also = f" (and rank(s) {others}, the same error)" if others else ""
        lines.append(f"--- rank {errors[0].rank}{also} ---\n{errors[0].formatted.rstrip()}")
    return "\n".join(lines)


def _describe(outcomes: dict[int, tuple[str, Any]]) -> str:
    if not outcomes:
        return "no rank finished."
    parts = []
    for rank, (status, value) in sorted(outcomes.items()):
        parts.append(f"rank {rank}: returned" if status == "ok" else f"rank {rank}:\n{value[2]}")
    return "\n".join(parts)


class WorkerPool:
    """``world_size`` spawned worker processes that run functions together on a gloo group.

    Prefer :class:`~local_sgd_optim.testing.Ranks` (the ``ranks`` fixture), which keeps one pool
    per world size and replaces a broken one.

    Args:
        world_size (int): the number of ranks, one process each.

    Example::

        >>> pool = WorkerPool(2)
        >>> pool.run(train, steps=8)
        [{'loss': 0.31}, {'loss': 0.29}]
        >>> pool.close()
    """

    def __init__(self, world_size: int) -> None:
        if not isinstance(world_size, int) or world_size < 1:
            raise ValueError(f"world_size must be a positive integer, got {world_size!r}")
        self.world_size = world_size
        self._dir = tempfile.mkdtemp(prefix="local_sgd_ranks_")
        ctx = mp.get_context("spawn")
        self._results = ctx.Queue()
        self._tasks = [ctx.Queue() for _ in range(world_size)]
        self._stacks = [os.path.join(self._dir, f"rank{rank}.stack") for rank in range(world_size)]
        self._procs = [
            ctx.Process(
                target=_worker_main,
                args=(rank, world_size, self._tasks[rank], self._results, self._stacks[rank]),
                daemon=True,
            )
            for rank in range(world_size)
        ]
        for proc in self._procs:
            proc.start()
        self._calls = 0

    @property
    def alive(self) -> bool:
        """Whether every worker process is still running."""
        return all(p.is_alive() for p in self._procs)

    def run(
        self,
        fn: Callable[..., Any],
        *args: Any,
        timeout: float = DEFAULT_TIMEOUT,
        pg_timeout: float | None = None,
        init_process_group: bool = True,
        return_exceptions: bool = False,
        **kwargs: Any,
    ) -> list[Any]:
        """Run ``fn(*args, **kwargs)`` on every rank; return the per-rank results in rank order.

        See :meth:`local_sgd_optim.testing.Ranks.run` for the arguments.
        """
        __tracebackhide__ = True  # pytest shows the caller's line
        if pg_timeout is None:
            pg_timeout = max(timeout / 2, 5.0)
        call = _make_call(fn, args, kwargs, pg_timeout, init_process_group)
        self._calls += 1
        call_id = self._calls
        tmp = tempfile.mkdtemp(prefix="call_", dir=self._dir)
        for q in self._tasks:
            q.put((call_id, call, f"file://{tmp}/store"))
        outcomes: dict[int, tuple[str, Any]] = {}
        deadline = time.monotonic() + timeout
        try:
            while len(outcomes) < self.world_size:
                if time.monotonic() > deadline:
                    missing = sorted(set(range(self.world_size)) - set(outcomes))
                    stacks = self._stacks_of(missing)
                    self.close(force=True)
                    raise TimeoutError(
                        f"{call.qualname} on {self.world_size} ranks did not finish within "
                        f"{timeout:g}s; ranks still running: {missing} (waiting in a "
                        "collective that a finished rank never joined?). Finished: "
                        + _describe(outcomes)
                        + stacks
                    )
                if not self.alive:
                    dead = [r for r, p in enumerate(self._procs) if not p.is_alive()]
                    self.close(force=True)
                    raise RanksFailed(
                        f"the worker process of rank(s) {dead} died while running "
                        f"{call.qualname}. " + _describe(outcomes)
                    )
                try:
                    got_id, rank, status, value = self._results.get(timeout=0.2)
                except queue.Empty:
                    continue
                if got_id == call_id:
                    outcomes[rank] = (status, value)
        finally:
            shutil.rmtree(tmp, ignore_errors=True)
        return _collect(call.qualname, self.world_size, outcomes, return_exceptions)

    def _stacks_of(self, ranks: Sequence[int]) -> str:
        """The Python stacks of ``ranks``' stuck workers, as text to append to an error."""
        if _STACK_SIGNAL is None:
            return ""
        for rank in ranks:
            pid = self._procs[rank].pid
            if pid is not None and self._procs[rank].is_alive():
                with contextlib.suppress(OSError):
                    os.kill(pid, _STACK_SIGNAL)
        time.sleep(1.0)  # faulthandler writes from a signal handler: give it a moment
        parts = []
        for rank in ranks:
            with contextlib.suppress(OSError), open(self._stacks[rank]) as f:
                parts.append(f"\n--- rank {rank} was at ---\n{f.read().strip()}")
        return "".join(parts)

    def close(self, force: bool = False) -> None:
        """Stop the workers: ask them to exit, or with ``force`` kill them at once.

        Args:
            force (bool): kill the workers without waiting for them (default: ``False``).
        """
        if not force:
            for q in self._tasks:
                q.put(None)
            for proc in self._procs:
                proc.join(timeout=10)
        for proc in self._procs:
            if proc.is_alive():
                proc.kill()
                proc.join(timeout=10)
        shutil.rmtree(self._dir, ignore_errors=True)

    def __enter__(self) -> WorkerPool:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.close(force=exc_type is not None)


_LAUNCHERS = ("pool", "torchrun")


class Ranks:
    """Runs module-level functions on N gloo ranks: what the ``ranks`` fixture gives a test.

    With the ``"pool"`` launcher, one :class:`WorkerPool` per world size, started on first use,
    serves every later call of that size, and a pool broken by a timeout or a dead worker is
    replaced at the next call. With ``"torchrun"``, every call is a
    :func:`~local_sgd_optim.testing.run_under_torchrun` launch.

    Args:
        launcher (str): ``"pool"`` or ``"torchrun"`` (default: ``"pool"``).

    Example::

        >>> with Ranks() as ranks:
        ...     results = ranks.run(train, steps=16, world_size=4)
    """

    def __init__(self, launcher: str = "pool") -> None:
        if launcher not in _LAUNCHERS:
            raise ValueError(f"launcher must be one of {list(_LAUNCHERS)}, got {launcher!r}")
        self.launcher = launcher
        self._pools: dict[int, WorkerPool] = {}

    def run(
        self,
        fn: Callable[..., Any],
        *args: Any,
        world_size: int = 2,
        timeout: float = DEFAULT_TIMEOUT,
        pg_timeout: float | None = None,
        init_process_group: bool = True,
        return_exceptions: bool = False,
        **kwargs: Any,
    ) -> list[Any]:
        """Run ``fn(*args, **kwargs)`` on ``world_size`` ranks; return their results in rank order.

        Every rank runs in its own process, on CPU, inside a fresh gloo process group (torn down
        afterwards, after a barrier). ``fn`` must be defined at module level: each rank imports
        it by its module's name (with the caller's ``sys.path``), or else from its module's
        file. Arguments and results are pickled: return small CPU tensors and plain values, and
        make the assertions in the test. Seed inside ``fn``: a pool's processes serve many calls.

        Args:
            fn (Callable): a module-level function.
            *args: positional arguments for ``fn``, the same on every rank.
            world_size (int): the number of ranks (default: ``2``).
            timeout (float): seconds before the call fails with a ``TimeoutError`` that names
                the ranks still running and shows their Python stacks; their processes are
                killed (default: ``120``).
            pg_timeout (float, optional): the process group's timeout in seconds, after which
                a collective waiting for an absent rank raises on its own (default: half of
                ``timeout``, at least 5).
            init_process_group (bool): set up the process group around ``fn`` (default:
                ``True``).
            return_exceptions (bool): return a :class:`RemoteError` in place of a failing
                rank's result instead of raising (default: ``False``).
            **kwargs: keyword arguments for ``fn``, the same on every rank.

        Returns:
            list: ``fn``'s return value on each rank, in rank order.

        Raises:
            RanksFailed: a rank raised (the message has each failing rank's exception and
                traceback), or a worker process died.
            TimeoutError: the call took longer than ``timeout``.

        Example::

            >>> def rank_and_sum():
            ...     t = torch.ones(1)
            ...     dist.all_reduce(t)
            ...     return dist.get_rank(), t.item()
            >>> ranks.run(rank_and_sum, world_size=4)
            [(0, 4.0), (1, 4.0), (2, 4.0), (3, 4.0)]
        """
        __tracebackhide__ = True  # pytest shows the caller's line
        options: dict[str, Any] = {
            "timeout": timeout,
            "pg_timeout": pg_timeout,
            "init_process_group": init_process_group,
            "return_exceptions": return_exceptions,
        }
        if self.launcher == "torchrun":
            from local_sgd_optim.testing.torchrun import run_under_torchrun

            return run_under_torchrun(fn, *args, nproc=world_size, **options, **kwargs)
        pool = self._pools.get(world_size)
        if pool is None or not pool.alive:
            pool = self._pools[world_size] = WorkerPool(world_size)
        return pool.run(fn, *args, **options, **kwargs)

    def close(self) -> None:
        """Stop every worker process."""
        for pool in self._pools.values():
            pool.close()
        self._pools.clear()

    def __enter__(self) -> Ranks:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.close()
