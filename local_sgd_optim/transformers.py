"""Hugging Face ``transformers.Trainer`` support: :class:`LocalSGDTrainer` and its mixin.

``transformers`` is an optional dependency (``pip install "local_sgd_optim[transformers]"``);
this module imports without it. :class:`LocalSGDTrainerMixin` needs nothing from
``transformers`` until it is mixed into a ``Trainer``; ``LocalSGDTrainer`` (the mixin on
``transformers.Trainer``) is built on first access, which imports ``transformers``.

Under the hood, on every rank:

- ``create_optimizer`` wraps whatever optimizer ``Trainer`` builds (its ``optim=`` choice, or
  one passed as ``optimizers=(opt, None)``) in a
  :class:`~local_sgd_optim.LocalSGDOptimizer` with ``accumulation_steps=1``: ``Trainer``
  accumulates ``gradient_accumulation_steps`` micro-batches and calls ``step()`` once per real
  optimizer step, so ``period`` counts real optimizer steps. The LR scheduler is built on the
  wrapper, which shares ``param_groups`` with the base optimizer.
- ``training_step`` hands the ``DistributedDataParallel`` that Accelerate built to
  :meth:`~local_sgd_optim.LocalSGDOptimizer.attach_ddp` before its first forward, so DDP never
  all-reduces a gradient (the wrapper would also find it at the first forward by itself).
- Every ``evaluate()`` and every model saved during training (checkpoints, ``save_model()``)
  see the global model, the mean of the ranks
  (:meth:`~local_sgd_optim.LocalSGDOptimizer.global_model`), computed for the occasion and
  then put back: evaluating and saving never change training, whatever ``eval_steps`` and
  ``save_steps`` are. At the end of ``train()`` one averaging round leaves every rank with the
  average.
- ``_save_optimizer_and_scheduler`` also writes each rank's own optimizer state and, between
  rounds, its own model: ``optimizer.pt`` is rank 0's (as ``Trainer`` writes it),
  ``optimizer-rank{N}.pt`` rank N's, ``model-rank{N}.pt`` rank N's parameters and buffers;
  ``_load_optimizer_and_scheduler`` loads each rank's own, so a resumed run continues with
  every rank's weights, momentum or Adam moments and the wrapper's counters exactly as saved.
"""

from __future__ import annotations

import contextlib
import os
import warnings
from collections.abc import Iterator
from typing import TYPE_CHECKING, Any

import torch
import torch.distributed as dist

from local_sgd_optim.optimizer import LocalSGDOptimizer

if TYPE_CHECKING:
    from torch import nn

    LocalSGDTrainer: type  # built on first access by __getattr__ below

__all__ = ["LocalSGDTrainer", "LocalSGDTrainerMixin", "rank_model_file", "rank_optimizer_file"]

OPTIMIZER_FILE = "optimizer.pt"  # transformers.trainer.OPTIMIZER_NAME: rank 0's state


def rank_optimizer_file(rank: int) -> str:
    """The name of the file that holds rank ``rank``'s optimizer state in a checkpoint folder.

    Rank 0's is ``Trainer``'s own ``optimizer.pt``; rank N's (N > 0) is
    ``optimizer-rank{N}.pt`` beside it.

    Args:
        rank (int): the global rank (``TrainingArguments.process_index``).

    Returns:
        The file name, without the folder.

    Example::

        >>> rank_optimizer_file(0), rank_optimizer_file(3)
        ('optimizer.pt', 'optimizer-rank3.pt')
    """
    return OPTIMIZER_FILE if rank == 0 else f"optimizer-rank{rank}.pt"


def rank_model_file(rank: int) -> str:
    """The name of the file that holds rank ``rank``'s own model (``state_dict()``) in a
    checkpoint folder written between rounds, beside ``Trainer``'s model file (which holds the
    global model, the mean of the ranks).

    Args:
        rank (int): the global rank (``TrainingArguments.process_index``).

    Returns:
        The file name, without the folder.

    Example::

        >>> rank_model_file(2)
        'model-rank2.pt'
    """
    return f"model-rank{rank}.pt"


