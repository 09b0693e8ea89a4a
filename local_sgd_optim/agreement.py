"""The cross-rank agreement: every rank built the same model with the same settings."""

from __future__ import annotations

import torch
import torch.distributed as dist

from local_sgd_optim.comm.collectives import exchange_descriptions

__all__ = ["agree_across_ranks"]


def agree_across_ranks(
    lines: list[str],
    process_group: dist.ProcessGroup | None,
    device: torch.device | None,
    error: str | None = None,
) -> None:
    """Raise the same error on every rank if any rank failed or the descriptions differ.

    ``lines`` describe this rank's settings (``setting ...``) and tensors; ``error`` is this
    rank's own failure, if it has one (the caller then raises it; this joins the collective so
    that the other ranks can raise too instead of hanging).

    Raises:
        RuntimeError: another rank failed, or the descriptions differ (the first difference is
            named).

    Example::

        >>> agree_across_ranks(["setting period=8", "parameter 'w' of shape (4,)"], None, None)
    """
    everyone = exchange_descriptions(lines, process_group, error, device)
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
