"""One checkpoint file written atomically and durably, and its length and SHA-256.

A file is written to a temporary name in the same directory, flushed, synced and renamed into
place (the directory synced after), so a crash never leaves a half-written file under the real
name. The digest is computed while writing, so the bytes are never read back or held.
"""

from __future__ import annotations

import contextlib
import hashlib
import os
from pathlib import Path
from typing import IO, Any

import torch

__all__ = ["digest", "write_atomically"]

_CHUNK = 1 << 20


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


def write_atomically(path: Path, obj: Any) -> dict[str, Any]:
    """``torch.save(obj)`` to ``path`` via a synced temporary file; return its length and digest.

    ``obj`` given as ``bytes`` is written as it is.
    """
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


def digest(path: Path) -> tuple[int, str]:
    """The length and SHA-256 (hex) of the file at ``path``, read in chunks."""
    sha256 = hashlib.sha256()
    length = 0
    with open(path, "rb") as f:
        while chunk := f.read(_CHUNK):
            sha256.update(chunk)
            length += len(chunk)
    return length, sha256.hexdigest()
