"""Facts about a process group that hold with or without an initialised ``torch.distributed``."""

from __future__ import annotations

import torch
import torch.distributed as dist

__all__ = ["collective_device", "group_rank", "group_size"]


def group_size(process_group: dist.ProcessGroup | None) -> int:
    """Number of ranks in ``process_group``; 1 when torch.distributed is not initialised."""
    if not dist.is_available() or not dist.is_initialized():
        return 1
    return dist.get_world_size(process_group)


def group_rank(process_group: dist.ProcessGroup | None) -> int:
    """This process's rank inside ``process_group``, or -1 when it is not a member."""
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
    backend = str(dist.get_backend(process_group)).lower()
    if "nccl" in backend and "cpu:" not in backend and torch.cuda.is_available():
        if preferred is not None and preferred.type == "cuda":
            return preferred
        return torch.device("cuda", torch.cuda.current_device())
    return torch.device("cpu")
