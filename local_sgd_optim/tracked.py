"""What a round averages: the live parameters and buffers of the model, in a fixed order."""

from __future__ import annotations

from collections.abc import Hashable, Iterator, Sequence
from typing import NamedTuple

from torch import Tensor, nn

__all__ = ["Tracked", "averaged_tensors", "describe", "outer_sources", "plan_key", "tracked"]


class Tracked(NamedTuple):
    """One parameter or buffer: its kind, name, tensor and whether rounds average it.

    Example::

        >>> next(tracked(model, [], True)).name
        '0.weight'
    """

    kind: str  # "parameter" or "buffer"
    name: str
    tensor: Tensor
    averaged: bool


def tracked(
    model: nn.Module, extra_params: Sequence[Tensor], average_buffers: bool
) -> Iterator[Tracked]:
    """Every parameter (trainable ones averaged), every parameter added with
    ``add_param_group``, then every buffer (floating-point ones averaged when
    ``average_buffers``), in a fixed order."""
    for name, p in model.named_parameters():
        yield Tracked("parameter", name, p, p.requires_grad)
    for i, extra in enumerate(extra_params):
        yield Tracked("parameter", f"<add_param_group #{i}>", extra, True)
    for name, b in model.named_buffers():
        yield Tracked("buffer", name, b, average_buffers and b.is_floating_point())


def averaged_tensors(entries: Sequence[Tracked]) -> list[Tensor]:
    """The tensors a round averages: parameters first, then buffers."""
    return [e.tensor for e in entries if e.averaged]


def outer_sources(entries: Sequence[Tracked]) -> list[Tensor]:
    """The averaged parameters, which an outer optimizer steps: the first of
    :func:`averaged_tensors`, in the same order."""
    return [e.tensor for e in entries if e.averaged and e.kind == "parameter"]


def plan_key(entries: Sequence[Tracked]) -> tuple[Hashable, ...]:
    """Changes when a tensor is added, replaced, frozen or unfrozen, or moved to other memory
    (``model.to(...)`` keeps the parameter objects and gives them new storage), another device,
    dtype or shape."""
    return tuple(
        (id(t), t.data_ptr(), t.device, t.dtype, t.shape, e.averaged)
        for e in entries
        for t in (e.tensor,)
    )


def describe(entries: Sequence[Tracked]) -> list[str]:
    """One line per tensor for the cross-rank agreement: name, shape, dtype, frozen."""
    lines = []
    for e in entries:
        frozen = "" if e.averaged or e.kind == "buffer" else ", frozen"
        lines.append(
            f"{e.kind} '{e.name}' of shape {tuple(e.tensor.shape)}, {e.tensor.dtype}{frozen}"
        )
    return lines
