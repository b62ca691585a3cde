"""Atomic file writes and up-front checks that output paths can be written.

Every file the package writes for a user (pretraining checkpoints, name-keyed optimizer state and its
manifest, ``--json`` results, the demo's ``results.json`` and plots) goes through :func:`atomic_write`:
the bytes go to a temporary file *in the target's directory* (so the final rename never crosses a file
system), are flushed and ``fsync``-ed, and the temporary file is then renamed over the target with
``os.replace`` (atomic on POSIX), after which the directory is ``fsync``-ed so the rename itself is
durable. A reader, or a process killed at any moment (``kill -9``, power loss after the fsyncs), sees
either the complete previous file or the complete new one, never a mixture or a truncated file.

Temporary files are named ``.<target name>.<16 hex digits>.tmp`` (see :func:`temporary_name`): hidden,
and ending in ``.tmp``, so that a stray one left by a killed writer is never matched by a checkpoint's
own name or by a pattern such as ``*.pt``. A writer that fails in Python (full disk, an exception while
serializing) removes its temporary file; only a killed writer can leave one behind.

:func:`check_writable_file` and :func:`check_writable_directory` are meant for the start of long runs:
they fail in a second with a message naming the option, instead of at the end of hours of training.
"""

from __future__ import annotations

import errno
import hashlib
import os
import re
import secrets
import stat
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, BinaryIO

__all__ = [
    "WrittenFile",
    "atomic_save",
    "atomic_write",
    "atomic_write_text",
    "check_writable_directory",
    "check_writable_file",
    "file_sha256",
    "is_temporary_name",
    "temporary_name",
]

_TEMP_RE = re.compile(r"^\..+\.[0-9a-f]{16}\.tmp$")
# Errors that mean "the disk is full" to a user; each gets a plain-words reason in the message.
_FULL_DISK = {errno.ENOSPC: "no space left on device", errno.EDQUOT: "disk quota exceeded (no space left on device)"}
_CHUNK = 1 << 20


@dataclass(frozen=True)
class WrittenFile:
    """What :func:`atomic_write` put in place: the target path, its size and (if asked) its SHA-256."""

    path: Path
    size: int
    sha256: str | None


def temporary_name(target: str | os.PathLike[str]) -> str:
    """A fresh temporary file name for ``target``: ``.<name>.<16 hex digits>.tmp`` (same directory)."""
    return f".{Path(target).name}.{secrets.token_hex(8)}.tmp"


def is_temporary_name(name: str) -> bool:
    """Whether ``name`` (a file name, no directory) is one of :func:`temporary_name`'s."""
    return bool(_TEMP_RE.match(name))


class _Writer:
    """The temporary file as the serializer sees it: counts and optionally hashes the bytes, and keeps
    the first ``OSError`` of a write. ``torch.save`` turns a failing ``write`` into a ``RuntimeError``
    without the errno ("unexpected pos ..."); the kept error lets :func:`atomic_write` report the cause
    (e.g. a full disk) instead."""

    def __init__(self, file: BinaryIO, hash_it: bool) -> None:
        self._file = file
        self._hash = hashlib.sha256() if hash_it else None
        self.size = 0
        self.error: OSError | None = None

    def write(self, data: Any) -> int:
        try:
            written = self._file.write(data)
        except OSError as error:
            self.error = self.error or error
            raise
        view = memoryview(data)
        if self._hash is not None:
            self._hash.update(view)
        self.size += view.nbytes
        return written

    def flush(self) -> None:
        try:
            self._file.flush()
        except OSError as error:
            self.error = self.error or error
            raise

    def hexdigest(self) -> str | None:
        return None if self._hash is None else self._hash.hexdigest()


def _final_target(path: str | os.PathLike[str]) -> Path:
    """Where the bytes for ``path`` go: through a symbolic link to the file it names (``os.replace`` of the
    link itself would turn a ``latest.pt -> run/step-100.pt`` link into a plain file, and leave the file it
    named unchanged), otherwise ``path``."""
    target = Path(path)
    return Path(os.path.realpath(target)) if target.is_symlink() else target


def _open_temporary(directory: Path, target: Path) -> tuple[Path, BinaryIO]:
    """Create a new temporary file for ``target`` in ``directory``; ``O_EXCL`` so that two writers can
    never share one. Mode 0o666 minus the umask, like a file ``open`` creates (``mkstemp`` would make
    it 0o600, and a checkpoint would become unreadable to the group that could read the previous one);
    when ``target`` exists, its permissions instead (replacing a file must not widen or narrow them)."""
    while True:
        path = directory / temporary_name(target)
        try:
            fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL | getattr(os, "O_BINARY", 0), 0o666)
        except FileExistsError:  # 64 random bits: practically never
            continue
        try:
            mode = stat.S_IMODE(os.stat(target).st_mode)
        except OSError:  # no previous file
            mode = None
        if mode is not None and hasattr(os, "fchmod"):
            os.fchmod(fd, mode)
        return path, os.fdopen(fd, "wb")


