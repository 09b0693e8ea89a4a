"""Facts about a process group that hold with or without an initialised ``torch.distributed``."""

from __future__ import annotations

import torch
import torch.distributed as dist

__all__ = ["StandaloneGroup", "collective_device", "group_rank", "group_size"]


class StandaloneGroup(dist.ProcessGroup):
    """A process group that torch.distributed's registry does not know, built with its rank and
    size and answering for both itself: a fault-tolerance quorum's group, rebuilt for each
    quorum, in processes that may have no default group at all
    (:mod:`local_sgd_optim.fault_tolerance`). ``dist.get_rank`` and ``dist.get_backend`` need
    a registered group; :func:`group_rank` and :func:`collective_device` ask this one.

    Args:
        rank (int): this process's rank in the group.
        size (int): the number of ranks.
        backend (str): the name of the backend underneath (``"torchft-gloo"``, say), which
            decides where small bookkeeping tensors live.

    Example::

        >>> group = StandaloneGroup(rank=1, size=3, backend="gloo")
        >>> group_rank(group), group_size(group)
        (1, 3)
    """

    def __init__(self, rank: int, size: int, backend: str) -> None:
        super().__init__(rank, size)  # type: ignore[call-arg]  # (rank, size): no store
        self.backend = backend


def group_size(process_group: dist.ProcessGroup | None) -> int:
    """Number of ranks in ``process_group``; 1 when torch.distributed is not initialised."""
    if isinstance(process_group, StandaloneGroup):
        return process_group.size()
    if not dist.is_available() or not dist.is_initialized():
        return 1
    return dist.get_world_size(process_group)


def group_rank(process_group: dist.ProcessGroup | None) -> int:
    """This process's rank inside ``process_group``, or -1 when it is not a member."""
    if isinstance(process_group, StandaloneGroup):
        return process_group.rank()
    if not dist.is_available() or not dist.is_initialized():
        return 0
    return dist.get_rank(process_group)


def collective_device(
    process_group: dist.ProcessGroup | None, preferred: torch.device | None = None
) -> torch.device:
    """The device small bookkeeping tensors must live on for ``process_group``'s backend.

    For a CUDA-only backend (NCCL) that is ``preferred`` (the model's GPU) when it is a CUDA
    device, else the current CUDA device; ranks that never called ``torch.cuda.set_device``
    would otherwise all pick GPU 0.
    """
    if isinstance(process_group, StandaloneGroup):
        backend = process_group.backend.lower()
    else:
        backend = str(dist.get_backend(process_group)).lower()
    if "nccl" in backend and "cpu:" not in backend and torch.cuda.is_available():
        if preferred is not None and preferred.type == "cuda":
            return preferred
        return torch.device("cuda", torch.cuda.current_device())
    return torch.device("cpu")
