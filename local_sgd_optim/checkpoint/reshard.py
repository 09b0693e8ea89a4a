"""Resharding: per-rank states of one checkpoint mapped onto another number of ranks.

Between averaging rounds no exact mapping exists; the rule (see :func:`reshard_state_dicts`)
takes the mean of the floating-point model and optimizer-state tensors, rank 0's everything
else, and adjusts the optimizer's ``"local_sgd"`` entry through
:func:`local_sgd_optim.state_entry.for_world_size`.
"""

from __future__ import annotations

import copy
from collections.abc import Iterable, Iterator, Sequence
from typing import Any

import torch
from torch import Tensor

from local_sgd_optim.checkpoint.ranks import check_int
from local_sgd_optim.state_entry import for_world_size, optimizer_steps_of

__all__ = ["merge", "reshard_state_dicts"]

_Path = tuple[Any, ...]


def reshard_state_dicts(
    old_states: Sequence[dict[str, Any]], new_world_size: int
) -> list[dict[str, Any]]:
    """Map the per-rank states of one checkpoint onto ``new_world_size`` ranks.

    Between averaging rounds each rank's model and optimizer state differ, so no exact mapping
    exists; this takes their average, which is what the next averaging round would have made of
    the parameters. The rule, for states laid out as :func:`save` expects:

    - ``state["model"]``: every floating-point tensor is the mean over the old ranks (computed
      in float64, cast back to its dtype); integer tensors (``num_batches_tracked``) come from
      old rank 0.
    - ``state["optimizer"]["state"]`` (momentum buffers, Adam moments): floating-point tensors
      are the mean over the old ranks; entries named ``"step"`` and integer tensors come from
      old rank 0. ``param_groups`` (learning rates) come from old rank 0.
    - ``state["optimizer"]["local_sgd"]``: counters and settings are old rank 0's (the ranks
      agree on them), ``"world_size"`` becomes ``new_world_size``, ``"anchor"`` (and
      ``"local_anchor"``, when present) becomes ``[]`` and ``"pending"`` becomes ``None``: the
      parameters are already averaged (a round in flight is part of that mean), and the next
      round (and the next two-level subgroup round) re-establishes the full-precision copy used
      for 16-bit deltas.
    - ``state["rng"]`` becomes ``None``: a rank's random stream cannot be mapped onto other
      ranks; seed the new ranks afresh.
    - every other key comes from old rank 0.

    Every new rank gets the same state; the returned dicts share no tensors with the input or
    with each other.

    Args:
        old_states (sequence of dict): the states saved by old ranks ``0, 1, ...``, in order.
        new_world_size (int): the number of ranks to continue on.

    Returns:
        list of dict: one state per new rank.

    Raises:
        ValueError: ``old_states`` is empty, lacks ``"model"``, or its states do not match
            (different shapes or optimizer steps), or ``new_world_size`` is not positive.

    Example::

        >>> old = [torch.load(f"ckpt/step-00000100/rank{r}.pt", weights_only=True)
        ...        for r in range(4)]
        >>> new = checkpoint.reshard_state_dicts(old, 2)
        >>> model.load_state_dict(new[rank]["model"])
        >>> opt.load_state_dict(new[rank]["optimizer"])
    """
    new_world_size = check_int("new_world_size", new_world_size, minimum=1)
    merged = merge(old_states, new_world_size)
    return [merged] + [_rebuild(merged, {}) for _ in range(new_world_size - 1)]


def merge(states: Iterable[dict[str, Any]], new_world_size: int) -> dict[str, Any]:
    """The resharded state (see :func:`reshard_state_dicts`), reading ``states`` one at a time."""
    first: dict[str, Any] | None = None
    total: _Sum | None = None
    steps: list[object] = []
    for r, state in enumerate(states):
        leaves = _averaged_leaves_of(r, state)
        steps.append(optimizer_steps_of(state.get("optimizer")))
        if total is None:
            first, total = state, _Sum(leaves)
        else:
            total.add(r, leaves)
    if first is None or total is None:
        raise ValueError("need the state of at least one old rank to reshard")
    if len(set(map(repr, steps))) > 1:
        raise ValueError(
            "the old ranks' states are at different optimizer steps "
            f"({', '.join(f'rank {r}: {s}' for r, s in enumerate(steps))}); reshard the states "
            "of one checkpoint"
        )
    merged: dict[str, Any] = _rebuild(first, total.means())
    optimizer = merged.get("optimizer")
    if isinstance(optimizer, dict):
        # The parameters are already averaged: a round in flight is part of that mean, and the
        # next round re-establishes the full-precision copies for 16-bit deltas.
        for_world_size(optimizer, new_world_size)
    if "rng" in merged:
        merged["rng"] = None  # a rank's random stream cannot be mapped onto other ranks
    return merged


