"""Checkpoints for Local SGD: one file per rank, written atomically, verified when read.

Between averaging rounds every rank holds its own parameters and optimizer state, so every rank
saves its own file. A checkpoint is a directory ``step-00000120/`` under a root of your choice::

    checkpoints/
        step-00000100/  rank0.pt  rank1.pt  COMPLETE
        step-00000120/  rank0.pt  rank1.pt  COMPLETE

Each ``rankN.pt`` is written to a temporary file in the same directory, flushed, synced and
renamed into place, so a crash never leaves a half-written ``rankN.pt``. Rank 0 writes
``COMPLETE`` (JSON: step, world size, each file's length and SHA-256) only once every rank's file
is on disk, and older complete checkpoints are deleted only after that. :func:`latest` skips
checkpoints without the marker or with a file of the wrong length; :func:`load` checks the
SHA-256 and reads with ``torch.load(..., weights_only=True)``, so a checkpoint from elsewhere
cannot run code. :func:`save` refuses anything that such loading would refuse, before writing.

The layout of ``state`` this module expects (other keys are saved and loaded as they are)::

    {
        "model": model.state_dict(),
        "optimizer": opt.state_dict(),  # a LocalSGDOptimizer's, with its "local_sgd" entry
        "rng": checkpoint.rng_state(),  # optional: per-rank random states
        ...                             # anything else made of tensors and plain containers
    }

Resuming on a different number of ranks is possible when asked for (``load(..., reshard=True)``
or :func:`reshard_state_dicts`); the rule is documented there.

The directory must be on a file system that every rank sees (on several nodes, a shared one).
"""

from __future__ import annotations

import contextlib
import copy
import hashlib
import json
import os
import pickle
import random
import re
import shutil
import sys
import warnings
from collections import OrderedDict
from collections.abc import Iterable, Iterator, Sequence
from pathlib import Path
from typing import IO, Any, Union

import torch
import torch.distributed as dist
from torch import Tensor

__all__ = [
    "latest",
    "load",
    "reshard_state_dicts",
    "rng_state",
    "save",
    "set_rng_state",
]

PathLike = Union[str, "os.PathLike[str]"]

COMPLETE = "COMPLETE"
_FORMAT = 1
_STEP_DIR = re.compile(r"^step-(\d{8,})$")
_CHUNK = 1 << 20

# What torch.load(weights_only=True) accepts, on every torch this package supports.
_PLAIN_LEAVES = (str, bytes, bytearray, int, float, bool, complex, type(None))
_TORCH_LEAVES = (torch.dtype, torch.device, torch.layout)


# --- writing ------------------------------------------------------------------------------


class _HashingWriter:
    """A file that hashes what is written to it, so the bytes are not read back or held."""

    def __init__(self, file: IO[bytes]) -> None:
        self._file = file
        self.sha256 = hashlib.sha256()
        self.bytes = 0

    def write(self, data: bytes) -> int:
        self.sha256.update(data)
        self.bytes += len(data)
        return self._file.write(data)

    def flush(self) -> None:
        self._file.flush()


def _fsync_directory(directory: Path) -> None:
    # The rename is durable only once the directory entry is; not every platform allows it.
    with contextlib.suppress(OSError):
        fd = os.open(directory, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)


def _write_atomically(path: Path, obj: Any) -> dict[str, Any]:
    """``torch.save(obj)`` to ``path`` via a synced temporary file; return its length and digest."""
    tmp = path.with_name(f".{path.name}.tmp{os.getpid()}")
    try:
        with open(tmp, "wb") as f:
            writer = _HashingWriter(f)
            if isinstance(obj, bytes):
                writer.write(obj)
            else:
                torch.save(obj, writer)  # type: ignore[arg-type]
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(OSError):
            tmp.unlink()
        raise
    _fsync_directory(path.parent)
    return {"bytes": writer.bytes, "sha256": writer.sha256.hexdigest()}


