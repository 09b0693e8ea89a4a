"""Run a module-level function on N gloo ranks in long-lived worker processes.

Spawning a process that imports torch costs seconds on a 2-core machine, so a pool of workers per
world size lives for the whole test session. Each call still gets a fresh process group, set up
with a ``file://`` init method in a temporary directory of its own (no port races), and torn down
afterwards. A call that does not finish within its timeout kills the pool (the next call spawns a
new one) and fails with the ranks that were still running; a rank that raises sends back its
traceback. Results are pickled in the worker and returned to the parent, which makes assertions.
"""

from __future__ import annotations

import contextlib
import importlib
import multiprocessing as mp
import pickle
import queue
import shutil
import tempfile
import time
import traceback
from datetime import timedelta
from typing import Any, Callable

DEFAULT_TIMEOUT = 120.0


class RemoteError(Exception):
    """An exception raised by a function on one rank, with its type, message and traceback."""

    def __init__(self, rank: int, type_name: str, message: str, formatted: str) -> None:
        super().__init__(f"rank {rank} raised {type_name}: {message}")
        self.rank = rank
        self.type_name = type_name
        self.message = message
        self.formatted = formatted


class RanksFailed(AssertionError):
    """One or more ranks raised; the message holds every failing rank's traceback."""


def _worker_main(rank: int, world_size: int, tasks: Any, results: Any) -> None:
    import torch
    import torch.distributed as dist

    torch.set_num_threads(1)
    while True:
        task = tasks.get()
        if task is None:
            return
        call_id, module, name, payload, init_file, pg_timeout = task
        try:
            if init_file is not None:
                dist.init_process_group(
                    "gloo",
                    init_method=f"file://{init_file}",
                    rank=rank,
                    world_size=world_size,
                    timeout=timedelta(seconds=pg_timeout),
                )
            fn = getattr(importlib.import_module(module), name)
            args, kwargs = pickle.loads(payload)
            value = fn(*args, **kwargs)
            results.put((call_id, rank, "ok", pickle.dumps(value)))
        except BaseException as exc:
            results.put(
                (call_id, rank, "error", (type(exc).__name__, str(exc), traceback.format_exc()))
            )
        finally:
            if dist.is_initialized():
                # Tearing down while a peer still finishes its last collective can make gloo
                # abort that peer; the barrier lets every rank finish first.
                with contextlib.suppress(Exception):
                    dist.barrier()
                dist.destroy_process_group()


class WorkerPool:
    """``world_size`` worker processes that run functions together on a gloo process group."""

    def __init__(self, world_size: int) -> None:
        self.world_size = world_size
        ctx = mp.get_context("spawn")
        self._results = ctx.Queue()
        self._tasks = [ctx.Queue() for _ in range(world_size)]
        self._procs = [
            ctx.Process(
                target=_worker_main,
                args=(rank, world_size, self._tasks[rank], self._results),
                daemon=True,
            )
            for rank in range(world_size)
        ]
        for proc in self._procs:
            proc.start()
        self._calls = 0

    @property
    def alive(self) -> bool:
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

        With ``return_exceptions``, a rank that raised contributes a :class:`RemoteError` instead
        of failing the call.
        """
        self._calls += 1
        call_id = self._calls
        tmp = tempfile.mkdtemp(prefix="local_sgd_test_")
        init_file = f"{tmp}/store" if init_process_group else None
        payload = pickle.dumps((args, kwargs))
        if pg_timeout is None:
            pg_timeout = max(timeout / 2, 5.0)
        for q in self._tasks:
            q.put((call_id, fn.__module__, fn.__qualname__, payload, init_file, pg_timeout))
        outcomes: dict[int, tuple[str, Any]] = {}
        deadline = time.monotonic() + timeout
        try:
            while len(outcomes) < self.world_size:
                if time.monotonic() > deadline:
                    self.close(force=True)
                    missing = sorted(set(range(self.world_size)) - set(outcomes))
                    raise TimeoutError(
                        f"{fn.__qualname__} on {self.world_size} ranks did not finish within "
                        f"{timeout:.0f}s; ranks still running: {missing}. Finished: "
                        + _describe(outcomes)
                    )
                if not self.alive:
                    self.close(force=True)
                    raise RanksFailed(
                        f"a worker process died while running {fn.__qualname__}. "
                        + _describe(outcomes)
                    )
                try:
                    got_id, rank, status, value = self._results.get(timeout=0.2)
                except queue.Empty:
                    continue
                if got_id == call_id:
                    outcomes[rank] = (status, value)
        finally:
            shutil.rmtree(tmp, ignore_errors=True)

        results: list[Any] = []
        failures: list[RemoteError] = []
        for rank in range(self.world_size):
            status, value = outcomes[rank]
            if status == "ok":
                results.append(pickle.loads(value))
            else:
                error = RemoteError(rank, *value)
                failures.append(error)
                results.append(error)
        if failures and not return_exceptions:
            raise RanksFailed(
                f"{fn.__qualname__} failed on rank(s) {[e.rank for e in failures]}:\n"
                + "\n".join(f"--- rank {e.rank} ---\n{e.formatted}" for e in failures)
            )
        return results

    def close(self, force: bool = False) -> None:
        if not force:
            for q in self._tasks:
                q.put(None)
            for proc in self._procs:
                proc.join(timeout=10)
        for proc in self._procs:
            if proc.is_alive():
                proc.kill()
                proc.join(timeout=10)


def _describe(outcomes: dict[int, tuple[str, Any]]) -> str:
    if not outcomes:
        return "no rank finished."
    parts = []
    for rank, (status, value) in sorted(outcomes.items()):
        parts.append(f"rank {rank}: ok" if status == "ok" else f"rank {rank}:\n{value[2]}")
    return "\n".join(parts)


class Pools:
    """One :class:`WorkerPool` per world size, created on first use and replaced when broken."""

    def __init__(self) -> None:
        self._pools: dict[int, WorkerPool] = {}

    def run(
        self, fn: Callable[..., Any], *args: Any, world_size: int = 2, **kwargs: Any
    ) -> list[Any]:
        pool = self._pools.get(world_size)
        if pool is None or not pool.alive:
            pool = self._pools[world_size] = WorkerPool(world_size)
        return pool.run(fn, *args, **kwargs)

    def close(self) -> None:
        for pool in self._pools.values():
            pool.close()
        self._pools.clear()
