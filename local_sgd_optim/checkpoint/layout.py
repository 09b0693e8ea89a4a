"""Where a checkpoint's files live, and which checkpoints are usable.

A root holds ``step-{step:08d}/`` directories, each with one ``rank{r}.pt`` per rank and, once
every rank's file is on disk, the ``COMPLETE`` marker (JSON: format, step, world size, and each
file's length and SHA-256). This module names those paths, reads and checks the marker, judges
a checkpoint cheaply (lengths, no hashing) and prunes old ones.
"""

from __future__ import annotations

import json
import os
import re
import shutil
from pathlib import Path
from typing import Any, Union

from local_sgd_optim.checkpoint.files import digest

__all__ = [
    "COMPLETE",
    "FORMAT",
    "STEP_DIR",
    "PathLike",
    "files_on_disk",
    "problem_with",
    "prune",
    "rank_file",
    "read_marker",
    "step_directories",
    "step_directory",
]

PathLike = Union[str, "os.PathLike[str]"]

COMPLETE = "COMPLETE"
FORMAT = 1
STEP_DIR = re.compile(r"^step-(\d{8,})$")


def step_directory(root: Path, step: int) -> Path:
    """The directory of checkpoint ``step`` under ``root``."""
    return root / f"step-{step:08d}"


def rank_file(rank: int) -> str:
    """The name of rank ``rank``'s file in a checkpoint directory."""
    return f"rank{rank}.pt"


def step_directories(root: Path) -> list[tuple[int, Path]]:
    """``(step, path)`` of the ``step-*`` directories under ``root``, newest first."""
    if not root.is_dir():
        return []
    found = []
    for path in root.iterdir():
        match = STEP_DIR.match(path.name)
        if match and path.is_dir():
            found.append((int(match.group(1)), path))
    return sorted(found, reverse=True)


def read_marker(path: Path) -> dict[str, Any]:
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
        if not file.exists():
            return f"{file} is missing"
        if file.stat().st_size != expected:
            return (
                f"{file} is truncated or corrupted ({file.stat().st_size} bytes, its {COMPLETE} "
                f"marker records {expected})"
            )
    return None


def files_on_disk(target: Path, world_size: int) -> dict[str, Any]:
    """The marker's ``files`` entries for the rank files already in ``target``."""
    files: dict[str, Any] = {}
    for r in range(world_size):
        path = target / rank_file(r)
        if path.exists():
            length, sha256 = digest(path)
            files[path.name] = {"bytes": length, "sha256": sha256}
    return files


def prune(root: Path, step: int, keep: int) -> None:
    """Delete complete checkpoints beyond the newest ``keep``; incomplete ones before ``step``."""
    complete = 0
    for other_step, path in step_directories(root):
        if other_step > step:
            continue
        if (path / COMPLETE).exists():
            complete += 1
            if complete > keep:
                shutil.rmtree(path, ignore_errors=True)
        elif other_step < step:
            shutil.rmtree(path, ignore_errors=True)
