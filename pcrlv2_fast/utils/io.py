"""Crash-safe file writes and file hashing.

Checkpoints, pictures and downloaded scans are written through :func:`atomic_write` so that an interrupted run (crash,
Ctrl-C, full disk) leaves either the old file or the complete new one, never a truncated file that a later run would
trust. A full disk (or quota, or file-size limit) raises :class:`WriteError`, whose message names the file and says
that its previous version is intact.
"""

from __future__ import annotations

import contextlib
import errno
import hashlib
import os
import secrets
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import IO, Any

_CHUNK = 1 << 20


@contextlib.contextmanager
def atomic_write(path: str | os.PathLike, mode: str = "wb") -> Iterator[IO[Any]]:
    """Open a temporary file next to ``path``; on success move it onto ``path`` in one step.

    The temporary file lives in the target's folder (``.<name>.<random>.tmp``) because ``os.replace`` is only atomic
    within one file system. Its contents are fsynced before the rename so that a power loss right after cannot leave
    an empty file under the final name. On any exception the temporary file is removed and the target is untouched.
    """
    if mode not in ("w", "wb", "wt"):
        raise ValueError(f"atomic_write supports write modes 'w', 'wt' and 'wb' only, got {mode!r}")
    path = Path(path)
    existed = path.exists()
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_name(f".{path.name}.{secrets.token_hex(8)}.tmp")
        # O_EXCL: never write into a file someone else created; 0o666 lets the umask give the usual permissions.
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL | getattr(os, "O_BINARY", 0), 0o666)
    except OSError as error:
        raise _write_error(path, error, existed) from error
    try:
        encoding = None if "b" in mode else "utf-8"
        with os.fdopen(fd, mode, encoding=encoding) as fh:
            yield fh
            fh.flush()
            os.fsync(fh.fileno())
        os.replace(tmp, path)
    except BaseException as error:
        tmp.unlink(missing_ok=True)
        if isinstance(error, OSError) and error.errno in _NO_SPACE:
            raise _write_error(path, error, existed) from error
        raise
    _fsync_dir(path.parent)


class WriteError(OSError):
    """A file could not be written (full disk, quota or file-size limit, no permission); the message names it and
    says whether the previous version is intact."""

    def __str__(self) -> str:
        return str(self.strerror)


# Errors that mean "no room": the disk, a quota, or a file-size limit (ulimit -f).
_NO_SPACE = {errno.ENOSPC, errno.EFBIG, getattr(errno, "EDQUOT", errno.ENOSPC)}


def _write_error(path: Path, error: OSError, existed: bool) -> WriteError:
    cause = error.strerror or str(error)
    if error.errno in _NO_SPACE:
        cause += " (the disk, a quota or a file-size limit is full)"
    kept = "the previous version is intact" if existed else "nothing was written under that name"
    return WriteError(error.errno, f"{path}: could not be written: {cause}; {kept}. Free space (or fix the "
                      "permissions) and run again")


def _fsync_dir(folder: Path) -> None:
    """Persist the rename itself; POSIX only, since Windows cannot open a folder as a file."""
    if os.name != "posix":
        return
    fd = os.open(folder, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def atomic_torch_save(obj: Any, path: str | os.PathLike) -> None:
    """``torch.save`` through :func:`atomic_write`, so a checkpoint on disk is always complete."""
    import torch  # imported lazily: the other helpers here must not pull in torch

    _atomic_stream(path, lambda fh: torch.save(obj, fh))


def atomic_npy_save(array, path: str | os.PathLike) -> None:
    """``numpy.save`` (no pickles) through :func:`atomic_write`."""
    import numpy as np

    _atomic_stream(path, lambda fh: np.save(fh, np.ascontiguousarray(array), allow_pickle=False))


def _atomic_stream(path: str | os.PathLike, write: Callable[[IO[bytes]], None]) -> None:
    """Run ``write(file)`` inside :func:`atomic_write`. torch's zip writer and numpy's ``tofile`` report a failed
    write without its errno (a RuntimeError "unexpected pos", an OSError "requested and written"); the writer
    gets a file whose failed write is recorded, so that a full disk still ends in a WriteError."""
    existed = Path(path).exists()
    recorder = None
    try:
        with atomic_write(path, "wb") as fh:
            recorder = _WriteRecorder(fh)
            write(recorder)
    except WriteError:
        raise
    except Exception as error:
        if recorder is not None and recorder.error is not None:
            raise _write_error(Path(path), recorder.error, existed) from error
        raise


class _WriteRecorder:
    """A binary file that remembers the OSError its last failed write raised."""

    def __init__(self, fh: IO[bytes]):
        self.fh, self.error = fh, None

    def write(self, data) -> int:
        try:
            return self.fh.write(data)
        except OSError as error:
            self.error = error
            raise

    def flush(self) -> None:
        self.fh.flush()


def sha256_file(path: str | os.PathLike) -> str:
    """Hex SHA-256 of a file's contents, read in chunks so large scans need little memory."""
    digest = hashlib.sha256()
    with open(path, "rb") as fh:
        for chunk in iter(lambda: fh.read(_CHUNK), b""):
            digest.update(chunk)
    return digest.hexdigest()
