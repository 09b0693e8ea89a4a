"""Parameters that live in bucket storage, so that a round averages them where they are.

A round on tensors that each own their memory copies them into a wire buffer, all-reduces it and
copies the mean back: two passes over the model's memory on top of the collective. Placing the
averaged tensors back to back in one flat tensor per (device, dtype) group, in the order the
buckets cut them, makes each bucket a slice of that flat tensor: the round is then one in-place
all-reduce per bucket and one division. DDP does the same for gradients
(``gradient_as_bucket_view``), FSDP for parameters, and torch's ``average_parameters`` re-points
parameters into its flat buffer after every round.

Two things change for the user, and both are handled here:

- ``tensor.data`` of each placed tensor is a view of the flat storage. Tensors that share memory
  with anything else the model or the optimizer holds (tied weights, views, FSDP's shards) are
  left where they are.
- A module's ``state_dict()`` would hand out views of one storage, which savers that refuse or
  drop shared tensors (safetensors; Accelerate's ``clean_state_dict_for_safetensors`` keeps one
  name per storage and drops the rest) would mishandle. A state-dict hook on each module that
  owns a placed tensor puts a copy in the state dict instead (with ``keep_vars=False``).
"""

from __future__ import annotations

import weakref
from collections.abc import Iterable, Sequence
from typing import Any

import torch
from torch import Tensor, nn
from torch.utils.hooks import RemovableHandle

from local_sgd_optim.comm.buckets import group_by_device_and_dtype

__all__ = ["Residence"]


def _owns_its_memory(tensor: Tensor) -> bool:
    """A plain real tensor that is its whole storage: moving it cannot strand another view."""
    return bool(
        type(tensor) in (Tensor, nn.Parameter)
        and tensor.is_floating_point()
        and tensor.is_contiguous()
        and tensor.numel() > 0
        and tensor.storage_offset() == 0
        and tensor.untyped_storage().nbytes() == tensor.numel() * tensor.element_size()
    )


class Residence:
    """Flat storage per (device, dtype) group that the averaged tensors are moved into.

    Args:
        tensors (Sequence[Tensor]): the averaged tensors, in the order the averager gets them.
        held (Iterable[Tensor]): every tensor the model and the optimizer hold (frozen
            parameters, buffers that are not averaged, the averaged ones too): a tensor whose
            memory another of them shares stays where it is.

    Example::

        >>> residence = Residence(params, held=list(model.parameters()) + list(model.buffers()))
        >>> averager = BucketedAverager(params, None)  # its buckets are now slices in place
        >>> residence.release()  # every tensor back in memory of its own

    .. note::
        A reference taken to a parameter's old memory before construction
        (``w = model.weight.data``) no longer follows the parameter.
    """

    def __init__(self, tensors: Sequence[Tensor], held: Iterable[Tensor]) -> None:
        users: dict[int, int] = {}
        for t in {id(t): t for t in list(tensors) + list(held)}.values():
            if t.numel():
                ptr = t.untyped_storage().data_ptr()
                users[ptr] = users.get(ptr, 0) + 1
        self.placed: list[Tensor] = []
        self.flats: list[Tensor] = []
        for group in group_by_device_and_dtype(tensors):
            movable = [
                t
                for i, t in group
                if t is tensors[i]  # not the real view of a complex tensor
                and _owns_its_memory(t)
                and users[t.untyped_storage().data_ptr()] == 1
            ]
            if movable:
                self._place(movable)
        self._storages = {flat.untyped_storage().data_ptr() for flat in self.flats}
        self._hooks: list[RemovableHandle] = []
        self._copies_for = 0  # id() of the state dict being built, and its copies so far
        self._copies: weakref.WeakValueDictionary[tuple[Any, ...], Tensor] = (
            weakref.WeakValueDictionary()
        )

    @torch.no_grad()
    def _place(self, tensors: list[Tensor]) -> None:
        first = tensors[0]
        flat = torch.empty(sum(t.numel() for t in tensors), dtype=first.dtype, device=first.device)
        offset = 0
        for t in tensors:
            view = flat[offset : offset + t.numel()].view(t.shape)
            view.copy_(t)
            t.data = view
            offset += t.numel()
        self.flats.append(flat)
        self.placed.extend(tensors)

    def holds(self, tensor: Tensor) -> bool:
        """Whether ``tensor`` lives in this residence's storage."""
        return tensor.numel() > 0 and tensor.untyped_storage().data_ptr() in self._storages

    @torch.no_grad()
    def release(self) -> None:
        """Give every placed tensor that is still here memory of its own again (a copy), and
        remove the state-dict hooks. Idempotent."""
        for t in self.placed:
            if self.holds(t):
                t.data = t.detach().clone()
        self.placed, self.flats, self._storages = [], [], set()
        for handle in self._hooks:
            handle.remove()
        self._hooks = []

    def protect_state_dict(self, model: nn.Module) -> None:
        """Make ``model``'s (and its submodules') ``state_dict()`` return copies of placed
        tensors, so that no saver sees several entries in one storage."""
        for module in model.modules():
            own = [
                name
                for name, t in list(module._parameters.items()) + list(module._buffers.items())
                if t is not None and self.holds(t)
            ]
            if own:
                hook = _CopyPlaced(self, own)
                self._hooks.append(module._register_state_dict_hook(hook))  # type: ignore[no-untyped-call]

    def copy_placed(
        self, module: nn.Module, names: list[str], state: dict[str, Any], prefix: str
    ) -> None:
        """Replace ``module``'s placed tensors ``names`` in ``state`` by copies."""
        if id(state) != self._copies_for:  # a new state_dict() call
            self._copies_for, self._copies = id(state), weakref.WeakValueDictionary()
        for name in names:
            value = state.get(prefix + name)
            live = module._parameters.get(name, module._buffers.get(name))
            # keep_vars=True hands out the tensor objects themselves: leave those alone.
            if not isinstance(value, Tensor) or value is live or not self.holds(value):
                continue
            # A tensor reached under two names (a module registered twice, tied weights) gets
            # one copy, so that savers still see the tie; its version counter tells whether it
            # was written since that copy was made.
            key = (value.data_ptr(), value.shape, value.stride(), value._version)
            copy = self._copies.get(key)
            if copy is None:
                copy = self._copies[key] = value.clone()
            state[prefix + name] = copy


def _inert() -> _CopyPlaced:
    return _CopyPlaced(None, [])


class _CopyPlaced:
    """The state-dict hook of :meth:`Residence.protect_state_dict`.

    It holds its residence weakly, and a pickled or deep-copied model gets an inert one: the
    copy's tensors are not placed, and ``torch.save(model)`` must not fail on a local function.
    """

    def __init__(self, residence: Residence | None, names: list[str]) -> None:
        self._residence = None if residence is None else weakref.ref(residence)
        self._names = names

    def __call__(self, module: nn.Module, state: dict[str, Any], prefix: str, _meta: Any) -> None:
        residence = None if self._residence is None else self._residence()
        if residence is not None:
            residence.copy_placed(module, self._names, state, prefix)

    def __reduce__(self) -> tuple[Any, ...]:
        return (_inert, ())
