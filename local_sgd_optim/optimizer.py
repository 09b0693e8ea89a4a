"""``LocalSGDOptimizer``: counters, the averaging schedule, delegation, state."""

from __future__ import annotations

import operator
import warnings
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
    TensorAverager,
    broadcast_tensors,
    exchange_descriptions,
    group_rank,
    group_size,
)

__all__ = ["LocalSGDOptimizer"]

_STATE_KEY = "local_sgd"
_STATE_VERSION = 1
_COUNTERS = ("micro_steps", "optimizer_steps", "averaging_rounds", "last_round_step")
_SETTINGS = ("period", "accumulation_steps", "average_buffers")


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
) -> tuple[int, int]:
    """Raise on bad input; return ``period`` and ``accumulation_steps`` as ints."""
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
    period = _check_positive_int("period", period)
    accumulation_steps = _check_positive_int("accumulation_steps", accumulation_steps)
    _check_bool("average_buffers", average_buffers)
    _check_bool("broadcast_initial", broadcast_initial)
    _check_bool("enabled", enabled)
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
    if enabled and isinstance(model, DistributedDataParallel) and model._comm_hooks:
        raise RuntimeError(
            "model is a DistributedDataParallel that already has a communication hook; "
            "LocalSGDOptimizer must install its own to keep gradients local between rounds. "
            "Wrap a DDP model without register_comm_hook()"
        )
    return period, accumulation_steps


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


