"""One writer per folder: an advisory lock on ``FOLDER/.lock`` held while a run, fine-tuning or preprocess writes.

The lock is ``flock`` on POSIX (released by the kernel when the process dies, so a crashed run never leaves a
stale lock) and ``msvcrt.locking`` on Windows. The holder writes its pid and what it is into the lock file so that
the process refused can say who holds the folder.
"""

from __future__ import annotations

import contextlib
import os
import time
from collections.abc import Iterator
from pathlib import Path

__all__ = ["FolderBusyError", "folder_lock"]

LOCK_NAME = ".lock"


class FolderBusyError(ValueError):
    """Another process holds the folder's lock; the message names the folder and the holder."""


def _try_lock(fh) -> bool:
    try:
        import fcntl
    except ImportError:  # Windows
        import msvcrt

        try:
            fh.seek(0)
            msvcrt.locking(fh.fileno(), msvcrt.LK_NBLCK, 1)
        except OSError:
            return False
        return True
    try:
        fcntl.flock(fh, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        return False
    return True


def _holder(path: Path) -> str:
    with contextlib.suppress(OSError):
        text = path.read_text(errors="replace").strip()
        if text:
            return text[:200]
    return "another process"


@contextlib.contextmanager
def folder_lock(folder: str | os.PathLike, what: str, wait: float = 0.0, hint: str = "") -> Iterator[Path]:
    """Hold ``folder``'s lock for the ``with`` block (creating the folder; a folder created here is removed again
    when the block fails before writing anything). ``what`` describes the holder (e.g. "pretrain"); when the lock
    is taken, wait up to ``wait`` seconds, then raise :class:`FolderBusyError` naming the holder, followed by
    ``hint``."""
    folder = Path(folder)
    created = not folder.exists()
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / LOCK_NAME
    fh = open(path, "a+")  # "a+": never truncates the holder's note before we hold the lock
    try:
        deadline = time.monotonic() + wait
        while not _try_lock(fh):
            if time.monotonic() >= deadline:
                hint = hint or "wait for it to end, or choose another folder"
                raise FolderBusyError(f"{folder}: in use by {_holder(path)}; two processes writing one folder would "
                                      f"corrupt each other's files: {hint}")
            time.sleep(0.2)
        fh.seek(0)
        fh.truncate()
        fh.write(f"{what} (pid {os.getpid()})\n")
        fh.flush()
        yield path
    except BaseException:
        if created and [p.name for p in folder.iterdir()] == [LOCK_NAME]:
            # A run refused before it wrote anything leaves no folder behind.
            path.unlink(missing_ok=True)
            with contextlib.suppress(OSError):
                folder.rmdir()
        raise
    finally:
        fh.close()  # closing the file releases the lock
