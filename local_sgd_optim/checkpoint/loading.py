"""Finding and reading a checkpoint: :func:`latest` and :func:`load`.

:func:`latest` judges checkpoints cheaply (the marker and the files' lengths); :func:`load`
checks the chosen file's SHA-256 against the marker and reads it with
``torch.load(..., weights_only=True)``, resharding when asked to and the world size differs.
Both look only at real directories and regular files, and read no more than the marker
records: a planted link or FIFO is reported, never followed or waited on.
"""

from __future__ import annotations

import os
import pickle
import sys
import warnings
from pathlib import Path
from typing import IO, Any

import torch

from local_sgd_optim.checkpoint.files import (
    IrregularFile,
    archive_problem,
    digest_file,
    open_regular,
)
from local_sgd_optim.checkpoint.layout import (
    COMPLETE,
    STEP_DIR,
    PathLike,
    problem_with,
    rank_file,
    read_marker,
    step_directories,
)
from local_sgd_optim.checkpoint.ranks import rank_and_world
from local_sgd_optim.checkpoint.reshard import merge

__all__ = ["latest", "load"]


def latest(directory: PathLike) -> tuple[int, Path] | None:
    """The newest complete checkpoint under ``directory``, as ``(step, path)``, or ``None``.

    Checkpoints without a ``COMPLETE`` marker (the run stopped while writing them), with a
    missing file or one whose length differs from the marker's (truncated) are skipped, with a
    warning naming them, and so are symbolic links and anything but regular files in place of
    a checkpoint directory, a file or the marker. The SHA-256 is checked by :func:`load`.

    Args:
        directory (str or PathLike): the root passed to :func:`save`.

    Example::

        >>> found = checkpoint.latest("ckpt")
        >>> start = 0 if found is None else found[0]
    """
    for step, path in step_directories(Path(directory), links=True):
        problem = (
            f"{path} is a symbolic link; checkpoints are read only from directories"
            if path.is_symlink()
            else problem_with(path)
        )
        if problem is None:
            return step, path
        warnings.warn(f"skipping an unusable checkpoint: {problem}", stacklevel=2)
    return None


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
    with ``torch.load(..., weights_only=True)``. Only regular files are read, never through a
    symbolic link, and no more of them than the marker records. The path you pass may be
    reached through links; what is found inside it may not.

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
        ValueError: the checkpoint is incomplete, a file is missing, truncated or corrupted,
            is not a regular file, or holds something other than tensors and plain containers
            (the message names it and the previous checkpoint still there), or the world size
            differs and ``reshard`` is ``False``.

    Example::

        >>> model = Net()
        >>> opt = LocalSGDOptimizer(torch.optim.SGD(model.parameters(), lr=0.1), model, period=8)
        >>> if checkpoint.latest("ckpt") is not None:
        ...     state = checkpoint.load("ckpt")
        ...     model.load_state_dict(state["model"])
        ...     opt.load_state_dict(state["optimizer"])
        ...     checkpoint.set_rng_state(state["rng"])
    """
    rank, world_size = rank_and_world(rank, world_size)
    path = _resolve(Path(directory))
    marker = read_marker(path)
    old_world = marker["world_size"]
    if old_world == world_size:
        return _read_verified(path, marker, rank, map_location)
    if not reshard:
        raise _other_world_size(path, old_world, world_size)
    states = (_read_verified(path, marker, r, map_location) for r in range(old_world))
    return merge(states, world_size)


def _other_world_size(path: Path, old_world: int, world_size: int) -> ValueError:
    return ValueError(
        f"checkpoint {path} was written by {old_world} rank(s) but the world size is now "
        f"{world_size}. Between averaging rounds each rank's model and optimizer state "
        f"differ, so they cannot be continued exactly on another number of ranks: relaunch "
        f"with {old_world} rank(s), or pass reshard=True to load() (or use "
        "local_sgd_optim.checkpoint.reshard_state_dicts) to continue from their average"
    )


def _resolve(directory: Path) -> Path:
    """The checkpoint in ``directory``: itself if it is a ``step-*`` one, else the newest there."""
    if STEP_DIR.match(directory.name) or os.path.lexists(directory / COMPLETE):
        return directory
    found = latest(directory)
    if found is None:
        raise FileNotFoundError(f"no complete checkpoint under {directory}")
    return found[1]


def _previous(path: Path) -> str:
    """A sentence naming the newest complete checkpoint older than ``path``, if there is one."""
    match = STEP_DIR.match(path.name)
    step = int(match.group(1)) if match else sys.maxsize
    for other_step, other in step_directories(path.parent):
        if other_step < step and problem_with(other) is None:
            return f"The previous checkpoint {other} is still there: load it instead."
    return f"No earlier complete checkpoint is left in {path.parent}."


def _read_verified(
    path: Path, marker: dict[str, Any], rank: int, map_location: Any
) -> dict[str, Any]:
    """Rank ``rank``'s state, once its length and SHA-256 match the marker's."""
    file = path / rank_file(rank)
    expected = marker["files"][file.name]
    try:
        opened = open_regular(file)
    except FileNotFoundError:
        raise ValueError(f"checkpoint file {file} is missing. {_previous(path)}") from None
    except IrregularFile as irregular:
        raise ValueError(
            f"checkpoint file {file} is {irregular.kind}, not a regular file: checkpoints are "
            f"read only from regular files in their directory. {_previous(path)}"
        ) from None
    with opened:
        found = _differs(opened, expected)
        if found is not None:
            raise ValueError(
                f"checkpoint file {file} is truncated or corrupted: {found}, but its "
                f"{COMPLETE} marker records {expected['bytes']} bytes with SHA-256 "
                f"{expected['sha256'][:16]}.... {_previous(path)}"
            )
        opened.seek(0)
        state = _torch_load(opened, file, map_location)
    if not isinstance(state, dict):
        raise ValueError(
            f"checkpoint file {file} holds a {type(state).__name__}, not a dict. " + _previous(path)
        )
    return state


def _differs(opened: IO[bytes], expected: dict[str, Any]) -> str | None:
    """What ``opened`` holds, if its length or SHA-256 differs from ``expected``; it is hashed
    only when the length matches, reading no more than that."""
    size = os.fstat(opened.fileno()).st_size
    if size != expected["bytes"]:
        return f"{size} bytes"
    length, sha256 = digest_file(opened, limit=size)
    if (length, sha256) == (size, expected["sha256"]):
        return None
    return f"{length} bytes with SHA-256 {sha256[:16]}..."


def _torch_load(opened: IO[bytes], file: Path, map_location: Any) -> Any:
    """``torch.load(..., weights_only=True)`` of ``opened``; a damaged archive, or objects it
    refuses, as a ValueError naming ``file``. Any other failure is raised as it is."""
    try:
        return torch.load(opened, map_location=map_location, weights_only=True)
    except Exception as problem:
        damage = archive_problem(opened)
        said = str(problem).strip().splitlines()[0][:300] if str(problem).strip() else ""
        if damage is not None:
            raise ValueError(
                f"checkpoint file {file} is truncated or corrupted: {damage}, although its "
                f"length and SHA-256 match its {COMPLETE} marker (the marker was rewritten, or "
                f"the bytes went bad before they were hashed); torch.load raised "
                f"{type(problem).__name__}: {said}. {_previous(file.parent)}"
            ) from problem
        if isinstance(problem, pickle.UnpicklingError):
            raise ValueError(
                f"checkpoint file {file} holds objects other than tensors and plain "
                "containers, which torch.load(weights_only=True) refuses: loading them could "
                f"run code. {_previous(file.parent)} ({problem})"
            ) from problem
        raise
