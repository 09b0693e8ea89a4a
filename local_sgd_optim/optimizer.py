"""``LocalSGDOptimizer``: the coordinator.

It counts steps, asks the clock what is due, and delegates: the base optimizer steps, the
averager (:mod:`local_sgd_optim.comm`) moves the bytes, the outer optimizer
(:mod:`local_sgd_optim.outer`) steps the kept copy, and the state entry
(:mod:`local_sgd_optim.state_entry`) holds what a checkpoint keeps. It decides *when*; it does
not know how bytes move.

Why this module is over 500 lines: it is the public class's documentation as much as its code.
Of about 750 lines, the class docstring is 119, the docstrings of the public methods 150 and the
twenty documented read-only properties (torch.optim's plumbing and the counters) 80; the code
that decides is under 300 lines, and every part it delegates to has a module of its own.
"""

from __future__ import annotations

import contextlib
import dataclasses
import logging
import time
import warnings
from collections.abc import Iterator
from types import TracebackType
from typing import Any, Callable

import torch
import torch.distributed as dist
from torch import Tensor, nn
from torch.nn.parallel import DistributedDataParallel
from torch.optim import Optimizer
from torch.utils.hooks import RemovableHandle

from local_sgd_optim import state_entry
from local_sgd_optim.agreement import agree_across_ranks
from local_sgd_optim.arguments import Ownership, check_arguments, could_communicate, first_device
from local_sgd_optim.checkpoint import dcp
from local_sgd_optim.clock import Clock
from local_sgd_optim.comm.collectives import GradientAverager, broadcast_tensors
from local_sgd_optim.comm.groups import group_rank, group_size
from local_sgd_optim.comm.header import HeaderView, RoundHeader
from local_sgd_optim.comm.stats import CommStats, RoundError
from local_sgd_optim.ddp import HookState, attach, inner_ddp, watch_for_ddp
from local_sgd_optim.delegating import DelegatingOptimizer
from local_sgd_optim.fault_tolerance import ReplicaQuorum
from local_sgd_optim.gradients import rescale_gradients
from local_sgd_optim.resume import (
    BroadcastRecord,
    check_loadable,
    fresh_entry,
    load_round_state,
    warn_changes,
)
from local_sgd_optim.rounds import Rounds
from local_sgd_optim.settings import PeriodSchedule, Settings
from local_sgd_optim.unclosed import watch_for_unclosed
from local_sgd_optim.view import global_view

__all__ = ["LocalSGDOptimizer"]

_LOG = logging.getLogger("local_sgd_optim")