def _fsync_directory(directory: Path) -> None:
    """Make a rename in ``directory`` durable. Not possible on every platform or file system (Windows has
    no directory descriptors; some network file systems answer EINVAL): then the rename is as durable
    as that file system makes it."""
    if not hasattr(os, "O_DIRECTORY"):
        return
    fd = os.open(directory, os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.fsync(fd)
    except OSError as error:
        if error.errno not in (errno.EINVAL, errno.ENOTSUP, errno.EBADF):
            raise
    finally:
        os.close(fd)


def _describe(error: BaseException, target: Path) -> OSError | None:
    """The ``OSError`` to raise for a failed write of ``target``: the reason in words and the path."""
    if not isinstance(error, OSError) or error.errno is None:
        return None
    reason = _FULL_DISK.get(error.errno, error.strerror or str(error))
    return OSError(
        error.errno, f"{reason} while writing {str(target)!r}; the previous file there (if any) is unchanged"
    )


def atomic_write(
    path: str | os.PathLike[str], write: Callable[[BinaryIO], object], *, checksum: bool = False
) -> WrittenFile:
    """Write ``path`` atomically: ``write(file)`` fills a temporary file in the same directory, which is
    flushed, ``fsync``-ed and renamed over ``path``; then the directory is ``fsync``-ed.

    On any failure (the callback's, a full disk, a signal raising ``KeyboardInterrupt``) the temporary
    file is removed and ``path`` is left as it was. An ``OSError`` is re-raised with the reason in words
    (ENOSPC: "no space left on device") and the target path. ``checksum=True``: the returned
    :class:`WrittenFile` carries the SHA-256 of the bytes written, computed while writing (no re-read).
    """
    target = _final_target(path)
    directory = target.parent
    temporary: Path | None = None
    writer: _Writer | None = None
    try:
        temporary, file = _open_temporary(directory, target)
        writer = _Writer(file, checksum)
        with file:
            write(writer)  # type: ignore[arg-type]  # a file-like object: write() and flush()
            writer.flush()
            os.fsync(file.fileno())
        os.replace(temporary, target)
    except BaseException as error:
        if temporary is not None:
            try:
                temporary.unlink()
            except FileNotFoundError:
                pass
        cause = writer.error if writer is not None and writer.error is not None else error
        described = _describe(cause, target)
        if described is not None:
            raise described from cause
        raise
    assert writer is not None
    _fsync_directory(directory)
    return WrittenFile(target, writer.size, writer.hexdigest())


def atomic_save(obj: Any, path: str | os.PathLike[str], *, checksum: bool = False) -> WrittenFile:
    """``torch.save(obj, path)``, atomically (see :func:`atomic_write`)."""
    import torch

    return atomic_write(path, lambda file: torch.save(obj, file), checksum=checksum)


def atomic_write_text(path: str | os.PathLike[str], text: str, *, checksum: bool = False) -> WrittenFile:
    """Write ``text`` (UTF-8) to ``path`` atomically (see :func:`atomic_write`)."""
    data = text.encode("utf-8")
    return atomic_write(path, lambda file: file.write(data), checksum=checksum)


def file_sha256(path: str | os.PathLike[str]) -> str:
    """SHA-256 of a file's bytes, read in 1 MiB chunks (a large file is never held in memory)."""
    digest = hashlib.sha256()
    with open(path, "rb") as file:
        while chunk := file.read(_CHUNK):
            digest.update(chunk)
    return digest.hexdigest()


def _probe(directory: Path, what: str, shown: str) -> None:
    """Create and remove a temporary file in ``directory``, exactly as :func:`atomic_write` will: the only
    test that answers for permissions, ACLs, read-only mounts and root alike (``os.access`` does not)."""
    try:
        temporary, file = _open_temporary(directory, Path(shown))
    except OSError as error:
        reason = {
            errno.EACCES: "permission denied",
            errno.EPERM: "operation not permitted",
            errno.EROFS: "read-only file system",
        }.get(error.errno or 0, _FULL_DISK.get(error.errno or 0, error.strerror or str(error)))
        raise ValueError(
            f"{what} ({shown!r}): cannot create files in directory {str(directory)!r} ({reason}); "
            "choose a path in a writable directory"
        ) from error
    file.close()
    temporary.unlink()


def check_writable_file(path: str | os.PathLike[str], what: str) -> Path:
    """Fail now, with a ``ValueError`` naming ``what`` (e.g. ``"--checkpoint"``), if :func:`atomic_write`
    could not write ``path`` later: it is a directory, its parent directory is missing (or not a
    directory), or no file can be created there. Leaves no file behind. Returns ``Path(path)``."""
    target = _final_target(path)
    shown = str(path)
    if target.is_dir():
        raise ValueError(f"{what} ({shown!r}) is a directory; it must be a file path (a new or an existing file)")
    parent = target.parent
    if not parent.exists():
        raise ValueError(f"{what} ({shown!r}): directory {str(parent)!r} does not exist; create it first")
    if not parent.is_dir():
        raise ValueError(f"{what} ({shown!r}): {str(parent)!r} is not a directory")
    _probe(parent, what, shown)
    return Path(path)


def check_writable_directory(path: str | os.PathLike[str], what: str, files: Sequence[str] = ()) -> Path:
    """Fail now, with a ``ValueError`` naming ``what`` (e.g. ``"--out"``), if output directory ``path``
    could not be created or written later: it exists but is not a directory, its nearest existing
    ancestor is not a writable directory, or one of the ``files`` to be written in it is a directory.
    Creates nothing (a missing directory is created when the results are written). Returns ``Path(path)``."""
    target = Path(path)
    shown = str(path)
    if target.exists() and not target.is_dir():
        raise ValueError(f"{what} ({shown!r}) exists and is not a directory; it must be a directory (new or existing)")
    for name in files:
        if (target / name).is_dir():
            raise ValueError(f"{what} ({shown!r}): {str(target / name)!r} is a directory, where the file {name} goes")
    existing = target
    while not existing.exists():
        existing = existing.parent  # ends at "." or "/", which exist
    if not existing.is_dir():
        raise ValueError(f"{what} ({shown!r}): {str(existing)!r} is not a directory, so {shown!r} cannot be created")
    _probe(existing, what, shown)
    return target
