"""Where a checkpoint's files live, and which checkpoints are usable.

A root holds ``step-{step:08d}/`` directories, each with one ``rank{r}.pt`` per rank and, once
every rank's file is on disk, the ``COMPLETE`` marker (JSON: format, step, world size, and each
file's length and SHA-256). This module names those paths, reads and checks the marker, and
judges a checkpoint cheaply (lengths, no hashing).

Two more names exist only while a step that already has a complete checkpoint is saved again
(see :mod:`.directories`): ``.step-{step:08d}.saving/``, hidden, where the new set is written,
and ``step-0{step:08d}/``, one more leading zero, which holds the checkpoint being replaced for
the instant of the swap. Readers never look at the first; the second parses as the step, so a
complete checkpoint of it is found at every instant, by any version of this package. After a
crash either may be left over; the next save removes them.

Only real directories and regular files count: a symbolic link, a FIFO or a device in a
checkpoint directory is never followed or opened.
"""

from __future__ import annotations

import json
import os
import re
import stat
from pathlib import Path
from typing import Any, Union

from local_sgd_optim.checkpoint.files import (
    IrregularFile,
    describe_kind,
    digest_file,
    open_regular,
)

__all__ = [
    "COMPLETE",
    "FORMAT",
    "STAGING_DIR",
    "STEP_DIR",
    "PathLike",
    "files_on_disk",
    "problem_with",
    "rank_file",
    "read_marker",
    "replaced_directory",
    "staging_directory",
    "step_directories",
    "step_directory",
]

PathLike = Union[str, "os.PathLike[str]"]

COMPLETE = "COMPLETE"
FORMAT = 1
STEP_DIR = re.compile(r"^step-(\d{8,})$")
STAGING_DIR = re.compile(r"^\.step-(\d{8,})\.saving$")
# A marker lists every rank's file in about 100 bytes: this allows over 100,000 ranks.
_MARKER_LIMIT = 16 << 20


def step_directory(root: Path, step: int) -> Path:
    """The directory of checkpoint ``step`` under ``root``."""
    return root / f"step-{step:08d}"


def staging_directory(target: Path) -> Path:
    """Where the files of checkpoint ``target`` are written when it already holds one."""
    return target.with_name(f".{target.name}.saving")


def replaced_directory(target: Path) -> Path:
    """The name the checkpoint in ``target`` has while it is replaced: the same step."""
    return target.with_name(target.name.replace("step-", "step-0", 1))


def rank_file(rank: int) -> str:
    """The name of rank ``rank``'s file in a checkpoint directory."""
    return f"rank{rank}.pt"


def step_directories(root: Path, *, links: bool = False) -> list[tuple[int, Path]]:
    """``(step, path)`` of the ``step-*`` directories under ``root``, newest first (of one
    step, the canonical name first); symbolic links among them only with ``links``."""
    if not root.is_dir():
        return []
    found = []
    for path in root.iterdir():
        match = STEP_DIR.match(path.name)
        if not match:
            continue
        try:
            mode = os.lstat(path).st_mode
        except FileNotFoundError:  # removed since it was listed
            continue
        if stat.S_ISDIR(mode) or (links and stat.S_ISLNK(mode)):
            found.append((int(match.group(1)), path))
    return sorted(found, key=lambda item: (item[0], _canonical(*item)), reverse=True)


def _canonical(step: int, path: Path) -> bool:
    return path.name == step_directory(path.parent, step).name


def read_marker(path: Path) -> dict[str, Any]:
    """The checkpoint's ``COMPLETE`` marker; a ValueError saying what is wrong otherwise."""
    marker_path = path / COMPLETE
    try:
        with open_regular(marker_path) as f:
            text = f.read(_MARKER_LIMIT + 1)
    except (FileNotFoundError, NotADirectoryError):
        raise ValueError(
            f"{path} is incomplete: it has no {COMPLETE} marker (the run stopped while writing it)"
        ) from None
    except IrregularFile as irregular:
        raise ValueError(
            f"{marker_path} is unreadable or malformed: it is {irregular.kind}, not a regular "
            "file (checkpoints are read only from regular files in their directory)"
        ) from None
    try:
        if len(text) > _MARKER_LIMIT:
            raise ValueError("too long")
        marker = json.loads(text)
        world_size = marker["world_size"]
        files = marker["files"]
        if not (
            isinstance(world_size, int)
            and world_size >= 1
            and isinstance(files, dict)
            and all(
                isinstance(files.get(rank_file(r)), dict)
                and isinstance(files[rank_file(r)].get("bytes"), int)
                and isinstance(files[rank_file(r)].get("sha256"), str)
                for r in range(world_size)
            )
        ):
            raise ValueError("malformed")
    except (ValueError, KeyError, TypeError):
        raise ValueError(f"{marker_path} is unreadable or malformed") from None
    return marker  # type: ignore[no-any-return]


def problem_with(path: Path) -> str | None:
    """Why the checkpoint in ``path`` cannot be used, judged cheaply (lengths, no hashing)."""
    try:
        marker = read_marker(path)
    except ValueError as unusable:
        return str(unusable)
    for r in range(marker["world_size"]):
        file = path / rank_file(r)
        expected = marker["files"][file.name]["bytes"]
        try:
            status = os.lstat(file)
        except FileNotFoundError:
            return f"{file} is missing"
        if not stat.S_ISREG(status.st_mode):
            return f"{file} is {describe_kind(status.st_mode)}, not a regular file"
        if status.st_size != expected:
            return (
                f"{file} is truncated or corrupted ({status.st_size} bytes, its {COMPLETE} "
                f"marker records {expected})"
            )
    return None


def files_on_disk(target: Path, world_size: int) -> dict[str, Any]:
    """The marker's ``files`` entries for the rank files already in ``target`` (regular files
    only: anything else there is replaced when its rank saves)."""
    files: dict[str, Any] = {}
    for r in range(world_size):
        path = target / rank_file(r)
        try:
            with open_regular(path) as f:
                length, sha256 = digest_file(f)
        except (FileNotFoundError, IrregularFile):
            continue
        files[path.name] = {"bytes": length, "sha256": sha256}
    return files