def _check_loadable(obj: object, where: str) -> None:
    """Raise a TypeError naming the first thing ``torch.load(weights_only=True)`` would refuse."""
    kind = type(obj)
    if isinstance(obj, Tensor) or kind in _PLAIN_LEAVES or kind in _TORCH_LEAVES:
        return
    if kind in (dict, OrderedDict):
        for key, value in obj.items():  # type: ignore[attr-defined]
            if type(key) not in _PLAIN_LEAVES:
                raise TypeError(
                    f"{where} has a key of type {type(key).__name__}; checkpoints are read with "
                    "torch.load(weights_only=True), which accepts only tensors and plain "
                    "containers: use str or int keys"
                )
            _check_loadable(value, f"{where}[{key!r}]")
        return
    if isinstance(obj, (list, tuple)) and kind in (list, tuple, torch.Size):
        for i, value in enumerate(obj):
            _check_loadable(value, f"{where}[{i}]")
        return
    hint = " (use vars(args))" if kind.__name__ == "Namespace" else ""
    raise TypeError(
        f"{where} is a {kind.__module__}.{kind.__qualname__}; checkpoints are read with "
        "torch.load(weights_only=True), which refuses anything but tensors and plain containers "
        f"(dict, list, tuple, str, numbers, None) so that a checkpoint cannot run code. Store it "
        f"as those{hint}; random states: checkpoint.rng_state()"
    )


def _step_directory(root: Path, step: int) -> Path:
    return root / f"step-{step:08d}"


def _rank_file(rank: int) -> str:
    return f"rank{rank}.pt"


def _rank_and_world(rank: int | None, world_size: int | None) -> tuple[int, int]:
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
    world = 1 if world_size is None else _check_int("world_size", world_size, minimum=1)
    me = 0 if rank is None else _check_int("rank", rank, minimum=0)
    if me >= world:
        raise ValueError(f"rank must be smaller than world_size, got rank={me}, world_size={world}")
    return me, world


def _check_int(name: str, value: object, minimum: int) -> int:
    if isinstance(value, int) and not isinstance(value, bool) and value >= minimum:
        return value
    raise ValueError(f"{name} must be an integer >= {minimum}, got {value!r}")


def _gather(item: Any, world_size: int) -> list[Any]:
    """Every rank's ``item`` (a collective when torch.distributed is initialised)."""
    if dist.is_available() and dist.is_initialized() and world_size > 1:
        everyone: list[Any] = [None] * world_size
        dist.all_gather_object(everyone, item)
        return everyone
    return [item]


