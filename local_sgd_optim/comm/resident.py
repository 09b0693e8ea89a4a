"""Parameters that live in bucket storage, so that a round averages them where they are.

Opt-in, with ``parameters_as_bucket_view=True``. A round on tensors that each own their memory
copies them into a wire buffer, all-reduces it and copies the mean back: two passes over the
model's memory on top of the collective. Placing the averaged tensors back to back in one flat
tensor per (device, dtype) group, in the order the buckets cut them, makes each bucket a slice
of that flat tensor: the round is then one in-place all-reduce per bucket and one division.
DDP does the same for gradients (``gradient_as_bucket_view``, also off by default), FSDP for
parameters, and torch's ``average_parameters`` re-points parameters into its flat buffer
after every round.

What changes for the user, and how each change is kept safe:

- ``tensor.data`` of each placed tensor is a view of the flat storage. Tensors that share memory
  with anything else the model or the optimizer holds (tied weights, views, FSDP's shards) are
  left where they are.
- ``state_dict()`` of a module that owns a placed tensor returns a fresh copy of it (a state-dict
  hook; with ``keep_vars=False``), since savers that refuse or drop tensors sharing a storage
  (safetensors; Accelerate's ``clean_state_dict_for_safetensors`` keeps one name per storage)
  would lose weights. So a write into such a copy does not reach the model, as it would in
  plain PyTorch: the residence notices it (each copy's version counter is followed through an
  empty alias, which outlives the copy) and the next round raises, naming the option, unless
  the copy was loaded back with ``load_state_dict``.
- Pickling the module (``torch.save(model)``) while tensors are placed would store them as one
  shared storage and raises instead, naming the fix; ``copy.deepcopy`` works (it clones each
  tensor on its own).
- Re-planning (a parameter unfrozen, a buffer replaced) keeps what is placed where it is and
  places only the new tensors, so memory never holds the averaged tensors twice.
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

_OPTION = "parameters_as_bucket_view=True"


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


def _version_follower(tensor: Tensor) -> Tensor | None:
    """An empty tensor that shares ``tensor``'s version counter (``detach()`` shares it, and
    ``set_`` then drops the memory): it tells whether ``tensor`` was written in place, even
    after ``tensor`` itself is gone. ``None`` where this torch refuses ``set_`` on it."""
    follower = tensor.detach()
    try:
        with torch.no_grad():
            follower.set_(torch.empty(0, dtype=torch.uint8, device=tensor.device).untyped_storage())
    except RuntimeError:  # pragma: no cover - torch builds that forbid set_ on a detached view
        return None
    return follower


class _Handed:
    """A copy handed out by ``state_dict()``: where it came from, and how to tell a write."""

    __slots__ = ("copy", "follower", "name", "version")

    def __init__(self, copy: Tensor, follower: Tensor, name: str) -> None:
        self.copy = weakref.ref(copy)
        self.follower = follower
        self.version = follower._version
        self.name = name

    @property
    def written(self) -> bool:
        return self.follower._version != self.version


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
        # Each flat tensor with the tensors placed in it.
        self._homes: list[tuple[Tensor, list[Tensor]]] = []
        self._hooks: list[RemovableHandle] = []
        self._copies_for = 0  # id() of the state dict being built, and its copies so far
        self._copies: dict[tuple[Any, ...], tuple[weakref.ref[Tensor], int]] = {}
        self._handed: list[_Handed] = []
        self.update(tensors, held)

    @property
    def placed(self) -> list[Tensor]:
        """The tensors placed here that still live here."""
        return [t for _, placed in self._homes for t in placed if self.holds(t)]

    @property
    def flats(self) -> list[Tensor]:
        """The flat tensors the placed ones are views of."""
        return [flat for flat, _ in self._homes]

    def holds(self, tensor: Tensor) -> bool:
        """Whether ``tensor`` lives in this residence's storage (read live: ``share_memory()``
        moves a storage's memory and keeps the storage)."""
        return any(self._in(tensor, flat) for flat, _ in self._homes)

    def update(self, tensors: Sequence[Tensor], held: Iterable[Tensor]) -> None:
        """Place those of ``tensors`` that may move and are not placed yet; let go of flat
        tensors none of whose tensors live there any more (moved by ``model.to``, replaced).

        What is placed stays where it is: re-planning after a parameter was unfrozen or a
        buffer replaced allocates only the new tensors' bytes, never a second copy of all."""
        self._homes = [(f, [t for t in ts if self._in(t, f)]) for f, ts in self._homes]
        self._homes = [(f, ts) for f, ts in self._homes if ts]
        users: dict[int, int] = {}
        for t in {id(t): t for t in list(tensors) + list(held)}.values():
            if t.numel():
                ptr = t.untyped_storage().data_ptr()
                users[ptr] = users.get(ptr, 0) + 1
        for group in group_by_device_and_dtype(tensors):
            movable = [
                t
                for i, t in group
                if t is tensors[i]  # not the real view of a complex tensor
                and not self.holds(t)
                and _owns_its_memory(t)
                and users[t.untyped_storage().data_ptr()] == 1
            ]
            if movable:
                self._place(movable)

    @staticmethod
    def _in(tensor: Tensor, flat: Tensor) -> bool:
        return tensor.numel() > 0 and (
            tensor.untyped_storage().data_ptr() == flat.untyped_storage().data_ptr()
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
        self._homes.append((flat, list(tensors)))

    @torch.no_grad()
    def release(self) -> None:
        """Give every placed tensor that is still here memory of its own again (a copy), one
        flat tensor at a time, and remove the hooks. Idempotent."""
        while self._homes:
            flat, placed = self._homes.pop()
            for t in placed:
                if self._in(t, flat):
                    t.data = t.detach().clone()
        for handle in self._hooks:
            handle.remove()
        self._hooks = []

    # --- the module's state_dict ----------------------------------------------------------

    def protect_state_dict(self, model: nn.Module) -> None:
        """Make ``model``'s (and its submodules') ``state_dict()`` return copies of placed
        tensors, so that no saver sees several entries in one storage; note copies that come
        back through ``load_state_dict``; refuse to pickle modules that hold placed tensors."""
        for handle in self._hooks:
            handle.remove()
        self._hooks = []
        for module in model.modules():
            own = [
                name
                for name, t in list(module._parameters.items()) + list(module._buffers.items())
                if t is not None and self.holds(t)
            ]
            if own:
                self._hooks.append(
                    module._register_state_dict_hook(_CopyPlaced(self, own))  # type: ignore[no-untyped-call]
                )
                self._hooks.append(
                    module._register_load_state_dict_pre_hook(  # type: ignore[no-untyped-call]
                        _LoadPlaced(self, own), with_module=True
                    )
                )

    def copy_placed(
        self, module: nn.Module, names: list[str], state: dict[str, Any], prefix: str
    ) -> None:
        """Replace ``module``'s placed tensors ``names`` in ``state`` by fresh copies."""
        if id(state) != self._copies_for:  # a new state_dict() call
            self._copies_for, self._copies = id(state), {}
            self._handed = [h for h in self._handed if h.written or h.copy() is not None]
        for name in names:
            value = state.get(prefix + name)
            live = module._parameters.get(name, module._buffers.get(name))
            # keep_vars=True hands out the tensor objects themselves: leave those alone.
            if not isinstance(value, Tensor) or value is live or not self.holds(value):
                continue
            # A tensor reached under two names (a module registered twice, tied weights) gets
            # one copy within one call, so that savers still see the tie. A copy is reused
            # only while neither it nor the tensor was written: a later call may get the id()
            # of an earlier, freed state dict, and must not see that dict's edited copies.
            key = (value.data_ptr(), value.shape, value.stride(), value._version)
            cached = self._copies.get(key)
            copy = cached[0]() if cached is not None else None
            if copy is None or cached is None or copy._version != cached[1]:
                copy = value.clone()
                follower = _version_follower(copy)  # (its set_ counts as a write: first)
                if follower is not None:
                    self._handed.append(_Handed(copy, follower, prefix + name))
                self._copies[key] = (weakref.ref(copy), copy._version)
            state[prefix + name] = copy

    def note_loaded(self, state: dict[str, Any], keys: list[str]) -> None:
        """Copies handed out by ``state_dict()`` that come back through ``load_state_dict``
        under ``keys``: their edits reach the model, so they are no longer watched."""
        values = {id(state[k]) for k in keys if isinstance(state.get(k), Tensor)}
        self._handed = [h for h in self._handed if id(h.copy()) not in values]

    def check_writes(self) -> None:
        """Raise if a copy handed out by ``state_dict()`` was written in place and never loaded
        back: in plain PyTorch that write would have changed the model.

        Raises:
            RuntimeError: naming the tensors and the fix.
        """
        written = sorted({h.name for h in self._handed if h.written})
        # Keep watching only the copies that are still alive and unwritten.
        self._handed = [h for h in self._handed if not h.written and h.copy() is not None]
        if written:
            raise RuntimeError(
                f"a tensor of model.state_dict() was written in place ({', '.join(written)}), "
                f"which does not change the model under {_OPTION}: state_dict() returns "
                "copies of the tensors placed in bucket storage. Load the edited dict back "
                "with model.load_state_dict(...), write to the parameters themselves "
                "(with torch.no_grad(): model.weight.copy_(...)), or build the "
                "LocalSGDOptimizer with parameters_as_bucket_view=False (the default), where "
                "state_dict() shares the model's memory as in plain PyTorch"
            )


def _inert(kind: type[_ResidenceHook]) -> _ResidenceHook:
    return kind(None, [])


class _ResidenceHook:
    """A hook of :meth:`Residence.protect_state_dict` on one module.

    It holds its residence weakly. A deep copy of the module gets an inert hook (its tensors
    are cloned one by one, so nothing of the copy is placed); pickling the module while its
    tensors are placed raises, since the pickle would hold them as one shared storage.
    """

    def __init__(self, residence: Residence | None, names: list[str]) -> None:
        self._residence = None if residence is None else weakref.ref(residence)
        self._names = names

    def residence(self) -> Residence | None:
        return None if self._residence is None else self._residence()

    def __deepcopy__(self, memo: dict[int, Any]) -> _ResidenceHook:
        return _inert(type(self))

    def __reduce__(self) -> tuple[Any, ...]:
        residence = self.residence()
        if residence is not None and residence.placed:
            raise RuntimeError(
                f"this module's tensors live in LocalSGDOptimizer's bucket storage ({_OPTION}), "
                "and pickling it (torch.save(model), multiprocessing) would store them as one "
                "shared storage. Save model.state_dict() instead, call opt.close() first, or "
                "build the LocalSGDOptimizer with parameters_as_bucket_view=False (the default)"
            )
        return (_inert, (type(self),))


class _CopyPlaced(_ResidenceHook):
    """State-dict hook: placed tensors go into the state dict as copies."""

    def __call__(self, module: nn.Module, state: dict[str, Any], prefix: str, _meta: Any) -> None:
        residence = self.residence()
        if residence is not None:
            residence.copy_placed(module, self._names, state, prefix)


class _LoadPlaced(_ResidenceHook):
    """Load pre-hook: copies that come back through ``load_state_dict`` were not lost."""

    def __call__(self, module: nn.Module, state: dict[str, Any], prefix: str, *_: Any) -> None:
        residence = self.residence()
        if residence is not None:
            residence.note_loaded(state, [prefix + name for name in self._names])
