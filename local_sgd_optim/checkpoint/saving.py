"""Saving a checkpoint: :func:`save`, and what it refuses before writing.

Every rank writes its own file; the ranks confirm their files to each other; the call that
completes the set (rank 0, or without a process group the last rank to save) writes the
``COMPLETE`` marker and prunes older checkpoints. A step that already has a complete checkpoint
is written beside it and swapped in once complete (see :mod:`.directories`).
"""

from __future__ import annotations

import contextlib
import json
from collections import OrderedDict
from pathlib import Path
from typing import Any, Optional

import torch
from torch import Tensor, nn

from local_sgd_optim.checkpoint.directories import prune, swap_in, write_directory
from local_sgd_optim.checkpoint.files import write_atomically
from local_sgd_optim.checkpoint.layout import (
    COMPLETE,
    FORMAT,
    PathLike,
    files_on_disk,
    rank_file,
    step_directory,
)
from local_sgd_optim.checkpoint.ranks import (
    broadcast_from_rank0,
    check_int,
    gather,
    rank_and_world,
)

__all__ = ["save"]

# What torch.load(weights_only=True) accepts, on every torch this package supports.
_PLAIN_LEAVES = (str, bytes, bytearray, int, float, bool, complex, type(None))
_TORCH_LEAVES = (torch.dtype, torch.device, torch.layout)
_PLAIN_TENSORS = (Tensor, nn.Parameter)

# Each rank's (failure, its file's length and SHA-256, whether it wrote beside a checkpoint).
_Outcome = tuple[Optional[str], Optional[dict[str, Any]], bool]  # evaluated: Python 3.9 too


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
    returns, on any rank, the checkpoint is complete. If ``step`` already has a complete
    checkpoint, the new one is written beside it and replaces it only once complete: a failure
    or a crash leaves the old one.

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
        ValueError: ``step``, ``keep``, ``rank`` or ``world_size`` is invalid, or a symbolic
            link (or another non-directory) is where the step's directory goes.
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
    # Over 60 lines (78) because the public docstring, which tests/test_docs.py holds to
    # the signature, and the signature are 59 of them; the code is 17.
    root = Path(directory)
    step = check_int("step", step, minimum=0)
    if keep is not None:
        keep = check_int("keep", keep, minimum=1)
    rank, world_size = rank_and_world(rank, world_size)
    target = step_directory(root, step)
    written, everyone = _write_own_file(target, rank, world_size, state)
    files = _files_if_completing(written, rank, world_size, everyone)
    error = None
    if files is not None:
        marker = {"format": FORMAT, "step": step, "world_size": world_size, "files": files}
        error = _complete(written, target, marker, keep, alone=len(everyone) == 1)
    if len(everyone) > 1:
        error = broadcast_from_rank0(error)
        if error is not None:
            raise RuntimeError(f"rank 0 could not complete checkpoint {target}: {error}")
    return target


def _write_own_file(
    target: Path, rank: int, world_size: int, state: object
) -> tuple[Path, list[_Outcome]]:
    """Write this rank's file; where, and every rank's outcome, raising if any rank failed."""
    name = rank_file(rank)
    failure: BaseException | None = None
    record: dict[str, Any] | None = None
    written, beside = target, False
    try:
        if not isinstance(state, dict):
            raise TypeError(f"state must be a dict, got {type(state).__name__}")
        _check_loadable(state, "state")
        written, beside = write_directory(target)
        for stale in written.glob(f".{name}.tmp*"):  # left by an attempt that was killed
            stale.unlink(missing_ok=True)
        if rank == 0 and beside:
            # A marker left there by an attempt killed before its swap describes other files.
            with contextlib.suppress(FileNotFoundError):
                (written / COMPLETE).unlink()
        record = write_atomically(written / name, state)
    except Exception as problem:
        failure = problem
    summary = None if failure is None else f"{type(failure).__name__}: {failure}"
    everyone: list[_Outcome] = gather((summary, record, beside), world_size)
    if failure is not None:
        raise failure
    failed = [f"rank {r} ({e})" for r, (e, _, _) in enumerate(everyone) if e is not None]
    if failed:
        raise RuntimeError(
            f"checkpoint {target} was not saved: {'; '.join(failed)} failed to write its file. "
            "The previous complete checkpoint is still there"
        )
    if len({b for _, _, b in everyone}) > 1:
        seeing = [r for r, (_, _, b) in enumerate(everyone) if b]
        raise RuntimeError(
            f"checkpoint {target} was not saved: rank(s) {seeing} found a complete checkpoint "
            "there and the others did not. Every rank must see the same directory, on a file "
            "system they share"
        )
    return written, everyone


def _files_if_completing(
    written: Path, rank: int, world_size: int, everyone: list[_Outcome]
) -> dict[str, Any] | None:
    """The marker's ``files`` if this call writes the marker, else ``None``."""
    if len(everyone) == world_size:
        files = {rank_file(r): record for r, (_, record, _) in enumerate(everyone)}
        return files if rank == 0 else None
    # No process group: whichever call finds every file on disk completes the set.
    files = files_on_disk(written, world_size)
    files[rank_file(rank)] = everyone[0][1]
    return files if len(files) == world_size else None


def _complete(
    written: Path, target: Path, marker: dict[str, Any], keep: int | None, *, alone: bool
) -> str | None:
    """Write the ``COMPLETE`` marker, swap the set in if it was written beside a checkpoint,
    and prune; what went wrong, for the other ranks (raised here when ``alone``)."""
    try:
        write_atomically(written / COMPLETE, (json.dumps(marker, indent=1) + "\n").encode())
        if written != target:
            swap_in(written, target)
        prune(target.parent, marker["step"], keep)
    except Exception as problem:
        if alone:
            raise
        return f"{type(problem).__name__}: {problem}"
    return None


def _check_loadable(obj: object, where: str) -> None:
    """Raise a TypeError naming the first thing ``torch.load(weights_only=True)`` would refuse."""
    kind = type(obj)
    if isinstance(obj, Tensor):
        _check_tensor(obj, where)
        return
    if kind in _PLAIN_LEAVES or kind in _TORCH_LEAVES:
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


def _check_tensor(tensor: Tensor, where: str) -> None:
    """Raise a TypeError if ``torch.load(weights_only=True)`` would refuse ``tensor``: a subclass
    (as quantisation and FP8 libraries use) not allowed for it, or an attribute it refuses."""
    kind = type(tensor)
    if kind not in _PLAIN_TENSORS:
        allowed = torch.serialization.get_safe_globals()
        if kind in {g[0] if isinstance(g, tuple) else g for g in allowed}:
            return  # its own pickling decides; torch.load allows it where it is allowed here
        name = f"{kind.__module__}.{kind.__qualname__}"
        raise TypeError(
            f"{where} is a tensor of subclass {name}, which torch.load(weights_only=True) "
            "refuses. Convert it to a plain tensor before saving (a quantised or FP8 tensor: "
            "dequantize it, or store its data and scale as plain tensors), or allow the class "
            f"with torch.serialization.add_safe_globals([{kind.__qualname__}]) both where you "
            "save and where you load"
        )
    for attribute, value in vars(tensor).items():  # pickled with the tensor
        _check_loadable(value, f"{where}.{attribute}")