# DDP validates a hook's annotations as objects; this module's postponed annotations are strings.
_keep_gradients_local.__annotations__ = {
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
    such as ``num_batches_tracked`` are left alone. A round costs one ``all_reduce`` per
    (device, dtype) into flat buffers allocated once: extra memory is one copy of the averaged
    tensors. Parameters keep their own storage.

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
        period (int): optimizer steps between averaging rounds (``1`` averages after every step).
        accumulation_steps (int): ``step()`` calls (micro-batches) per optimizer step (default: 1).
        average_buffers (bool): also average floating-point buffers (default: ``True``).
        process_group (ProcessGroup, optional): the ranks to average over (default: the world).
        broadcast_initial (bool): at construction, copy rank 0's parameters and buffers to every
            rank, as DDP does, so ranks start identical even when seeded differently
            (default: ``True``). Build the optimizer *before* loading a per-rank checkpoint into
            the model, or pass ``False`` when resuming, or the broadcast replaces what was loaded.
        enabled (bool): ``False`` makes the wrapper behave exactly like ``base_optimizer``, with
            accumulation still applied (default: ``True``).

    Raises:
        TypeError: ``base_optimizer`` is not an optimizer, ``model`` is not a module or is
            sharded (FSDP, DTensor parameters), or a flag is not a bool.
        ValueError: ``period`` or ``accumulation_steps`` is not a positive integer, or
            ``base_optimizer`` holds parameters that are not in ``model``.
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

    def __init__(
        self,
        base_optimizer: Optimizer,
        model: nn.Module,
        period: int,
        *,
        accumulation_steps: int = 1,
        average_buffers: bool = True,
        process_group: dist.ProcessGroup | None = None,
        broadcast_initial: bool = True,
        enabled: bool = True,
    ) -> None:
        try:
            period, accumulation_steps = _validate_arguments(
                base_optimizer,
                model,
                period,
                accumulation_steps,
                average_buffers,
                broadcast_initial,
                enabled,
                process_group,
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
        self._extra_params: list[Tensor] = []
        self._micro_steps = 0
        self._optimizer_steps = 0
        self._averaging_rounds = 0
        self._last_round_step = 0
        self._closed = False
        self._averager: TensorAverager | None = None
        self._plan_key: tuple[Hashable, ...] | None = None
        self._init_optimizer_bookkeeping()

        self._world_size = group_size(process_group) if enabled else 1
        self._broadcast_changed_model = False
        self._versions_after_broadcast: list[int] | None = None
        if self._communicates:
            self._check_ranks_agree()
            if isinstance(model, DistributedDataParallel):
                self._detach_from_ddp(model)
            if broadcast_initial:
                state = list(model.parameters()) + list(model.buffers())
                self._broadcast_changed_model = broadcast_tensors(state, process_group)
                self._versions_after_broadcast = [t._version for t in state]
            self._build_averager()

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
    def period(self) -> int:
        """Optimizer steps between averaging rounds."""
        return self._period

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
        """Averaging rounds so far (with a group of one, a round is free but still counted)."""
        return self._averaging_rounds

    @property
    def _communicates(self) -> bool:
        return self._enabled and self._world_size > 1

    def __repr__(self) -> str:
        return (
            f"{type(self).__name__}(period={self._period}, "
            f"accumulation_steps={self._accumulation_steps}, world_size={self._world_size}, "
            f"enabled={self._enabled}, base_optimizer={self._base!r})"
        )

    # --- stepping -------------------------------------------------------------------------

    def step(self, closure: Callable[[], float] | None = None) -> float | None:  # type: ignore[override]
        """Count one micro-batch; take an optimizer step at the end of each accumulation window.

        Args:
            closure (Callable, optional): re-evaluates the model and returns the loss, as for the
                base optimizer. Not allowed with ``accumulation_steps > 1``.

        Returns:
            The closure's loss, or ``None``.

        Raises:
            ValueError: a closure was given with ``accumulation_steps > 1``.
            RuntimeError: the optimizer was closed.
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
        self._micro_steps += 1
        if self._micro_steps % self._accumulation_steps != 0:
            return None
        if self._accumulation_steps > 1:
            self._divide_gradients(self._accumulation_steps)
        loss = self._base.step() if closure is None else self._base.step(closure)
        self._optimizer_steps += 1
        if self._enabled and self._optimizer_steps % self._period == 0:
            self._round()
        return loss

    @torch.no_grad()
    def _divide_gradients(self, divisor: int) -> None:
        dense: list[Tensor] = []
        for group in self.param_groups:
            for p in group["params"]:
                if p.grad is None:
                    continue
                if p.grad.is_sparse:
                    p.grad.div_(divisor)
                else:
                    dense.append(p.grad)
        if dense:
            torch._foreach_div_(dense, divisor)

    def zero_grad(self, set_to_none: bool = True) -> None:
        """Clear gradients, but only at the end of an accumulation window.

        Args:
            set_to_none (bool): set gradients to ``None`` instead of zero (default: ``True``).
        """
        if self._micro_steps % self._accumulation_steps == 0:
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
            broadcast_tensors(list(self._base.param_groups[-1]["params"]), self._process_group)

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
        self._averager = TensorAverager(tensors, self._process_group)
        self._plan_key = self._current_plan_key()

    def _check_ranks_agree(self) -> None:
        lines = [
            f"setting period={self._period}",
            f"setting accumulation_steps={self._accumulation_steps}",
            f"setting average_buffers={self._average_buffers}",
            f"setting broadcast_initial={self._broadcast_initial}",
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

    def _round(self) -> None:
        if self._communicates:
            if self._current_plan_key() != self._plan_key:
                # Parameters were unfrozen, added or replaced since the last round.
                self._check_ranks_agree()
                self._build_averager()
            assert self._averager is not None
            self._averager.average()
        self._averaging_rounds += 1
        self._last_round_step = self._optimizer_steps

    def average(self) -> None:
        """Run an averaging round now, outside the ``period`` schedule.

        Does nothing when disabled. Useful before evaluating or saving a single model.

        .. warning::
            Every rank of the process group must call this at the same point.
        """
        if self._enabled:
            self._round()

    def close(self) -> None:
        """End training: a final averaging round, unless no optimizer step happened since the last.

        Idempotent. Afterwards every rank holds the same parameters and ``step()`` raises.

        .. warning::
            Every rank of the process group must call this.
        """
        if self._closed:
            return
        if self._enabled and self._optimizer_steps > self._last_round_step:
            self._round()
        self._closed = True

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

    @staticmethod
    def _detach_from_ddp(model: DistributedDataParallel) -> None:
        model.register_comm_hook(None, _keep_gradients_local)
        # Buffers are averaged at rounds; rank 0's copy must not overwrite them every forward.
        model.broadcast_buffers = False

    # --- state ----------------------------------------------------------------------------

    def state_dict(self) -> dict[str, Any]:
        """The base optimizer's state dict plus a ``"local_sgd"`` entry: counters and settings.

        Each rank's optimizer state (momentum, Adam moments) differs between rounds: save each
        rank's own to resume exactly.
        """
        for pre_hook in self._optimizer_state_dict_pre_hooks.values():
            pre_hook(self)
        state_dict = self._base.state_dict()
        state_dict[_STATE_KEY] = {
            "version": _STATE_VERSION,
            "micro_steps": self._micro_steps,
            "optimizer_steps": self._optimizer_steps,
            "averaging_rounds": self._averaging_rounds,
            "last_round_step": self._last_round_step,
            "period": self._period,
            "accumulation_steps": self._accumulation_steps,
            "average_buffers": self._average_buffers,
            "world_size": self._world_size,
        }
        for post_hook in self._optimizer_state_dict_post_hooks.values():
            result = post_hook(self, state_dict)
            if result is not None:
                state_dict = result
        return state_dict

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        """Load the base optimizer's state, and the counters and settings if present.

        A plain optimizer checkpoint (no ``"local_sgd"`` entry) loads with a warning and the
        counters at zero. Settings (``period``, ``accumulation_steps``, ``average_buffers``) come
        from the checkpoint, as ``lr`` does for torch optimizers; a warning names any that differ
        from the constructor's.

        Raises:
            ValueError: the ``"local_sgd"`` entry is malformed.
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
            ours.update(
                period=self._period,
                accumulation_steps=self._accumulation_steps,
                average_buffers=self._average_buffers,
            )
        loaded = self._validate_loaded(ours)
        self._base.load_state_dict(state_dict)

        changed = [
            f"{name}={loaded[name]!r} (was {getattr(self, '_' + name)!r})"
            for name in _SETTINGS
            if loaded[name] != getattr(self, "_" + name)
        ]
        if changed:
            warnings.warn(
                "LocalSGDOptimizer.load_state_dict: settings taken from the checkpoint: "
                + ", ".join(changed),
                stacklevel=2,
            )
        for name in _COUNTERS + _SETTINGS:
            setattr(self, "_" + name, loaded[name])
        self._closed = False
        self._warn_if_broadcast_replaced_checkpoint()
        for post_hook in self._optimizer_load_state_dict_post_hooks.values():
            post_hook(self)

    @staticmethod
    def _validate_loaded(ours: object) -> dict[str, int | bool]:
        if not isinstance(ours, dict):
            raise ValueError(
                f"the state dict's 'local_sgd' entry must be a dict, got {type(ours).__name__}"
            )
        missing = [name for name in _COUNTERS + _SETTINGS if name not in ours]
        if missing:
            raise ValueError(f"the state dict's 'local_sgd' entry lacks {', '.join(missing)}")
        for name in _COUNTERS:
            value = ours[name]
            if isinstance(value, bool) or not isinstance(value, int) or value < 0:
                raise ValueError(
                    f"the state dict's 'local_sgd' counter {name} must be a non-negative "
                    f"integer, got {value!r}"
                )
        for name in ("period", "accumulation_steps"):
            _check_positive_int(f"the state dict's 'local_sgd' setting {name}", ours[name])
        _check_bool("the state dict's 'local_sgd' setting average_buffers", ours["average_buffers"])
        if ours["last_round_step"] > ours["optimizer_steps"]:
            raise ValueError(
                "the state dict's 'local_sgd' entry is inconsistent: last_round_step "
                f"{ours['last_round_step']} is after optimizer_steps {ours['optimizer_steps']}"
            )
        return {name: ours[name] for name in _COUNTERS + _SETTINGS}

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
