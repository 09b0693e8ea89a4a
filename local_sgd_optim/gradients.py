"""Gradients at the end of an accumulation window: divided by the window, or unscaled."""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor

from local_sgd_optim.sharded import local_tensor

__all__ = ["rescale_gradients"]


@torch.no_grad()
def rescale_gradients(
    param_groups: list[dict[str, Any]], *, divisor: int = 1, multiplier: Tensor | None = None
) -> None:
    """Divide every gradient by ``divisor``, or multiply it by ``multiplier``.

    A DTensor gradient (FSDP2) is rescaled through its local shard: the same values, without
    a sharding propagation per call.

    Example::

        >>> rescale_gradients(opt.param_groups, divisor=4)  # the mean over a window of 4
    """
    dense: list[Tensor] = []
    for group in param_groups:
        for p in group["params"]:
            if p.grad is None:
                continue
            if not p.grad.is_sparse:
                dense.append(local_tensor(p.grad))
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
