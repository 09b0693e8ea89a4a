"""Hugging Face Accelerate support: :func:`prepare_local_sgd`, a drop-in ``accelerator.prepare``.

``accelerate`` is an optional dependency (``pip install "local_sgd_optim[accelerate]"``); this
module imports without it, and :func:`prepare_local_sgd` only calls methods of the accelerator
it is given.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from torch.nn.parallel import DistributedDataParallel

from local_sgd_optim.ddp import ddp_wrappers_of as _ddp_wrappers_of
from local_sgd_optim.optimizer import LocalSGDOptimizer

if TYPE_CHECKING:
    from accelerate import Accelerator

__all__ = ["prepare_local_sgd"]


def prepare_local_sgd(
    accelerator: Accelerator, *args: Any, device_placement: list[bool] | None = None
) -> Any:
    """``accelerator.prepare(*args)`` that keeps gradients local for every ``LocalSGDOptimizer``.

    ``accelerator.prepare`` wraps the model in
    :class:`~torch.nn.parallel.DistributedDataParallel` in multi-process runs, after the
    :class:`~local_sgd_optim.LocalSGDOptimizer` was built on the plain model, so that DDP would
    all-reduce gradients at every optimizer step and Local SGD would silently become data
    parallel training. This function calls ``accelerator.prepare`` with the same arguments and
    then, for each ``LocalSGDOptimizer`` among them, finds the DDP wrapper (also under
    ``torch.compile``) around its model, among the returned objects or the models the
    accelerator prepared earlier, and switches it to local gradients: a communication hook that
    does not communicate, and no per-forward buffer broadcast (buffers are averaged at rounds).
    Objects of any other kind are prepared exactly as ``accelerator.prepare`` does.

    Let Accelerate accumulate gradients (``Accelerator(gradient_accumulation_steps=...)`` with
    ``accelerator.accumulate(model)``) and keep ``accumulation_steps=1`` on the
    ``LocalSGDOptimizer``: Accelerate calls ``step()`` once per real optimizer step, so
    ``period`` counts real optimizer steps, never micro-batches.

    The returned optimizer is Accelerate's ``AcceleratedOptimizer``, which does not forward
    :meth:`~local_sgd_optim.LocalSGDOptimizer.average`, ``close()``, ``with`` or the counters:
    keep a reference to the ``LocalSGDOptimizer`` for those.

    Args:
        accelerator (Accelerator): the ``accelerate.Accelerator`` of the script.
        *args: what ``accelerator.prepare`` takes: models, optimizers (``LocalSGDOptimizer`` or
            not), data loaders, schedulers.
        device_placement (list of bool, optional): passed on to ``accelerator.prepare``.

    Returns:
        What ``accelerator.prepare(*args)`` returns: the prepared objects in the same order, or
        the single object when one was given.

    Raises:
        ValueError: a ``LocalSGDOptimizer`` has ``accumulation_steps > 1`` while the accelerator
            also accumulates (``gradient_accumulation_steps > 1``): the two would multiply.
        RuntimeError: the DDP wrapper Accelerate built already has a communication hook (from
            ``DistributedDataParallelKwargs(comm_hook=...)``).

    Example::

        >>> from accelerate import Accelerator
        >>> from local_sgd_optim import LocalSGDOptimizer
        >>> from local_sgd_optim.accelerate import prepare_local_sgd
        >>> accelerator = Accelerator(gradient_accumulation_steps=4)
        >>> local_sgd = LocalSGDOptimizer(torch.optim.AdamW(model.parameters()), model, period=8)
        >>> model, opt, loader = prepare_local_sgd(accelerator, model, local_sgd, loader)
        >>> with local_sgd:  # a final averaging round at the end
        ...     for x, y in loader:
        ...         with accelerator.accumulate(model):
        ...             accelerator.backward(loss_fn(model(x), y))
        ...             opt.step()  # Accelerate calls local_sgd.step() once per 4 batches
        ...             opt.zero_grad()
    """
    ours = [obj for obj in args if isinstance(obj, LocalSGDOptimizer)]
    accumulating = getattr(accelerator, "gradient_accumulation_steps", 1)
    for opt in ours:
        if accumulating > 1 and opt.accumulation_steps > 1:
            raise ValueError(
                f"the accelerator accumulates gradients over {accumulating} batches and the "
                f"LocalSGDOptimizer over another {opt.accumulation_steps}; let Accelerate do "
                "it and build LocalSGDOptimizer with accumulation_steps=1"
            )
    if device_placement is None:
        result = accelerator.prepare(*args)
    else:
        result = accelerator.prepare(*args, device_placement=device_placement)
    prepared = list(result) if isinstance(result, tuple) else [result]
    candidates = prepared + list(getattr(accelerator, "_models", []))
    for opt in ours:
        if opt.world_size > 1:  # disabled or alone: nothing would all-reduce anyway
            for ddp in _ddp_wrappers_of(opt.model, candidates):
                _keep_ddp_gradients_local(opt, ddp)
    return result


def _keep_ddp_gradients_local(opt: LocalSGDOptimizer, ddp: DistributedDataParallel) -> None:
    try:
        opt.attach_ddp(ddp)
    except RuntimeError as problem:
        raise RuntimeError(
            f"{problem}; for the DistributedDataParallel that Accelerate built, drop comm_hook "
            "from DistributedDataParallelKwargs"
        ) from None
