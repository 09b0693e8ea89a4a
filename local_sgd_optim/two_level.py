"""Two-level averaging: the subgroup a rank also averages in, between the global rounds."""

from __future__ import annotations

import os

import torch.distributed as dist

__all__ = ["build_local_group"]


def build_local_group(
    local_group: dist.ProcessGroup | str | None,
    process_group: dist.ProcessGroup | None,
    world_size: int,
) -> dist.ProcessGroup:
    """This rank's subgroup for two-level averaging, checked on every rank to partition the
    group.

    ``"node"`` (or ``None``) builds one subgroup per node of ``LOCAL_WORLD_SIZE`` ranks (set by
    torchrun) over the default group.

    Raises:
        ValueError: ``"node"`` without a usable ``LOCAL_WORLD_SIZE``, or subgroups that do not
            split the ranks into disjoint sets covering them all.

    Example::

        >>> group = build_local_group("node", None, dist.get_world_size())
    """
    if local_group is None or local_group == "node":
        size = int(os.environ.get("LOCAL_WORLD_SIZE", "0"))
        if size < 1 or process_group is not None or world_size % size:
            raise ValueError(
                "local_group='node' builds one subgroup per node from LOCAL_WORLD_SIZE "
                "(set by torchrun) over the default group, and needs a world size that is "
                f"a multiple of it (LOCAL_WORLD_SIZE={size or 'unset'}, world size "
                f"{world_size}); otherwise pass this rank's subgroup, e.g. from "
                "torch.distributed.new_subgroups()"
            )
        group, _ = dist.new_subgroups(group_size=size)
    else:
        assert isinstance(local_group, dist.ProcessGroup)
        group = local_group
    _check_partition(group, process_group, world_size)
    return group


def _check_partition(
    group: dist.ProcessGroup, process_group: dist.ProcessGroup | None, world_size: int
) -> None:
    members = dist.get_process_group_ranks(group) if dist.get_rank(group) >= 0 else []
    everyone: list[list[int] | None] = [None] * world_size
    dist.all_gather_object(everyone, members, group=process_group)
    ranks = (
        dist.get_process_group_ranks(process_group)
        if process_group is not None
        else list(range(world_size))
    )
    problems = []
    for rank, mine in zip(ranks, everyone):
        if not mine or rank not in mine:
            problems.append(f"rank {rank} is not in its own subgroup")
        elif any(everyone[ranks.index(q)] != mine for q in mine if q in ranks):
            problems.append(f"rank {rank}'s subgroup {mine} is not the same on its members")
        elif not set(mine) <= set(ranks):
            problems.append(f"rank {rank}'s subgroup {mine} reaches outside the group")
    if problems:
        raise ValueError(
            "local_group must split the ranks into disjoint subgroups that cover them all: "
            + "; ".join(problems[:3])
            + ". Build the subgroups on every rank, e.g. with torch.distributed.new_subgroups"
        )
