"""Writing one cache entry (:class:`Fill`): bytes at their offsets from any thread (O_DIRECT
from the caller's memory where aligned), published atomically by a background committer
(:func:`wait_for_commits`)."""

from __future__ import annotations

import atexit
import collections
import contextlib
import ctypes
import errno
import json
import logging
import os
import queue
import socket
import threading
import time
from typing import TYPE_CHECKING

from . import metrics
from .files import _fsync_dir, _unlink

if TYPE_CHECKING:
    from .disk import EntryStore

log = logging.getLogger(__name__)

MANIFEST_VERSION = 1
_O_DIRECT = getattr(os, "O_DIRECT", 0)
_DIRECT_ALIGN = 4096


class Fill:
    """One entry being written: ``write`` bytes at their offsets (thread-safe), then ``commit``.

    Holds the entry's fill lock from creation to commit/abort. Nothing is visible to readers
    before :meth:`commit` returns.
    """

    def __init__(self, store: "EntryStore", ident: dict, key: str, lock_fd: int):
        self.store = store
        self.ident = ident                 # bucket, key, etag, size, uri
        self.key = key
        self.size = int(ident["size"])
        self._lock_fd = lock_fd
        self._paths = store._paths(key)
        self._ranges: list[tuple[int, int]] = []
        self._mutex = threading.Lock()
        self.written = 0
        self.failed: BaseException | None = None
        self.state = "open"                # open | committed | aborted
        self.fd = os.open(self._paths["partial"], os.O_RDWR | os.O_CREAT | os.O_TRUNC | os.O_CLOEXEC, 0o644)
        self._dfd = -1
        self._direct_ok = True
        try:
            st = os.statvfs(self._paths["dir"])   # a full disk (or tmpfs) fails here, not midway
            if st.f_bavail * st.f_frsize < self.size:
                raise OSError(errno.ENOSPC, f"{st.f_bavail * st.f_frsize} bytes free, the entry needs {self.size}")
            os.ftruncate(self.fd, self.size)
            if store.durable and self.size:
                # contiguous extents although the writes arrive out of order (66 vs 9 extents per GB
                # measured for O_DIRECT writes in shuffled 16 MiB chunks); no cost to the writes
                with contextlib.suppress(OSError):
                    os.posix_fallocate(self.fd, 0, self.size)
            if store.durable and _O_DIRECT:
                try:
                    self._dfd = os.open(self._paths["partial"], os.O_WRONLY | _O_DIRECT | os.O_CLOEXEC)
                except OSError:   # a file system without O_DIRECT: every write is buffered
                    self._dfd = -1
        except BaseException:
            self.abort()
            raise

    # -- writing ---------------------------------------------------------------------------
    def write(self, offset: int, data) -> None:
        """Write ``data`` (a buffer) at ``offset``. A failure marks the fill failed, never raises."""
        if self.state != "open" or self.failed is not None:
            return
        view = memoryview(data)
        if view.ndim != 1 or view.format not in ("B", "b", "c"):
            view = view.cast("B")
        n = view.nbytes
        if offset < 0 or offset + n > self.size:
            self.failed = ValueError(f"write of [{offset}, {offset + n}) outside the {self.size}-byte entry")
            return
        try:
            lo, hi = self._direct_span(view, offset, n)
            if hi > lo:   # the aligned middle straight from the caller's memory to the disk (no copy)
                try:
                    self._pwrite(self._dfd, view[lo:hi], offset + lo)
                except OSError as exc:
                    if exc.errno != errno.EINVAL:
                        raise
                    self._direct_ok = False   # the device wants another alignment (closed at commit/abort)
                    lo = hi = 0
                if lo:
                    self._pwrite(self.fd, view[:lo], offset)
                self._pwrite(self.fd, view[hi:], offset + hi)
            else:
                self._pwrite(self.fd, view, offset)
        except OSError as exc:
            self.failed = exc
            log.warning("%s: writing the %s cache entry failed (%s); the load goes on without caching it",
                        self.ident.get("uri"), self.store.tier, exc)
            return
        with self._mutex:
            self._ranges.append((offset, offset + n))
            self.written += n

    def _direct_span(self, view: memoryview, offset: int, n: int) -> tuple[int, int]:
        """The part of ``view`` O_DIRECT can write: whole aligned blocks, same alignment in memory
        and file (the reader allocates tensors that way); (0, 0) when none."""
        if self._dfd < 0 or not self._direct_ok or n < 2 * _DIRECT_ALIGN:
            return 0, 0
        try:
            addr = ctypes.addressof(ctypes.c_char.from_buffer(view))
        except (TypeError, ValueError):   # read-only buffer
            return 0, 0
        if (addr - offset) % _DIRECT_ALIGN:
            return 0, 0
        lo = -offset % _DIRECT_ALIGN
        hi = (offset + n) // _DIRECT_ALIGN * _DIRECT_ALIGN - offset
        return (lo, hi) if hi > lo else (0, 0)

    @staticmethod
    def _pwrite(fd: int, view: memoryview, offset: int) -> None:
        pos, n = 0, view.nbytes
        while pos < n:
            pos += os.pwrite(fd, view[pos:], offset + pos)

    def missing(self) -> list[tuple[int, int]]:
        """Byte ranges not written yet, merged and sorted."""
        with self._mutex:
            ranges = sorted(self._ranges)
        gaps: list[tuple[int, int]] = []
        pos = 0
        merged: list[tuple[int, int]] = []
        for start, end in ranges:
            if merged and start <= merged[-1][1]:
                merged[-1] = (merged[-1][0], max(merged[-1][1], end))
            else:
                merged.append((start, end))
        with self._mutex:
            self._ranges = list(merged)
        for start, end in merged:
            if start > pos:
                gaps.append((pos, start))
            pos = max(pos, end)
        if pos < self.size:
            gaps.append((pos, self.size))
        return gaps

    @property
    def complete(self) -> bool:
        return self.failed is None and not self.missing()

    # -- finishing -------------------------------------------------------------------------
    def commit(self) -> bool:
        """Publish the entry if every byte was written; returns whether it was published."""
        if self.state != "open":
            return self.state == "committed"
        if not self.complete:
            self.abort()
            return False
        paths = self._paths
        try:
            self._close_direct()
            if self.store.durable:
                os.fsync(self.fd)
            os.close(self.fd)
            self.fd = -1
            os.replace(paths["partial"], paths["data"])
            manifest = {
                "version": MANIFEST_VERSION, "uri": self.ident.get("uri"), "bucket": self.ident["bucket"],
                "key": self.ident["key"], "etag": self.ident["etag"], "size": self.size,
                "created": time.time(), "host": socket.gethostname(), "tier": self.store.tier,
            }
            tmp = paths["manifest"] + f".{os.getpid()}.tmp"
            with open(tmp, "w") as f:
                json.dump(manifest, f)
                f.flush()
                if self.store.durable:
                    os.fsync(f.fileno())
            os.replace(tmp, paths["manifest"])
            if self.store.durable:
                _fsync_dir(paths["dir"])
        except OSError as exc:
            log.warning("%s: publishing the %s cache entry failed (%s)", self.ident.get("uri"), self.store.tier, exc)
            if not os.path.exists(paths["manifest"]):
                _unlink(paths["data"])   # renamed already: no manifest, so no entry; we still hold the fill lock
            self.abort()
            return False
        self.state = "committed"
        self._release()
        metrics.stored(self.store.tier, self.size)
        log.info("cached %s (%d bytes) in the %s tier", self.ident.get("uri"), self.size, self.store.tier)
        return True

    def commit_later(self) -> None:
        """Publish in a background thread (the fsync of a large entry can take seconds: the load
        that wrote it need not wait). Until then nothing is visible; a crash leaves a partial file.
        Pending commits finish before the interpreter exits (:func:`wait_for_commits`)."""
        _committer().put(self)

    def abort(self) -> None:
        if self.state != "open":
            return
        self.state = "aborted"
        self._close_direct()
        if self.fd >= 0:
            with contextlib.suppress(OSError):
                os.close(self.fd)
            self.fd = -1
        _unlink(self._paths["partial"])
        self._release()

    def _close_direct(self) -> None:
        if self._dfd >= 0:
            with contextlib.suppress(OSError):
                os.close(self._dfd)
            self._dfd = -1

    def _release(self) -> None:
        if self._lock_fd >= 0:
            _unlink(self._paths["fill"])   # while still held: a waiter re-checks the inode and starts over
            os.close(self._lock_fd)
            self._lock_fd = -1

    def __del__(self) -> None:
        with contextlib.suppress(Exception):
            self.abort()