def save(
    directory: PathLike,
    step: int,
    state: dict[str, Any],
    *,
    rank: int | None = None,
    world_size: int | None = None,
    keep: int | None = 2,
) -> Path:
    """Save this rank's ``state`` as part of checkpoint ``step`` under ``directory``.

    Every rank writes ``directory/step-{step:08d}/rank{rank}.pt`` atomically (a temporary file in
    the same directory, flushed, synced and renamed). Once every rank's file is on disk, rank 0
    writes the ``COMPLETE`` marker with each file's length and SHA-256, then deletes the oldest
    complete checkpoints beyond ``keep`` (and any incomplete ones older than this). When this
    returns, on any rank, the checkpoint is complete.

    With torch.distributed initialised, ``rank`` and ``world_size`` come from the default process
    group, and a failure on one rank (a full disk, an unsaveable object) raises on every rank.
    Without it, each call saves one rank's file (``rank``, default 0, of ``world_size``, default
    1), and the call that completes the set writes the marker.

    Args:
        directory (str or PathLike): the root that holds the ``step-*`` directories; created if
            missing. Every rank must see the same one.
        step (int): the training step this checkpoint resumes from (names the directory).
        state (dict): this rank's state, made of tensors and plain containers only (see the
            module docstring for the layout :func:`load` with ``reshard`` expects).
        rank (int, optional): this rank, without a process group (default: 0).
        world_size (int, optional): the number of ranks, without a process group (default: 1).
        keep (int, optional): complete checkpoints to keep, this one included; ``None`` keeps
            all (default: 2).

    Returns:
        Path: the checkpoint's directory.

    Raises:
        TypeError: ``state`` is not a dict or holds something that
            ``torch.load(weights_only=True)`` would refuse (the message names it).
        ValueError: ``step``, ``keep``, ``rank`` or ``world_size`` is invalid.
        RuntimeError: another rank failed to save its file (the message names it).

    Example::

        >>> if opt.optimizer_steps % 500 == 0:
        ...     checkpoint.save("ckpt", opt.optimizer_steps, {
        ...         "model": model.state_dict(),
        ...         "optimizer": opt.state_dict(),
        ...         "rng": checkpoint.rng_state(),
        ...     })

    .. warning::
        With torch.distributed initialised, every rank must call this at the same step. With
        NCCL, call ``torch.cuda.set_device(local_rank)`` first: the ranks confirm their files
        with object collectives, which NCCL stages on the current CUDA device.
    """
    root = Path(directory)
    step = _check_int("step", step, minimum=0)
    if keep is not None:
        keep = _check_int("keep", keep, minimum=1)
    rank, world_size = _rank_and_world(rank, world_size)
    target = _step_directory(root, step)
    name = _rank_file(rank)

    failure: BaseException | None = None
    record: dict[str, Any] | None = None
    try:
        if not isinstance(state, dict):
            raise TypeError(f"state must be a dict, got {type(state).__name__}")
        _check_loadable(state, "state")
        target.mkdir(parents=True, exist_ok=True)
        for stale in target.glob(f".{name}.tmp*"):  # left by an attempt that was killed
            stale.unlink(missing_ok=True)
        if rank == 0:
            # A marker left from an earlier attempt at this step describes other files.
            with contextlib.suppress(FileNotFoundError):
                (target / COMPLETE).unlink()
        record = _write_atomically(target / name, state)
    except Exception as problem:
        failure = problem
    summary = None if failure is None else f"{type(failure).__name__}: {failure}"
    everyone = _gather((summary, record), world_size)
    if failure is not None:
        raise failure
    failed = [f"rank {r} ({e})" for r, (e, _) in enumerate(everyone) if e is not None]
    if failed:
        raise RuntimeError(
            f"checkpoint {target} was not saved: {'; '.join(failed)} failed to write its file. "
            "The previous complete checkpoint is still there"
        )

    if len(everyone) == world_size:
        files = {_rank_file(r): rec for r, (_, rec) in enumerate(everyone)}
        writer = rank == 0
    else:  # no process group: whichever call finds every file on disk completes the set
        files = _files_on_disk(target, world_size)
        files[name] = record
        writer = len(files) == world_size
    if writer:
        error = None
        try:
            marker = {"format": _FORMAT, "step": step, "world_size": world_size, "files": files}
            _write_atomically(target / COMPLETE, (json.dumps(marker, indent=1) + "\n").encode())
            if keep is not None:
                _prune(root, step, keep)
        except Exception as problem:
            error = f"{type(problem).__name__}: {problem}"
            if len(everyone) == 1:
                raise
    else:
        error = None
    if len(everyone) > 1:
        outcome = [error]
        dist.broadcast_object_list(outcome, src=0)
        if outcome[0] is not None:
            raise RuntimeError(f"rank 0 could not complete checkpoint {target}: {outcome[0]}")
    return target


def _files_on_disk(target: Path, world_size: int) -> dict[str, Any]:
    files: dict[str, Any] = {}
    for r in range(world_size):
        path = target / _rank_file(r)
        if path.exists():
            length, digest = _digest(path)
            files[path.name] = {"bytes": length, "sha256": digest}
    return files


