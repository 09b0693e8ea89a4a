"""Working with ``DistributedDataParallel``: finding it, and taking over its gradient traffic.

A DDP model all-reduces gradients at every backward. Under Local SGD gradients stay local
between rounds, so the wrapper registers :func:`local_sgd_hook`, which all-reduces only during
warm-up (post-local SGD) and otherwise hands each bucket back untouched, and turns off the
per-forward buffer broadcast (buffers are averaged at rounds instead).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
import torch.distributed as dist
from torch import Tensor, nn
from torch.nn.parallel import DistributedDataParallel
from torch.utils.hooks import RemovableHandle

from local_sgd_optim.clock import Clock
from local_sgd_optim.comm.collectives import start_all_reduce
from local_sgd_optim.comm.stats import CommStats

__all__ = [
    "HookState",
    "attach",
    "ddp_wrappers_of",
    "inner_ddp",
    "local_sgd_hook",
    "watch_for_ddp",
]


@dataclass
class HookState:
    """What :func:`local_sgd_hook` needs: whether this backward averages, and where to count.

    Args:
        clock (Clock): the optimizer's clock (warm-up window, micro-steps).
        process_group (ProcessGroup, optional): the ranks to average over.
        world_size (int): ranks in the group (1: never communicate).
        stats (CommStats): where bytes are counted.

    Example::

        >>> ddp.register_comm_hook(HookState(clock, None, 2, stats), local_sgd_hook)
    """

    clock: Clock
    process_group: dist.ProcessGroup | None
    world_size: int
    stats: CommStats

    def averages_now(self) -> bool:
        """Whether the backward in progress ends a window of a warm-up step."""
        return self.world_size > 1 and self.clock.in_warmup and self.clock.next_call_ends_window()


def _keep_local(bucket: Any) -> torch.futures.Future[Tensor]:
    future: torch.futures.Future[Tensor] = torch.futures.Future()
    future.set_result(bucket.buffer())
    return future


def local_sgd_hook(state: object, bucket: Any) -> torch.futures.Future[Tensor]:
    """DDP communication hook: average gradients during warm-up, keep them local after."""
    if isinstance(state, HookState) and state.averages_now():
        tensor = bucket.buffer()
        tensor.div_(state.world_size)
        work = start_all_reduce(
            tensor, state.process_group, state.stats, state.clock.optimizer_steps
        )
        return work.get_future().then(lambda done: done.value()[0])
    return _keep_local(bucket)


# DDP validates a hook's annotations as objects; this module's postponed annotations are strings.
local_sgd_hook.__annotations__ = {
    "state": object,
    "bucket": dist.GradBucket,  # type: ignore[attr-defined]
    "return": torch.futures.Future[Tensor],
}


def has_foreign_hook(ddp: DistributedDataParallel) -> bool:
    """Whether ``ddp`` has a communication hook other than ours."""
    return any(hook is not local_sgd_hook for hook, _ in ddp._comm_hooks)


def attach(ddp: DistributedDataParallel, state: HookState) -> None:
    """Register :func:`local_sgd_hook` on ``ddp`` (once) and stop its buffer broadcast.

    Raises:
        RuntimeError: ``ddp`` already has another communication hook.
    """
    if any(hook is local_sgd_hook for hook, _ in ddp._comm_hooks):
        return
    if has_foreign_hook(ddp):
        raise RuntimeError(
            "the DistributedDataParallel model already has a communication hook; "
            "LocalSGDOptimizer must install its own to keep gradients local between rounds. "
            "Remove that hook (or DistributedDataParallelKwargs(comm_hook=...))"
        )
    ddp.register_comm_hook(state, local_sgd_hook)
    # Buffers are averaged at rounds; rank 0's copy must not overwrite them every forward.
    ddp.broadcast_buffers = False


def watch_for_ddp(model: nn.Module, state: HookState) -> RemovableHandle:
    """Attach to a DistributedDataParallel built around ``model`` later, at its first forward.

    DDP marks itself as the active module while it runs the wrapped module's forward; a
    forward pre-hook on ``model`` reads that mark and takes over the DDP's gradient traffic
    before the first backward (frameworks wrap the model in DDP after the optimizer exists). A
    DDP that wraps more parameters than ``model``'s is left alone (its other gradients are not
    ours to keep local); the round's check for ranks that stay identical catches it.

    Returns:
        The hook's handle; remove it once training has started.

    Example::

        >>> handle = watch_for_ddp(model, state)
        >>> DistributedDataParallel(model)(x)  # the hook is attached before backward
    """
    global _ATTACH_ACTIVE
    if _ATTACH_ACTIVE is None:
        # Compiled models run forward pre-hooks under dynamo: the look at DDP's mark is not
        # for tracing. (Done on first use: importing dynamo costs a second.)
        disable = getattr(getattr(torch, "compiler", None), "disable", None)
        _ATTACH_ACTIVE = disable(_attach_active) if disable is not None else _attach_active
    return model.register_forward_pre_hook(_WatchForDDP(state, {id(p) for p in model.parameters()}))


def _attach_active(state: HookState, ours: set[int]) -> None:
    ddp = getattr(DistributedDataParallel, "_active_ddp_module", None)
    if isinstance(ddp, DistributedDataParallel) and {id(p) for p in ddp.parameters()} == ours:
        attach(ddp, state)


_ATTACH_ACTIVE: Any = None


def _inert_watch() -> _WatchForDDP:
    return _WatchForDDP(None, set())


class _WatchForDDP:
    """The forward pre-hook of :func:`watch_for_ddp`. A pickled or deep-copied model gets an
    inert one: ``torch.save(model)`` before the first step must not fail on the hook, and a
    copy of the model is not this wrapper's to attach."""

    def __init__(self, state: HookState | None, ours: set[int]) -> None:
        self._state = state
        self._ours = ours

    def __call__(self, module: nn.Module, args: Any) -> None:
        if self._state is not None and _ATTACH_ACTIVE is not None:
            _ATTACH_ACTIVE(self._state, self._ours)

    def __deepcopy__(self, memo: dict[int, Any]) -> _WatchForDDP:
        return _inert_watch()

    def __reduce__(self) -> tuple[Any, ...]:
        return (_inert_watch, ())


