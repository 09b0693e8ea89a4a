"""Checkpoint directories made, replaced and deleted: where :func:`save` writes, the swap that
replaces a step's complete checkpoint, and pruning.

A step without a complete checkpoint is written in place: until its marker exists, readers skip
it. A step that has one (a run resumed from it saves again at the same step) must keep it while
the new set is written, since a rank may fail or the job die at any moment. So the new set goes
to the hidden sibling ``.step-N.saving/`` and, once complete, is swapped in by two renames:
``step-N`` to ``step-0N`` (the same step to any reader), then ``.step-N.saving`` to ``step-N``;
``step-0N`` is deleted after. At every instant, and after a crash at any point, a complete
checkpoint of step N is under a name :func:`latest` reads.

Nothing is written or deleted through a symbolic link: a link planted where a step directory
goes is refused, and pruning leaves links alone.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import stat
from pathlib import Path

from local_sgd_optim.checkpoint.files import describe_kind, fsync_directory
from local_sgd_optim.checkpoint.layout import (
    COMPLETE,
    STAGING_DIR,
    replaced_directory,
    staging_directory,
    step_directories,
)

__all__ = ["prune", "remove_tree", "swap_in", "write_directory"]


def write_directory(target: Path) -> tuple[Path, bool]:
    """Where a rank writes its file of checkpoint ``target``: ``target``, or, when it already
    holds a ``COMPLETE`` marker, its staging directory (then ``True``)."""
    target.parent.mkdir(parents=True, exist_ok=True)
    _require_real_directory(target, create=False)
    if os.path.lexists(target / COMPLETE):
        staging = staging_directory(target)
        _require_real_directory(staging, create=True)
        return staging, True
    _require_real_directory(target, create=True)
    return target, False


def _require_real_directory(path: Path, *, create: bool) -> None:
    """Raise a ValueError unless ``path`` is a directory (not a link to one), or is missing;
    create it if missing and ``create``."""
    try:
        mode = os.lstat(path).st_mode
    except FileNotFoundError:
        if not create:
            return
        with contextlib.suppress(FileExistsError):
            path.mkdir()
        mode = os.lstat(path).st_mode
    if not stat.S_ISDIR(mode):
        raise ValueError(
            f"{path} is {describe_kind(mode)}, not a directory that checkpoint.save() made: it "
            "never writes or deletes through one. Remove it, or save under another directory"
        )


def swap_in(staging: Path, target: Path) -> None:
    """Replace the checkpoint in ``target`` by the complete one in ``staging``, a complete one
    of that step readable at every instant."""
    replaced = replaced_directory(target)
    remove_tree(replaced)  # left by a crash during an earlier swap, beside the complete target
    if os.path.lexists(target):
        os.rename(target, replaced)
    try:
        os.rename(staging, target)
    except OSError:
        with contextlib.suppress(OSError):
            os.rename(replaced, target)  # back under its own name; the old one stays
        raise
    fsync_directory(target.parent)
    remove_tree(replaced)


def remove_tree(path: Path) -> None:
    """Delete ``path``: a directory with what it holds, anything else (a link) by itself."""
    try:
        mode = os.lstat(path).st_mode
    except FileNotFoundError:
        return
    if stat.S_ISDIR(mode):
        shutil.rmtree(path, ignore_errors=True)  # never follows the links inside
    else:
        with contextlib.suppress(OSError):
            os.unlink(path)


def prune(root: Path, step: int, keep: int | None) -> None:
    """Once checkpoint ``step`` is complete: delete complete checkpoints beyond the newest
    ``keep`` (``None``: none) and, unless ``keep`` is ``None``, incomplete ones older than
    ``step``; and what earlier saves left at or before ``step``: staging directories, and the
    copy of a replaced checkpoint beside a complete one. Symbolic links are left alone."""
    kept: set[int] = set()
    for other_step, path in step_directories(root):  # of one step, the canonical name first
        if other_step > step:
            continue
        if other_step in kept:
            remove_tree(path)
        elif os.path.lexists(path / COMPLETE):
            kept.add(other_step)
            if keep is not None and len(kept) > keep:
                remove_tree(path)
        elif keep is not None and other_step < step:
            remove_tree(path)
    for path in root.iterdir():
        match = STAGING_DIR.match(path.name)
        if match and int(match.group(1)) <= step and not path.is_symlink():
            remove_tree(path)
