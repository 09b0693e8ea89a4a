"""``LocalSGDOptimizer``: counters, the averaging schedule, delegation, state."""

from __future__ import annotations

import dataclasses
import logging
import math
import operator
import os
import warnings
import weakref
from collections import OrderedDict
from collections.abc import Hashable, Iterator
from types import TracebackType
from typing import Any, Callable

import torch
import torch.distributed as dist
from torch import Tensor, nn
from torch.nn.parallel import DistributedDataParallel
from torch.optim import Optimizer

from local_sgd_optim.averaging import (
    BucketedAverager,
    CommStats,
    GradientAverager,
    RoundError,
    _as_real,
    _copy_all,
    broadcast_tensors,
    check_comm_dtype,
    collective_device,
    exchange_descriptions,
    group_rank,
    group_size,
)

__all__ = ["LocalSGDOptimizer"]

_LOG = logging.getLogger("local_sgd_optim")
# Which wrapper holds each base optimizer. Kept outside the optimizer object so that it stays
# copyable and picklable; weak both ways, so neither is kept alive by this table.
_OWNERS: weakref.WeakKeyDictionary[Optimizer, weakref.ref[LocalSGDOptimizer]] = (
    weakref.WeakKeyDictionary()
)
_STATE_KEY = "local_sgd"
_STATE_VERSION = 3
_COUNTERS = ("micro_steps", "optimizer_steps", "averaging_rounds", "last_round_step")
# Added in version 3, derived from the others when a checkpoint lacks them.
_NEW_COUNTERS = ("next_round_step", "local_rounds")
PeriodSchedule = Callable[[int], int]
_SETTINGS = ("period", "accumulation_steps", "average_buffers")
# Added in version 2; a version 1 checkpoint was taken with their defaults.
_COMM_SETTINGS = {
    "bucket_cap_mb": 25.0,
    "comm_dtype": None,
    "overlap_steps": 0,
    "on_nonfinite": "raise",
}
_COMM_DTYPE_NAMES = {None: None, torch.bfloat16: "bfloat16", torch.float16: "float16"}


def _check_positive_int(name: str, value: object) -> int:
    """``value`` as an int (NumPy integers welcome) if it is one >= 1, else a ValueError."""
    if not isinstance(value, bool):
        try:
            as_int = operator.index(value)  # type: ignore[arg-type]
        except TypeError:
            pass
        else:
            if as_int >= 1:
                return as_int
    raise ValueError(f"{name} must be a positive integer, got {value!r}")


def _check_bucket_cap(value: object) -> float:
    number = isinstance(value, (int, float)) and not isinstance(value, bool)
    if number and math.isfinite(value) and value > 0:  # type: ignore[arg-type,operator]
        return float(value)  # type: ignore[arg-type]
    raise ValueError(f"bucket_cap_mb must be a positive number of MiB, got {value!r}")


def _check_overlap_steps(value: object, period: int | None) -> int:
    """``value`` as an int if it is >= 0 and below ``period`` (``None``: a schedule, whose
    periods are checked as they come)."""
    steps = _check_non_negative_int("overlap_steps", value)
    if steps and period is not None and steps >= period:
        raise ValueError(
            f"overlap_steps must be smaller than period, got overlap_steps={steps} with "
            f"period={period}: a round must land before the next one starts"
        )
    return steps


def _check_non_negative_int(name: str, value: object) -> int:
    if not isinstance(value, bool):
        try:
            as_int = operator.index(value)  # type: ignore[arg-type]
        except TypeError:
            pass
        else:
            if as_int >= 0:
                return as_int
    raise ValueError(f"{name} must be a non-negative integer, got {value!r}")


def _check_bool(name: str, value: object) -> bool:
    if not isinstance(value, bool):
        raise TypeError(f"{name} must be a bool, got {type(value).__name__}")
    return value


def _validate_arguments(
    base_optimizer: object,
    model: object,
    period: object,
    accumulation_steps: object,
    average_buffers: object,
    broadcast_initial: object,
    enabled: object,
    process_group: object,
    bucket_cap_mb: object = 25.0,
    comm_dtype: object = None,
    overlap_steps: object = 0,
    on_nonfinite: object = "raise",
    warmup_steps: object = 0,
    outer_optimizer: object = None,
    local_period: object = None,
    local_group: object = None,
) -> tuple[int | PeriodSchedule, int, float, torch.dtype | None, int, int, int | None]:
    """Raise on bad input; return the numeric settings in their canonical types."""
    if isinstance(base_optimizer, LocalSGDOptimizer):
        raise TypeError(
            "base_optimizer is already a LocalSGDOptimizer; wrap the underlying optimizer "
            "(opt.base_optimizer) once"
        )
    if not isinstance(base_optimizer, Optimizer):
        raise TypeError(
            f"base_optimizer must be a torch.optim.Optimizer, got {type(base_optimizer).__name__}"
        )
    if not isinstance(model, nn.Module):
        raise TypeError(f"model must be a torch.nn.Module, got {type(model).__name__}")
    if callable(period):
        schedule: int | PeriodSchedule = period  # checked each time it is called
    else:
        schedule = _check_positive_int("period", period)
    accumulation_steps = _check_positive_int("accumulation_steps", accumulation_steps)
    _check_bool("average_buffers", average_buffers)
    _check_bool("broadcast_initial", broadcast_initial)
    _check_bool("enabled", enabled)
    bucket_cap = _check_bucket_cap(bucket_cap_mb)
    dtype = check_comm_dtype(comm_dtype)
    overlap = _check_overlap_steps(overlap_steps, schedule if isinstance(schedule, int) else None)
    warmup = _check_non_negative_int("warmup_steps", warmup_steps)
    if outer_optimizer is not None and not callable(outer_optimizer):
        raise TypeError(
            "outer_optimizer must be a callable that takes a list of tensors and returns a "
            f"torch.optim.Optimizer, e.g. lambda ps: torch.optim.SGD(ps, lr=0.7), got "
            f"{type(outer_optimizer).__name__}"
        )
    local = None if local_period is None else _check_positive_int("local_period", local_period)
    if local is not None and isinstance(schedule, int) and local >= schedule:
        raise ValueError(
            f"local_period must be smaller than period, got local_period={local} with "
            f"period={schedule}: the subgroup rounds fall between the global ones"
        )
    if local_group is not None and local is None:
        raise ValueError("local_group was given without local_period; pass both")
    if local_group is not None and not (
        local_group == "node" or isinstance(local_group, dist.ProcessGroup)
    ):
        raise TypeError(
            "local_group must be a torch.distributed.ProcessGroup (this rank's subgroup) or "
            f"'node', got {type(local_group).__name__}"
        )
    if overlap and local is not None:
        raise ValueError(
            "overlap_steps cannot be combined with local_period yet; use overlap_steps=0 with "
            "two-level averaging"
        )
    if on_nonfinite not in ("raise", "skip"):
        raise ValueError(f"on_nonfinite must be 'raise' or 'skip', got {on_nonfinite!r}")
    owner = _OWNERS.get(base_optimizer)
    if owner is not None and owner() is not None and not owner()._closed:  # type: ignore[union-attr]
        raise ValueError(
            "base_optimizer is already wrapped by another LocalSGDOptimizer that is still "
            "open; two wrappers would step and average it twice. close() the first one, or "
            "build a new base optimizer"
        )
    if process_group is not None and not isinstance(process_group, dist.ProcessGroup):
        raise TypeError(
            "process_group must be a torch.distributed.ProcessGroup or None, "
            f"got {type(process_group).__name__}"
        )
    if process_group is not None and not dist.is_initialized():
        raise RuntimeError(
            "process_group was given but torch.distributed is not initialised; call "
            "torch.distributed.init_process_group() first"
        )
    sharded = _sharded_parameter(model)
    if sharded is not None:
        raise TypeError(
            f"model is sharded across ranks ({sharded}); Local SGD averages full copies of the "
            "model, one per rank. Use a plain module or DistributedDataParallel"
        )
    model_params = {id(p) for p in model.parameters()}
    foreign = sum(
        1 for g in base_optimizer.param_groups for p in g["params"] if id(p) not in model_params
    )
    if foreign:
        raise ValueError(
            f"base_optimizer holds {foreign} parameter(s) that are not parameters of model; "
            "build the base optimizer from model.parameters() (use add_param_group for "
            "parameters that live outside the model)"
        )
    if enabled and group_rank(process_group) < 0:
        raise ValueError(
            "this rank is not a member of process_group; build LocalSGDOptimizer only on "
            "the group's ranks, or pass enabled=False elsewhere"
        )
    ddp = _inner_ddp(model)
    if enabled and ddp is not None and ddp._comm_hooks:
        raise RuntimeError(
            "model is a DistributedDataParallel that already has a communication hook; "
            "LocalSGDOptimizer must install its own to keep gradients local between rounds. "
            "Wrap a DDP model without register_comm_hook()"
        )
    return schedule, accumulation_steps, bucket_cap, dtype, overlap, warmup, local