class _Sum:
    """The float64 (or complex128) sums of the averaged tensors, one old rank at a time."""

    def __init__(self, leaves: dict[_Path, Tensor]) -> None:
        self.sums: dict[_Path, Tensor] = {}
        self.dtypes: dict[_Path, torch.dtype] = {}
        for path, t in leaves.items():
            wide = torch.promote_types(t.dtype, torch.float64)
            self.sums[path] = t.detach().to(wide, copy=True)
            self.dtypes[path] = t.dtype
        self.count = 1

    def add(self, r: int, leaves: dict[_Path, Tensor]) -> None:
        """Add old rank ``r``'s tensors, which must have rank 0's paths and shapes."""
        for path, total in self.sums.items():
            other = leaves.get(path)
            if other is None or other.shape != total.shape:
                got = "nothing" if other is None else f"shape {tuple(other.shape)}"
                raise ValueError(
                    f"old rank {r}'s state has {got} at {_describe(path)}, rank 0's has "
                    f"shape {tuple(total.shape)}: the states are not from one run"
                )
            total.add_(other.detach().to(total.device, total.dtype))
        self.count += 1

    def means(self) -> dict[_Path, Tensor]:
        """The means, each in its tensor's own dtype."""
        return {
            path: (total / self.count).to(self.dtypes[path]) for path, total in self.sums.items()
        }


def _averaged_leaves_of(r: int, state: object) -> dict[_Path, Tensor]:
    """Old rank ``r``'s tensors that the rule averages, once its state is known to have them."""
    if not isinstance(state, dict):
        raise TypeError(f"old rank {r}'s state must be a dict, got {type(state).__name__}")
    if "model" not in state:
        raise ValueError(
            f"old rank {r}'s state has no 'model' entry; resharding averages "
            "state['model'] (a model.state_dict()) and state['optimizer']"
        )
    return dict(_averaged_leaves(state))


def _averaged_leaves(obj: object, path: _Path = ()) -> Iterator[tuple[_Path, Tensor]]:
    """``(path, tensor)`` of the tensors the reshard rule averages, in ``obj``'s order."""
    if isinstance(obj, Tensor):
        averaged_kind = path[:1] == ("model",) or (
            path[:2] == ("optimizer", "state") and path[-1] != "step"
        )
        if averaged_kind and (obj.is_floating_point() or obj.is_complex()):
            yield path, obj
    elif isinstance(obj, dict):
        if path == () or path[0] in ("model", "optimizer"):
            for key, value in obj.items():
                if path == () and key not in ("model", "optimizer"):
                    continue
                if path == ("optimizer",) and key != "state":
                    continue
                yield from _averaged_leaves(value, (*path, key))
    elif isinstance(obj, (list, tuple)) and path[:1] in (("model",), ("optimizer",)):
        for i, value in enumerate(obj):
            yield from _averaged_leaves(value, (*path, i))


def _rebuild(obj: Any, replace: dict[_Path, Tensor], path: _Path = ()) -> Any:
    """A copy of ``obj`` with the tensors at ``replace``'s paths replaced and every other cloned."""
    if isinstance(obj, Tensor):
        found = replace.get(path)
        return found if found is not None else obj.detach().clone()
    if isinstance(obj, dict):
        new = copy.copy(obj)  # keeps the type and a state dict's _metadata
        for key, value in obj.items():
            new[key] = _rebuild(value, replace, (*path, key))
        return new
    if isinstance(obj, list):
        return [_rebuild(v, replace, (*path, i)) for i, v in enumerate(obj)]
    if isinstance(obj, tuple) and type(obj) in (tuple, torch.Size):
        return type(obj)(_rebuild(v, replace, (*path, i)) for i, v in enumerate(obj))
    return obj


def _describe(path: _Path) -> str:
    return "".join(f"[{key!r}]" for key in path)
