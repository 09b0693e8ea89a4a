"""Which rank of how many a checkpoint call is, and exchanging small objects between ranks.

With torch.distributed initialised the default process group decides; without it, the
``rank`` and ``world_size`` arguments do, and every exchange is with this call alone.
"""

from __future__ import annotations

from typing import Any

import torch.distributed as dist

__all__ = ["broadcast_from_rank0", "check_int", "gather", "rank_and_world"]


def check_int(name: str, value: object, minimum: int) -> int:
    """``value`` if it is an integer (not a bool) of at least ``minimum``, else a ValueError."""
    if isinstance(value, int) and not isinstance(value, bool) and value >= minimum:
        return value
    raise ValueError(f"{name} must be an integer >= {minimum}, got {value!r}")


def rank_and_world(rank: int | None, world_size: int | None) -> tuple[int, int]:
    """This call's ``(rank, world_size)``: the process group's, or the arguments' (0 of 1)."""
    if dist.is_available() and dist.is_initialized():
        actual_rank, actual_world = dist.get_rank(), dist.get_world_size()
        if (rank is not None and rank != actual_rank) or (
            world_size is not None and world_size != actual_world
        ):
            raise ValueError(
                f"rank={rank!r}, world_size={world_size!r} disagree with the process group "
                f"(rank {actual_rank} of {actual_world}); leave them out when torch.distributed "
                "is initialised"
            )
        return actual_rank, actual_world
    world = 1 if world_size is None else check_int("world_size", world_size, minimum=1)
    me = 0 if rank is None else check_int("rank", rank, minimum=0)
    if me >= world:
        raise ValueError(f"rank must be smaller than world_size, got rank={me}, world_size={world}")
    return me, world


def gather(item: Any, world_size: int) -> list[Any]:
    """Every rank's ``item`` (a collective when torch.distributed is initialised)."""
    if dist.is_available() and dist.is_initialized() and world_size > 1:
        everyone: list[Any] = [None] * world_size
        dist.all_gather_object(everyone, item)
        return everyone
    return [item]


def broadcast_from_rank0(item: Any) -> Any:
    """Rank 0's ``item`` on every rank (a collective: call it only with a process group)."""
    outcome = [item]
    dist.broadcast_object_list(outcome, src=0)
    return outcome[0]
