"""Checkpoints with ``torch.distributed.checkpoint`` (DCP) and its ``get_state_dict``.

``torch.distributed.checkpoint.state_dict.get_state_dict(model, opt)`` keeps only the
``"state"`` and ``"param_groups"`` of an optimizer's state dict; a top-level ``"local_sgd"``
entry would be dropped. So when DCP asks, :class:`~local_sgd_optim.LocalSGDOptimizer` puts its
entry in the first parameter group, the one place DCP carries both ways (``set_state_dict``
copies a saved group's keys back before calling ``load_state_dict``)::

    optim_sd["param_groups"][0]["local_sgd"] = {"rank_3": b"<this rank's entry, serialized>"}

Why one serialized value per rank: the entry's tensors (the 16-bit anchor, the outer
optimizer's kept copy, a round in flight) are each rank's own, of shapes that differ between
FSDP shards, and may not exist yet in the fresh wrapper whose state dict ``dcp.load`` fills.
DCP saves a value found under the same key on several ranks once (it "deduplicates" what it
takes to be replicated) and loads a tensor only into a tensor of the saved shape. Under a key
of its own rank, as one opaque value, each rank's entry is saved whole and comes back whole to
that rank. It is read back with ``torch.load(..., weights_only=True)``.

What the entry cannot change is DCP's deduplication of the *model's* parameters and the base
optimizer's state: between rounds every replica holds its own, under the same names. Save each
replica under a key of its own with :func:`per_replica`, or DCP keeps one replica's values for
all. Each rank's entry holds a fingerprint of its optimizer state and one of its averaged
parameters, which is how that mistake shows: :meth:`LocalSGDOptimizer.load_state_dict` refuses
(``ValueError``) a checkpoint in which this rank's optimizer state is not the one it saved, and
since ``set_state_dict`` loads the model *after* the optimizer, the first ``step()`` (or
:meth:`~LocalSGDOptimizer.average`, :meth:`~LocalSGDOptimizer.close`) compares the parameters
with the saved ones and raises a ``ValueError`` on every rank if a rank's differ (see
:class:`LoadedParameters`).

``get_state_dict`` and ``set_state_dict`` also "initialise" an optimizer whose state is empty by
calling its ``step()`` with zero gradients and a learning rate of 0
(``torch.distributed.checkpoint.state_dict._init_optim_state``). The wrapper recognises that call
and passes it to the base optimizer alone: no step is counted and no round runs.

Example::

    >>> from torch.distributed.checkpoint.state_dict import get_state_dict, set_state_dict
    >>> import torch.distributed.checkpoint as dcp
    >>> model_sd, optim_sd = get_state_dict(model, opt)
    >>> dcp.save(per_replica({"model": model_sd, "optim": optim_sd}), checkpoint_id=path)
    >>> # later, with a freshly built model and LocalSGDOptimizer:
    >>> model_sd, optim_sd = get_state_dict(model, opt)
    >>> dcp.load(per_replica({"model": model_sd, "optim": optim_sd}), checkpoint_id=path)
    >>> set_state_dict(model, opt, model_state_dict=model_sd, optim_state_dict=optim_sd)
"""

from __future__ import annotations

import hashlib
import io
import sys
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from types import FrameType
from typing import Any

import torch
import torch.distributed as dist
from torch import Tensor

from local_sgd_optim import state_entry
from local_sgd_optim.comm.header import HeaderView, RoundHeader
from local_sgd_optim.comm.tensors import integer_view
from local_sgd_optim.sharded import local_tensor
from local_sgd_optim.tracked import Tracked, outer_sources

__all__ = [
    "LoadedParameters",
    "from_dcp_layout",
    "initialising_state",
    "parameters_fingerprint",
    "per_replica",
    "requested_by_dcp",
    "to_dcp_layout",
]

_DCP_STATE_DICT = "torch.distributed.checkpoint.state_dict"
_INIT_STATE = "_init_optim_state"  # the function that calls step() with zero gradients
_RANK_PREFIX = "rank_"
_ENTRY = "entry"
_STATE_FINGERPRINT = "state_fingerprint"
_PARAMETERS_FINGERPRINT = "parameters_fingerprint"
_FRAMES = 5  # our method, the hook and scheduler wrappers around step(), DCP's caller


def _rank() -> int:
    return dist.get_rank() if dist.is_available() and dist.is_initialized() else 0


def _dcp_frame(name: str | None) -> bool:
    """Whether a function of DCP's ``state_dict`` module (named ``name``, if given) is among
    the few callers of the caller."""
    module = sys.modules.get(_DCP_STATE_DICT)
    if module is None:  # never imported: DCP cannot be the caller
        return False
    filename = module.__file__
    frame: FrameType | None = sys._getframe(2)
    for _ in range(_FRAMES):
        if frame is None:
            return False
        code = frame.f_code
        if code.co_filename == filename and (name is None or code.co_name == name):
            return True
        frame = frame.f_back
    return False


