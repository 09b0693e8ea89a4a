"""PyTorch Lightning support: the :class:`LocalSGD` callback, Local SGD as one added line.

``Trainer(..., callbacks=[LocalSGD(period=8)])`` with an unchanged ``configure_optimizers``.
Lightning is an optional dependency (``pip install "local_sgd_optim[lightning]"``): this module
imports without it, and the callback class is built on first use as a subclass of the
``Callback`` of the Lightning that is there: ``pytorch_lightning``, or ``lightning.pytorch``
(the ``lightning`` package). Where both are installed, ``LocalSGD`` follows the one the script
has imported (``pytorch_lightning`` when it imported both or neither), and
:func:`callback_class` names one explicitly. See ``docs/lightning.md``.
"""

from __future__ import annotations

import contextlib
import importlib
import sys
from typing import Any

import torch
import torch.distributed as dist
from torch import nn
from torch.nn.parallel import DistributedDataParallel

from local_sgd_optim.optimizer import LocalSGDOptimizer

__all__ = ["LocalSGD", "callback_class"]

_PACKAGES = ("pytorch_lightning", "lightning.pytorch")
_STATE_VERSION = 1
_classes: dict[str, type] = {}


def _to_cpu(obj: Any) -> Any:
    """``obj`` with every tensor copied to the CPU (for a gather that pickles it)."""
    if isinstance(obj, torch.Tensor):
        return obj.detach().cpu()
    if isinstance(obj, dict):
        return {k: _to_cpu(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return type(obj)(_to_cpu(v) for v in obj)
    return obj


def _distributed() -> bool:
    return dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1


class _LocalSGDHooks:
    """The callback's behaviour; :func:`callback_class` adds Lightning's ``Callback`` base."""

    def __init__(self, period: Any, **options: Any) -> None:
        if "accumulation_steps" in options or "model" in options:
            raise ValueError(
                "LocalSGD takes neither model (it is the LightningModule) nor "
                "accumulation_steps (use Trainer(accumulate_grad_batches=...): Lightning "
                "calls step() once per real optimizer step)"
            )
        self.period = period
        self.options = options
        self.optimizers: list[LocalSGDOptimizer] = []
        self._pending: dict[str, Any] | None = None
        self._views: contextlib.ExitStack | None = None

    # --- wrapping -------------------------------------------------------------------------

    def on_fit_start(self, trainer: Any, pl_module: Any) -> None:
        strategy = trainer.strategy
        wrapped: list[Any] = []
        self.optimizers = []
        for opt in strategy.optimizers:
            if not isinstance(opt, LocalSGDOptimizer):
                opt = LocalSGDOptimizer(
                    opt, pl_module, self.period, accumulation_steps=1, **self.options
                )
            self.optimizers.append(opt)
            wrapped.append(opt)
        # The setter rebuilds the LightningOptimizer wrappers that Lightning steps. LR
        # schedulers keep their reference to the base optimizer: the wrapper's param_groups
        # are the base's own list, and the base's step() still runs (and is counted).
        strategy.optimizers = wrapped
        ddp = getattr(strategy, "model", None)
        inner = getattr(ddp, "_orig_mod", ddp)  # under torch.compile
        if isinstance(ddp, nn.Module) and isinstance(inner, DistributedDataParallel):
            for opt in self.optimizers:
                if opt.world_size > 1:
                    opt.attach_ddp(ddp)

    def on_train_start(self, trainer: Any, pl_module: Any) -> None:
        # Lightning has restored rank 0's model and optimizer state on every rank by now; a
        # rank other than 0 takes back its own, saved in this callback's state.
        pending, self._pending = self._pending, None
        if pending is None:
            return
        pl_module.load_state_dict(pending["model"])
        for opt, state in zip(self.optimizers, pending["optimizers"]):
            opt.load_state_dict(state)

    def on_train_end(self, trainer: Any, pl_module: Any) -> None:
        for opt in self.optimizers:
            opt.close()

    # --- validation on the global model ---------------------------------------------------

    def on_validation_start(self, trainer: Any, pl_module: Any) -> None:
        # Validation during fit sees the global model (the mean of the ranks), put back
        # afterwards: validating never changes training (LocalSGDOptimizer.global_model).
        self._leave_global_model()
        views = contextlib.ExitStack()
        for opt in self.optimizers:  # several wrappers: each averages what it owns
            views.enter_context(opt.global_model())
        self._views = views

    def on_validation_end(self, trainer: Any, pl_module: Any) -> None:
        self._leave_global_model()

    def on_exception(self, trainer: Any, pl_module: Any, exception: BaseException) -> None:
        self._leave_global_model()

    def _leave_global_model(self) -> None:
        views, self._views = self._views, None
        if views is not None:
            views.close()

    # --- checkpoints ----------------------------------------------------------------------

    def state_dict(self) -> dict[str, Any]:
        """Every rank's model and optimizer state but rank 0's (which Lightning saves itself).

        Collective: Lightning builds a checkpoint on every rank and writes rank 0's.
        """
        if not self.optimizers or not _distributed():
            return {}
        mine = None
        if dist.get_rank() != 0:
            module = self.optimizers[0].model
            mine = _to_cpu(
                {
                    "model": module.state_dict(),
                    "optimizers": [opt.state_dict() for opt in self.optimizers],
                }
            )
        gathered: list[Any] | None = (
            [None] * dist.get_world_size() if dist.get_rank() == 0 else None
        )
        dist.gather_object(mine, gathered, dst=0)
        if gathered is None:
            return {}
        return {"version": _STATE_VERSION, "world_size": len(gathered), "ranks": gathered[1:]}

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        """Keep this rank's saved state, to be loaded once Lightning has restored rank 0's."""
        self._pending = None
        if not state_dict or not _distributed():
            return
        rank, world_size = dist.get_rank(), dist.get_world_size()
        if state_dict.get("world_size") != world_size:
            raise ValueError(
                f"the checkpoint was written by {state_dict.get('world_size')} rank(s) but the "
                f"world size is now {world_size}; resume on as many ranks, or convert the "
                "per-rank states with local_sgd_optim.checkpoint.reshard_state_dicts"
            )
        if rank > 0:
            self._pending = state_dict["ranks"][rank - 1]


_DOC = """Local SGD for a Lightning ``Trainer``: one added line, ``configure_optimizers`` unchanged.

    At ``on_fit_start`` (after Lightning built the optimizers and wrapped the model in DDP, before
    a checkpoint's optimizer state is restored) each optimizer Lightning steps is wrapped in
    ``LocalSGDOptimizer(optimizer, pl_module, period, accumulation_steps=1, **options)`` and put
    back in ``trainer.strategy.optimizers``; the wrapper's communication hook is installed on the
    strategy's DDP module, so gradients stay on their rank and every ``period``-th real optimizer
    step averages parameters and floating-point buffers across ranks. Lightning accumulates
    gradients itself (``accumulate_grad_batches``) and calls ``step()`` once per real step, so
    ``period`` counts real optimizer steps. Learning-rate schedulers work unchanged. At
    ``on_train_end`` a final round (``close()``) leaves every rank with the same model.

    Checkpoints: Lightning writes rank 0's model and optimizer state; the callback's state holds
    every other rank's (gathered to rank 0 when the checkpoint is built), and after a resume
    each rank takes back its own at ``on_train_start``, so every rank continues exactly where it
    stopped (counters, parameters, momentum). The file's ``state_dict`` is rank 0's model, which
    equals the averaged one only right after a round.

    The wrappers are in :attr:`optimizers` for their counters and ``stats``.

    Args:
        period (int or Callable[[int], int]): optimizer steps between averaging rounds, or a
            schedule (see :class:`~local_sgd_optim.LocalSGDOptimizer`).
        **options: other keyword arguments of ``LocalSGDOptimizer`` (``comm_dtype``,
            ``overlap_steps``, ``warmup_steps``, ``outer_optimizer``, ...); not ``model`` or
            ``accumulation_steps``.

    Raises:
        ValueError: ``options`` holds ``model`` or ``accumulation_steps``, or a checkpoint from
            another number of ranks is resumed.

    Example::

        >>> from pytorch_lightning import Trainer
        >>> from local_sgd_optim.lightning import LocalSGD
        >>> trainer = Trainer(accelerator="gpu", devices=8, strategy="ddp",
        ...                   accumulate_grad_batches=4, callbacks=[LocalSGD(period=8)])
        >>> trainer.fit(model, datamodule)  # configure_optimizers unchanged
    """


def callback_class(package: str = "pytorch_lightning") -> type:
    """The :class:`LocalSGD` callback class for one Lightning package, built once.

    Needed only where both ``pytorch_lightning`` and ``lightning`` are installed and
    ``LocalSGD`` would pick the other one: a callback must subclass the ``Callback`` of the
    ``Trainer`` it is given to.

    Args:
        package (str): ``"pytorch_lightning"`` or ``"lightning.pytorch"``.

    Returns:
        A subclass of ``package``'s ``Callback``, constructed as :class:`LocalSGD`.

    Raises:
        ValueError: ``package`` is neither of the two.
        ImportError: ``package`` is not installed.

    Example::

        >>> from lightning.pytorch import Trainer
        >>> from local_sgd_optim.lightning import callback_class
        >>> LocalSGD = callback_class("lightning.pytorch")
        >>> trainer = Trainer(devices=2, strategy="ddp", callbacks=[LocalSGD(period=8)])
    """
    if package not in _PACKAGES:
        raise ValueError(f"package must be one of {_PACKAGES}, got {package!r}")
    if package not in _classes:
        base = importlib.import_module(package).Callback
        cls = type("LocalSGD", (_LocalSGDHooks, base), {"__doc__": _DOC, "__module__": __name__})
        _classes[package] = cls
    return _classes[package]


def _default_package() -> str:
    if "lightning.pytorch" in sys.modules and "pytorch_lightning" not in sys.modules:
        return "lightning.pytorch"
    try:
        importlib.import_module("pytorch_lightning")
    except ImportError:
        return "lightning.pytorch"
    return "pytorch_lightning"


def __getattr__(name: str) -> Any:
    if name == "LocalSGD":
        cls = callback_class(_default_package())
        globals()["LocalSGD"] = cls
        return cls
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


def __dir__() -> list[str]:
    return sorted([*globals(), "LocalSGD"])


# For type checkers: ``LocalSGD`` is a class built at first access (see ``__getattr__``).
LocalSGD: Any
