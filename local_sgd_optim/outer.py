"""The outer optimizer of DiLoCo and SlowMo: a kept copy of the parameters stepped at rounds.

At each round the ranks' parameters are averaged; the outer optimizer then takes one step on its
kept copy with the *pseudo-gradient* (kept copy minus the mean), and every rank continues from
the result (DiLoCo, https://arxiv.org/abs/2311.08105; SlowMo, https://arxiv.org/abs/1910.00643).
With overlapped rounds the mean is that of the ranks' snapshots, and each rank keeps its own
progress since its snapshot on top of the result.
"""

from __future__ import annotations

import warnings
from collections.abc import Sequence
from typing import Any, Callable

import torch
from torch import Tensor
from torch.optim import Optimizer

from local_sgd_optim.comm.overlap import Piece
from local_sgd_optim.comm.tensors import copy_all

__all__ = ["OuterOptimizer"]


class OuterOptimizer:
    """An optimizer over a kept copy of the averaged parameters, stepped once per round.

    Args:
        factory (Callable[[list[Tensor]], Optimizer]): builds the optimizer on the kept copy.
        ready (bool): whether the kept copy already holds the ranks' common starting point
            (after the initial broadcast); if not, the first round's mean becomes it and the
            first step comes at the second round.

    Example::

        >>> outer = OuterOptimizer(lambda ps: torch.optim.SGD(ps, lr=0.7, momentum=0.9,
        ...                        nesterov=True), ready=True)
        >>> outer.build(params)
        >>> averager.average(); outer.step_from_mean(params)
    """

    def __init__(self, factory: Callable[[list[Tensor]], Optimizer], ready: bool) -> None:
        self._factory = factory
        self._ready_at_build = ready
        self.kept: list[Tensor] = []
        self.optimizer: Optimizer | None = None
        self.ready = ready
        self._plan: list[int] = []

    def build(self, sources: Sequence[Tensor]) -> None:
        """Copy ``sources`` and build the optimizer on the copy (its state starts empty)."""
        self.kept = [p.detach().clone() for p in sources]
        for kept in self.kept:
            kept.grad = torch.zeros_like(kept)
        outer = self._factory(self.kept)
        if not isinstance(outer, Optimizer):
            raise TypeError(
                "outer_optimizer must return a torch.optim.Optimizer built on the tensors it "
                f"is given, got {type(outer).__name__}"
            )
        self.optimizer = outer
        self._plan = [id(t) for t in sources]
        self.ready = self._ready_at_build

    def _follow(self, sources: Sequence[Tensor]) -> None:
        """Move the kept copy, its gradient and the optimizer's state to where the parameters
        went (``model.to(device)`` after the wrapper was built)."""
        assert self.optimizer is not None
        for kept, source in zip(self.kept, sources):
            if kept.device == source.device and kept.dtype == source.dtype:
                continue
            state = self.optimizer.state.get(kept, {})
            kept.data = kept.data.to(source.device, source.dtype)
            if kept.grad is not None:
                kept.grad = kept.grad.to(source.device, source.dtype)
            for name, value in state.items():
                if isinstance(value, Tensor) and value.dim() > 0:
                    state[name] = value.to(source.device, source.dtype)

    def _restart_if_changed(self, sources: Sequence[Tensor]) -> None:
        if [id(t) for t in sources] == self._plan:
            self._follow(sources)
            return
        warnings.warn(
            "LocalSGDOptimizer: the averaged parameters changed (unfrozen, added or "
            "replaced); the outer optimizer starts again from the current average, its "
            "state reset",
            stacklevel=6,
        )
        self.build(sources)
        self.ready = False

    @torch.no_grad()
    def _step(self, pairs: list[tuple[Tensor, Tensor, Tensor]]) -> bool:
        """One outer step from (kept, its gradient, the mean) triples; ``False`` when the mean
        only became the starting point."""
        assert self.optimizer is not None
        kept = [k for k, _, _ in pairs]
        means = [m for _, _, m in pairs]
        if not self.ready:
            copy_all(kept, means)
            self.ready = True
            return False
        grads = [g for _, g, _ in pairs]
        copy_all(grads, kept)  # the pseudo-gradient: where the last round left us minus the mean
        torch._foreach_sub_(grads, means)
        self.optimizer.step()
        return True

    @torch.no_grad()
    def step_from_mean(self, sources: Sequence[Tensor]) -> None:
        """After a blocking round: ``sources`` hold the mean; they become the outer result."""
        self._restart_if_changed(sources)
        pairs = [(k, k.grad, s) for k, s in zip(self.kept, sources)]
        if self._step(pairs):  # type: ignore[arg-type]
            copy_all(list(sources), self.kept)

    @torch.no_grad()
    def step_from_snapshot(
        self, sources: Sequence[Tensor], pieces: Sequence[Piece]
    ) -> dict[int, Tensor]:
        """After an overlapped round: ``pieces`` (of ``sources``, by index) carry the mean of
        the snapshots; each rank moves by (outer result - mean), keeping its own progress.

        Returns:
            The kept copy by source index, for the averager's 16-bit anchor (empty when the
            mean only became the starting point).
        """
        self._restart_if_changed(sources)
        mine = [p for p in pieces if p.index < len(self.kept)]
        kept = [Piece.slice_of(self.kept[p.index], p.offset, p.source) for p in mine]
        grads = [Piece.slice_of(self.kept[p.index].grad, p.offset, p.source) for p in mine]  # type: ignore[arg-type]
        if not self._step(list(zip(kept, grads, [p.mean for p in mine]))):
            return {}
        targets = [p.source for p in mine]
        torch._foreach_add_(targets, kept)
        torch._foreach_sub_(targets, [p.mean for p in mine])
        return dict(enumerate(self.kept))

    def state_dict(self) -> dict[str, Any]:
        """The kept copy (cloned), the optimizer's state and readiness, for a checkpoint."""
        assert self.optimizer is not None
        return {
            "params": [kept.detach().clone() for kept in self.kept],
            "state": self.optimizer.state_dict(),
            "ready": self.ready,
        }

    def check_state_dict(self, state: dict[str, Any]) -> None:
        """Raise a ValueError if ``state`` does not fit this kept copy."""
        kept = state["params"]
        if len(kept) != len(self.kept) or any(
            a.shape != b.shape or a.dtype != b.dtype for a, b in zip(kept, self.kept)
        ):
            raise ValueError(
                "the checkpoint's outer optimizer parameters do not match this model's"
            )

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Restore :meth:`state_dict`."""
        assert self.optimizer is not None
        self.check_state_dict(state)
        with torch.no_grad():
            copy_all(self.kept, list(state["params"]))
        self.optimizer.load_state_dict(state["state"])
        self.ready = bool(state["ready"])