def initialising_state() -> bool:
    """Whether the calling ``step()`` is DCP's state initialisation: zero gradients, lr 0.

    Call it only from the wrapper's ``step()`` itself.
    """
    return _dcp_frame(_INIT_STATE)


def requested_by_dcp() -> bool:
    """Whether the calling ``state_dict()`` was called by DCP's ``get_state_dict`` (or
    ``get_optimizer_state_dict``), which keeps only ``"state"`` and ``"param_groups"``.

    Call it only from the wrapper's ``state_dict()`` itself.
    """
    return _dcp_frame(None)


def _tensors(value: object) -> Iterator[Tensor]:
    if isinstance(value, Tensor):
        yield local_tensor(value)  # a DTensor: this rank's shard
    elif isinstance(value, dict):
        for item in value.values():
            yield from _tensors(item)
    elif isinstance(value, (list, tuple)):
        for item in value:
            yield from _tensors(item)


def _fingerprint(optimizer_state: object) -> int:
    """The bits of every tensor of an optimizer's ``"state"`` (this rank's shards), summed as
    integers: equal for equal values in any order and on any device, and different, but for
    a 2**-64 chance, when DCP brought back another replica's state."""
    total = 0
    for tensor in _tensors(optimizer_state):
        if tensor.numel() == 0:
            continue
        flat = tensor.detach().reshape(-1)
        if flat.dtype == torch.bool:
            flat = flat.to(torch.uint8)
        total += int(integer_view(flat).sum(dtype=torch.int64).item())
    return total % 2**63


def parameters_fingerprint(entries: Sequence[Tracked]) -> int:
    """A 62-bit hash of the sums of the bits of each averaged parameter (this rank's shards),
    in order: equal for bitwise equal parameters on any device, and different, but for a
    vanishing chance, when DCP brought back another replica's. Buffers are left out: a
    forward in training mode changes them (BatchNorm statistics) before the first ``step()``
    looks. One read of each parameter, one device sync per device."""
    sums: dict[torch.device, list[Tensor]] = {}
    for tensor in outer_sources(entries):
        flat = tensor.detach().reshape(-1)
        if flat.is_complex():
            flat = torch.view_as_real(flat).reshape(-1)
        sums.setdefault(flat.device, []).append(integer_view(flat).sum(dtype=torch.int64))
    values = [v for group in sums.values() for v in torch.stack(group).cpu().tolist()]
    raw = b"".join(int(v).to_bytes(8, "little", signed=True) for v in values)
    return int.from_bytes(hashlib.blake2b(raw, digest_size=8).digest(), "little") >> 2


def _serialize(value: dict[str, Any]) -> bytes:
    buffer = io.BytesIO()
    torch.save(value, buffer)
    return buffer.getvalue()


def to_dcp_layout(state_dict: dict[str, Any], parameters: int) -> dict[str, Any]:
    """Move the ``"local_sgd"`` entry of a wrapper's state dict into its first parameter group,
    under this rank's key, serialized, with fingerprints of this rank's optimizer state and
    of its averaged parameters (``parameters``, from :func:`parameters_fingerprint` of the
    wrapper's tracked tensors as they are now).

    Example::

        >>> sd = to_dcp_layout(opt._snapshot(), parameters_fingerprint(opt._rounds.tracked()))
        >>> list(sd["param_groups"][0]["local_sgd"])
        ['rank_0']
    """
    state_dict = dict(state_dict)
    entry = state_dict.pop(state_entry.ENTRY_KEY)
    value = {
        _ENTRY: entry,
        _STATE_FINGERPRINT: _fingerprint(state_dict.get("state", {})),
        _PARAMETERS_FINGERPRINT: parameters,
    }
    groups = [dict(group) for group in state_dict["param_groups"]]
    groups[0][state_entry.ENTRY_KEY] = {f"{_RANK_PREFIX}{_rank()}": _serialize(value)}
    state_dict["param_groups"] = groups
    return state_dict


