"""File helpers of the cache tiers: open with a lock, unlink quietly, fsync a directory."""

from __future__ import annotations

import contextlib
import fcntl
import logging
import os
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    pass

log = logging.getLogger(__name__)


# ------------------------------------------------------------------------------------------
# lock files
# ------------------------------------------------------------------------------------------

def _open_locked(path: str, flags: int, *, create: bool) -> int | None:
    """Open ``path`` and ``flock`` it; None when LOCK_NB and busy, or when ``path`` is missing.

    Guards the classic race with unlinking lock holders: after locking, the descriptor must
    still name the file at ``path`` (same inode, not unlinked), else it starts over.
    """
    while True:
        try:
            fd = os.open(path, (os.O_RDWR | os.O_CREAT if create else os.O_RDONLY) | os.O_CLOEXEC, 0o644)
        except FileNotFoundError:
            return None
        try:
            fcntl.flock(fd, flags)
        except BlockingIOError:
            os.close(fd)
            return None
        except BaseException:
            os.close(fd)
            raise
        try:
            same = os.stat(path).st_ino == os.fstat(fd).st_ino
        except FileNotFoundError:
            same = False
        if same:
            return fd
        os.close(fd)
        if not create:
            return None


def _unlink(path: str | os.PathLike) -> None:
    with contextlib.suppress(FileNotFoundError):
        os.unlink(path)


def _fsync_dir(path: str | os.PathLike) -> None:
    try:
        fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)