def wrapper_chain(module: nn.Module) -> list[nn.Module]:
    """``module`` and what it wraps: DDP's ``.module``, ``torch.compile``'s ``._orig_mod``."""
    chain = [module]
    while True:
        inner = getattr(chain[-1], "_orig_mod", None)
        if isinstance(chain[-1], DistributedDataParallel):
            inner = chain[-1].module
        if not isinstance(inner, nn.Module) or any(inner is m for m in chain):
            return chain
        chain.append(inner)


def inner_ddp(model: nn.Module) -> DistributedDataParallel | None:
    """The DistributedDataParallel that is ``model``, or that ``torch.compile`` wrapped."""
    while not isinstance(model, DistributedDataParallel):
        inner = getattr(model, "_orig_mod", None)  # torch.compile's OptimizedModule
        if not isinstance(inner, nn.Module):
            return None
        model = inner
    return model


def ddp_wrappers_of(model: nn.Module, candidates: list[Any]) -> list[DistributedDataParallel]:
    """The DDP modules among ``candidates`` (and what they wrap) that wrap ``model``."""
    targets = wrapper_chain(model)
    found: list[DistributedDataParallel] = []
    for candidate in candidates:
        if not isinstance(candidate, nn.Module):
            continue
        chain = wrapper_chain(candidate)
        if not any(m is t for m in chain for t in targets):
            continue
        for m in chain:
            if isinstance(m, DistributedDataParallel) and not any(m is d for d in found):
                found.append(m)
    return found