def from_dcp_layout(state_dict: dict[str, Any]) -> tuple[dict[str, Any], int | None]:
    """The state dict with this rank's entry back at the top level, if a parameter group holds
    entries (DCP's layout, see :func:`to_dcp_layout`), and the fingerprint of the parameters
    this rank saved; ``state_dict`` itself and ``None`` otherwise (``None`` too for an entry
    saved before parameters had a fingerprint).

    Raises:
        ValueError: the entries lack this rank's, or this rank's optimizer state is not the
            one it saved (DCP kept another replica's: save with :func:`per_replica`).
    """
    groups = state_dict.get("param_groups")
    if not isinstance(groups, list) or not any(
        isinstance(g, dict) and state_entry.ENTRY_KEY in g for g in groups
    ):
        return state_dict, None
    state_dict = dict(state_dict)
    entries: dict[str, Any] = {}
    stripped = []
    for group in groups:
        group = dict(group)
        found = group.pop(state_entry.ENTRY_KEY, None)
        if isinstance(found, dict):
            entries.update(found)
        stripped.append(group)
    state_dict["param_groups"] = stripped
    key = f"{_RANK_PREFIX}{_rank()}"
    blob = entries.get(key)
    if not isinstance(blob, bytes):
        raise ValueError(
            f"the state dict's 'local_sgd' entries are those of {sorted(entries)}, not of "
            f"{key}: resume on the ranks that saved the checkpoint"
        )
    value = torch.load(io.BytesIO(blob), weights_only=True)
    if not isinstance(value, dict) or _ENTRY not in value:
        raise ValueError(f"the state dict's 'local_sgd' entry of {key} is malformed")
    saved = value.get(_STATE_FINGERPRINT)
    if saved is not None and saved != _fingerprint(state_dict.get("state", {})):
        raise ValueError(
            "this rank's optimizer state in the checkpoint is not the one it saved: "
            "torch.distributed.checkpoint kept another rank's copy of tensors saved under the "
            "same names on every rank, but Local SGD replicas differ between rounds (and so "
            "do their models). Save each replica under a key of its own: dcp.save("
            "local_sgd_optim.checkpoint.dcp.per_replica({'model': model_sd, 'optim': "
            "optim_sd}), ...) and load the same way"
        )
    state_dict[state_entry.ENTRY_KEY] = value[_ENTRY]
    parameters = value.get(_PARAMETERS_FINGERPRINT)
    return state_dict, parameters if isinstance(parameters, int) else None


@dataclass(frozen=True, eq=False)
class LoadedParameters:
    """What the averaged parameters may be at the first ``step()`` after a DCP-layout load.

    ``set_state_dict`` loads the optimizer before the model, so the wrapper's
    ``load_state_dict`` cannot see the parameters the checkpoint gives this rank: it keeps
    this, and the first ``step()``, :meth:`~LocalSGDOptimizer.average` or
    :meth:`~LocalSGDOptimizer.close` after it calls :meth:`verify`. The parameters may be
    the ones this rank saved, or the ones in place when the optimizer was loaded (a model
    loaded before the optimizer, on purpose, is left alone); anything else is a model that
    DCP filled with another replica's values. The parameters are those averaged at the load:
    one unfrozen or added (``add_param_group``) before the first step is not compared.

    Args:
        saved (int): the fingerprint of the parameters this rank saved.
        entries (tuple of Tracked): the wrapper's tracked tensors at the load; their values
            are read when verified.
        at_load (int): the fingerprint of ``entries`` at the load.

    Example::

        >>> check = LoadedParameters.after_load(saved, opt._rounds.tracked())
        >>> check.verify(step=8, exchange=None, header=header)
    """

    saved: int
    entries: tuple[Tracked, ...]
    at_load: int

    @classmethod
    def after_load(
        cls, saved: int, entries: Sequence[Tracked], before: int | None = None
    ) -> LoadedParameters:
        """The check for parameters saved with fingerprint ``saved``, ``entries`` being the
        wrapper's tracked tensors as they are when the optimizer is loaded.

        ``before``: the parameters' fingerprint when DCP last asked for the state dict
        (``get_state_dict`` before ``dcp.load``). The model's state dict shares the model's
        memory, so ``dcp.load`` may already have written the checkpoint's (possibly another
        replica's) parameters into the model by the time the optimizer is loaded: what was
        in place on purpose is what was there before ``dcp.load``."""
        at_load = parameters_fingerprint(entries) if before is None else before
        return cls(saved, tuple(entries), at_load)

    def verify(
        self,
        step: int,
        exchange: Callable[[str, int, int], HeaderView] | None,
        header: RoundHeader,
    ) -> None:
        """Raise on every rank if a rank's parameters are neither the saved ones nor the
        ones in place at the load.

        Args:
            step (int): this rank's optimizer step, the same on every rank.
            exchange (Callable, optional): runs the header collective with the other ranks
                (kind, step, flag); ``None`` when the wrapper does not communicate.
            header (RoundHeader): judges the exchanged header.

        Raises:
            ValueError: a rank's parameters are not the ones it saved; raised on every rank.
            RoundError: another rank is doing something else (it did not load the
                checkpoint); raised on every rank.
        """
        wrong = parameters_fingerprint(self.entries) not in (self.saved, self.at_load)
        if exchange is None:
            if wrong:
                raise ValueError(_replaced_message([header.rank], header.rank))
            return
        # Every rank that loaded the checkpoint is here at the same step; the flag carries
        # this rank's verdict, so that all raise together instead of one raising while the
        # others wait in the next round's collective.
        view = exchange("first step()", step, int(wrong))
        header.check(
            view,
            step,
            "The optimizer's state was loaded from a torch.distributed.checkpoint "
            "checkpoint on some ranks only: load it on every rank",
        )
        ranks = [r for r, flag in enumerate(view.flags) if flag]
        if ranks:
            raise ValueError(_replaced_message(ranks, header.rank))


