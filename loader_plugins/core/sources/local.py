"""Local files: ``os.preadv`` straight into the destination's memory (the GIL is released
while the kernel copies), with O_DIRECT through aligned staging buffers for data that is not
in the page cache.

``direct_io="auto"`` first asks for the bytes with ``RWF_NOWAIT`` (served only from the page
cache, never blocking on the disk); whatever is not cached is read with O_DIRECT. A warm file
is thus read at memory speed and a cold one at the device's O_DIRECT speed, without guessing.
"""

from __future__ import annotations

import ctypes
import errno
import logging
import os
import threading
from pathlib import Path

from ...errors import SourceChangedError, SourceError
from .base import BufferPool, Source, Storage

log = logging.getLogger(__name__)

_RWF_NOWAIT = getattr(os, "RWF_NOWAIT", 0)  # Linux 4.14+, Python 3.7+
_O_DIRECT = getattr(os, "O_DIRECT", 0)


def _strip_scheme(uri: str) -> str:
    text = str(uri)
    return text[len("file://"):] if text.startswith("file://") else text


class LocalSource(Source):
    header_prefetch = 1 << 20

    def __init__(self, uri: str, *, direct_io: str = "auto", alignment: int = 4096):
        super().__init__(uri)
        self.path = _strip_scheme(uri)
        self._direct_mode = direct_io if _O_DIRECT else "off"
        self._alignment = alignment
        try:
            self._fd = os.open(self.path, os.O_RDONLY | getattr(os, "O_CLOEXEC", 0))
        except OSError as exc:
            raise SourceError(exc.errno, f"{self.path}: cannot open ({exc.strerror})") from exc
        st = os.fstat(self._fd)
        self._stat = (st.st_size, st.st_mtime_ns, st.st_ino)
        self._size = st.st_size
        self._dfd: int | None = None
        self._dfd_lock = threading.Lock()
        self._nowait_ok = bool(_RWF_NOWAIT)

    def size(self) -> int:
        return self._size

    def _direct_fd(self) -> int | None:
        if self._direct_mode == "off":
            return None
        with self._dfd_lock:
            if self._dfd is None:
                try:
                    self._dfd = os.open(self.path, os.O_RDONLY | _O_DIRECT | getattr(os, "O_CLOEXEC", 0))
                except OSError as exc:  # tmpfs and some FUSE file systems refuse O_DIRECT
                    log.debug("O_DIRECT unavailable for %s (%s); using buffered reads", self.path, exc)
                    self._direct_mode = "off"
                    return None
            return self._dfd

    def read_into(self, offset: int, dest: memoryview, pool: BufferPool | None = None,
                  cancelled: threading.Event | None = None) -> None:
        length = len(dest)
        if offset + length > self._size:
            raise SourceError(
                errno.EIO, f"{self.path}: bytes [{offset}, {offset + length}) lie past the end of the "
                f"{self._size}-byte file; the file is truncated")
        pos = 0
        mode = self._direct_mode if pool is not None else "off"
        try:
            if mode == "auto" and self._nowait_ok:
                pos = self._read_cached(offset, dest)
            if pos < length and mode in ("auto", "on"):
                dfd = self._direct_fd()
                if dfd is not None:
                    self._read_direct(dfd, offset + pos, dest[pos:], pool, cancelled)
                    return
            if pos < length:
                self._read_buffered(offset + pos, dest[pos:])
        except OSError as exc:
            if isinstance(exc, SourceError):
                raise
            raise SourceError(exc.errno, f"{self.path}: read of bytes [{offset}, {offset + length}) "
                              f"failed: {exc.strerror or exc}") from exc

    def _read_cached(self, offset: int, dest: memoryview) -> int:
        """Read what the page cache holds without blocking; returns the bytes read."""
        pos, length = 0, len(dest)
        while pos < length:
            try:
                n = os.preadv(self._fd, [dest[pos:]], offset + pos, _RWF_NOWAIT)
            except BlockingIOError:
                break
            except OSError as exc:
                if exc.errno in (errno.EOPNOTSUPP, errno.EINVAL):
                    self._nowait_ok = False  # file system without RWF_NOWAIT support
                    break
                raise
            if n <= 0:
                break
            pos += n
        return pos

    def _read_buffered(self, offset: int, dest: memoryview) -> None:
        pos, length = 0, len(dest)
        while pos < length:
            n = os.preadv(self._fd, [dest[pos:]], offset + pos)
            if n <= 0:
                self._short(offset + pos, offset + length)
            pos += n

    def _read_direct(self, dfd: int, offset: int, dest: memoryview, pool: BufferPool,
                     cancelled: threading.Event | None) -> None:
        align = self._alignment
        length = len(dest)
        buf = pool.acquire()
        try:
            staging = memoryview(buf)
            capacity = (len(staging) // align) * align
            dest_addr = ctypes.addressof(ctypes.c_char.from_buffer(dest)) if not dest.readonly else None
            src_addr = ctypes.addressof(ctypes.c_char.from_buffer(buf))
            pos = 0
            while pos < length:
                if cancelled is not None and cancelled.is_set():
                    return
                start = offset + pos
                aligned = start - start % align
                skip = start - aligned
                want = min(capacity, skip + (length - pos))
                want_aligned = -(-want // align) * align
                n = os.preadv(dfd, [staging[:want_aligned]], aligned)
                useful = min(n - skip, length - pos)
                if useful <= 0:
                    self._short(start, offset + length)
                # ctypes.memmove releases the GIL, so copies on several workers run in parallel
                ctypes.memmove(dest_addr + pos, src_addr + skip, useful)
                pos += useful
        finally:
            del staging
            pool.release(buf)

    def _short(self, at: int, end: int) -> None:
        size = os.fstat(self._fd).st_size
        raise SourceError(
            errno.EIO, f"{self.path}: file ended at byte {at} while reading bytes [{at}, {end}) "
            f"(file is now {size} bytes, was {self._size} when opened); it was truncated or replaced")

    def check_unchanged(self) -> None:
        st = os.stat(self.path)
        if (st.st_size, st.st_mtime_ns, st.st_ino) != self._stat:
            raise SourceChangedError(
                errno.ESTALE, f"{self.path}: the file changed while it was being loaded "
                f"(size/mtime/inode differ); load it again once it is no longer being written")

    def close(self) -> None:
        for fd in (self._fd, self._dfd):
            if fd is not None and fd >= 0:
                try:
                    os.close(fd)
                except OSError:
                    pass
        self._fd = -1
        self._dfd = None


class LocalStorage(Storage):
    def open(self, uri: str) -> LocalSource:
        return LocalSource(uri, direct_io=self.config.direct_io, alignment=self.config.alignment)

    def is_dir(self, uri: str) -> bool:
        return os.path.isdir(_strip_scheme(uri))

    def exists(self, uri: str) -> bool:
        return os.path.exists(_strip_scheme(uri))

    def list_dir(self, uri: str) -> list[str]:
        path = Path(_strip_scheme(uri))
        try:
            return sorted(p.name for p in path.iterdir() if p.is_file())
        except OSError as exc:
            raise SourceError(exc.errno, f"{path}: cannot list directory ({exc.strerror})") from exc

    def join(self, base: str, name: str) -> str:
        return os.path.join(_strip_scheme(base), name)