def _prune(root: Path, step: int, keep: int) -> None:
    """Delete complete checkpoints beyond the newest ``keep``; incomplete ones before ``step``."""
    complete = 0
    for other_step, path in _step_directories(root):
        if other_step > step:
            continue
        if (path / COMPLETE).exists():
            complete += 1
            if complete > keep:
                shutil.rmtree(path, ignore_errors=True)
        elif other_step < step:
            shutil.rmtree(path, ignore_errors=True)


# --- finding and reading ------------------------------------------------------------------


def _step_directories(root: Path) -> list[tuple[int, Path]]:
    """``(step, path)`` of the ``step-*`` directories under ``root``, newest first."""
    if not root.is_dir():
        return []
    found = []
    for path in root.iterdir():
        match = _STEP_DIR.match(path.name)
        if match and path.is_dir():
            found.append((int(match.group(1)), path))
    return sorted(found, reverse=True)


def _read_marker(path: Path) -> dict[str, Any]:
    """The checkpoint's ``COMPLETE`` marker; a ValueError saying what is wrong otherwise."""
    marker_path = path / COMPLETE
    if not marker_path.exists():
        raise ValueError(
            f"{path} is incomplete: it has no {COMPLETE} marker (the run stopped while writing it)"
        )
    try:
        marker = json.loads(marker_path.read_text())
        world_size = marker["world_size"]
        files = marker["files"]
        if not (
            isinstance(world_size, int)
            and world_size >= 1
            and isinstance(files, dict)
            and all(
                isinstance(files.get(_rank_file(r)), dict)
                and isinstance(files[_rank_file(r)].get("bytes"), int)
                and isinstance(files[_rank_file(r)].get("sha256"), str)
                for r in range(world_size)
            )
        ):
            raise ValueError("malformed")
    except (ValueError, KeyError, TypeError):
        raise ValueError(f"{marker_path} is unreadable or malformed") from None
    return marker  # type: ignore[no-any-return]


def _problem(path: Path) -> str | None:
    """Why the checkpoint in ``path`` cannot be used, judged cheaply (lengths, no hashing)."""
    try:
        marker = _read_marker(path)
    except ValueError as problem:
        return str(problem)
    for r in range(marker["world_size"]):
        file = path / _rank_file(r)
        expected = marker["files"][file.name]["bytes"]
        if not file.exists():
            return f"{file} is missing"
        if file.stat().st_size != expected:
            return (
                f"{file} is truncated or corrupted ({file.stat().st_size} bytes, its {COMPLETE} "
                f"marker records {expected})"
            )
    return None


def latest(directory: PathLike) -> tuple[int, Path] | None:
    """The newest complete checkpoint under ``directory``, as ``(step, path)``, or ``None``.

    Checkpoints without a ``COMPLETE`` marker (the run stopped while writing them), with a
    missing file or one whose length differs from the marker's (truncated) are skipped, with a
    warning naming them. The SHA-256 is checked by :func:`load`.

    Args:
        directory (str or PathLike): the root passed to :func:`save`.

    Example::

        >>> found = checkpoint.latest("ckpt")
        >>> start = 0 if found is None else found[0]
    """
    for step, path in _step_directories(Path(directory)):
        problem = _problem(path)
        if problem is None:
            return step, path
        warnings.warn(f"skipping an unusable checkpoint: {problem}", stacklevel=2)
    return None


def _digest(path: Path) -> tuple[int, str]:
    sha256 = hashlib.sha256()
    length = 0
    with open(path, "rb") as f:
        while chunk := f.read(_CHUNK):
            sha256.update(chunk)
            length += len(chunk)
    return length, sha256.hexdigest()


def _previous(path: Path) -> str:
    """A sentence naming the newest complete checkpoint older than ``path``, if there is one."""
    match = _STEP_DIR.match(path.name)
    step = int(match.group(1)) if match else sys.maxsize
    for other_step, other in _step_directories(path.parent):
        if other_step < step and _problem(other) is None:
            return f"The previous checkpoint {other} is still there: load it instead."
    return f"No earlier complete checkpoint is left in {path.parent}."


