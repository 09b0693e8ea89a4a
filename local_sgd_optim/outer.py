"""The outer optimizer of DiLoCo and SlowMo: a kept copy of the parameters stepped at rounds.

At each round the ranks' parameters are averaged; the outer optimizer then takes one step on its
kept copy with the *pseudo-gradient* (kept copy minus the mean), and every rank continues from
the result (DiLoCo, https://arxiv.org/abs/2311.08105; SlowMo, https://arxiv.org/abs/1910.00643).
With overlapped rounds the mean is that of the ranks' snapshots, and each rank keeps its own
progress since its snapshot on top of the result.
"""

from __future__ import annotations

import contextlib
import functools
import warnings
from collections.abc import Iterator, Sequence
from typing import Any, Callable

import torch
from torch import Tensor
from torch.optim import Optimizer

from local_sgd_optim.comm.overlap import Piece
from local_sgd_optim.comm.tensors import copy_all

__all__ = ["OuterOptimizer"]


def _moved_to(
    device: torch.device, dtype: torch.dtype | None = None, non_blocking: bool = False
) -> Callable[[str, Tensor], Tensor]:
    """A conversion for :meth:`OuterOptimizer._convert`: each tensor moved to ``device``."""
    return lambda _name, t: t.to(device=device, dtype=dtype, non_blocking=non_blocking)