class _Committer:
    """One daemon thread publishing fills handed to :meth:`Fill.commit_later`, in order."""

    def __init__(self) -> None:
        self._queue: queue.Queue = queue.Queue()
        self._pending = 0
        self._paths: collections.Counter = collections.Counter()   # partial paths not yet published
        self._cond = threading.Condition()
        self._thread = threading.Thread(target=self._run, name="cache-commit", daemon=True)
        self._thread.start()

    def put(self, fill: "Fill") -> None:
        with self._cond:
            self._pending += 1
            self._paths[fill._paths["partial"]] += 1
        self._queue.put(fill)

    def _run(self) -> None:
        while True:
            fill = self._queue.get()
            try:
                fill.commit()
            except BaseException as exc:  # noqa: BLE001 - a failed commit only loses the entry
                log.warning("%s: publishing the cache entry failed: %s", fill.ident.get("uri"), exc)
                with contextlib.suppress(BaseException):
                    fill.abort()
            finally:
                with self._cond:
                    self._pending -= 1
                    path = fill._paths["partial"]
                    self._paths[path] -= 1
                    if self._paths[path] <= 0:
                        del self._paths[path]
                    self._cond.notify_all()

    def wait_path(self, partial: str) -> None:
        with self._cond:
            while self._paths.get(partial):
                self._cond.wait()

    def wait(self, timeout: float | None = None) -> bool:
        deadline = None if timeout is None else time.monotonic() + timeout
        with self._cond:
            while self._pending:
                left = None if deadline is None else deadline - time.monotonic()
                if left is not None and left <= 0:
                    return False
                self._cond.wait(left)
        return True


_committers: dict[int, _Committer] = {}
_committers_lock = threading.Lock()


def _committer() -> _Committer:
    with _committers_lock:
        c = _committers.get(os.getpid())   # per process: a forked child starts its own thread
        if c is None:
            c = _committers[os.getpid()] = _Committer()
        return c


def _wait_published(partial: str) -> None:
    """If this process is publishing the entry of ``partial`` in the background, wait for it."""
    c = _committers.get(os.getpid())
    if c is not None:
        c.wait_path(partial)


def wait_for_commits(timeout: float | None = None) -> bool:
    """Wait until entries handed to :meth:`Fill.commit_later` are published (or dropped)."""
    c = _committers.get(os.getpid())
    return True if c is None else c.wait(timeout)


atexit.register(wait_for_commits)