def _read_verified(path: Path, marker: dict[str, Any], rank: int, map_location: Any) -> Any:
    file = path / _rank_file(rank)
    expected = marker["files"][file.name]
    if not file.exists():
        raise ValueError(f"checkpoint file {file} is missing. {_previous(path)}")
    length, digest = _digest(file)
    if (length, digest) != (expected["bytes"], expected["sha256"]):
        raise ValueError(
            f"checkpoint file {file} is truncated or corrupted: {length} bytes with SHA-256 "
            f"{digest[:16]}..., but its {COMPLETE} marker records {expected['bytes']} bytes with "
            f"SHA-256 {expected['sha256'][:16]}.... {_previous(path)}"
        )
    try:
        state = torch.load(file, map_location=map_location, weights_only=True)
    except pickle.UnpicklingError as problem:
        raise ValueError(
            f"checkpoint file {file} holds objects other than tensors and plain containers, "
            "which torch.load(weights_only=True) refuses: loading them could run code. "
            f"({problem})"
        ) from problem
    if not isinstance(state, dict):
        raise ValueError(f"checkpoint file {file} holds a {type(state).__name__}, not a dict")
    return state


def _resolve(directory: Path) -> Path:
    """The checkpoint in ``directory``: itself if it is a ``step-*`` one, else the newest there."""
    if _STEP_DIR.match(directory.name) or (directory / COMPLETE).exists():
        return directory
    found = latest(directory)
    if found is None:
        raise FileNotFoundError(f"no complete checkpoint under {directory}")
    return found[1]


def load(
    directory: PathLike,
    *,
    rank: int | None = None,
    world_size: int | None = None,
    map_location: Any = "cpu",
    reshard: bool = False,
) -> dict[str, Any]:
    """Read this rank's state from a checkpoint written by :func:`save`.

    The file's length and SHA-256 are checked against the ``COMPLETE`` marker, and it is read
    with ``torch.load(..., weights_only=True)``.

    A checkpoint written by another number of ranks cannot be continued exactly: between rounds
    each rank's model and optimizer state differ. That is a ``ValueError`` unless ``reshard``
    asks for the averaged state (see :func:`reshard_state_dicts` for the rule); every rank then
    reads every old rank's file and gets the same state.

    Args:
        directory (str or PathLike): a checkpoint (``.../step-00000120``) or the root passed to
            :func:`save`, in which case the newest complete checkpoint there is read.
        rank (int, optional): this rank, without a process group (default: 0).
        world_size (int, optional): the number of ranks, without a process group (default: 1).
        map_location: as for :func:`torch.load` (default: ``"cpu"``).
        reshard (bool): when the world size differs from the checkpoint's, return the averaged
            state instead of raising (default: ``False``).

    Returns:
        dict: the state this rank saved (or the resharded one).

    Raises:
        FileNotFoundError: ``directory`` holds no complete checkpoint.
        ValueError: the checkpoint is incomplete, a file is truncated or corrupted (the message
            names it and the previous checkpoint still there), a file holds something other
            than tensors and plain containers, or the world size differs and ``reshard`` is
            ``False``.

    Example::

        >>> model = Net()
        >>> opt = LocalSGDOptimizer(torch.optim.SGD(model.parameters(), lr=0.1), model, period=8)
        >>> if checkpoint.latest("ckpt") is not None:
        ...     state = checkpoint.load("ckpt")
        ...     model.load_state_dict(state["model"])
        ...     opt.load_state_dict(state["optimizer"])
        ...     checkpoint.set_rng_state(state["rng"])
    """
    rank, world_size = _rank_and_world(rank, world_size)
    path = _resolve(Path(directory))
    marker = _read_marker(path)
    old_world = marker["world_size"]
    if old_world == world_size:
        return _read_verified(path, marker, rank, map_location)  # type: ignore[no-any-return]
    if not reshard:
        raise ValueError(
            f"checkpoint {path} was written by {old_world} rank(s) but the world size is now "
            f"{world_size}. Between averaging rounds each rank's model and optimizer state "
            f"differ, so they cannot be continued exactly on another number of ranks: relaunch "
            f"with {old_world} rank(s), or pass reshard=True to load() (or use "
            "local_sgd_optim.checkpoint.reshard_state_dicts) to continue from their average"
        )
    states = (_read_verified(path, marker, r, map_location) for r in range(old_world))
    return _merge(states, world_size)


