"""One checkpoint file: written atomically and durably, opened only if it is a regular file.

A file is written to a temporary name in the same directory, flushed, synced and renamed into
place (the directory synced after), so a crash never leaves a half-written file under the real
name. The digest is computed while writing, so the bytes are never read back or held.

Reading opens only regular files, never through a symbolic link (a link to ``/dev/zero`` or a
FIFO planted in a checkpoint directory would otherwise make a read hang or leave the
directory), and reads no more than the caller expects.
"""

from __future__ import annotations

import contextlib
import errno
import hashlib
import os
import stat
import zipfile
from pathlib import Path
from typing import IO, Any, BinaryIO

import torch

__all__ = [
    "IrregularFile",
    "archive_problem",
    "describe_kind",
    "digest_file",
    "fsync_directory",
    "open_regular",
    "write_atomically",
]

_CHUNK = 1 << 20
# Not every platform has them; where one is missing, the lstat() and fstat() checks remain.
_NOFOLLOW = getattr(os, "O_NOFOLLOW", 0)
_NONBLOCK = getattr(os, "O_NONBLOCK", 0)  # opening a FIFO must not wait for a writer
_BINARY = getattr(os, "O_BINARY", 0)


def describe_kind(mode: int) -> str:
    """What a file of ``st_mode`` ``mode`` is, as a phrase: ``"a symbolic link"``, ..."""
    kinds = (
        (stat.S_ISLNK, "a symbolic link"),
        (stat.S_ISFIFO, "a FIFO"),
        (stat.S_ISDIR, "a directory"),
        (stat.S_ISCHR, "a device"),
        (stat.S_ISBLK, "a device"),
        (stat.S_ISSOCK, "a socket"),
        (stat.S_ISREG, "a regular file"),
    )
    return next((name for test, name in kinds if test(mode)), "a special file")


class IrregularFile(ValueError):
    """A path that is not a regular file (a symbolic link, a FIFO, a device, ...)."""

    def __init__(self, path: Path, mode: int) -> None:
        self.kind = describe_kind(mode)
        super().__init__(f"{path} is {self.kind}, not a regular file")


def open_regular(path: Path) -> BinaryIO:
    """``path`` opened for reading in binary mode if it is a regular file, not a symbolic link.

    Raises FileNotFoundError if it is missing, :class:`IrregularFile` if it is anything else.
    """
    mode = os.lstat(path).st_mode
    if not stat.S_ISREG(mode):
        raise IrregularFile(path, mode)
    try:
        fd = os.open(path, os.O_RDONLY | _NOFOLLOW | _NONBLOCK | _BINARY)
    except OSError as problem:
        if problem.errno == errno.ELOOP:  # replaced by a link since the lstat()
            raise IrregularFile(path, stat.S_IFLNK) from None
        raise
    try:
        mode = os.fstat(fd).st_mode
        if not stat.S_ISREG(mode):
            raise IrregularFile(path, mode)
        return os.fdopen(fd, "rb")
    except BaseException:
        os.close(fd)
        raise


def digest_file(file: IO[bytes], limit: int | None = None) -> tuple[int, str]:
    """The length and SHA-256 (hex) of what ``file`` holds from its position, read in chunks;
    with ``limit``, at most ``limit + 1`` bytes are read (a longer file shows as longer)."""
    sha256 = hashlib.sha256()
    length = 0
    while limit is None or length <= limit:
        size = _CHUNK if limit is None else min(_CHUNK, limit + 1 - length)
        chunk = file.read(size)
        if not chunk:
            break
        sha256.update(chunk)
        length += len(chunk)
    return length, sha256.hexdigest()


def archive_problem(file: IO[bytes]) -> str | None:
    """What is wrong with the zip archive ``torch.save`` wrote to ``file``, or ``None``.

    For telling a damaged file from other reasons ``torch.load`` fails (a ``map_location``
    that cannot be honoured): reads the whole archive, so only after a failure.
    """
    file.seek(0)
    try:
        with zipfile.ZipFile(file) as archive:
            bad = archive.testzip()
    except Exception as problem:  # anything the zip reader raises means a damaged archive
        return f"it is not a complete zip archive ({type(problem).__name__}: {problem})"
    if bad is not None:
        return f"its member {bad} fails its CRC check"
    return None


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


def fsync_directory(directory: Path) -> None:
    """Make the entries of ``directory`` durable, where the platform allows it."""
    with contextlib.suppress(OSError):
        fd = os.open(directory, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)


def write_atomically(path: Path, obj: Any) -> dict[str, Any]:
    """``torch.save(obj)`` to ``path`` via a synced temporary file; return its length and digest.

    ``obj`` given as ``bytes`` is written as it is. The temporary file is created anew (never
    opened through a link left in its place), and the rename replaces whatever entry ``path``
    was, a link included, without following it.
    """
    tmp = path.with_name(f".{path.name}.tmp{os.getpid()}")
    with contextlib.suppress(FileNotFoundError):
        tmp.unlink()  # left by a process of the same id that was killed
    flags = os.O_WRONLY | os.O_CREAT | os.O_EXCL | _NOFOLLOW | _BINARY
    try:
        with os.fdopen(os.open(tmp, flags, 0o666), "wb") as f:
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
    fsync_directory(path.parent)
    return {"bytes": writer.bytes, "sha256": writer.sha256.hexdigest()}