def _inner_ddp(model: nn.Module) -> DistributedDataParallel | None:
    """The DistributedDataParallel that is ``model``, or that ``torch.compile`` wrapped."""
    while not isinstance(model, DistributedDataParallel):
        inner = getattr(model, "_orig_mod", None)  # torch.compile's OptimizedModule
        if not isinstance(inner, nn.Module):
            return None
        model = inner
    return model


def _sharded_parameter(model: nn.Module) -> str | None:
    """What in ``model`` holds only a shard of the parameters (FSDP, DTensor), if anything."""
    try:
        from torch.distributed.fsdp import FullyShardedDataParallel
    except ImportError:  # pragma: no cover - builds without distributed support
        FullyShardedDataParallel = ()  # type: ignore[assignment,misc]
    try:
        from torch.distributed.tensor import DTensor
    except ImportError:  # pragma: no cover - torch < 2.4 keeps it private
        from torch.distributed._tensor import DTensor  # type: ignore[attr-defined]
    for name, module in model.named_modules():
        if isinstance(module, FullyShardedDataParallel):
            return f"module {name or '<root>'!r} is FullyShardedDataParallel"
    for name, p in model.named_parameters():
        if isinstance(p, DTensor):
            return f"parameter {name!r} is a DTensor"
    return None


def _first_device(model: object) -> torch.device | None:
    """The device of ``model``'s first parameter, where there is one."""
    if isinstance(model, nn.Module):
        return next((p.device for p in model.parameters()), None)
    return None


def _could_communicate(process_group: object, enabled: object) -> bool:
    """Whether this rank would have joined the construction-time collective."""
    return (
        enabled is not False
        and dist.is_available()
        and dist.is_initialized()
        and (process_group is None or isinstance(process_group, dist.ProcessGroup))
        and group_size(process_group) > 1
        and group_rank(process_group) >= 0
    )


def _keep_gradients_local(state: object, bucket: Any) -> torch.futures.Future[Tensor]:
    """DDP communication hook that hands each gradient bucket back without communicating."""
    future: torch.futures.Future[Tensor] = torch.futures.Future()
    future.set_result(bucket.buffer())
    return future


def _local_sgd_ddp_hook(state: object, bucket: Any) -> torch.futures.Future[Tensor]:
    """DDP communication hook: average gradients during warm-up, keep them local after.

    ``state`` is a weak reference to the LocalSGDOptimizer, which knows the step and window.
    """
    opt = state() if isinstance(state, weakref.ref) else None
    if isinstance(opt, LocalSGDOptimizer) and opt._ddp_averages_now():
        group = opt._process_group
        tensor = bucket.buffer()
        tensor.div_(group_size(group))
        opt._stats.bytes_communicated += tensor.numel() * tensor.element_size()
        work = dist.all_reduce(tensor, group=group, async_op=True)
        assert work is not None
        return work.get_future().then(lambda done: done.value()[0])
    return _keep_gradients_local(state, bucket)


# DDP validates a hook's annotations as objects; this module's postponed annotations are strings.
for _hook in (_keep_gradients_local, _local_sgd_ddp_hook):
    _hook.__annotations__ = {
        "state": object,
        "bucket": dist.GradBucket,  # type: ignore[attr-defined]
        "return": torch.futures.Future[Tensor],
    }