def _replaced_message(ranks: list[int], rank: int) -> str:
    names = ", ".join(map(str, ranks))
    if rank in ranks:
        what = (
            "the checkpoint's model parameters are not the ones this rank saved "
            f"(rank(s) {names} of the process group)"
        )
    else:
        what = f"the checkpoint's model parameters on rank(s) {names} are not the ones they saved"
    return (
        f"{what}: torch.distributed.checkpoint kept one rank's copy of tensors saved under "
        "the same names on every rank, but Local SGD replicas differ between rounds. Nothing "
        "was stepped or averaged. Save each replica under a key of its own and load the same "
        "way: dcp.save(local_sgd_optim.checkpoint.dcp.per_replica({'model': model_sd, "
        "'optim': optim_sd}, process_group), ...), process_group being the one given to "
        "LocalSGDOptimizer. To train on other weights on purpose, load them into the model "
        "before the optimizer's state"
    )


def per_replica(
    state: dict[str, Any], process_group: dist.ProcessGroup | None = None
) -> dict[str, Any]:
    """``state`` under a key naming this rank's replica, for ``dcp.save`` and ``dcp.load``.

    Between averaging rounds each replica's parameters and optimizer state are its own, yet
    they carry the same names on every replica: under one key DCP would save one replica's
    values for all. Inside a replica (the FSDP shards of one copy of the model), DCP still
    saves each shard once. Loading the same way gives every replica its own values back.

    ``state`` may hold ``Stateful`` objects at any depth of its dicts (the tutorial's
    ``AppState`` under a key): DCP itself calls ``state_dict()``/``load_state_dict()`` only on
    the top level of what it is given, and would otherwise pickle such an object whole (model
    and optimizer as Python objects) instead of saving its tensors, so they are resolved here.

    Args:
        state (dict): what to save or load, e.g. ``{"model": model_sd, "optim": optim_sd}`` or
            ``{"app": AppState(model, optimizer)}``; ``dcp.load`` fills it in place (and
            calls each ``Stateful``'s ``load_state_dict``).
        process_group (ProcessGroup, optional): the ``process_group`` given to
            :class:`~local_sgd_optim.LocalSGDOptimizer`, whose ranks are the replicas
            (default: the world; for FSDP2, ``mesh["replicate"].get_group()``).

    Returns:
        ``{"replica_<i>": state}``, ``i`` being this rank's rank in ``process_group``.

    Example::

        >>> dcp.save(per_replica({"model": model_sd, "optim": optim_sd}), checkpoint_id=path)
    """
    if not isinstance(state, dict):
        raise TypeError(f"state must be a dict, got {type(state).__name__}")
    replica = dist.get_rank(process_group) if dist.is_initialized() else 0
    if replica < 0:
        raise ValueError(
            "this rank is not in process_group; pass the process_group given to LocalSGDOptimizer"
        )
    held: dict[str, Any] | _Replica = _Replica(state) if _has_stateful(state) else state
    return {f"replica_{replica}": held}


def _is_stateful(value: object) -> bool:
    return callable(getattr(value, "state_dict", None)) and callable(
        getattr(value, "load_state_dict", None)
    )


def _has_stateful(value: object) -> bool:
    if _is_stateful(value):
        return True
    return isinstance(value, dict) and any(_has_stateful(v) for v in value.values())


class _Replica:
    """A replica's ``state`` as one ``Stateful`` for DCP: nested ``Stateful`` objects become
    their state dicts on save, and receive what was loaded on load."""

    def __init__(self, state: dict[str, Any]) -> None:
        self._state = state

    def state_dict(self) -> dict[str, Any]:
        return _resolved(self._state)  # type: ignore[no-any-return]

    def load_state_dict(self, loaded: dict[str, Any]) -> None:
        _give_back(self._state, loaded)


def _resolved(value: Any) -> Any:
    if _is_stateful(value):
        return value.state_dict()
    if isinstance(value, dict) and _has_stateful(value):
        return {k: _resolved(v) for k, v in value.items()}
    return value


def _give_back(state: dict[str, Any], loaded: dict[str, Any]) -> None:
    for key, value in state.items():
        if key not in loaded:
            continue
        if _is_stateful(value):
            value.load_state_dict(loaded[key])
        elif isinstance(value, dict) and _has_stateful(value):
            _give_back(value, loaded[key])
        else:
            state[key] = loaded[key]  # plain values: dcp.load filled containers in place