# --- resharding ---------------------------------------------------------------------------


def _averaged_leaves(
    obj: object, path: tuple[Any, ...] = ()
) -> Iterator[tuple[tuple[Any, ...], Tensor]]:
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


def _rebuild(obj: Any, replace: dict[tuple[Any, ...], Tensor], path: tuple[Any, ...] = ()) -> Any:
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


def _describe(path: tuple[Any, ...]) -> str:
    return "".join(f"[{key!r}]" for key in path)


def _merge(states: Iterable[dict[str, Any]], new_world_size: int) -> dict[str, Any]:
    """The resharded state (see :func:`reshard_state_dicts`), reading ``states`` one at a time."""
    first: dict[str, Any] | None = None
    sums: dict[tuple[Any, ...], Tensor] = {}
    dtypes: dict[tuple[Any, ...], torch.dtype] = {}
    steps: list[object] = []
    count = 0
    for r, state in enumerate(states):
        if not isinstance(state, dict):
            raise TypeError(f"old rank {r}'s state must be a dict, got {type(state).__name__}")
        if "model" not in state:
            raise ValueError(
                f"old rank {r}'s state has no 'model' entry; resharding averages "
                "state['model'] (a model.state_dict()) and state['optimizer']"
            )
        optimizer = state.get("optimizer")
        ours = optimizer.get("local_sgd") if isinstance(optimizer, dict) else None
        steps.append(ours.get("optimizer_steps") if isinstance(ours, dict) else None)
        leaves = dict(_averaged_leaves(state))
        if first is None:
            first = state
            for path, t in leaves.items():
                wide = torch.promote_types(t.dtype, torch.float64)
                sums[path] = t.detach().to(wide, copy=True)
                dtypes[path] = t.dtype
        else:
            for path, total in sums.items():
                other = leaves.get(path)
                if other is None or other.shape != total.shape:
                    got = "nothing" if other is None else f"shape {tuple(other.shape)}"
                    raise ValueError(
                        f"old rank {r}'s state has {got} at {_describe(path)}, rank 0's has "
                        f"shape {tuple(total.shape)}: the states are not from one run"
                    )
                total.add_(other.detach().to(total.device, total.dtype))
        count += 1
    if first is None:
        raise ValueError("need the state of at least one old rank to reshard")
    if len(set(map(repr, steps))) > 1:
        raise ValueError(
            "the old ranks' states are at different optimizer steps "
            f"({', '.join(f'rank {r}: {s}' for r, s in enumerate(steps))}); reshard the states "
            "of one checkpoint"
        )
    means = {path: (total / count).to(dtypes[path]) for path, total in sums.items()}
    merged: dict[str, Any] = _rebuild(first, means)
    optimizer = merged.get("optimizer")
    if isinstance(optimizer, dict) and isinstance(optimizer.get("local_sgd"), dict):
        ours = dict(optimizer["local_sgd"])
        # The parameters are already averaged: a round in flight is part of that mean, and the
        # next round re-establishes the full-precision copy for 16-bit deltas.
        ours.update(world_size=new_world_size, anchor=[], pending=None)
        optimizer["local_sgd"] = ours
    if "rng" in merged:
        merged["rng"] = None  # a rank's random stream cannot be mapped onto other ranks
    return merged


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
      agree on them), ``"world_size"`` becomes ``new_world_size``, ``"anchor"`` becomes ``[]``
      and ``"pending"`` becomes ``None``: the parameters are already averaged (a round in
      flight is part of that mean), and the next round re-establishes the full-precision copy
      used for 16-bit deltas.
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
    new_world_size = _check_int("new_world_size", new_world_size, minimum=1)
    merged = _merge(old_states, new_world_size)
    return [merged] + [_rebuild(merged, {}) for _ in range(new_world_size - 1)]