class OuterOptimizer:
    """An optimizer over a kept copy of the averaged parameters, stepped once per round.

    Args:
        factory (Callable[[list[Tensor]], Optimizer]): builds the optimizer on the kept copy.
        ready (bool): whether the kept copy already holds the ranks' common starting point
            (after the initial broadcast); if not, the first round's mean becomes it and the
            first step comes at the second round.
        cpu_offload (bool): keep the kept copy, its gradient and the optimizer's state in CPU
            memory (pinned when CUDA is available) between rounds; they visit the parameters'
            device for the outer step only (default: ``False``).

    Example::

        >>> outer = OuterOptimizer(lambda ps: torch.optim.SGD(ps, lr=0.7, momentum=0.9,
        ...                        nesterov=True), ready=True)
        >>> outer.build(params)
        >>> averager.average(); outer.step_from_mean(params)
    """

    # Tests set this to make a CPU model's offloaded state take the path a GPU model's does.
    _visit_cpu = False

    def __init__(
        self, factory: Callable[[list[Tensor]], Optimizer], ready: bool, cpu_offload: bool = False
    ) -> None:
        self._factory = factory
        self._ready_at_build = ready
        self._offload = cpu_offload
        # Pinned buffers the offloaded tensors come back to after each step, reused across
        # rounds: pinning memory costs far more than the copy. By (kept index, state name).
        self._host: dict[tuple[int, str], Tensor] = {}
        self.kept: list[Tensor] = []
        self.optimizer: Optimizer | None = None
        self.ready = ready
        # While not ready: the kept tensors that already took a round's mean as their starting
        # point (with fragments, each fragment's first round gives its own).
        self._started: set[int] = set()
        self._plan: list[int] = []

    def build(self, sources: Sequence[Tensor]) -> None:
        """Copy ``sources`` and build the optimizer on the copy (its state starts empty)."""
        self._host = {}
        self.kept = [self._copy_home(p) for p in sources]
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
        self._started = set()

    def _home_device(self, source: Tensor) -> torch.device:
        """Where the copy of ``source`` lives between rounds."""
        return torch.device("cpu") if self._offload else source.device

    def _copy_home(self, source: Tensor) -> Tensor:
        """A copy of ``source`` where the kept copy lives between rounds."""
        source = source.detach()
        if not self._offload or source.device.type == "cpu":
            return source.clone()
        pinned = torch.cuda.is_available()
        return torch.empty_like(source, device="cpu", pin_memory=pinned).copy_(source)

    def _convert(self, kept: Tensor, convert: Callable[[str, Tensor], Tensor]) -> None:
        """Replace ``kept``'s values, its gradient and its optimizer state by
        ``convert(name, tensor)`` (name ``""``, ``"grad"`` or ``"state.<key>"``)."""
        assert self.optimizer is not None
        values = self.optimizer.state.get(kept, {})
        kept.data = convert("", kept.data)
        if kept.grad is not None:
            kept.grad = convert("grad", kept.grad)
        for name, value in values.items():
            if isinstance(value, Tensor) and value.dim() > 0:
                values[name] = convert(f"state.{name}", value)

    def _follow(self, sources: Sequence[Tensor]) -> None:
        """Move the kept copy, its gradient and the optimizer's state to where the parameters
        went (``model.to(device)`` after the wrapper was built; CPU memory when offloaded)."""
        for kept, source in zip(self.kept, sources):
            device = self._home_device(source)
            if kept.device != device or kept.dtype != source.dtype:
                self._convert(kept, _moved_to(device, source.dtype))

    def _back_home(self, index: int, name: str, tensor: Tensor) -> Tensor:
        """``tensor``'s values in this copy's pinned buffer for ``name`` (made on first use)."""
        buffer = self._host.get((index, name))
        if buffer is None or buffer.shape != tensor.shape or buffer.dtype != tensor.dtype:
            buffer = torch.empty_like(tensor, device="cpu", pin_memory=torch.cuda.is_available())
            self._host[(index, name)] = buffer
        return buffer.copy_(tensor)

    @contextlib.contextmanager
    def _on_device(self, sources: Sequence[Tensor]) -> Iterator[None]:
        """With ``cpu_offload``: the kept copy, its gradient and the optimizer's state on the
        parameters' device for the duration (an outer step), back in CPU memory afterwards."""
        on_cpu = {s.device for s in sources} <= {torch.device("cpu")}
        if not self._offload or (on_cpu and not self._visit_cpu):
            yield
            return
        for kept, source in zip(self.kept, sources):
            self._convert(kept, _moved_to(source.device, non_blocking=True))
        try:
            yield
        finally:
            # State the step created (momentum at the first step) is on the device: it joins.
            for index, kept in enumerate(self.kept):
                self._convert(kept, functools.partial(self._back_home, index))

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
    def _step(self, pairs: list[tuple[Tensor, Tensor, Tensor]], indices: set[int]) -> bool:
        """One outer step from (kept, its gradient, the mean) triples of the kept tensors
        ``indices``; the others keep their values and state. ``False`` when the mean only
        became their starting point."""
        assert self.optimizer is not None
        kept = [k for k, _, _ in pairs]
        means = [m for _, _, m in pairs]
        if not self.ready and not indices <= self._started:
            copy_all(kept, means)
            self._started |= indices
            self.ready = len(self._started) == len(self.kept)
            return False
        grads = [g for _, g, _ in pairs]
        copy_all(grads, kept)  # the pseudo-gradient: where the last round left us minus the mean
        torch._foreach_sub_(grads, means)
        # A tensor without a gradient is skipped by torch's optimizers, its state untouched:
        # the other fragments' tensors wait for their own rounds.
        idle = [k for i, k in enumerate(self.kept) if i not in indices]
        held = [k.grad for k in idle]
        for k in idle:
            k.grad = None
        try:
            self.optimizer.step()
        finally:
            for k, grad in zip(idle, held):
                k.grad = grad
        return True

    @torch.no_grad()
    def step_from_mean(
        self, sources: Sequence[Tensor], indices: Sequence[int] | None = None
    ) -> None:
        """After a blocking round: ``sources`` hold the mean; they become the outer result.
        ``indices``: the sources the round averaged (one fragment; ``None``: all)."""
        self._restart_if_changed(sources)
        chosen = range(len(self.kept)) if indices is None else indices
        chosen = [i for i in chosen if i < len(self.kept)]
        with self._on_device(sources):
            pairs = [(self.kept[i], self.kept[i].grad, sources[i]) for i in chosen]
            if self._step(pairs, set(chosen)):  # type: ignore[arg-type]
                copy_all([sources[i] for i in chosen], [self.kept[i] for i in chosen])

    @torch.no_grad()
    def step_from_snapshot(
        self, sources: Sequence[Tensor], pieces: Sequence[Piece]
    ) -> dict[int, Tensor]:
        """After an overlapped round: ``pieces`` (of ``sources``, by index) carry the mean of
        the snapshots; each rank moves by (outer result - mean), keeping its own progress.

        Returns:
            The kept copy of each source the round averaged, by source index, for the
            averager's 16-bit anchor (empty when the mean only became the starting point).
        """
        self._restart_if_changed(sources)
        with self._on_device(sources):
            mine = [p for p in pieces if p.index < len(self.kept)]
            indices = {p.index for p in mine}
            kept = [Piece.slice_of(self.kept[p.index], p.offset, p.source) for p in mine]
            grads = [Piece.slice_of(self.kept[p.index].grad, p.offset, p.source) for p in mine]  # type: ignore[arg-type]
            if not self._step(list(zip(kept, grads, [p.mean for p in mine])), indices):
                return {}
            targets = [p.source for p in mine]
            torch._foreach_add_(targets, kept)
            torch._foreach_sub_(targets, [p.mean for p in mine])
        return {i: self.kept[i] for i in sorted(indices)}

    def state_dict(self) -> dict[str, Any]:
        """The kept copy (cloned), the optimizer's state and readiness, for a checkpoint."""
        assert self.optimizer is not None
        state: dict[str, Any] = {
            "params": [kept.detach().clone() for kept in self.kept],
            "state": self.optimizer.state_dict(),
            "ready": self.ready,
        }
        if not self.ready and self._started:
            state["started"] = sorted(self._started)
        return state

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
        self._started = set() if self.ready else set(state.get("started", []))
