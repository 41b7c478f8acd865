"""Local files: ``os.preadv`` straight into the destination's memory (the GIL is released
while the kernel copies), O_DIRECT for data that is not in the page cache.

``direct_io="auto"`` asks the kernel which pages of a range are cached (``cachestat``; before
Linux 6.5 ``mincore`` on a read-only mapping of the file; neither reads anything): cached
ranges are copied with buffered ``preadv`` at memory speed, the rest is read with O_DIRECT at
the device's speed. O_DIRECT reads land in the destination itself when its address and the
file offset share the same alignment (the reader allocates its tensors that way) and its pages
were mapped before, or were just faulted in as huge pages; otherwise they go through an
aligned staging buffer from the pool (huge pages, so the device gets long requests) and are
copied, by the pool's copy-behind thread while the worker reads its next piece into a second
buffer.
"""

from __future__ import annotations

import collections
import ctypes
import errno
import logging
import mmap
import os
import queue
import threading
from pathlib import Path

from .._libc import cached_pages, libc, residency
from ...errors import SourceChangedError, SourceError, SourceNotFoundError
from .base import BufferPool, Source, Storage

log = logging.getLogger(__name__)

_O_DIRECT = getattr(os, "O_DIRECT", 0)
_PAGE = mmap.PAGESIZE

_lib = libc  # the shared, typed C library (core/_libc.py)


def _strip_scheme(uri: str) -> str:
    text = str(uri)
    return text[len("file://"):] if text.startswith("file://") else text


def _addr(view: memoryview) -> int:
    return ctypes.addressof(ctypes.c_char.from_buffer(view))


