"""The ``torch.optim`` plumbing of a wrapper that shares a base optimizer's objects."""

from __future__ import annotations

from collections import OrderedDict
from typing import Any, Callable

from torch.optim import Optimizer

__all__ = ["DelegatingOptimizer"]


class DelegatingOptimizer(Optimizer):
    """An :class:`~torch.optim.Optimizer` whose ``param_groups``, ``state`` and ``defaults``
    are those of ``base_optimizer``, so that schedulers, hooks and ``GradScaler`` act on the
    real thing, while step and state hooks registered on the wrapper fire around the
    wrapper's own ``step``, ``state_dict`` and ``load_state_dict``.

    ``Optimizer.__init__`` would build param groups of its own; this sets up only the hook
    registries that ``Optimizer``'s methods use.

    Args:
        base_optimizer (Optimizer): the optimizer whose objects are shared.

    Example::

        >>> class Wrapper(DelegatingOptimizer):
        ...     def step(self, closure=None):
        ...         return self.base_optimizer.step(closure)
        >>> StepLR(Wrapper(torch.optim.SGD(model.parameters(), lr=0.1)), 10)  # works
    """

    def __init__(self, base_optimizer: Optimizer) -> None:
        self._base = base_optimizer
        self._optimizer_step_pre_hooks: OrderedDict[int, Callable[..., Any]] = OrderedDict()
        self._optimizer_step_post_hooks: OrderedDict[int, Callable[..., Any]] = OrderedDict()
        self._optimizer_state_dict_pre_hooks: OrderedDict[int, Callable[..., Any]] = OrderedDict()
        self._optimizer_state_dict_post_hooks: OrderedDict[int, Callable[..., Any]] = OrderedDict()
        self._optimizer_load_state_dict_pre_hooks: OrderedDict[int, Callable[..., Any]] = (
            OrderedDict()
        )
        self._optimizer_load_state_dict_post_hooks: OrderedDict[int, Callable[..., Any]] = (
            OrderedDict()
        )
        self._patch_step_function()  # runs step pre/post hooks around the subclass's step()

    @property
    def param_groups(self) -> list[dict[str, Any]]:
        return self._base.param_groups

    @param_groups.setter
    def param_groups(self, value: list[dict[str, Any]]) -> None:
        self._base.param_groups = value

    @property
    def state(self) -> Any:
        return self._base.state

    @state.setter
    def state(self, value: Any) -> None:
        self._base.state = value

    @property
    def defaults(self) -> dict[str, Any]:
        return self._base.defaults

    @defaults.setter
    def defaults(self, value: dict[str, Any]) -> None:
        self._base.defaults = value

    @property
    def base_optimizer(self) -> Optimizer:
        """The wrapped optimizer that takes each local step."""
        return self._base

    def _run_state_dict_pre_hooks(self) -> None:
        for pre_hook in self._optimizer_state_dict_pre_hooks.values():
            pre_hook(self)

    def _run_state_dict_post_hooks(self, state_dict: dict[str, Any]) -> dict[str, Any]:
        for post_hook in self._optimizer_state_dict_post_hooks.values():
            result = post_hook(self, state_dict)
            if result is not None:
                state_dict = result
        return state_dict

    def _run_load_state_dict_pre_hooks(self, state_dict: dict[str, Any]) -> dict[str, Any]:
        for pre_hook in self._optimizer_load_state_dict_pre_hooks.values():
            result = pre_hook(self, state_dict)
            if result is not None:
                state_dict = result
        return state_dict

    def _run_load_state_dict_post_hooks(self) -> None:
        for post_hook in self._optimizer_load_state_dict_post_hooks.values():
            post_hook(self)
