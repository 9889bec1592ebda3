"""Crash-safe file writes and file hashing.

Checkpoints, pictures and downloaded scans are written through :func:`atomic_write` so that an interrupted run (crash,
Ctrl-C, full disk) leaves either the old file or the complete new one, never a truncated file that a later run would
trust.
"""

from __future__ import annotations

import contextlib
import hashlib
import os
import secrets
from collections.abc import Iterator
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
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{secrets.token_hex(8)}.tmp")
    # O_EXCL: never write into a file someone else created; 0o666 lets the umask give the usual permissions.
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL | getattr(os, "O_BINARY", 0), 0o666)
    try:
        encoding = None if "b" in mode else "utf-8"
        with os.fdopen(fd, mode, encoding=encoding) as fh:
            yield fh
            fh.flush()
            os.fsync(fh.fileno())
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    _fsync_dir(path.parent)


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

    with atomic_write(path, "wb") as fh:
        torch.save(obj, fh)


def sha256_file(path: str | os.PathLike) -> str:
    """Hex SHA-256 of a file's contents, read in chunks so large scans need little memory."""
    digest = hashlib.sha256()
    with open(path, "rb") as fh:
        for chunk in iter(lambda: fh.read(_CHUNK), b""):
            digest.update(chunk)
    return digest.hexdigest()