# --- random states ------------------------------------------------------------------------


def rng_state() -> dict[str, Any]:
    """This process's random states as tensors and plain containers.

    ``torch.load(weights_only=True)`` refuses NumPy's state (it holds an array), and Python's
    ``random.getstate()`` is 625 integers; this stores each as tensors, ints and floats:
    torch's CPU generator, the CUDA generators (when CUDA has been initialised), Python's
    ``random`` and NumPy's global generator (when NumPy has been imported).

    Example::

        >>> state = {"model": model.state_dict(), "rng": checkpoint.rng_state()}
        >>> checkpoint.set_rng_state(state["rng"])
    """
    version, internal, gauss_next = random.getstate()
    state: dict[str, Any] = {
        "torch": torch.get_rng_state(),
        "python": {
            "version": version,
            "internal": torch.tensor(internal, dtype=torch.int64),
            "gauss_next": gauss_next,
        },
    }
    if torch.cuda.is_available() and torch.cuda.is_initialized():  # type: ignore[no-untyped-call]
        state["cuda"] = torch.cuda.get_rng_state_all()
    numpy = sys.modules.get("numpy")
    if numpy is not None:  # not imported: nothing in this process has used its generator
        kind, keys, pos, has_gauss, cached_gaussian = numpy.random.get_state(legacy=True)
        state["numpy"] = {
            "kind": str(kind),
            "keys": torch.from_numpy(keys.astype(numpy.int64)),
            "pos": int(pos),
            "has_gauss": int(has_gauss),
            "cached_gaussian": float(cached_gaussian),
        }
    return state


def set_rng_state(state: dict[str, Any]) -> None:
    """Restore the random states saved by :func:`rng_state`.

    Args:
        state (dict): what :func:`rng_state` returned (possibly after a save and load).

    Raises:
        ValueError: ``state`` is not such a dict.

    Example::

        >>> saved = checkpoint.rng_state()
        >>> a = torch.rand(3)
        >>> checkpoint.set_rng_state(saved)
        >>> torch.equal(a, torch.rand(3))
        True
    """
    if not isinstance(state, dict) or "torch" not in state or "python" not in state:
        raise ValueError(
            "set_rng_state expects what checkpoint.rng_state() returned, a dict with 'torch' "
            f"and 'python' entries, got {type(state).__name__}"
        )
    torch.set_rng_state(state["torch"])
    python = state["python"]
    internal = tuple(int(x) for x in python["internal"].tolist())
    random.setstate((python["version"], internal, python["gauss_next"]))
    cuda = state.get("cuda")
    if cuda is not None and torch.cuda.is_available():
        if len(cuda) == torch.cuda.device_count():
            torch.cuda.set_rng_state_all(cuda)
        else:
            warnings.warn(
                f"the saved random states are for {len(cuda)} CUDA device(s), this process sees "
                f"{torch.cuda.device_count()}; CUDA random states not restored",
                stacklevel=2,
            )
    saved_numpy = state.get("numpy")
    if saved_numpy is not None:
        import numpy

        numpy.random.set_state(
            (
                saved_numpy["kind"],
                saved_numpy["keys"].numpy().astype(numpy.uint32),
                saved_numpy["pos"],
                saved_numpy["has_gauss"],
                saved_numpy["cached_gaussian"],
            )
        )