class LocalSGDTrainerMixin:
    """Local SGD for ``transformers.Trainer``: put it before ``Trainer`` in the bases.

    ``class MyTrainer(LocalSGDTrainerMixin, Trainer)`` (or the ready-made ``LocalSGDTrainer``)
    takes every ``Trainer`` argument plus ``period``. Each rank then trains its own copy of the
    model on its shard of the data, and the ranks average parameters and floating-point buffers
    every ``period`` real optimizer steps (``gradient_accumulation_steps`` micro-batches each)
    instead of all-reducing gradients at every step. Launch as for DDP (``torchrun``,
    ``accelerate launch``); alone, it trains exactly as ``Trainer`` does.

    The :class:`~local_sgd_optim.LocalSGDOptimizer` is ``trainer.local_sgd`` once training
    started (``trainer.optimizer`` is Accelerate's wrapper around it): its counters
    (``optimizer_steps``, ``averaging_rounds``) and ``stats`` (bytes sent) are there.

    Each ``evaluate()`` and each model saved during training (checkpoints, ``save_model()``)
    see the global model, the mean of the ranks computed for the occasion and then put back
    (:meth:`~local_sgd_optim.LocalSGDOptimizer.global_model`), so evaluating and saving never
    change training; ``train()`` ends with an averaging round, so the returned model is the
    average, the same on every rank, as is every saved model (``load_best_model_at_end`` loads
    it on every rank). Each rank saves its own optimizer state (:func:`rank_optimizer_file`)
    and, between rounds, its own model (:func:`rank_model_file`), and loads both back on
    resume, so weights, counters, momentum and Adam moments continue exactly; a checkpoint
    without the per-rank files (a plain ``Trainer``'s) loads rank 0's optimizer state
    everywhere, with a warning. The checkpoint folder must be on a file system every rank sees.

    Args:
        *args: ``Trainer``'s positional arguments.
        period (int or Callable[[int], int]): real optimizer steps between averaging rounds, or
            a schedule (see :mod:`local_sgd_optim.schedules`) (default: 8).
        local_sgd_kwargs (dict, optional): further keyword arguments of
            :class:`~local_sgd_optim.LocalSGDOptimizer` (``comm_dtype``, ``overlap_steps``,
            ``warmup_steps``, ``outer_optimizer``, ...); not ``accumulation_steps``, which
            ``Trainer`` handles (default: ``None``).
        **kwargs: ``Trainer``'s keyword arguments (``model``, ``args``, ``train_dataset``, ...).

    Raises:
        ValueError: ``local_sgd_kwargs`` sets ``accumulation_steps`` (use
            ``TrainingArguments(gradient_accumulation_steps=...)``) or ``model`` or ``period``.
        TypeError: at ``train()``, the model is sharded (DeepSpeed, FSDP): Local SGD keeps a
            full copy on every rank.

    Example::

        >>> from transformers import TrainingArguments
        >>> from local_sgd_optim.transformers import LocalSGDTrainer
        >>> args = TrainingArguments("out", gradient_accumulation_steps=4, optim="adamw_torch")
        >>> trainer = LocalSGDTrainer(model=model, args=args, train_dataset=train, period=8)
        >>> trainer.train()  # averages every 8 optimizer steps, i.e. every 32 batches per rank
    """

    # Trainer's attributes that the mixin uses (set by Trainer.__init__ and train()).
    args: Any
    model: Any
    optimizer: Any
    accelerator: Any
    is_deepspeed_enabled: bool
    is_fsdp_enabled: bool
    is_in_train: bool

    def __init__(
        self,
        *args: Any,
        period: Any = 8,
        local_sgd_kwargs: dict[str, Any] | None = None,
        **kwargs: Any,
    ) -> None:
        options = dict(local_sgd_kwargs or {})
        for key in ("accumulation_steps", "model", "period", "base_optimizer"):
            if key in options:
                hint = (
                    "; Trainer accumulates: use TrainingArguments(gradient_accumulation_steps=...)"
                    if key == "accumulation_steps"
                    else ""
                )
                raise ValueError(f"local_sgd_kwargs may not set {key!r}{hint}")
        self.local_sgd_period = period
        self.local_sgd_kwargs = options
        self.local_sgd: LocalSGDOptimizer | None = None
        self._local_sgd_synced_at: int | None = None
        self._local_sgd_rounds_seen = 0
        self._local_sgd_attached: set[int] = set()
        base: Any = super()
        base.__init__(*args, **kwargs)

    # --- building the optimizer ------------------------------------------------------------

    def create_optimizer(self, model: nn.Module | None = None) -> torch.optim.Optimizer:
        """``Trainer.create_optimizer``, then wrap the result in a ``LocalSGDOptimizer``.

        Args:
            model (nn.Module, optional): passed on to ``Trainer.create_optimizer``.

        Returns:
            The ``LocalSGDOptimizer`` (also ``self.optimizer`` and ``self.local_sgd``).

        Example::

            >>> trainer.create_optimizer()  # Trainer.train() calls it
        """
        if self.is_deepspeed_enabled or self.is_fsdp_enabled:
            raise TypeError(
                "LocalSGDTrainer does not support DeepSpeed or FSDP: Local SGD keeps a full copy "
                "of the model on every rank"
            )
        base: Any = super()
        optimizer = base.create_optimizer(model)
        ours = self.local_sgd
        if ours is not None and (
            optimizer is ours or getattr(optimizer, "optimizer", None) is ours
        ):  # a second train(): the optimizer (maybe inside Accelerate's wrapper) is ours
            return optimizer  # type: ignore[no-any-return]
        if isinstance(optimizer, LocalSGDOptimizer):
            ours = optimizer  # the user passed one in optimizers=(...)
        else:
            ours = LocalSGDOptimizer(
                optimizer, self.model, self.local_sgd_period, **self.local_sgd_kwargs
            )
        if ours.accumulation_steps != 1:
            raise ValueError(
                "the LocalSGDOptimizer given to the Trainer has accumulation_steps="
                f"{ours.accumulation_steps}; Trainer accumulates by itself: build it with "
                "accumulation_steps=1 and set TrainingArguments(gradient_accumulation_steps=...)"
            )
        ours.register_step_post_hook(self._local_sgd_after_step)
        self.local_sgd = ours
        self._local_sgd_rounds_seen = ours.averaging_rounds
        self.optimizer = ours
        return ours

    def _local_sgd_after_step(self, opt: Any, args: Any, kwargs: Any) -> None:
        ours = self.local_sgd
        if ours is None:
            return
        if ours.averaging_rounds != self._local_sgd_rounds_seen:
            self._local_sgd_rounds_seen = ours.averaging_rounds
            # A blocking round of the whole model just left every rank identical (a
            # fragment's round leaves the other fragments apart).
            if ours.overlap_steps == 0 and ours.fragments == 1:
                self._local_sgd_synced_at = ours.optimizer_steps

    def _local_sgd_sync(self) -> None:
        """One averaging round, on every rank, unless the ranks are identical already."""
        ours = self.local_sgd
        if ours is None or ours.world_size <= 1:
            return
        if self._local_sgd_synced_at == ours.optimizer_steps:
            return
        ours.average()
        self._local_sgd_synced_at = ours.optimizer_steps
        self._local_sgd_rounds_seen = ours.averaging_rounds

    def _local_sgd_apart(self) -> bool:
        """Whether the ranks may hold different models now (stepped since the last round)."""
        ours = self.local_sgd
        return (
            ours is not None
            and ours.world_size > 1
            and self._local_sgd_synced_at != ours.optimizer_steps
        )

    @contextlib.contextmanager
    def _local_sgd_global_model(self) -> Iterator[None]:
        """The global model for the block, on every rank, when the ranks are apart."""
        ours = self.local_sgd
        if ours is None or not self._local_sgd_apart():
            yield
            return
        with ours.global_model():
            yield

    # --- training --------------------------------------------------------------------------

    def training_step(self, model: nn.Module, *args: Any, **kwargs: Any) -> torch.Tensor:
        """``Trainer.training_step``, first keeping the DDP model's gradients local.

        Args:
            model (nn.Module): the model Trainer runs (Accelerate's DDP around ``self.model``).
            *args: passed on to ``Trainer.training_step``.
            **kwargs: passed on to ``Trainer.training_step``.

        Returns:
            What ``Trainer.training_step`` returns: the loss, detached.

        Example::

            >>> loss = trainer.training_step(trainer.model_wrapped, inputs)
        """
        ours = self.local_sgd
        if ours is not None and ours.world_size > 1 and id(model) not in self._local_sgd_attached:
            with contextlib.suppress(TypeError):  # no DDP around the model: nothing to keep
                ours.attach_ddp(model)
            self._local_sgd_attached.add(id(model))
        base: Any = super()
        return base.training_step(model, *args, **kwargs)  # type: ignore[no-any-return]

    def train(self, *args: Any, **kwargs: Any) -> Any:
        """``Trainer.train``, ending with an averaging round: every rank returns the average.

        Args:
            *args: passed on to ``Trainer.train``.
            **kwargs: passed on to ``Trainer.train`` (``resume_from_checkpoint``, ...).

        Returns:
            What ``Trainer.train`` returns.

        Example::

            >>> trainer.train(resume_from_checkpoint=True)
        """
        base: Any = super()
        output = base.train(*args, **kwargs)
        self._local_sgd_sync()
        return output

    def evaluate(self, *args: Any, **kwargs: Any) -> Any:
        """``Trainer.evaluate`` on the global model (the mean of the ranks), which is put back
        afterwards: evaluating does not change training.

        Args:
            *args: passed on to ``Trainer.evaluate``.
            **kwargs: passed on to ``Trainer.evaluate``.

        Returns:
            What ``Trainer.evaluate`` returns.

        Example::

            >>> metrics = trainer.evaluate()
        """
        base: Any = super()
        with self._local_sgd_global_model():
            return base.evaluate(*args, **kwargs)

    # --- saving and resuming ---------------------------------------------------------------

    def save_model(self, output_dir: str | None = None, _internal_call: bool = False) -> None:
        """``Trainer.save_model`` of the global model (the mean of the ranks; during training
        computed for the save and put back afterwards). Call it on every rank, as ``Trainer``
        asks.

        Args:
            output_dir (str, optional): passed on to ``Trainer.save_model``.
            _internal_call (bool): passed on to ``Trainer.save_model``.

        Example::

            >>> trainer.save_model("final")
        """
        base: Any = super()
        with self._local_sgd_global_model():
            base.save_model(output_dir, _internal_call=_internal_call)

    def _local_sgd_per_rank(self) -> bool:
        return self.local_sgd is not None and self.local_sgd.world_size > 1

    def _save_optimizer_and_scheduler(self, output_dir: str) -> None:
        base: Any = super()
        base._save_optimizer_and_scheduler(output_dir)  # rank 0: optimizer.pt, scheduler.pt
        if not self._local_sgd_per_rank() or self.args.save_only_model:
            return
        rank = self.args.process_index
        os.makedirs(output_dir, exist_ok=True)
        if rank != 0:
            _save_atomically(self.optimizer.state_dict(), output_dir, rank_optimizer_file(rank))
        if self._local_sgd_apart():  # Trainer saved the global model: each rank keeps its own
            _save_atomically(self.model.state_dict(), output_dir, rank_model_file(rank))
        if dist.is_available() and dist.is_initialized():
            dist.barrier()  # the checkpoint is complete on every rank before anyone goes on

    def _load_optimizer_and_scheduler(self, checkpoint: str | None) -> None:
        base: Any = super()
        base._load_optimizer_and_scheduler(checkpoint)  # rank 0's state and the scheduler
        ours = self.local_sgd
        if checkpoint is None or ours is None or not self._local_sgd_per_rank():
            return
        rank = self.args.process_index
        device = self.args.device
        location = device if device.type != "cpu" else "cpu"
        if rank != 0:
            path = os.path.join(checkpoint, rank_optimizer_file(rank))
            if not os.path.isfile(path):
                if os.path.isfile(os.path.join(checkpoint, OPTIMIZER_FILE)):
                    warnings.warn(
                        f"{checkpoint} has no {rank_optimizer_file(rank)} (not saved by "
                        f"LocalSGDTrainer): rank {rank} continues from rank 0's optimizer state",
                        stacklevel=2,
                    )
                return
            self.optimizer.load_state_dict(
                torch.load(path, map_location=location, weights_only=True)
            )
        own = os.path.join(checkpoint, rank_model_file(rank))
        if os.path.isfile(own):  # saved between rounds: this rank's own model, not the mean
            self.model.load_state_dict(torch.load(own, map_location=location, weights_only=True))
            self._local_sgd_rounds_seen = ours.averaging_rounds
            return
        # Saved right after a round: every rank starts from the model Trainer loaded.
        self._local_sgd_synced_at = ours.optimizer_steps
        self._local_sgd_rounds_seen = ours.averaging_rounds


def _save_atomically(value: Any, folder: str, name: str) -> None:
    """``torch.save`` to ``folder/name`` through a temporary name: never a half-written file
    under the final name."""
    path = os.path.join(folder, name)
    partial = f"{path}.partial"
    torch.save(value, partial)
    os.replace(partial, path)


_TRAINER_CLASS: type | None = None


def _trainer_class() -> type:
    global _TRAINER_CLASS
    if _TRAINER_CLASS is None:
        from transformers import Trainer

        _TRAINER_CLASS = type(
            "LocalSGDTrainer",
            (LocalSGDTrainerMixin, Trainer),
            {"__doc__": LocalSGDTrainerMixin.__doc__, "__module__": __name__},
        )
    return _TRAINER_CLASS


def __getattr__(name: str) -> Any:
    # LocalSGDTrainer subclasses transformers.Trainer, so it is built (and transformers
    # imported) on first access: ``from local_sgd_optim.transformers import LocalSGDTrainer``.
    if name == "LocalSGDTrainer":
        return _trainer_class()
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