class LocalSGDOptimizer(Optimizer):
    r"""Local SGD around any optimizer: step locally, average parameters every ``period`` steps.

    Each rank trains its own copy of ``model`` with ``base_optimizer``; every ``period``-th
    optimizer step the ranks average their parameters (and floating-point buffers such as
    BatchNorm statistics) instead of all-reducing gradients at every step. This is Local SGD
    (Stich, "Local SGD Converges Fast and Communicates Little", https://arxiv.org/abs/1805.09767;
    Lin et al., "Don't Use Large Mini-Batches, Use Local SGD", https://arxiv.org/abs/1808.07217).

    The wrapper is a real :class:`torch.optim.Optimizer`: ``param_groups``, ``state`` and
    ``defaults`` are the base optimizer's own objects, so learning-rate schedulers, step hooks
    and ``add_param_group`` work on it as on the base optimizer.

    ``step()`` is called once per micro-batch. Every ``accumulation_steps``-th call divides the
    accumulated gradients by ``accumulation_steps`` (so do not divide the loss yourself), runs
    ``base_optimizer.step()``, and every ``period``-th such optimizer step runs an averaging round.
    ``zero_grad()`` only clears gradients right after an optimizer step, so a loop that calls it
    every micro-batch still accumulates. Scripts that accumulate on their own keep
    ``accumulation_steps=1`` and call ``step()`` once per window, as with any optimizer.

    What is averaged: every floating-point parameter of ``model`` that requires grad (frozen ones
    are skipped; a parameter unfrozen later joins at the next round), parameters added with
    :meth:`add_param_group`, and floating-point buffers when ``average_buffers``. Integer buffers
    such as ``num_batches_tracked`` are left alone. Parameters keep their own storage.

    How a round moves bytes: tensors are grouped by (device, dtype), cut into buckets of about
    ``bucket_cap_mb`` and all-reduced asynchronously, so packing, communicating and unpacking of
    consecutive buckets overlap. Extra memory is bounded by what the options ask for:

    - default (full precision, ``overlap_steps=0``): at most ``2 * bucket_cap_mb`` per device, a
      pool of two wire buffers reused by every round; no copy of the model;
    - ``comm_dtype=torch.bfloat16`` or ``torch.float16``: ranks exchange the change since the
      last round (the *delta*) in 16 bits, so the rounding error scales with the delta, not with
      the weights. This keeps one full-precision copy of the averaged tensors (the last round's
      values, identical on every rank) plus about ``2 * bucket_cap_mb``. Tensors already 16-bit
      travel as they are. The first round (and the first after the set of averaged tensors
      changes) is in full precision, to set that copy;
    - ``overlap_steps=k``: a round is started in the background at each ``period`` boundary and
      applied ``k`` optimizer steps later, so the local steps in between hide it. Each rank then
      holds the mean of the ranks' snapshots plus its own progress since its snapshot: the
      average is ``k`` steps stale. ``k`` is fixed, so runs are reproducible and the ranks stay
      in step. Every bucket of a round in flight has its own buffers: two copies of the
      averaged tensors in the wire dtype. :meth:`average` and :meth:`close` first complete the
      round in flight, then run a blocking one, so ranks end bitwise identical.

    ``stats`` reports rounds, bytes sent and time spent waiting on communication.

    ``model`` may be a :class:`~torch.nn.parallel.DistributedDataParallel`: its per-step gradient
    all-reduce is replaced by a communication hook that keeps gradients local (whatever the script
    does with ``no_sync()`` or ``require_backward_grad_sync``), and its per-forward buffer broadcast
    is turned off, since buffers are averaged at rounds instead.

    With no initialised process group, a group of one, or ``enabled=False``, no collective ever
    runs and the numbers are exactly those of the base optimizer.

    Args:
        base_optimizer (Optimizer): the optimizer that takes each local step, built on
            ``model``'s parameters.
        model (nn.Module): the module whose parameters and buffers are averaged.
        period (int or Callable[[int], int]): optimizer steps between averaging rounds (``1``
            averages after every step), or a schedule: a callable given the step of a round
            that returns the number of steps to the next one, reading only what every rank
            shares (see :mod:`local_sgd_optim.schedules`).
        accumulation_steps (int): ``step()`` calls (micro-batches) per optimizer step (default: 1).
        average_buffers (bool): also average floating-point buffers (default: ``True``).
        process_group (ProcessGroup, optional): the ranks to average over (default: the world).
        broadcast_initial (bool): at construction, copy rank 0's parameters and buffers to every
            rank, as DDP does, so ranks start identical even when seeded differently
            (default: ``True``). Build the optimizer *before* loading a per-rank checkpoint into
            the model, or pass ``False`` when resuming, or the broadcast replaces what was loaded.
        enabled (bool): ``False`` makes the wrapper behave exactly like ``base_optimizer``, with
            accumulation still applied (default: ``True``).
        bucket_cap_mb (float): size of a communication bucket in MiB (default: 25).
        comm_dtype (torch.dtype, optional): ``torch.bfloat16`` or ``torch.float16`` to send
            16-bit deltas; ``None`` sends full precision (default: ``None``).
        overlap_steps (int): apply each round this many optimizer steps after it starts, with
            the communication running behind those steps; ``0`` blocks at the boundary; must be
            smaller than ``period`` (default: 0).
        on_nonfinite (str): when a rank's parameters or buffers hold NaN or inf at a round,
            ``"raise"`` a :class:`RoundError` on every rank or ``"skip"`` the round with a
            warning; either way no rank's values change (default: ``"raise"``).
        warmup_steps (int): optimizer steps of synchronous data parallelism (gradients
            averaged across ranks before each base step) before local SGD starts: post-local
            SGD (https://arxiv.org/abs/1808.07217). For a DDP ``model`` the wrapper's hook
            all-reduces during warm-up and stops after it (default: 0).
        outer_optimizer (Callable[[list[Tensor]], Optimizer], optional): builds an optimizer
            over a kept copy of the parameters; at each round it steps with the pseudo-gradient
            (kept copy minus the mean of the ranks' parameters) and every rank continues from
            the result: DiLoCo (https://arxiv.org/abs/2311.08105) with Nesterov SGD, SlowMo
            (https://arxiv.org/abs/1910.00643) with heavy-ball momentum. Extra memory: one copy
            of the parameters and the outer optimizer's state. With ``overlap_steps`` it steps
            when a round lands, from the mean of the snapshots (default: ``None``).
        local_period (int, optional): two-level averaging: also average inside ``local_group``
            every ``local_period`` optimizer steps; smaller than ``period`` (default: ``None``).
        local_group (ProcessGroup or str, optional): this rank's subgroup for ``local_period``,
            e.g. from :func:`torch.distributed.new_subgroups`, or ``"node"`` for one subgroup per
            node of ``LOCAL_WORLD_SIZE`` ranks (default: ``"node"`` when ``local_period`` is
            given).

    Raises:
        TypeError: ``base_optimizer`` is not an optimizer, ``model`` is not a module or is
            sharded (FSDP, DTensor parameters), or a flag is not a bool.
        ValueError: ``period`` or ``accumulation_steps`` is not a positive integer,
            ``bucket_cap_mb`` is not positive, ``comm_dtype`` is not a 16-bit float type,
            ``overlap_steps`` is negative or not below ``period``, ``on_nonfinite`` is neither
            ``"raise"`` nor ``"skip"``, ``base_optimizer`` holds parameters that are not in
            ``model``, or ``base_optimizer`` is already wrapped by an open
            ``LocalSGDOptimizer``.
        RuntimeError: the ranks' models or settings differ, input was bad on another rank, or a
            DDP ``model`` already has a communication hook.

    Example::

        >>> model = Net()
        >>> opt = LocalSGDOptimizer(torch.optim.SGD(model.parameters(), lr=0.1), model, period=8)
        >>> with opt:
        ...     for x, y in loader:
        ...         loss_fn(model(x), y).backward()
        ...         opt.step()
        ...         opt.zero_grad()

    .. warning::
        Construction, rounds, :meth:`average` and :meth:`close` are collective: every rank of the
        process group must make the same calls in the same order.
    """

    # torch.amp.GradScaler hands over grad_scale and found_inf instead of skipping step():
    # a rank whose gradients overflow must still count the step to stay in step with the others.
    _step_supports_amp_scaling = True

    def __init__(
        self,
        base_optimizer: Optimizer,
        model: nn.Module,
        period: int | PeriodSchedule,
        *,
        accumulation_steps: int = 1,
        average_buffers: bool = True,
        process_group: dist.ProcessGroup | None = None,
        broadcast_initial: bool = True,
        enabled: bool = True,
        bucket_cap_mb: float = 25.0,
        comm_dtype: torch.dtype | None = None,
        overlap_steps: int = 0,
        on_nonfinite: str = "raise",
        warmup_steps: int = 0,
        outer_optimizer: Callable[[list[Tensor]], Optimizer] | None = None,
        local_period: int | None = None,
        local_group: dist.ProcessGroup | str | None = None,
    ) -> None:
        try:
            (
                period,
                accumulation_steps,
                bucket_cap_mb,
                comm_dtype,
                overlap_steps,
                warmup_steps,
                local_period,
            ) = _validate_arguments(
                base_optimizer,
                model,
                period,
                accumulation_steps,
                average_buffers,
                broadcast_initial,
                enabled,
                process_group,
                bucket_cap_mb,
                comm_dtype,
                overlap_steps,
                on_nonfinite,
                warmup_steps,
                outer_optimizer,
                local_period,
                local_group,
            )
        except (TypeError, ValueError, RuntimeError) as problem:
            # The other ranks may have valid input and be about to wait for us in the first
            # collective: join it with the error so that every rank raises instead of hanging.
            if _could_communicate(process_group, enabled):
                self._process_group = process_group
                self._device = _first_device(model)
                self._agree_across_ranks([], error=f"{type(problem).__name__}: {problem}")
            raise

        self._base = base_optimizer
        self._model = model
        self._process_group = process_group
        self._device = _first_device(model)
        self._period = period
        self._accumulation_steps = accumulation_steps
        self._average_buffers = average_buffers
        self._broadcast_initial = broadcast_initial
        self._enabled = enabled
        self._bucket_cap_mb = bucket_cap_mb
        self._comm_dtype = comm_dtype
        self._overlap_steps = overlap_steps
        self._on_nonfinite = on_nonfinite
        self._warmup_steps = warmup_steps
        self._local_period = local_period
        self._local_group: dist.ProcessGroup | None = None
        self._local_averager: BucketedAverager | None = None
        self._gradient_averager: GradientAverager | None = None
        self._outer_factory = outer_optimizer
        self._outer: Optimizer | None = None
        self._outer_params: list[Tensor] = []
        self._local_rounds = 0
        self._stats = CommStats()
        self._extra_params: list[Tensor] = []
        self._micro_steps = 0
        # micro_steps at the start of the accumulation windows' grid (moves when a resumed run
        # changes accumulation_steps), so windows stay whole.
        self._window_start = 0
        self._optimizer_steps = 0
        self._averaging_rounds = 0
        self._last_round_step = 0
        self._next_round_step = 0
        self._closed = False
        self._averager: BucketedAverager | None = None
        self._plan_key: tuple[Hashable, ...] | None = None
        self._init_optimizer_bookkeeping()
        _OWNERS[base_optimizer] = weakref.ref(self)

        self._world_size = group_size(process_group) if enabled else 1
        self._broadcast_changed_model = False
        self._versions_after_broadcast: list[int] | None = None
        if self._communicates:
            self._check_ranks_agree()
            ddp = _inner_ddp(model)
            if ddp is not None:
                self._detach_from_ddp(ddp)
            if broadcast_initial:
                state = list(model.parameters()) + list(model.buffers())
                self._broadcast_changed_model = broadcast_tensors(
                    state, process_group, bucket_cap_mb
                )
                self._versions_after_broadcast = [t._version for t in state]
            if local_period is not None:
                self._local_group = self._build_local_group(local_group)
            self._build_averager()
            if broadcast_initial:
                # Every rank now holds rank 0's values: the reference for 16-bit deltas.
                self._require_averager().set_anchor_from_tensors()
                if self._local_averager is not None:
                    self._local_averager.set_anchor_from_tensors()
            if warmup_steps and ddp is None:
                self._gradient_averager = GradientAverager(
                    process_group, bucket_cap_mb, self._stats
                )
        if outer_optimizer is not None:
            self._build_outer_optimizer()
        self._next_round_step = warmup_steps + self._period_from(warmup_steps)
        self._log_settings()

    def _log_settings(self) -> None:
        if not _LOG.isEnabledFor(logging.INFO) or (
            self._communicates and group_rank(self._process_group) != 0
        ):
            return
        averager = self._averager
        what = "nothing is communicated"
        if averager is not None:
            what = (
                f"{averager.numel:,} values ({averager.nbytes / 2**20:.1f} MiB on the wire) "
                f"in {len(averager.buckets)} bucket(s)"
            )
        _LOG.info(
            "LocalSGDOptimizer: period=%d, accumulation_steps=%d, world_size=%d, "
            "comm_dtype=%s, overlap_steps=%d, bucket_cap_mb=%g, average_buffers=%s; %s",
            self._period,
            self._accumulation_steps,
            self._world_size,
            self._comm_dtype,
            self._overlap_steps,
            self._bucket_cap_mb,
            self._average_buffers,
            what,
        )

    def _init_optimizer_bookkeeping(self) -> None:
        # Optimizer.__init__ would build param groups of its own; the wrapper shares the base
        # optimizer's, so it sets up only the hook registries that Optimizer's methods use.
        self._optimizer_step_pre_hooks: OrderedDict[int, Callable[..., Any]] = OrderedDict()
        self._optimizer_step_post_hooks: OrderedDict[int, Callable[..., Any]] = OrderedDict()
        self._optimizer_state_dict_pre_hooks: OrderedDict[int, Callable[..., Any]] = OrderedDict()
        self._optimizer_state_dict_post_hooks: OrderedDict[int, Callable[..., Any]] = OrderedDict()
        self._optimizer_load_state_dict_pre_hooks: OrderedDict[int, Callable[..., Any]] = (
            OrderedDict()
        )
        self._optimizer_load_state_dict_post_hooks: OrderedDict[int, Callable[..., Any]] = (
            OrderedDict()
        )
        self._patch_step_function()  # runs step pre/post hooks around our step()

    # The base optimizer's own objects, so schedulers and hooks act on the real thing.
    @property
    def param_groups(self) -> list[dict[str, Any]]:
        return self._base.param_groups

    @param_groups.setter
    def param_groups(self, value: list[dict[str, Any]]) -> None:
        self._base.param_groups = value

    @property
    def state(self) -> Any:
        return self._base.state

    @state.setter
    def state(self, value: Any) -> None:
        self._base.state = value

    @property
    def defaults(self) -> dict[str, Any]:
        return self._base.defaults

    @defaults.setter
    def defaults(self, value: dict[str, Any]) -> None:
        self._base.defaults = value

    @property
    def base_optimizer(self) -> Optimizer:
        """The wrapped optimizer that takes each local step."""
        return self._base

    @property
    def model(self) -> nn.Module:
        """The module whose parameters and buffers are averaged."""
        return self._model

    @property
    def period(self) -> int | PeriodSchedule:
        """Optimizer steps between averaging rounds, or the schedule that gives them."""
        return self._period

    @property
    def next_round_step(self) -> int:
        """The optimizer step at which the next averaging round runs."""
        return self._next_round_step

    @property
    def warmup_steps(self) -> int:
        """Synchronous optimizer steps (gradients averaged) before local SGD begins."""
        return self._warmup_steps

    @property
    def local_period(self) -> int | None:
        """Optimizer steps between rounds inside the local subgroup, if two-level."""
        return self._local_period

    @property
    def local_rounds(self) -> int:
        """Rounds inside the local subgroup so far (two-level averaging)."""
        return self._local_rounds

    @property
    def outer_optimizer(self) -> Optimizer | None:
        """The outer optimizer that steps the kept parameters at each round, if any."""
        return self._outer

    @property
    def accumulation_steps(self) -> int:
        """``step()`` calls per optimizer step."""
        return self._accumulation_steps

    @property
    def world_size(self) -> int:
        """Ranks that average together (1 when nothing is communicated)."""
        return self._world_size

    @property
    def micro_steps(self) -> int:
        """``step()`` calls so far, one per micro-batch."""
        return self._micro_steps

    @property
    def optimizer_steps(self) -> int:
        """Steps taken by the base optimizer so far."""
        return self._optimizer_steps

    @property
    def averaging_rounds(self) -> int:
        """Averaging rounds so far (with a group of one, a round is free but still counted).

        With ``overlap_steps``, a round counts when it starts.
        """
        return self._averaging_rounds

    @property
    def bucket_cap_mb(self) -> float:
        """Size of a communication bucket in MiB."""
        return self._bucket_cap_mb

    @property
    def comm_dtype(self) -> torch.dtype | None:
        """The 16-bit type deltas travel in, or ``None`` for full precision."""
        return self._comm_dtype

    @property
    def overlap_steps(self) -> int:
        """Optimizer steps between the start of a round and its application."""
        return self._overlap_steps

    @property
    def stats(self) -> CommStats:
        """A snapshot of what averaging has cost this rank: rounds that communicated,
        ``bytes_communicated``, ``comm_seconds`` spent blocked on communication and
        ``round_seconds`` spent in rounds altogether. Kept in :meth:`state_dict`.

        Example::

            >>> s = opt.stats
            >>> print(f"{s.bytes_communicated / 2**20:.1f} MiB in {s.rounds} rounds, "
            ...       f"{s.comm_seconds:.2f} s waiting")
        """
        return dataclasses.replace(self._stats)

    @property
    def _communicates(self) -> bool:
        return self._enabled and self._world_size > 1

    def __repr__(self) -> str:
        extra = ""
        if self._comm_dtype is not None:
            extra += f", comm_dtype={self._comm_dtype}"
        if self._overlap_steps:
            extra += f", overlap_steps={self._overlap_steps}"
        return (
            f"{type(self).__name__}(period={self._period}, "
            f"accumulation_steps={self._accumulation_steps}, world_size={self._world_size}, "
            f"enabled={self._enabled}{extra}, base_optimizer={self._base!r})"
        )

    # --- stepping -------------------------------------------------------------------------

    def step(self, closure: Callable[[], float] | None = None) -> float | None:  # type: ignore[override]
        """Count one micro-batch; take an optimizer step at the end of each accumulation window.

        Args:
            closure (Callable, optional): re-evaluates the model and returns the loss, as for the
                base optimizer. Not allowed with ``accumulation_steps > 1``.

        Returns:
            The closure's loss, or ``None``.

        Under ``torch.amp.GradScaler`` (``scaler.step(opt)``), the wrapper unscales the
        gradients itself and, when this rank's gradients hold inf or NaN, skips its base step
        but still counts it, so it joins the next round on the same step as every other rank.

        Raises:
            ValueError: a closure was given with ``accumulation_steps > 1``, or a
                ``GradScaler`` drives a wrapper with ``accumulation_steps > 1``.
            RuntimeError: the optimizer was closed.
            RoundError: a round found the ranks out of step or non-finite values (see
                ``on_nonfinite``), or its collective failed; raised on every rank.
        """
        if self._closed:
            raise RuntimeError(
                "step() after close(): the final averaging round has already run; use "
                "average() for a synchronisation in the middle of training"
            )
        if closure is not None and self._accumulation_steps > 1:
            raise ValueError(
                "a closure cannot be combined with accumulation_steps > 1, got "
                f"accumulation_steps={self._accumulation_steps}; accumulate inside the closure "
                "and use accumulation_steps=1"
            )
        # Set by torch.amp.GradScaler.step() for optimizers with _step_supports_amp_scaling.
        # (Instance attributes only: step() is on every training step's path, kept lean.)
        grad_scale: Tensor | None = self.__dict__.get("grad_scale")
        found_inf: Tensor | None = self.__dict__.get("found_inf")
        if found_inf is not None and self._accumulation_steps > 1:
            raise ValueError(
                "GradScaler cannot drive a LocalSGDOptimizer with accumulation_steps > 1, got "
                f"accumulation_steps={self._accumulation_steps}: the scaler would change its "
                "scale in the middle of a window. Accumulate in the loop and call "
                "scaler.step(opt) and scaler.update() once per window, with accumulation_steps=1"
            )
        self._micro_steps += 1
        if (self._micro_steps - self._window_start) % self._accumulation_steps != 0:
            return None
        if grad_scale is not None:
            self._rescale_gradients(multiplier=grad_scale.double().reciprocal().float())
        elif self._accumulation_steps > 1:
            self._rescale_gradients(divisor=self._accumulation_steps)
        skip = found_inf is not None and bool(found_inf.item())
        if self._gradient_averager is not None and self._in_warmup:
            grads = [p.grad for g in self.param_groups for p in g["params"] if p.grad is not None]
            self._gradient_averager.average(grads)
            if found_inf is not None:
                # One rank's overflow reached every rank through the average: all skip alike.
                skip = not self._gradient_averager.finite(grads)
        loss = None
        if not skip:
            loss = self._base.step() if closure is None else self._base.step(closure)
        self._optimizer_steps += 1
        if self._enabled:
            if (
                self._overlap_steps
                and self._round_in_flight
                and (self._optimizer_steps - self._last_round_step >= self._overlap_steps)
            ):
                self._land_round()
            if self._optimizer_steps >= self._next_round_step:
                self._round(blocking=self._overlap_steps == 0)
                self._next_round_step = self._optimizer_steps + self._period_from(
                    self._optimizer_steps
                )
            elif self._local_period is not None and self._local_round_due():
                self._local_round()
        return loss

    @property
    def _in_warmup(self) -> bool:
        return self._enabled and self._optimizer_steps < self._warmup_steps

    def _ddp_averages_now(self) -> bool:
        """For the DDP hook: whether this backward ends a window of a warm-up step."""
        return (
            self._in_warmup
            and self._world_size > 1
            and (self._micro_steps + 1 - self._window_start) % self._accumulation_steps == 0
        )

    def _period_from(self, step: int) -> int:
        """The number of optimizer steps from a round at ``step`` to the next one."""
        if not callable(self._period):
            return self._period
        returned: object = self._period(step)
        try:
            value = -1 if isinstance(returned, bool) else operator.index(returned)  # type: ignore[arg-type]
        except TypeError:
            value = -1
        if value < 1:
            raise ValueError(
                f"the period schedule {self._period!r} returned {returned!r} at optimizer step "
                f"{step}; it must return a positive integer"
            )
        if self._overlap_steps >= value:
            raise ValueError(
                f"the period schedule returned {value} at optimizer step {step}, not more than "
                f"overlap_steps={self._overlap_steps}: a round must land before the next starts"
            )
        return value

    def _local_round_due(self) -> bool:
        if self._local_period is None or self._optimizer_steps <= self._warmup_steps:
            return False
        return (self._optimizer_steps - self._warmup_steps) % self._local_period == 0

    @torch.no_grad()
    def _rescale_gradients(self, *, divisor: int = 1, multiplier: Tensor | None = None) -> None:
        """Divide every gradient by ``divisor`` or multiply it by ``multiplier``."""
        dense: list[Tensor] = []
        for group in self.param_groups:
            for p in group["params"]:
                if p.grad is None:
                    continue
                if not p.grad.is_sparse:
                    dense.append(p.grad)
                elif multiplier is not None:
                    p.grad.mul_(multiplier)
                else:
                    p.grad.div_(divisor)
        if not dense:
            return
        if multiplier is not None:
            # As GradScaler.unscale_ does it, so numbers match a base optimizer under a scaler.
            torch._foreach_mul_(dense, multiplier)
        else:
            torch._foreach_div_(dense, divisor)

    def zero_grad(self, set_to_none: bool = True) -> None:
        """Clear gradients, but only at the end of an accumulation window.

        Args:
            set_to_none (bool): set gradients to ``None`` instead of zero (default: ``True``).
        """
        if (self._micro_steps - self._window_start) % self._accumulation_steps == 0:
            self._base.zero_grad(set_to_none=set_to_none)

    def add_param_group(self, param_group: dict[str, Any]) -> None:
        """Add a parameter group to the base optimizer; its parameters join averaging.

        With ``broadcast_initial``, the new parameters are copied from rank 0 right away.

        .. warning::
            Every rank must call this, with the same parameters.
        """
        self._base.add_param_group(param_group)
        known = {id(p) for p in self._model.parameters()} | {id(p) for p in self._extra_params}
        added = [p for p in self._base.param_groups[-1]["params"] if id(p) not in known]
        self._extra_params.extend(added)
        if self._communicates and self._broadcast_initial:
            broadcast_tensors(
                list(self._base.param_groups[-1]["params"]),
                self._process_group,
                self._bucket_cap_mb,
            )

    # --- averaging ------------------------------------------------------------------------

    def _named_averaged_state(self) -> Iterator[tuple[str, str, Tensor, bool]]:
        """(kind, name, tensor, averaged) for every parameter and buffer, in a fixed order."""
        for name, p in self._model.named_parameters():
            yield "parameter", name, p, p.requires_grad
        for i, extra in enumerate(self._extra_params):
            yield "parameter", f"<add_param_group #{i}>", extra, True
        for name, b in self._model.named_buffers():
            yield "buffer", name, b, self._average_buffers and b.is_floating_point()

    def _current_plan_key(self) -> tuple[Hashable, ...]:
        return tuple((id(t), averaged) for _, _, t, averaged in self._named_averaged_state())

    def _build_averager(self) -> None:
        tensors = [t for _, _, t, averaged in self._named_averaged_state() if averaged]
        self._averager = BucketedAverager(
            tensors,
            self._process_group,
            bucket_cap_mb=self._bucket_cap_mb,
            comm_dtype=self._comm_dtype,
            overlap=self._overlap_steps > 0,
            stats=self._stats,
            on_nonfinite=self._on_nonfinite,
        )
        if self._local_group is not None:
            self._local_averager = BucketedAverager(
                tensors,
                self._local_group,
                bucket_cap_mb=self._bucket_cap_mb,
                comm_dtype=self._comm_dtype,
                stats=self._stats,
                on_nonfinite=self._on_nonfinite,
            )
        self._plan_key = self._current_plan_key()

    def _build_local_group(self, local_group: object) -> dist.ProcessGroup:
        """This rank's subgroup for two-level averaging, checked to partition the group."""
        if local_group is None or local_group == "node":
            size = int(os.environ.get("LOCAL_WORLD_SIZE", "0"))
            if size < 1 or self._process_group is not None or self._world_size % size:
                raise ValueError(
                    "local_group='node' builds one subgroup per node from LOCAL_WORLD_SIZE "
                    "(set by torchrun) over the default group, and needs a world size that is "
                    f"a multiple of it (LOCAL_WORLD_SIZE={size or 'unset'}, world size "
                    f"{self._world_size}); otherwise pass this rank's subgroup, e.g. from "
                    "torch.distributed.new_subgroups()"
                )
            group, _ = dist.new_subgroups(group_size=size)
        else:
            assert isinstance(local_group, dist.ProcessGroup)
            group = local_group
        members = dist.get_process_group_ranks(group) if dist.get_rank(group) >= 0 else []
        everyone: list[list[int] | None] = [None] * self._world_size
        dist.all_gather_object(everyone, members, group=self._process_group)
        ranks = (
            dist.get_process_group_ranks(self._process_group)
            if self._process_group is not None
            else list(range(self._world_size))
        )
        problems = []
        for rank, mine in zip(ranks, everyone):
            if not mine or rank not in mine:
                problems.append(f"rank {rank} is not in its own subgroup")
            elif any(everyone[ranks.index(q)] != mine for q in mine if q in ranks):
                problems.append(f"rank {rank}'s subgroup {mine} is not the same on its members")
            elif not set(mine) <= set(ranks):
                problems.append(f"rank {rank}'s subgroup {mine} reaches outside the group")
        if problems:
            raise ValueError(
                "local_group must split the ranks into disjoint subgroups that cover them all: "
                + "; ".join(problems[:3])
                + ". Build the subgroups on every rank, e.g. with torch.distributed.new_subgroups"
            )
        return group

    def _require_averager(self) -> BucketedAverager:
        if self._averager is None:  # pragma: no cover - built whenever the wrapper communicates
            raise RuntimeError("LocalSGDOptimizer has no averager on a rank that communicates")
        return self._averager

    @property
    def _round_in_flight(self) -> bool:
        return self._averager is not None and self._averager.pending

    def _check_ranks_agree(self) -> None:
        period: object = self._period
        if callable(period):  # its repr holds an address: name the schedule instead
            period = getattr(period, "__qualname__", type(period).__qualname__)
        lines = [
            f"setting period={period}",
            f"setting accumulation_steps={self._accumulation_steps}",
            f"setting average_buffers={self._average_buffers}",
            f"setting broadcast_initial={self._broadcast_initial}",
            f"setting bucket_cap_mb={self._bucket_cap_mb}",
            f"setting comm_dtype={self._comm_dtype}",
            f"setting overlap_steps={self._overlap_steps}",
            f"setting on_nonfinite={self._on_nonfinite}",
        ]
        for kind, name, t, averaged in self._named_averaged_state():
            frozen = "" if averaged or kind == "buffer" else ", frozen"
            lines.append(f"{kind} '{name}' of shape {tuple(t.shape)}, {t.dtype}{frozen}")
        self._agree_across_ranks(lines)

    def _agree_across_ranks(self, lines: list[str], error: str | None = None) -> None:
        """Raise the same error on every rank if any rank failed or the descriptions differ."""
        everyone = exchange_descriptions(lines, self._process_group, error, self._device)
        if everyone is None:
            return
        failed = [(r, e) for r, (e, _) in enumerate(everyone) if e is not None]
        if failed:
            if error is not None:
                return  # the caller raises this rank's own exception
            raise RuntimeError(
                "LocalSGDOptimizer could not be built on "
                + "; ".join(f"rank {r} ({e})" for r, e in failed)
                + ". Fix the arguments there: every rank must build it with the same input."
            )
        descriptions = [d for _, d in everyone]
        a = descriptions[0]
        other = next(r for r, d in enumerate(descriptions) if d != a)
        b = descriptions[other]
        i = next((i for i, (x, y) in enumerate(zip(a, b)) if x != y), min(len(a), len(b)))
        what_a = a[i] if i < len(a) else "nothing more"
        what_b = b[i] if i < len(b) else "nothing more"

        def count(lines: list[str]) -> int:
            return sum(1 for line in lines if not line.startswith("setting "))

        raise RuntimeError(
            "LocalSGDOptimizer: the model or settings differ across ranks "
            f"(rank 0: {count(a)} parameters and buffers, rank {other}: {count(b)}). "
            f"First difference: rank 0 has {what_a}; rank {other} has {what_b}. "
            "Every rank must build the same model and pass the same arguments."
        )

    def _refresh_plan(self) -> None:
        if self._current_plan_key() != self._plan_key:
            # Parameters were unfrozen, added or replaced since the last round.
            self._check_ranks_agree()
            self._build_averager()

    def _local_round(self) -> None:
        if self._communicates:
            self._refresh_plan()
            if self._local_averager is not None:
                self._local_averager.average(self._optimizer_steps)
        self._local_rounds += 1

    def _land_round(self) -> None:
        """Apply the round in flight (``overlap_steps``), with the outer step if there is one."""
        averager = self._averager
        landed = averager is not None and averager.pending and averager.finish()
        if landed and self._outer is not None:
            assert averager is not None
            self._outer_step_from_snapshot(averager)

    def _round(self, blocking: bool = True) -> None:
        # Whether the round's values are in place now (not started in the background), and
        # whether it was applied at all (a round skipped for NaN must not feed the outer step).
        landed = applied = True
        if self._communicates:
            self._land_round()  # a round in flight lands first
            self._refresh_plan()
            averager = self._require_averager()
            before = dataclasses.replace(self._stats)
            if blocking:
                applied = averager.average(self._optimizer_steps)
            else:
                result = averager.start(self._optimizer_steps)
                landed = result is not None
                applied = bool(result)
            if _LOG.isEnabledFor(logging.DEBUG):
                _LOG.debug(
                    "round %d at step %d (%s): %d bytes sent, %.1f ms in the round, %.1f ms "
                    "blocked on communication",
                    self._averaging_rounds + 1,
                    self._optimizer_steps,
                    "blocking" if blocking else "started, lands later",
                    self._stats.bytes_communicated - before.bytes_communicated,
                    1e3 * (self._stats.round_seconds - before.round_seconds),
                    1e3 * (self._stats.comm_seconds - before.comm_seconds),
                )
        if self._outer is not None and landed and applied:  # a started one steps when it lands
            self._outer_step()
            if self._averager is not None:
                self._averager.set_anchor_from_tensors()  # deltas start from the outer result
        if self._local_averager is not None:
            self._local_averager.set_anchor_from_tensors()
        self._averaging_rounds += 1
        self._last_round_step = self._optimizer_steps

    # --- the outer optimizer -----------------------------------------------------------------

    def _outer_sources(self) -> list[Tensor]:
        return [
            t
            for kind, _, t, averaged in self._named_averaged_state()
            if kind == "parameter" and averaged
        ]

    def _build_outer_optimizer(self) -> None:
        assert self._outer_factory is not None
        sources = self._outer_sources()
        self._outer_params = [p.detach().clone() for p in sources]
        for kept in self._outer_params:
            kept.grad = torch.zeros_like(kept)
        outer = self._outer_factory(self._outer_params)
        if not isinstance(outer, Optimizer):
            raise TypeError(
                "outer_optimizer must return a torch.optim.Optimizer built on the tensors it "
                f"is given, got {type(outer).__name__}"
            )
        self._outer = outer
        self._outer_plan = [id(t) for t in sources]
        # Without the initial broadcast the ranks start apart: the first round's average is
        # the outer optimizer's starting point, and its first step comes at the second round.
        self._outer_ready = self._broadcast_initial or not self._communicates

    def _restart_outer_if_parameters_changed(self, sources: list[Tensor]) -> None:
        if [id(t) for t in sources] != self._outer_plan:
            warnings.warn(
                "LocalSGDOptimizer: the averaged parameters changed (unfrozen, added or "
                "replaced); the outer optimizer starts again from the current average, its "
                "state reset",
                stacklevel=5,
            )
            self._build_outer_optimizer()
            self._outer_ready = False

    @torch.no_grad()
    def _outer_step(self) -> None:
        assert self._outer is not None
        sources = self._outer_sources()
        self._restart_outer_if_parameters_changed(sources)
        if not self._outer_ready:
            _copy_all(self._outer_params, sources)
            self._outer_ready = True
            return
        # The pseudo-gradient: where the last round left the parameters minus the mean now.
        grads = [kept.grad for kept in self._outer_params]
        _copy_all(grads, self._outer_params)  # type: ignore[arg-type]
        torch._foreach_sub_(grads, sources)  # type: ignore[arg-type]
        self._outer.step()
        _copy_all(sources, self._outer_params)

    def _outer_slices(self, averager: BucketedAverager) -> list[list[tuple[int, Tensor, Tensor]]]:
        """Per bucket: (index of the source, the kept copy's slice, its gradient's slice) for
        every source that is a slice of an outer-optimized parameter (buffers have none)."""
        owners: dict[int, list[tuple[Tensor, Tensor, Tensor]]] = {}
        for p, kept in zip(self._outer_sources(), self._outer_params):
            assert kept.grad is not None
            real = [_as_real(t) for t in (p, kept, kept.grad)]
            owners.setdefault(real[0].untyped_storage().data_ptr(), []).append(
                (real[0], real[1], real[2])
            )
        slices = []
        for b in averager.buckets:
            entries = []
            for i, source in enumerate(b.sources):
                for p, kept, grad in owners.get(source.untyped_storage().data_ptr(), []):
                    offset = source.storage_offset() - p.storage_offset()
                    if source.shape == p.shape and offset == 0:
                        entries.append((i, kept, grad))  # the whole tensor
                        break
                    if source.dim() == 1 and 0 <= offset < p.numel():
                        end = offset + source.numel()
                        entries.append(
                            (i, kept.reshape(-1)[offset:end], grad.reshape(-1)[offset:end])
                        )
                        break
            slices.append(entries)
        return slices

    @torch.no_grad()
    def _outer_step_from_snapshot(self, averager: BucketedAverager) -> None:
        # A landed overlapped round left each rank at (its own progress) + (mean of the
        # snapshots). The outer optimizer steps from that mean; every rank then moves by
        # (outer result - mean), keeping its own progress on top.
        assert self._outer is not None
        self._restart_outer_if_parameters_changed(self._outer_sources())
        means = averager.snapshot_means()
        slices = self._outer_slices(averager)
        pairs = [
            (b, [means[k][i] for i, _, _ in entries], entries)
            for k, (b, entries) in enumerate(zip(averager.buckets, slices))
            if entries
        ]
        if not self._outer_ready:
            for _, mean, entries in pairs:
                _copy_all([kept for _, kept, _ in entries], mean)
            self._outer_ready = True
            return
        for _, mean, entries in pairs:
            grads = [grad for _, _, grad in entries]
            _copy_all(grads, [kept for _, kept, _ in entries])
            torch._foreach_sub_(grads, mean)
        self._outer.step()
        for b, mean, entries in pairs:
            sources = [b.sources[i] for i, _, _ in entries]
            kept = [k for _, k, _ in entries]
            torch._foreach_add_(sources, kept)
            torch._foreach_sub_(sources, mean)
            if b.delta:  # deltas are taken from the outer step's result from now on
                _copy_all([b.anchor_views[i] for i, _, _ in entries], kept)

    def average(self) -> None:
        """Run a blocking averaging round now, outside the ``period`` schedule.

        A round in flight (``overlap_steps``) is applied first. Does nothing when disabled.
        Afterwards every rank holds the same values; useful before evaluating or saving a
        single model.

        .. warning::
            Every rank of the process group must call this at the same point.
        """
        if self._enabled:
            self._round()

    def close(self) -> None:
        """End training: a final averaging round, unless no optimizer step happened since the last.

        Idempotent. Afterwards every rank holds the same parameters and ``step()`` raises.

        The ranks first agree, in one small all-reduce, on whether a round is due: a rank that
        took one step more than the others (uneven data, say) would otherwise wait alone in a
        final round that the others skip.

        Raises:
            RoundError: the ranks took different numbers of optimizer steps; raised on every
                rank, with the steps named, before any value changes.

        .. warning::
            Every rank of the process group must call this.
        """
        if self._closed:
            return
        due = self._optimizer_steps > self._last_round_step or self._round_in_flight
        if self._communicates:
            due = self._agree_on_final_round(due)
        if self._enabled and due:
            # Applying a round in flight leaves each rank's own progress in place: the blocking
            # round after it is what makes the ranks identical.
            self._round()
        self._closed = True

    def _agree_on_final_round(self, due: bool) -> bool:
        device = collective_device(self._process_group, self._device)
        steps = self._optimizer_steps
        mine = torch.tensor([int(due), steps, -steps], dtype=torch.int64, device=device)
        dist.all_reduce(mine, op=dist.ReduceOp.MAX, group=self._process_group)
        any_due, most, fewest = (int(v) for v in mine.tolist())
        if most != -fewest:
            self._closed = True  # no collective may follow: the ranks are no longer in step
            raise RoundError(
                f"ranks are out of step at close(): between {-fewest} and {most} optimizer "
                "steps. Every rank must call step() the same number of times (give every rank "
                "the same number of batches, e.g. DistributedSampler with drop_last=True); "
                "nothing was averaged"
            )
        return bool(any_due)

    def __enter__(self) -> LocalSGDOptimizer:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        traceback: TracebackType | None,
    ) -> None:
        if exc_type is None:
            self.close()
        else:
            # Another rank may be waiting in a collective we will never join: a final round
            # now could hang it (or us), so we leave without communicating and let it propagate.
            self._closed = True

    # --- DDP ------------------------------------------------------------------------------

    def _detach_from_ddp(self, model: DistributedDataParallel) -> None:
        model.register_comm_hook(weakref.ref(self), _local_sgd_ddp_hook)
        # Buffers are averaged at rounds; rank 0's copy must not overwrite them every forward.
        model.broadcast_buffers = False

    # --- state ----------------------------------------------------------------------------

    def state_dict(self) -> dict[str, Any]:
        """The base optimizer's state dict plus a ``"local_sgd"`` entry: counters and settings.

        Each rank's optimizer state (momentum, Adam moments) differs between rounds: save each
        rank's own to resume exactly. With a 16-bit ``comm_dtype`` the entry also holds the
        full-precision copy of the last round's values (``"anchor"``), and with
        ``overlap_steps`` a round in flight is waited for (no new collective) and saved as
        ``"pending"``, to be applied on schedule after loading. Everything is tensors and plain
        containers, loadable with ``torch.load(..., weights_only=True)``.
        """
        for pre_hook in self._optimizer_state_dict_pre_hooks.values():
            pre_hook(self)
        state_dict = self._base.state_dict()
        ours: dict[str, Any] = {
            "version": _STATE_VERSION,
            "micro_steps": self._micro_steps,
            "optimizer_steps": self._optimizer_steps,
            "averaging_rounds": self._averaging_rounds,
            "last_round_step": self._last_round_step,
            "next_round_step": self._next_round_step,
            "window_start": self._window_start,
            "local_rounds": self._local_rounds,
            "period": None if callable(self._period) else self._period,
            "warmup_steps": self._warmup_steps,
            "local_period": self._local_period,
            "accumulation_steps": self._accumulation_steps,
            "average_buffers": self._average_buffers,
            "bucket_cap_mb": self._bucket_cap_mb,
            "comm_dtype": _COMM_DTYPE_NAMES[self._comm_dtype],
            "overlap_steps": self._overlap_steps,
            "on_nonfinite": self._on_nonfinite,
            "world_size": self._world_size,
            "stats": self._stats.as_dict(),
        }
        if self._averager is not None:
            ours["anchor"] = [a.clone() for a in self._averager.anchor_tensors()]
            ours["pending"] = self._averager.pending_state()
        if self._local_averager is not None:
            ours["local_anchor"] = [a.clone() for a in self._local_averager.anchor_tensors()]
        if self._outer is not None:
            ours["outer"] = {
                "params": [kept.detach().clone() for kept in self._outer_params],
                "state": self._outer.state_dict(),
                "ready": self._outer_ready,
            }
        state_dict[_STATE_KEY] = ours
        for post_hook in self._optimizer_state_dict_post_hooks.values():
            result = post_hook(self, state_dict)
            if result is not None:
                state_dict = result
        return state_dict

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        """Load the base optimizer's state and the wrapper's counters and state.

        Counters, statistics, the outer optimizer's state, the full-precision copy for 16-bit
        deltas and a round in flight come from the checkpoint. Settings come from the
        constructor, that is from the script that runs now: a run resumed with ``period=16``
        from a ``period=8`` checkpoint averages every 16 steps, the next round falling 16 steps
        after the last one (at the next step if that is already past). A warning names each
        setting that differs from the checkpoint's. ``period``, ``warmup_steps``,
        ``accumulation_steps``, ``average_buffers``, ``bucket_cap_mb``, ``comm_dtype``,
        ``overlap_steps`` and ``on_nonfinite`` may change between runs.

        A plain optimizer checkpoint (no ``"local_sgd"`` entry) loads with a warning and the
        counters at zero.

        Raises:
            ValueError: the ``"local_sgd"`` entry is malformed or does not fit this wrapper: a
                different world size, ``local_period`` or presence of ``outer_optimizer``; a
                round in flight that the new settings cannot apply; ``accumulation_steps``
                changed in the middle of a window.
        """
        for pre_hook in self._optimizer_load_state_dict_pre_hooks.values():
            result = pre_hook(self, state_dict)
            if result is not None:
                state_dict = result
        state_dict = dict(state_dict)
        ours = state_dict.pop(_STATE_KEY, None)
        if ours is None:
            warnings.warn(
                "LocalSGDOptimizer.load_state_dict: the state dict has no 'local_sgd' entry "
                "(a plain optimizer checkpoint); counters start at zero",
                stacklevel=2,
            )
            ours = {name: 0 for name in _COUNTERS}
            ours.update({name: getattr(self, "_" + name) for name in _SETTINGS})
            ours["period"] = None if callable(self._period) else self._period
            ours["warmup_steps"] = self._warmup_steps
            ours["local_period"] = self._local_period
            ours.update({name: getattr(self, "_" + name) for name in _COMM_SETTINGS})
            ours["comm_dtype"] = _COMM_DTYPE_NAMES[self._comm_dtype]
            ours["next_round_step"] = self._warmup_steps + self._period_from(self._warmup_steps)
        loaded = self._validate_loaded(ours)
        if loaded["local_period"] != self._local_period:
            raise ValueError(
                f"the checkpoint was taken with local_period={loaded['local_period']}, this "
                f"LocalSGDOptimizer has local_period={self._local_period}; build it with the "
                "checkpoint's two-level setting to resume"
            )
        if (loaded["outer"] is None) != (self._outer is None):
            raise ValueError(
                "the checkpoint was taken "
                + ("with" if loaded["outer"] is not None else "without")
                + " an outer_optimizer and this LocalSGDOptimizer has "
                + ("none" if self._outer is None else "one")
                + "; build it the same way to resume"
            )
        changed = self._settings_changed_since(loaded)
        window_start = self._resume_window_start(loaded, "accumulation_steps" in changed)
        layout = {"bucket_cap_mb", "comm_dtype", "average_buffers"} & set(changed)
        if loaded["pending"] is not None and (not self._overlap_steps or layout):
            raise ValueError(
                "the checkpoint holds an averaging round in flight (overlap_steps), which can "
                "only be applied with overlap_steps > 0 and the same bucket_cap_mb, comm_dtype "
                f"and average_buffers; this LocalSGDOptimizer changes {', '.join(changed)}. "
                "Resume once with the checkpoint's settings, or call opt.average() before "
                "saving so that nothing is in flight"
            )
        self._base.load_state_dict(state_dict)
        if changed:
            warnings.warn(
                "LocalSGDOptimizer.load_state_dict: settings differ from the checkpoint's; "
                "the constructor's apply: "
                + ", ".join(
                    f"{name}={getattr(self, '_' + name)!r} (checkpoint: {loaded[name]!r})"
                    for name in changed
                ),
                stacklevel=2,
            )
        for name in (*_COUNTERS, *_NEW_COUNTERS):
            setattr(self, "_" + name, loaded[name])
        self._window_start = window_start
        if "period" in changed or "warmup_steps" in changed:
            # The next round falls a (new) period after the last one, or after warm-up; a
            # step already past it rounds at the next step.
            base = max(self._last_round_step, self._warmup_steps)
            if self._averaging_rounds == 0:
                base = self._warmup_steps
            self._next_round_step = base + self._period_from(base)
        if layout or "comm_dtype" in changed:
            # A full-precision copy of another layout: the next round sets a new one.
            loaded["anchor"], loaded["local_anchor"] = [], []
        outer = loaded["outer"]
        if isinstance(outer, dict) and self._outer is not None:
            kept = outer["params"]
            if len(kept) != len(self._outer_params) or any(
                a.shape != b.shape or a.dtype != b.dtype for a, b in zip(kept, self._outer_params)
            ):
                raise ValueError(
                    "the checkpoint's outer optimizer parameters do not match this model's"
                )
            with torch.no_grad():
                _copy_all(self._outer_params, list(kept))
            self._outer.load_state_dict(outer["state"])
            self._outer_ready = bool(outer["ready"])
        stats = loaded["stats"]
        assert isinstance(stats, dict)
        self._stats.__init__(**stats)  # type: ignore[misc]
        if self._averager is not None:
            self._averager.load_anchor_tensors(loaded["anchor"])  # type: ignore[arg-type]
            self._averager.load_pending_state(loaded["pending"])  # type: ignore[arg-type]
        if self._local_averager is not None:
            self._local_averager.load_anchor_tensors(loaded["local_anchor"])  # type: ignore[arg-type]
        elif loaded["pending"] is not None:
            warnings.warn(
                "LocalSGDOptimizer.load_state_dict: the checkpoint holds a round in flight, "
                "but this wrapper does not communicate (one rank, or enabled=False); the "
                "round is dropped",
                stacklevel=2,
            )
        self._closed = False
        self._warn_if_broadcast_replaced_checkpoint()
        for post_hook in self._optimizer_load_state_dict_post_hooks.values():
            post_hook(self)

    def _settings_changed_since(self, loaded: dict[str, object]) -> list[str]:
        """The settings whose constructor value differs from the checkpoint's (which wins not)."""
        changed = []
        for name in (*_SETTINGS, *_COMM_SETTINGS, "warmup_steps"):
            mine: object = getattr(self, "_" + name)
            if name == "period" and callable(mine):
                mine = None  # a schedule is saved as None: code, not state
            if loaded[name] != mine:
                changed.append(name)
        return changed

    def _resume_window_start(self, loaded: dict[str, object], accumulation_changed: bool) -> int:
        """Where the accumulation windows' grid starts after loading ``loaded``."""
        micro, start = loaded["micro_steps"], loaded["window_start"]
        assert isinstance(micro, int) and isinstance(start, int)
        if not accumulation_changed:
            return start
        old = loaded["accumulation_steps"]
        assert isinstance(old, int)
        if (micro - start) % old:
            raise ValueError(
                f"the checkpoint was taken in the middle of an accumulation window ({micro} "
                f"step() calls with accumulation_steps={old}); resume with "
                f"accumulation_steps={old}, or save right after the optimizer step that ends "
                "a window"
            )
        return micro

    def _validate_loaded(self, ours: object) -> dict[str, object]:
        def bad(what: str) -> ValueError:
            return ValueError(f"the state dict's 'local_sgd' {what}")

        if not isinstance(ours, dict):
            raise ValueError(
                f"the state dict's 'local_sgd' entry must be a dict, got {type(ours).__name__}"
            )
        version = ours.get("version", _STATE_VERSION)
        defaults = dict(_COMM_SETTINGS) if version in (1, 2) else {}
        missing = [
            name
            for name in _COUNTERS + _SETTINGS + tuple(_COMM_SETTINGS)
            if name not in ours and name not in defaults
        ]
        if missing:
            raise bad(f"entry lacks {', '.join(missing)}")
        for name in _COUNTERS:
            value = ours[name]
            if isinstance(value, bool) or not isinstance(value, int) or value < 0:
                raise bad(f"counter {name} must be a non-negative integer, got {value!r}")
        for name in ("period", "accumulation_steps"):
            if name == "period" and ours[name] is None:
                continue  # saved from a period schedule
            _check_positive_int(f"the state dict's 'local_sgd' setting {name}", ours[name])
        _check_bool("the state dict's 'local_sgd' setting average_buffers", ours["average_buffers"])
        if ours["last_round_step"] > ours["optimizer_steps"]:
            raise bad(
                "entry is inconsistent: last_round_step "
                f"{ours['last_round_step']} is after optimizer_steps {ours['optimizer_steps']}"
            )
        loaded: dict[str, object] = {name: ours[name] for name in _COUNTERS + _SETTINGS}
        comm = {name: ours.get(name, defaults.get(name)) for name in _COMM_SETTINGS}
        try:
            loaded["bucket_cap_mb"] = _check_bucket_cap(comm["bucket_cap_mb"])
            loaded["overlap_steps"] = _check_overlap_steps(comm["overlap_steps"], ours["period"])
        except ValueError as problem:
            raise bad(f"setting is invalid: {problem}") from None
        if comm["on_nonfinite"] not in ("raise", "skip"):
            raise bad(
                f"setting on_nonfinite must be 'raise' or 'skip', got {comm['on_nonfinite']!r}"
            )
        loaded["on_nonfinite"] = comm["on_nonfinite"]
        # Version 3: the schedule's next round, warm-up, two-level and outer state.
        try:
            warmup = _check_non_negative_int("warmup_steps", ours.get("warmup_steps", 0))
            local_rounds = _check_non_negative_int("local_rounds", ours.get("local_rounds", 0))
            window_start = _check_non_negative_int("window_start", ours.get("window_start", 0))
            local_period = ours.get("local_period")
            if local_period is not None:
                local_period = _check_positive_int("local_period", local_period)
        except ValueError as problem:
            raise bad(f"entry is invalid: {problem}") from None
        steps, period = ours["optimizer_steps"], ours["period"]
        if "next_round_step" in ours:
            next_round = ours["next_round_step"]
            if isinstance(next_round, bool) or not isinstance(next_round, int) or next_round < 1:
                raise bad(f"counter next_round_step must be a positive integer, got {next_round!r}")
        elif isinstance(period, int):  # an older checkpoint: rounds fell on multiples of period
            next_round = warmup + period * (max(0, steps - warmup) // period + 1)
        else:
            raise bad("entry lacks next_round_step")
        loaded.update(
            warmup_steps=warmup,
            local_rounds=local_rounds,
            local_period=local_period,
            next_round_step=next_round,
            window_start=window_start,
        )
        outer = ours.get("outer")
        if outer is not None and not (
            isinstance(outer, dict)
            and isinstance(outer.get("params"), list)
            and all(isinstance(t, Tensor) for t in outer["params"])
            and isinstance(outer.get("state"), dict)
            and isinstance(outer.get("ready"), bool)
        ):
            raise bad("outer must be None or a dict of 'params' (tensors), 'state' and 'ready'")
        loaded["outer"] = outer
        local_anchor = ours.get("local_anchor", [])
        if not isinstance(local_anchor, list) or not all(
            isinstance(t, Tensor) for t in local_anchor
        ):
            raise bad("local_anchor must be a list of tensors")
        loaded["local_anchor"] = local_anchor
        world = ours.get("world_size", self._world_size)
        if world != self._world_size:
            raise ValueError(
                f"the checkpoint was taken with world_size={world}, but this LocalSGDOptimizer "
                f"averages over {self._world_size} rank(s). Resume on {world} ranks, or convert "
                "the per-rank checkpoints with local_sgd_optim.checkpoint.reshard_state_dicts "
                "(parameters averaged, optimizer state by its documented rule)"
            )
        names = {name: dtype for dtype, name in _COMM_DTYPE_NAMES.items()}
        if comm["comm_dtype"] not in names:
            raise bad(
                f"setting comm_dtype must be one of {sorted(map(str, names))}, "
                f"got {comm['comm_dtype']!r}"
            )
        loaded["comm_dtype"] = names[comm["comm_dtype"]]
        stats = ours.get("stats", {})
        fields = CommStats().as_dict()
        if not isinstance(stats, dict) or set(stats) - set(fields):
            raise bad(f"stats must be a dict with keys {sorted(fields)}, got {stats!r}")
        if any(
            isinstance(v, bool) or not isinstance(v, (int, float)) or v < 0 for v in stats.values()
        ):
            raise bad(f"stats must hold non-negative numbers, got {stats!r}")
        loaded["stats"] = {**fields, **stats}
        anchor = ours.get("anchor", [])
        if not isinstance(anchor, list) or not all(isinstance(t, Tensor) for t in anchor):
            raise bad("anchor must be a list of tensors")
        loaded["anchor"] = anchor
        pending = ours.get("pending")
        if pending is not None and not (
            isinstance(pending, dict)
            and set(pending) == {"step", "received", "sent"}
            and isinstance(pending["step"], int)
            and all(
                isinstance(pending[k], list) and all(isinstance(t, Tensor) for t in pending[k])
                for k in ("received", "sent")
            )
        ):
            raise bad(
                "pending must be None or a dict of 'step' and the 'received' and 'sent' "
                "tensor lists"
            )
        loaded["pending"] = pending
        return loaded

    def _warn_if_broadcast_replaced_checkpoint(self) -> None:
        # A checkpoint taken between rounds holds rank-specific parameters. If the model was
        # loaded before construction, the initial broadcast replaced them with rank 0's, and
        # nothing has written to the model since: tell the user before training goes on.
        if (
            self._optimizer_steps > self._last_round_step
            and self._broadcast_changed_model
            and self._versions_after_broadcast is not None
        ):
            state = list(self._model.parameters()) + list(self._model.buffers())
            if [t._version for t in state] == self._versions_after_broadcast:
                warnings.warn(
                    "LocalSGDOptimizer: this rank's parameters are rank 0's initial broadcast, "
                    "not the checkpoint this rank saved between averaging rounds. Load the "
                    "model's state dict after constructing LocalSGDOptimizer, or pass "
                    "broadcast_initial=False when resuming",
                    stacklevel=3,
                )