class LocalSource(Source):
    #: most shard headers fit (tens of KB); a longer one costs a second pread, which is cheap on a
    #: local file, while every byte read here past the header is read again with the data (and a
    #: tensor-parallel rank may not need it at all)
    header_prefetch = 64 << 10

    def __init__(self, uri: str, *, direct_io: str = "auto", alignment: int = 4096):
        super().__init__(uri)
        self.path = _strip_scheme(uri)
        self._direct_mode = direct_io if _O_DIRECT else "off"
        self._alignment = alignment
        try:
            self._fd = os.open(self.path, os.O_RDONLY | getattr(os, "O_CLOEXEC", 0))
        except OSError as exc:
            kind = SourceNotFoundError if isinstance(exc, FileNotFoundError) else SourceError
            raise kind(exc.errno, f"{self.path}: cannot open ({exc.strerror})") from exc
        st = os.fstat(self._fd)
        self._stat = (st.st_size, st.st_mtime_ns, st.st_ino)
        self._size = st.st_size
        self._dfd: int | None = None
        self._lock = threading.Lock()
        self._map: int | None = None     # read-only mapping used only to ask mincore what is cached
        self._bypassed = False           # some read went past the page cache (O_DIRECT)

    @property
    def wants_staging(self) -> bool:
        return self._direct_mode != "off"

    def bypassed_page_cache(self) -> str | None:
        return self.path if self._bypassed else None

    @property
    def gathers(self) -> bool:
        """Rows are read with buffered preads: not when the user asked for O_DIRECT only."""
        return self._direct_mode != "on"

    def size(self) -> int:
        return self._size

    # ---- page cache residency ------------------------------------------------------------
    def _cached(self, offset: int, length: int) -> bool:
        """True when every page of ``[offset, offset+length)`` is in the page cache."""
        if length == 0:
            return True
        pages = cached_pages(self._fd, offset, length)
        if pages is not None:
            return pages >= (offset + length - 1) // _PAGE - offset // _PAGE + 1
        lib = _lib()
        if not lib:
            return True
        with self._lock:
            if self._map is None and self._size > 0:
                addr = lib.mmap(None, self._size, mmap.PROT_READ, mmap.MAP_SHARED, self._fd, 0)
                if addr in (None, ctypes.c_void_p(-1).value):
                    self._map = 0
                else:
                    self._map = addr
        if not self._map:
            return True
        start = offset - offset % _PAGE
        pages = -(-(offset + length - start) // _PAGE)
        try:
            return b"\x00" not in residency(self._map + start, pages * _PAGE)
        except OSError:
            return True

    # ---- reads ---------------------------------------------------------------------------
    def _direct_fd(self) -> int | None:
        if self._direct_mode == "off":
            return None
        with self._lock:
            if self._dfd is None:
                try:
                    self._dfd = os.open(self.path, os.O_RDONLY | _O_DIRECT | getattr(os, "O_CLOEXEC", 0))
                except OSError as exc:  # tmpfs and some FUSE file systems refuse O_DIRECT
                    log.debug("O_DIRECT unavailable for %s (%s); using buffered reads", self.path, exc)
                    self._direct_mode = "off"
                    return None
            return self._dfd

    def read_into(self, offset: int, dest: memoryview, *, pool: BufferPool | None = None,
                  cancelled: threading.Event | None = None, slack: bool = False, fresh: bool = False) -> None:
        length = len(dest)
        if offset + length > self._size:
            raise SourceError(
                errno.EIO, f"{self.path}: bytes [{offset}, {offset + length}) lie past the end of the "
                f"{self._size}-byte file; the file is truncated")
        if length == 0:
            return
        try:
            mode = self._direct_mode
            if mode == "auto" and self._cached(offset, length):
                mode = "off"
            dfd = self._direct_fd() if mode != "off" else None
            if dfd is None:
                self._read_buffered(offset, dest)
            else:
                self._bypassed = True
                self._read_direct(dfd, offset, dest, pool, cancelled, slack, fresh)
        except OSError as exc:
            if isinstance(exc, SourceError):
                raise
            raise SourceError(exc.errno, f"{self.path}: read of bytes [{offset}, {offset + length}) "
                              f"failed: {exc.strerror or exc}") from exc

    def read_rows(self, offset: int, stride: int, width: int, dest: memoryview, *,
                  cancelled: threading.Event | None = None) -> None:
        """One buffered pread per row (the page cache serves them; rows are too short and
        unaligned for O_DIRECT)."""
        rows = len(dest) // width if width else 0
        if rows == 0:
            return
        end = offset + (rows - 1) * stride + width
        if end > self._size:
            raise SourceError(
                errno.EIO, f"{self.path}: bytes [{offset}, {end}) lie past the end of the "
                f"{self._size}-byte file; the file is truncated")
        fd, preadv = self._fd, os.preadv
        try:
            for row in range(rows):
                at = offset + row * stride
                piece = dest[row * width:(row + 1) * width]
                if preadv(fd, [piece], at) != width:
                    self._read_buffered(at, piece)        # a short read: finish it (or name the truncation)
                if cancelled is not None and not row % 1024 and cancelled.is_set():
                    return
        except OSError as exc:
            if isinstance(exc, SourceError):
                raise
            raise SourceError(exc.errno, f"{self.path}: read of {rows} rows of {width} bytes every {stride} "
                              f"bytes from byte {offset} failed: {exc.strerror or exc}") from exc

    def _read_buffered(self, offset: int, dest: memoryview) -> None:
        pos, length = 0, len(dest)
        while pos < length:
            n = os.preadv(self._fd, [dest[pos:]], offset + pos)
            if n <= 0:
                self._short(offset + pos, offset + length)
            pos += n

    def _read_direct(self, dfd: int, offset: int, dest: memoryview, pool: BufferPool | None,
                     cancelled: threading.Event | None, slack: bool, fresh: bool = False) -> None:
        align = self._alignment
        length = len(dest)
        addr = _addr(dest)
        if fresh and pool is not None:
            # Just-faulted memory is scattered 4 KiB pages: in place, the device gets short requests;
            # from huge-page staging, full-size ones (faster: docs/measurements.md, "Staging buffers").
            self._direct_staged(dfd, offset, dest, pool, cancelled)
            return
        if (addr - offset) % align == 0:
            # Same alignment in memory and file: read in place.
            lo = offset - offset % align
            hi = min(-(-(offset + length) // align) * align, -(-self._size // align) * align)
            if slack:
                self._direct_in_place(dfd, lo, hi, addr - (offset - lo), offset, offset + length)
                return
            inner_lo = -(-offset // align) * align
            inner_hi = (offset + length) // align * align
            if inner_hi > inner_lo:
                self._direct_in_place(dfd, inner_lo, inner_hi, addr + (inner_lo - offset), inner_lo, inner_hi)
                if inner_lo > offset:
                    self._read_buffered(offset, dest[:inner_lo - offset])
                if offset + length > inner_hi:
                    self._read_buffered(inner_hi, dest[inner_hi - offset:])
                return
        if pool is None:
            self._read_buffered(offset, dest)
            return
        self._direct_staged(dfd, offset, dest, pool, cancelled)

    def _direct_in_place(self, dfd: int, lo: int, hi: int, mem: int, need_lo: int, need_hi: int) -> None:
        """O_DIRECT read of aligned file bytes [lo, hi) to address ``mem`` (aligned likewise)."""
        view = memoryview((ctypes.c_char * (hi - lo)).from_address(mem)).cast("B")
        pos = 0
        while lo + pos < need_hi:
            n = os.preadv(dfd, [view[pos:]], lo + pos)
            if n <= 0:
                self._short(lo + pos, need_hi)
            pos += n
            if pos % self._alignment and lo + pos < need_hi:   # a short, unaligned read: finish buffered
                self._read_buffered(lo + pos, view[pos:need_hi - lo])
                return

    def _direct_staged(self, dfd: int, offset: int, dest: memoryview, pool: BufferPool,
                       cancelled: threading.Event | None) -> None:
        """O_DIRECT reads of aligned pieces into staging buffers, each copied to ``dest``: by the
        pool's copy-behind thread while this worker reads the next piece into a second buffer
        (when the pool has one to spare), otherwise here, between reads."""
        align = self._alignment
        length = len(dest)
        dest_addr = _addr(dest)
        copier = pool.copier
        done: queue.SimpleQueue = queue.SimpleQueue()
        held: list = [pool.acquire()]     # one or two buffers, used in turn
        copying: collections.deque = collections.deque()   # buffers whose copy is in flight, oldest first
        error: BaseException | None = None
        try:
            pos = 0
            turn = 0
            while pos < length:
                if cancelled is not None and cancelled.is_set():
                    return
                buf = held[turn % len(held)]
                if copying and copying[0] is buf:   # its previous piece is still being copied
                    copying.popleft()
                    self._copied(done)
                capacity = (len(buf) // align) * align
                start = offset + pos
                aligned = start - start % align
                skip = start - aligned
                want = min(capacity, skip + (length - pos))
                want_aligned = -(-want // align) * align
                n = os.preadv(dfd, [buf.view[:want_aligned]], aligned)
                useful = min(n - skip, length - pos)
                if useful <= 0:
                    self._short(start, offset + length)
                if copier is None:
                    ctypes.memmove(dest_addr + pos, buf.addr + skip, useful)   # releases the GIL
                else:
                    copier.submit(dest_addr + pos, buf.addr + skip, useful, done)
                    copying.append(buf)
                    if len(held) == 1 and pos + useful < length:
                        spare = pool.acquire(wait=False)
                        if spare is not None:
                            held.append(spare)
                pos += useful
                turn += 1
        except BaseException as exc:
            error = exc
            raise
        finally:
            # Every copy into dest ends before this returns, even on error or cancel: the caller
            # may free dest, and the buffers go back to the pool.
            while copying:
                copying.popleft()
                try:
                    self._copied(done)
                except BaseException:
                    if error is None:
                        raise
            for buf in held:
                pool.release(buf)

    @staticmethod
    def _copied(done: queue.SimpleQueue) -> None:
        failure = done.get()
        if failure is not None:
            raise failure

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
        lib = _lib()
        with self._lock:
            if self._map and lib:
                lib.munmap(self._map, self._size)
            self._map = None
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