class LocalSGDOptimizer(DelegatingOptimizer):
    r"""Local SGD around any optimizer: step locally, average parameters every ``period`` steps.

    Each rank trains its own copy of ``model`` with ``base_optimizer``; every ``period``-th
    optimizer step the ranks average their parameters (and running statistics such as
    BatchNorm's) instead of all-reducing gradients at every step. This is Local SGD
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
    :meth:`add_param_group`, and, with ``average_buffers=True``, running statistics (the
    buffers of normalization layers and buffers named ``running_*``); other floating-point
    buffers (a pruning mask, a table) are copied from the group's first rank at each round, as
    DDP copies buffers from rank 0. Integer buffers such as ``num_batches_tracked`` are left
    alone. When several wrappers share one ``model`` (one per optimizer: a GAN, Lightning's
    two optimizers), each averages the parameters its base optimizer steps and the buffers of
    their modules; the first one built also takes the parameters no wrapped optimizer holds and
    the buffers of modules without parameters.

    Where they live: each tensor keeps its own memory (the default), and a round copies the
    buckets in and out of a small wire buffer. With ``parameters_as_bucket_view=True`` the
    averaged tensors are moved at construction into one flat tensor per device and dtype, laid
    out as the buckets cut them (``param.data`` becomes a view of it, as with DDP's
    ``gradient_as_bucket_view``), so a round all-reduces them in place: no copy in or out,
    which saves about a third of a full-precision round on a fast link and little on a slow
    one (``docs/communication.md``). In exchange, ``state_dict()`` of the model returns copies
    of those tensors (a write into one raises at the next round unless it is loaded back),
    pickling the module raises, and ``torch.save`` of one placed tensor writes the whole flat
    storage; :meth:`close` gives each tensor its own memory back. Tensors that share memory
    with another tensor of the model, sharded (FSDP) parameters, and rounds with
    ``overlap_steps`` keep their own storage either way.

    How a round moves bytes (buckets, 16-bit deltas with a full-precision anchor, overlapped
    rounds) and the extra memory each option costs: see
    :class:`~local_sgd_optim.comm.averager.BucketedAverager` and ``docs/communication.md``. In
    short: full precision needs at most ``2 * bucket_cap_mb`` per device and no copy of the
    model; ``comm_dtype`` keeps one full-precision copy of the averaged tensors; with
    ``overlap_steps=k`` a round starts at a ``period`` boundary and is applied ``k`` steps later
    (each rank then holds the mean of the snapshots plus its own progress since), which needs
    two copies in the wire dtype. :meth:`average` and :meth:`close` complete a round in flight
    and then run a blocking one, so ranks end bitwise identical.

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
        average_buffers (bool or str): ``True`` averages running statistics and copies the
            other floating-point buffers from the group's first rank at each round; ``"all"``
            averages every floating-point buffer; ``False`` leaves buffers to each rank
            (default: ``True``).
        process_group (ProcessGroup, optional): the ranks to average over (default: the world).
            For a model sharded with FSDP2 over ``mesh["shard"]``, the ranks that hold the same
            shards: ``mesh["replicate"].get_group()`` (``docs/fsdp2.md``).
        broadcast_initial (bool): at construction, copy rank 0's parameters and buffers to every
            rank, as DDP does, so ranks start identical even when seeded differently
            (default: ``True``). Build the optimizer *before* loading a per-rank checkpoint into
            the model, or pass ``False`` when resuming, or the broadcast replaces what was loaded.
        enabled (bool): ``False`` makes the wrapper behave exactly like ``base_optimizer``, with
            accumulation still applied (default: ``True``).
        bucket_cap_mb (float): size of a communication bucket in MiB (default: 25).
        comm_dtype (torch.dtype or str, optional): ``torch.bfloat16`` or ``torch.float16`` to
            send 16-bit deltas, ``"int8"`` or ``"int4"`` to send 8- or 4-bit ones (a float32
            scale per 128 values, summed in float32 so that every rank ends bitwise identical;
            ``docs/communication.md``); ``None`` sends full precision (default: ``None``).
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
        cpu_offload (bool): keep the outer optimizer's copy of the parameters and its state in
            CPU memory (pinned when CUDA is available) and move them to the parameters' device
            only for the outer step at a round, as DiLoCo implementations do; the 16-bit
            ``comm_dtype`` anchor follows the same setting. The numbers are those without
            offloading; each round then copies the kept parameters and state to the device and
            back (default: ``False``).
        local_period (int, optional): two-level averaging: also average inside ``local_group``
            every ``local_period`` optimizer steps; smaller than ``period`` (default: ``None``).
        local_group (ProcessGroup or str, optional): this rank's subgroup for ``local_period``,
            e.g. from :func:`torch.distributed.new_subgroups`, or ``"node"`` for one subgroup per
            node of ``LOCAL_WORLD_SIZE`` ranks (default: ``"node"`` when ``local_period`` is
            given).
        allow_identical_ranks (bool): a scheduled round raises a :class:`RoundError` when every
            rank's parameters changed since the last round and yet are bitwise identical across
            ranks: gradients were all-reduced behind the wrapper's back, or every rank trains
            on the same data. Pass ``True`` if every rank really is meant to see the same data
            (default: ``False``).
        parameters_as_bucket_view (bool): place the averaged tensors in bucket storage so that
            rounds average them in place, saving a copy in and a copy out per round; changes
            what ``state_dict()`` and pickling do (see above) (default: ``False``).
        fragments (int): streaming: cut the averaged tensors into this many runs of
            consecutive layers (module order, equal sizes: a tensor a cut falls inside travels
            in pieces) and average fragment ``i`` at
            step ``floor(period * (i + 1) / fragments)`` of each period, so that each round
            sends ``1 / fragments`` of the model and each fragment is still averaged every
            ``period`` steps (Streaming DiLoCo, https://arxiv.org/abs/2501.18512). With an
            outer optimizer each fragment steps with its own pseudo-gradient; with
            ``overlap_steps`` each fragment's round travels behind the steps after it, which
            must be fewer than the steps between two fragments' rounds. :meth:`average` and
            :meth:`close` average every fragment (default: 1).
        fault_tolerance (torchft.Manager, optional): run every round through this torchft
            ``Manager``'s quorum, across replica groups, so that the others train on when a
            replica dies (https://github.com/pytorch/torchft). Each replica group is its own
            job; construction waits for the live replicas' next round and, when this replica
            is behind, takes a live peer's whole state and joins that round without
            contributing; a round whose quorum does not commit changes nothing and runs again
            with the next quorum, keeping the local steps. The Manager must be built with
            ``use_async_quorum=False`` and a ``quorum_timeout`` above both its ``timeout``
            and the time between rounds; ``process_group`` must be ``None``, and
            ``overlap_steps``, ``fragments``, ``local_period`` and ``warmup_steps`` keep their
            defaults. Needs torchft (the ``ft`` extra); see
            ``docs/fault-tolerance.md`` (default: ``None``).

    Raises:
        TypeError: ``base_optimizer`` is not an optimizer, ``model`` is not a module or is an
            FSDP1 ``FullyShardedDataParallel``, or a flag is not a bool.
        ValueError: ``period`` or ``accumulation_steps`` is not a positive integer,
            ``bucket_cap_mb`` is not positive, ``comm_dtype`` is not one of the formats,
            ``overlap_steps`` is negative or not below ``period``, ``on_nonfinite`` is neither
            ``"raise"`` nor ``"skip"``, ``base_optimizer`` holds parameters that are not in
            ``model``, ``base_optimizer`` is already wrapped by an open
            ``LocalSGDOptimizer``, or ``model`` has DTensor parameters (FSDP2) whose device
            mesh shares ranks with ``process_group`` (HSDP, or no group given: see
            ``docs/fsdp2.md``); ``fault_tolerance`` is combined with ``process_group`` or with
            a setting its rounds do not support, or its Manager is not one they can use.
        RoundError: with ``fault_tolerance``, no quorum formed within the Manager's
            ``quorum_timeout``.
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
        average_buffers: bool | str = True,
        process_group: dist.ProcessGroup | None = None,
        broadcast_initial: bool = True,
        enabled: bool = True,
        bucket_cap_mb: float = 25.0,
        comm_dtype: torch.dtype | str | None = None,
        overlap_steps: int = 0,
        on_nonfinite: str = "raise",
        warmup_steps: int = 0,
        outer_optimizer: Callable[[list[Tensor]], Optimizer] | None = None,
        cpu_offload: bool = False,
        local_period: int | None = None,
        local_group: dist.ProcessGroup | str | None = None,
        allow_identical_ranks: bool = False,
        parameters_as_bucket_view: bool = False,
        fragments: int = 1,
        fault_tolerance: Any = None,
    ) -> None:
        arguments = {k: v for k, v in locals().items() if k not in ("self", "__class__")}
        del arguments["base_optimizer"], arguments["model"], arguments["process_group"]
        settings = self._validated(base_optimizer, model, process_group, arguments)
        self._settings = settings
        super().__init__(base_optimizer)
        self._model = model
        self._process_group = process_group
        self._device = first_device(model)
        self._ownership = Ownership.claim(base_optimizer)
        self._clock = Clock.from_settings(settings)
        self._extra_params: list[Tensor] = []
        self._stats = CommStats()
        self._last_step: tuple[float, float] | None = None  # perf_counter, round_seconds
        # With fault tolerance the replicas averaged over change with each quorum: none of
        # the collectives outside rounds (agreement, broadcast, headers) has a fixed group.
        fixed = settings.enabled and settings.fault_tolerance is None
        self._world_size = group_size(process_group) if fixed else 1
        self._hook_state = HookState(self._clock, process_group, self._world_size, self._stats)
        self._header = RoundHeader(
            process_group,
            self._world_size,
            max(group_rank(process_group), 0),
            settings.on_nonfinite,
            self._device,
            self._stats,
        )
        self._gradient_averager: GradientAverager | None = None
        self._broadcast = BroadcastRecord()
        self._rounds = Rounds(
            base_optimizer,
            model,
            self._extra_params,
            settings,
            process_group,
            self._stats,
            self._device,
            self._communicates,
        )
        self._quorum: ReplicaQuorum | None = None
        if settings.fault_tolerance is not None and settings.enabled:
            self._quorum = ReplicaQuorum(settings.fault_tolerance, self._rounds, model, self)
            self._rounds.quorum = self._quorum
        self._ddp_watch: RemovableHandle | None = None
        if self._communicates:
            self._set_up_communication()
        elif settings.fault_tolerance is None and could_communicate(process_group, True):
            self._rounds.agree()  # enabled=False here: so that it must be so on every rank
        self._rounds.build_outer()
        # Copies taken above (the outer optimizer's, the anchor for 16-bit deltas) must follow
        # weights loaded into the model before training starts: see Rounds.follow_loaded.
        self._built_state: list[tuple[int, int]] | None = self._rounds.signature()
        # Set by a DCP-layout load: the model is loaded after it (dcp.LoadedParameters).
        self._loaded_parameters: dcp.LoadedParameters | None = None
        self._before_dcp_load: int | None = None  # see dcp.LoadedParameters.after_load
        if self._quorum is not None:
            self._quorum.join(self._join_round)
        self._log_settings()
        if self._communicates:  # a forgotten close() leaves the ranks apart: say so
            watch_for_unclosed(self, self._clock, self._ownership, group_rank(process_group))

    @staticmethod
    def _validated(
        base_optimizer: object, model: object, process_group: object, arguments: dict[str, Any]
    ) -> Settings:
        """The settings, or the error that input deserves, raised on every rank."""
        try:
            if isinstance(base_optimizer, LocalSGDOptimizer):
                raise TypeError(
                    "base_optimizer is already a LocalSGDOptimizer; wrap the underlying "
                    "optimizer (opt.base_optimizer) once"
                )
            fault_tolerant = arguments["fault_tolerance"] is not None
            enabled = arguments["enabled"]
            check_arguments(base_optimizer, model, process_group, enabled, fault_tolerant)
            if fault_tolerant and process_group is not None:
                raise ValueError(
                    "process_group must be None with fault_tolerance: the Manager's quorum "
                    "decides which replicas average together, round by round"
                )
            return Settings.from_arguments(**arguments)
        except (TypeError, ValueError, RuntimeError) as problem:
            # The other ranks may have valid input and be about to wait for us in the first
            # collective: join it with the error so that every rank raises instead of hanging.
            if could_communicate(process_group, arguments["enabled"]):
                error = f"{type(problem).__name__}: {problem}"
                group = process_group if isinstance(process_group, dist.ProcessGroup) else None
                agree_across_ranks([], group, first_device(model), error=error)
            raise

    def _exchange_header(self, kind: str, step: int, flag: int) -> HeaderView:
        """A header outside a round's own; its time counts as round time, as a round's does."""
        began = time.perf_counter()
        try:
            return self._header.exchange(kind, step, flag)
        finally:
            self._stats.round_seconds += time.perf_counter() - began

    def _set_up_communication(self) -> None:
        """Agree with the other ranks, take over DDP, broadcast, build the averagers."""
        settings, group = self._settings, self._process_group
        self._rounds.agree()
        ddp = inner_ddp(self._model)
        if ddp is not None:
            attach(ddp, self._hook_state)
        else:  # a framework may wrap the model in DDP later: attach at its first forward
            self._ddp_watch = watch_for_ddp(self._model, self._hook_state)
        if settings.broadcast_initial:
            state = list(self._model.parameters()) + list(self._model.buffers())
            changed = broadcast_tensors(state, group, settings.bucket_cap_mb)
            self._broadcast.note(self._model, changed)
        self._rounds.build(self._world_size)
        if settings.broadcast_initial:
            self._rounds.set_anchors_from_tensors()  # every rank holds rank 0's values
        if settings.warmup_steps and ddp is None:
            self._gradient_averager = GradientAverager(
                group, settings.bucket_cap_mb, self._stats, self._device
            )

    def _log_settings(self) -> None:
        if not _LOG.isEnabledFor(logging.INFO) or (
            self._communicates and group_rank(self._process_group) != 0
        ):
            return
        _LOG.info(
            "LocalSGDOptimizer: %s; %s", ", ".join(self._summary()), self._rounds.describe_plan()
        )

    def _summary(self) -> list[str]:
        """The settings for logs and ``repr``: period, accumulation, world size, the rest that
        are off their defaults."""
        parts = self._settings.summary()
        parts.insert(2, f"world_size={self.world_size}")
        return parts

    @property
    def model(self) -> nn.Module:
        """The module whose parameters and buffers are averaged."""
        return self._model

    @property
    def period(self) -> int | PeriodSchedule:
        """Optimizer steps between averaging rounds, or the schedule that gives them."""
        return self._settings.period

    @property
    def next_round_step(self) -> int:
        """The optimizer step at which the next averaging round runs."""
        return self._clock.next_round_step

    @property
    def warmup_steps(self) -> int:
        """Synchronous optimizer steps (gradients averaged) before local SGD begins."""
        return self._settings.warmup_steps

    @property
    def local_period(self) -> int | None:
        """Optimizer steps between rounds inside the local subgroup, if two-level."""
        return self._settings.local_period

    @property
    def local_rounds(self) -> int:
        """Rounds inside the local subgroup so far (two-level averaging)."""
        return self._clock.local_rounds

    @property
    def outer_optimizer(self) -> Optimizer | None:
        """The outer optimizer that steps the kept parameters at each round, if any."""
        outer = self._rounds.outer
        return None if outer is None else outer.optimizer

    @property
    def accumulation_steps(self) -> int:
        """``step()`` calls per optimizer step."""
        return self._settings.accumulation_steps

    @property
    def world_size(self) -> int:
        """Ranks that average together (1 when nothing is communicated; with
        ``fault_tolerance``, the replicas of the last quorum)."""
        return self._world_size if self._quorum is None else self._quorum.size

    @property
    def micro_steps(self) -> int:
        """``step()`` calls so far, one per micro-batch."""
        return self._clock.micro_steps

    @property
    def optimizer_steps(self) -> int:
        """Steps taken by the base optimizer so far."""
        return self._clock.optimizer_steps

    @property
    def averaging_rounds(self) -> int:
        """Averaging rounds so far (with a group of one, a round is free but still counted).

        With ``overlap_steps``, a round counts when it starts.
        """
        return self._clock.averaging_rounds

    @property
    def bucket_cap_mb(self) -> float:
        """Size of a communication bucket in MiB."""
        return self._settings.bucket_cap_mb

    @property
    def comm_dtype(self) -> torch.dtype | str | None:
        """The format deltas travel in (``torch.bfloat16``, ``torch.float16``, ``"int8"``,
        ``"int4"``), or ``None`` for full precision."""
        return self._settings.comm_dtype

    @property
    def fragments(self) -> int:
        """The number of fragments averaged at staggered steps of each period."""
        return self._settings.fragments

    @property
    def overlap_steps(self) -> int:
        """Optimizer steps between the start of a round and its application."""
        return self._settings.overlap_steps

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
        return self._settings.enabled and self._world_size > 1

    def __repr__(self) -> str:
        settings = ", ".join(self._summary())
        return f"{type(self).__name__}({settings}, base_optimizer={self._base!r})"

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
                ``GradScaler`` drives a wrapper with ``accumulation_steps > 1``; or, at the
                first step after a ``torch.distributed.checkpoint`` load, a rank's model
                parameters are not the ones it saved (raised on every rank: save and load with
                :func:`~local_sgd_optim.checkpoint.dcp.per_replica`).
            RuntimeError: the optimizer was closed.
            RoundError: a round found the ranks out of step or non-finite values (see
                ``on_nonfinite``), or its collective failed; raised on every rank.
        """
        # Set by torch.amp.GradScaler.step() for optimizers with _step_supports_amp_scaling.
        # (Instance attributes only: step() is on every training step's path, kept lean.)
        if not self._base.state and dcp.initialising_state():
            self._initialise_base_state()
            return None
        grad_scale: Tensor | None = self.__dict__.get("grad_scale")
        found_inf: Tensor | None = self.__dict__.get("found_inf")
        self._check_step(closure, found_inf)
        if self._loaded_parameters is not None:
            self._verify_loaded_parameters(self._loaded_parameters)
        if self._built_state is not None:
            built, self._built_state = self._built_state, None
            self._rounds.follow_loaded(built, self._exchange_header, self._header)
        if not self._clock.count_micro_step():
            return None
        sent = self._stats.bytes_communicated
        accumulation = self._settings.accumulation_steps
        if grad_scale is not None:
            rescale_gradients(
                self.param_groups, multiplier=grad_scale.double().reciprocal().float()
            )
        elif accumulation > 1:
            rescale_gradients(self.param_groups, divisor=accumulation)
        skip = found_inf is not None and bool(found_inf.item())
        if self._gradient_averager is not None and self._clock.in_warmup:
            grads = [p.grad for g in self.param_groups for p in g["params"] if p.grad is not None]
            self._gradient_averager.average(grads, self._clock.optimizer_steps)
            if found_inf is not None:
                # One rank's overflow reached every rank through the average: all skip alike.
                skip = not self._gradient_averager.finite(grads)
        loss = None
        if not skip:
            loss = self._base.step() if closure is None else self._base.step(closure)
        self._clock.count_optimizer_step()
        self._time_step()
        if self._ddp_watch is not None:  # training has started: any DDP has run by now
            self._ddp_watch.remove()
            self._ddp_watch = None
        if self._settings.enabled:
            self._run_due_rounds()
        self._stats.record_step(sent)
        return loss

    def _verify_loaded_parameters(self, check: dcp.LoadedParameters) -> None:
        """After a DCP-layout load, before anything else: raise on every rank if DCP gave a
        rank's model another replica's parameters (see :class:`dcp.LoadedParameters`). Once
        passed, never again until the next load: later steps pay one attribute test."""
        exchange = self._exchange_header if self._communicates else None
        check.verify(self._clock.optimizer_steps, exchange, self._header)
        self._loaded_parameters = None

    def _initialise_base_state(self) -> None:
        """DCP's ``get_state_dict``/``set_state_dict`` step an optimizer without state once,
        with zero gradients and lr 0, to create its state: the base optimizer takes it alone,
        not counted and without a round, since no training happened."""
        unchanged = self._built_state is not None and self._built_state == self._rounds.signature()
        self._base.step()
        if unchanged:  # parameters stepped by lr 0 are not weights loaded since construction
            self._built_state = self._rounds.signature()

    def _time_step(self) -> None:
        """Add the time since the last optimizer step, rounds left out, to ``stats``."""
        now, in_rounds = time.perf_counter(), self._stats.round_seconds
        if self._last_step is not None:
            then, in_rounds_then = self._last_step
            self._stats.step_seconds += max(0.0, (now - then) - (in_rounds - in_rounds_then))
            self._stats.steps_timed += 1
        self._last_step = (now, in_rounds)

    def _check_step(self, closure: object, found_inf: Tensor | None) -> None:
        accumulation = self._settings.accumulation_steps
        if self._ownership.closed:
            raise RuntimeError(
                "step() after close(): the final averaging round has already run; use "
                "average() for a synchronisation in the middle of training"
            )
        if closure is not None and accumulation > 1:
            raise ValueError(
                "a closure cannot be combined with accumulation_steps > 1, got "
                f"accumulation_steps={accumulation}; accumulate inside the closure "
                "and use accumulation_steps=1"
            )
        if found_inf is not None and accumulation > 1:
            raise ValueError(
                "GradScaler cannot drive a LocalSGDOptimizer with accumulation_steps > 1, got "
                f"accumulation_steps={accumulation}: the scaler would change its "
                "scale in the middle of a window. Accumulate in the loop and call "
                "scaler.step(opt) and scaler.update() once per window, with accumulation_steps=1"
            )

    def _run_due_rounds(self) -> None:
        """After an optimizer step: land a round in flight, run a round or a subgroup round."""
        clock = self._clock
        blocking = self._settings.overlap_steps == 0
        if self._rounds.in_flight and clock.landing_due():
            self._rounds.land()
        if clock.round_due():  # with fragments: the last one's round, at the period's end
            self._round(blocking, fragment=clock.fragment_due())
            clock.schedule_next_round()
        elif (fragment := clock.fragment_due()) is not None:
            self._round(blocking, fragment=fragment)
        elif clock.local_round_due():
            self._rounds.run_local(clock.optimizer_steps)
            clock.local_rounds += 1

    def zero_grad(self, set_to_none: bool = True) -> None:
        """Clear gradients, but only at the end of an accumulation window.

        Args:
            set_to_none (bool): set gradients to ``None`` instead of zero (default: ``True``).
        """
        if self._clock.at_window_end():
            self._base.zero_grad(set_to_none=set_to_none)

    def add_param_group(self, param_group: dict[str, Any]) -> None:
        """Add a parameter group to the base optimizer; its parameters join averaging.

        With ``broadcast_initial``, the new parameters are copied from rank 0 right away, after
        a header that checks every rank is adding a group at the same step; without it, the
        next round's header checks that every rank averages the same tensors.

        Raises:
            RoundError: the other ranks are doing something else (a rank added the group
                alone); raised on every rank.

        .. warning::
            Every rank must call this, with the same parameters.
        """
        if self._communicates and self._settings.broadcast_initial:
            steps = self._clock.optimizer_steps
            self._header.check(self._exchange_header("add_param_group()", steps, 0), steps)
        self._base.add_param_group(param_group)
        known = {id(p) for p in self._model.parameters()} | {id(p) for p in self._extra_params}
        added = [p for p in self._base.param_groups[-1]["params"] if id(p) not in known]
        self._extra_params.extend(added)
        if self._communicates and self._settings.broadcast_initial:
            broadcast_tensors(
                list(self._base.param_groups[-1]["params"]),
                self._process_group,
                self._settings.bucket_cap_mb,
            )

    def attach_ddp(self, module: nn.Module) -> None:
        """Keep gradients local in a :class:`~torch.nn.parallel.DistributedDataParallel`
        built around this optimizer's model after the optimizer.

        Frameworks (Accelerate, Lightning, transformers' ``Trainer``) wrap the model in DDP
        after the optimizer exists; DDP would then all-reduce gradients at every step. This
        registers the wrapper's communication hook on ``module`` (a DDP module, or one that
        ``torch.compile`` wrapped), which all-reduces only during ``warmup_steps``, and turns
        off DDP's per-forward buffer broadcast (buffers are averaged at rounds). Calling it
        again on the same module does nothing.

        Args:
            module (nn.Module): the DistributedDataParallel (or a compiled one) around ``model``.

        Raises:
            TypeError: ``module`` holds no DistributedDataParallel.
            RuntimeError: the DDP module already has another communication hook.

        Example::

            >>> opt = LocalSGDOptimizer(torch.optim.SGD(model.parameters(), lr=0.1), model, 8)
            >>> ddp_model = DistributedDataParallel(model)  # built after the optimizer
            >>> opt.attach_ddp(ddp_model)
        """
        ddp = inner_ddp(module)
        if not isinstance(ddp, DistributedDataParallel):
            raise TypeError(
                f"attach_ddp needs a DistributedDataParallel module, got {type(module).__name__}"
            )
        attach(ddp, self._hook_state)

    # --- averaging ------------------------------------------------------------------------

    def _round(
        self, blocking: bool = True, kind: str = "round", fragment: int | None = None
    ) -> None:
        clock, settings = self._clock, self._settings

        def attempt() -> None:
            # Read at each attempt: with fault tolerance, a replica behind the others takes a
            # live peer's counters in the quorum before it.
            # Ranks identical after local steps mean Local SGD is not happening; not a
            # symptom during warm-up (synchronous by design) or with subgroup rounds between.
            check = (
                kind == "round"
                and not settings.allow_identical_ranks
                and settings.local_period is None
                and clock.last_round_step >= settings.warmup_steps
            )
            number = clock.averaging_rounds + 1
            # The whole model: with fragments, those not averaged at this step.
            chosen = clock.fragments_behind() if fragment is None else fragment
            self._rounds.run(clock.optimizer_steps, blocking, number, kind, check, chosen)

        self._rounds.commit(kind, attempt)
        clock.record_round(whole=fragment is None)

    def _join_round(self, kind: str) -> None:
        """At construction with fault tolerance: this replica took the state of a live peer
        that is in a round of ``kind``; join that round as the peer runs it."""
        calls = {"round": self._run_due_rounds, "average()": self.average, "close()": self.close}
        calls[kind]()

    def average(self) -> None:
        """Run a blocking averaging round now, outside the ``period`` schedule.

        A round in flight (``overlap_steps``) is applied first. Does nothing when disabled.
        Afterwards every rank holds the same values; useful before evaluating or saving a
        single model.

        Raises:
            ValueError: first after a ``torch.distributed.checkpoint`` load, a rank's model
                parameters are not the ones it saved (see :meth:`step`); raised on every rank.

        .. warning::
            Every rank of the process group must call this at the same point.
        """
        if self._loaded_parameters is not None:
            self._verify_loaded_parameters(self._loaded_parameters)
        if self._settings.enabled:
            self._round(kind="average()")

    @contextlib.contextmanager
    def global_model(self) -> Iterator[nn.Module]:
        """Within the block, the model is the global model: the mean of the ranks' parameters
        and running statistics (other buffers: the first rank's); afterwards every rank has
        its own values back, bitwise. For evaluating and saving during training.

        Unlike :meth:`average`, this is not a round: no counter, optimizer or outer-optimizer
        state, 16-bit anchor or round in flight changes, so evaluating or saving every few
        steps leaves training exactly as it would have been without. It costs one
        full-precision all-reduce of the averaged tensors and, during the block, one copy of
        them. Right after a blocking round or :meth:`close`, when the ranks are identical, or
        with nothing to communicate, the model is yielded as is, for free.

        Yields:
            The model (``model`` as given to the constructor).

        Raises:
            RoundError: the ranks are at different steps or doing something else, or a rank's
                tensors hold NaN or inf; raised on every rank, before any value changes.

        Example::

            >>> with opt.global_model() as model:
            ...     model.eval()
            ...     accuracy = evaluate(model, test_loader)
            ...     torch.save(model.state_dict(), "global.pt")  # on rank 0
            ...     model.train()

        .. warning::
            Every rank of the process group must enter the block at the same point.
        """
        steps = self._clock.optimizer_steps
        if self._quorum is not None and not (
            self._rounds.identical_at == steps and not self._rounds.in_flight
        ):
            raise RuntimeError(
                "global_model() needs a fixed process group, and with fault_tolerance the "
                "replicas change with each quorum: call average() first (a round through the "
                "quorum), after which every replica holds the global model and global_model() "
                "yields it as is"
            )
        if (
            not self._communicates
            or self._ownership.closed
            or (self._rounds.identical_at == steps and not self._rounds.in_flight)
        ):
            yield self._model
            return
        if self._loaded_parameters is not None:
            self._verify_loaded_parameters(self._loaded_parameters)
        unchanged = self._built_state is not None and self._built_state == self._rounds.signature()
        settings = self._settings
        with global_view(
            self._rounds.tracked(),
            self._process_group,
            steps,
            self._stats,
            settings.bucket_cap_mb,
        ):
            yield self._model
        if unchanged:  # values put back are not weights loaded since construction
            self._built_state = self._rounds.signature()

    def close(self) -> None:
        """End training: a final averaging round, unless no optimizer step happened since the last.

        Idempotent. Afterwards every rank holds the same parameters and ``step()`` raises.
        The wrapper then lets go of its rounds' buffers and async work; :meth:`state_dict`
        still holds everything an exact resume needs.

        The ranks first agree, in the small header collective, on whether a round is due: a
        rank that took one step more than the others (uneven data, say) would otherwise wait
        alone in a final round that the others skip.

        Raises:
            RoundError: the ranks took different numbers of optimizer steps, or another rank is
                doing something else (a round); raised on every rank, with each rank's step
                named, before any value changes.
            ValueError: first after a ``torch.distributed.checkpoint`` load, a rank's model
                parameters are not the ones it saved (see :meth:`step`); raised on every rank.

        .. warning::
            Every rank of the process group must call this.
        """
        if self._ownership.closed:
            return
        if self._loaded_parameters is not None:
            self._verify_loaded_parameters(self._loaded_parameters)
        clock = self._clock
        # With fragments, a period's last round leaves the other fragments apart.
        apart = bool(clock.fragments_behind())
        due = clock.optimizer_steps > clock.last_round_step or self._rounds.in_flight or apart
        if self._communicates:
            try:
                view = self._exchange_header("close()", clock.optimizer_steps, due)
                self._header.check(view, clock.optimizer_steps)
                due = any(view.flags)
            except RoundError:
                self._ownership.closed = True  # no collective may follow: ranks are out of step
                raise
        if self._settings.enabled and due:
            # Applying a round in flight leaves each rank's own progress in place: the blocking
            # round after it is what makes the ranks identical.
            self._round(kind="close()")
        self._rounds.release()  # each tensor in memory of its own again
        # No async work, wire or staging buffer outlives training (the anchors and the outer
        # state stay for state_dict()); the warm-up pool grows back if a load reopens warm-up.
        self._rounds.release_buffers()
        if self._gradient_averager is not None:
            self._gradient_averager._pools.clear()
        self._ownership.closed = True

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
            self._ownership.closed = True

    # --- state ----------------------------------------------------------------------------

    def state_dict(self) -> dict[str, Any]:
        """The base optimizer's state dict plus a ``"local_sgd"`` entry: counters and settings.

        Each rank's optimizer state (momentum, Adam moments) differs between rounds: save each
        rank's own to resume exactly. With a ``comm_dtype`` the entry also holds the
        full-precision copy of the last round's values (``"anchor"``), and with
        ``overlap_steps`` a round in flight is waited for (no new collective) and saved as
        ``"pending"``, to be applied on schedule after loading. Everything is tensors and plain
        containers, loadable with ``torch.load(..., weights_only=True)``.
        """
        self._run_state_dict_pre_hooks()
        state_dict = self._snapshot()
        if dcp.requested_by_dcp():  # DCP keeps only "state" and "param_groups"
            # Also what the parameters are before a dcp.load that may write into them.
            self._before_dcp_load = dcp.parameters_fingerprint(self._rounds.tracked())
            state_dict = dcp.to_dcp_layout(state_dict, self._before_dcp_load)
        return self._run_state_dict_post_hooks(state_dict)

    def _snapshot(self) -> dict[str, Any]:
        """The state dict, without the user's state-dict hooks."""
        state_dict = self._base.state_dict()
        tensors = self._rounds.state_tensors()
        state_dict[state_entry.ENTRY_KEY] = state_entry.build(
            self._clock.counters(), self._settings, self._world_size, self._stats, tensors
        )
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
        ``overlap_steps``, ``on_nonfinite`` and ``cpu_offload`` may change between runs.

        A plain optimizer checkpoint (no ``"local_sgd"`` entry) loads with a warning and the
        counters at zero. Everything is checked before anything is changed.

        Raises:
            ValueError: the ``"local_sgd"`` entry is malformed or does not fit this wrapper: a
                different world size, ``local_period`` or presence of ``outer_optimizer``; a
                round in flight that the new settings cannot apply; ``accumulation_steps``
                changed in the middle of a window; or, for a ``torch.distributed.checkpoint``
                state dict, this rank's optimizer state is not the one it saved. Its model
                parameters, loaded after the optimizer by ``set_state_dict``, are compared at
                the next :meth:`step`, :meth:`average` or :meth:`close`.
        """
        state_dict, saved_parameters = dcp.from_dcp_layout(
            dict(self._run_load_state_dict_pre_hooks(state_dict))
        )
        ours = state_dict.pop(state_entry.ENTRY_KEY, None)
        if ours is None:
            warnings.warn(
                "LocalSGDOptimizer.load_state_dict: the state dict has no 'local_sgd' entry "
                "(a plain optimizer checkpoint); counters start at zero",
                stacklevel=2,
            )
            ours = fresh_entry(self._settings, self._world_size)
        entry = state_entry.parse(ours)
        changed = check_loadable(entry, self._settings, self._world_size, self._rounds.outer)
        old_accumulation = entry.settings["accumulation_steps"]
        assert isinstance(old_accumulation, int)
        window_start = Clock.window_start_after_resume(
            entry.counters, "accumulation_steps" in changed, old_accumulation
        )
        # All or nothing: what only the loaders themselves check (the base and outer
        # optimizers' state, the anchors' shapes) may still fail, and then nothing changed.
        before = self._snapshot()  # not state_dict(): the user's hooks are not run
        try:
            self._apply_loaded(state_dict, entry, changed, window_start)
        except Exception:
            self._apply_loaded(*self._split(before))
            raise
        warn_changes(self._settings, entry, changed)
        self._ownership.closed = False
        self._built_state = None  # a restored state keeps its own copies
        self._loaded_parameters = (
            None
            if saved_parameters is None
            else dcp.LoadedParameters.after_load(
                saved_parameters, self._rounds.tracked(), self._before_dcp_load
            )
        )
        self._before_dcp_load = None
        self._broadcast.warn_if_replaced(self._model, self._clock)
        self._run_load_state_dict_post_hooks()

    def _split(
        self, state_dict: dict[str, Any]
    ) -> tuple[dict[str, Any], state_entry.Entry, list[str], int]:
        """A state dict of this wrapper's as ``_apply_loaded``'s arguments."""
        state_dict = dict(state_dict)
        entry = state_entry.parse(state_dict.pop(state_entry.ENTRY_KEY))
        return state_dict, entry, [], entry.counters["window_start"]

    def _apply_loaded(
        self,
        base_state: dict[str, Any],
        entry: state_entry.Entry,
        changed: list[str],
        window_start: int,
    ) -> None:
        self._base.load_state_dict(base_state)
        reschedule = "period" in changed or "warmup_steps" in changed
        self._clock.load(entry.counters, window_start, reschedule)
        if entry.outer is not None and self._rounds.outer is not None:
            self._rounds.outer.load_state_dict(entry.outer)
        self._stats.__init__(**entry.stats)  # type: ignore[misc]
        # The interval to the next step is timed from here, so a resumed run times as many
        # steps as an uninterrupted one.
        self._last_step = (time.perf_counter(), self._stats.round_seconds)
        if self._ownership.closed:  # close() let go of the buffers a round in flight needs
            self._rounds.rebuild_released()
        load_round_state(entry, changed, self._rounds.averager, self._rounds.local_averager)
