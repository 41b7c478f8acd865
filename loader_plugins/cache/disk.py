"""A directory of immutable cached objects, and the local disk tier built on it.

One entry is one remote object at one version, keyed by ``sha256(bucket/key/etag)``::

    ROOT/objects/ab/<key>.data      the object's bytes
    ROOT/objects/ab/<key>.json      the manifest: written last, so present = complete
    ROOT/objects/ab/<key>.partial   bytes being written (only while its writer holds <key>.fill)
    ROOT/objects/ab/<key>.fill      flock held exclusively by the one writer of the entry
    ROOT/budget.lock                serialises space reservations

Atomicity: a writer fills ``.partial`` (``pwrite`` at the object's offsets, in any order), and
only once every byte is there fsyncs it, renames it to ``.data``, then writes the manifest to a
temporary name, fsyncs and renames it (for a write-through load, in a background thread once the
load has returned: :meth:`Fill.commit_later`). A crash at any point leaves no manifest, hence no entry:
the leftovers are reclaimed by the next writer of the key or by :meth:`EntryStore.sweep`.

On a durable tier, whole aligned blocks are written with O_DIRECT straight from the caller's
memory (the reader allocates tensors with the same 4 KiB alignment as their bytes in the file):
no copy through the page cache, which on a small host takes CPU from the S3 download itself
(docs/measurements.md, "Disk tier write-through"), and the fsync at publication is short.

Readers hold a shared ``flock`` on the ``.data`` file while they read; eviction takes an
exclusive one without waiting and skips entries it cannot lock, so it never deletes (or frees
the memory of) an entry being read. Least recently used = oldest manifest mtime, which a
reader bumps on every hit. Lookups verify the manifest against the bucket, key, ETag and size
the remote reported, and the data file's size against the manifest.
"""

from __future__ import annotations

import atexit
import collections
import contextlib
import ctypes
import errno
import fcntl
import hashlib
import json
import logging
import os
import queue
import socket
import threading
import time
from pathlib import Path
from typing import TYPE_CHECKING, Iterator

from ..errors import ConfigError
from . import metrics

if TYPE_CHECKING:
    from ..config import StreamerConfig

log = logging.getLogger(__name__)

MANIFEST_VERSION = 1
_O_DIRECT = getattr(os, "O_DIRECT", 0)
_DIRECT_ALIGN = 4096


def entry_key(bucket: str, key: str, etag: str) -> str:
    """The cache key of one object version: ``sha256("bucket/key/etag")`` in hex."""
    return hashlib.sha256(f"{bucket}/{key}/{etag}".encode()).hexdigest()


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


# ------------------------------------------------------------------------------------------
# entries
# ------------------------------------------------------------------------------------------

class EntryHandle:
    """A complete entry opened for reading: holds a shared lock on its data file until closed."""

    def __init__(self, store: "EntryStore", manifest: dict, data_path: str, lock_fd: int):
        self.store = store
        self.manifest = manifest
        self.data_path = data_path
        self._fd = lock_fd

    @property
    def size(self) -> int:
        return int(self.manifest["size"])

    def close(self) -> None:
        if self._fd >= 0:
            os.close(self._fd)   # releases the shared lock
            self._fd = -1

    def __enter__(self) -> "EntryHandle":
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def __del__(self) -> None:
        self.close()


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


class EntryStore:
    """Entries of one tier in one directory, with a byte budget (0 = unlimited) and LRU eviction."""

    #: fsync data and manifests (disk); a memory tier has nothing to make durable
    durable = True
    tier = "disk"

    def __init__(self, root: str | os.PathLike, max_bytes: int = 0):
        if max_bytes is None or max_bytes < 0:
            raise ConfigError(f"{self.tier} cache budget {max_bytes!r}: must be a number of bytes >= 0 "
                              f"(0 = unlimited)")
        self.root = Path(root)
        self.max_bytes = int(max_bytes)
        self.objects = self.root / "objects"
        try:
            self.objects.mkdir(parents=True, exist_ok=True)
        except OSError as exc:
            raise ConfigError(f"cannot create the {self.tier} cache directory {self.objects}: {exc.strerror}; "
                              f"check the path and its permissions") from exc

    # -- paths -----------------------------------------------------------------------------
    def _paths(self, key: str) -> dict[str, str]:
        d = self.objects / key[:2]
        base = str(d / key)
        return {"dir": str(d), "data": base + ".data", "manifest": base + ".json",
                "partial": base + ".partial", "fill": base + ".fill"}

    def budget(self) -> int:
        return self.max_bytes

    # -- reading ---------------------------------------------------------------------------
    def lookup(self, bucket: str, key: str, etag: str, size: int | None = None, *,
               touch: bool = True) -> EntryHandle | None:
        """The complete entry for this object version, locked for reading, or None."""
        k = entry_key(bucket, key, etag)
        paths = self._paths(k)
        _wait_published(paths["partial"])   # written by this process a moment ago: about to appear
        if not os.path.exists(paths["manifest"]):
            return None
        fd = _open_locked(paths["data"], fcntl.LOCK_SH, create=False)
        if fd is None:
            return None
        try:
            manifest = _read_manifest(paths["manifest"])
            problem = None
            if manifest is None:
                problem = "no readable manifest"
            elif (manifest.get("bucket"), manifest.get("key"), manifest.get("etag")) != (bucket, key, etag):
                problem = "manifest names another object"
            elif size is not None and int(manifest.get("size", -1)) != size:
                problem = f"manifest records {manifest.get('size')} bytes, the object has {size}"
            elif os.fstat(fd).st_size != int(manifest.get("size", -1)):
                problem = f"data file holds {os.fstat(fd).st_size} bytes, manifest records {manifest.get('size')}"
        except BaseException:
            os.close(fd)
            raise
        if problem is not None:
            os.close(fd)
            if manifest is not None or os.path.exists(paths["manifest"]):
                log.warning("s3://%s/%s: %s cache entry %s is invalid (%s); dropping it", bucket, key, self.tier, k,
                            problem)
                self._remove_entry(k)
            return None
        if touch:
            with contextlib.suppress(OSError):
                os.utime(paths["manifest"])   # LRU: last use
        return EntryHandle(self, manifest, paths["data"], fd)

    def contains(self, bucket: str, key: str, etag: str, size: int | None = None) -> bool:
        """Whether a complete, valid entry exists (no lock kept, LRU time untouched)."""
        handle = self.lookup(bucket, key, etag, size, touch=False)
        if handle is None:
            return False
        handle.close()
        return True

    # -- writing ---------------------------------------------------------------------------
    def begin_fill(self, bucket: str, key: str, etag: str, size: int, uri: str | None = None) -> Fill | None:
        """Start writing an entry; None when another writer has it, it exists, or it cannot fit."""
        k = entry_key(bucket, key, etag)
        paths = self._paths(k)
        os.makedirs(paths["dir"], exist_ok=True)
        lock_fd = _open_locked(paths["fill"], fcntl.LOCK_EX | fcntl.LOCK_NB, create=True)
        if lock_fd is None:
            log.debug("%s: another process is writing this %s cache entry; not writing it twice", uri, self.tier)
            return None
        ident = {"bucket": bucket, "key": key, "etag": etag, "size": int(size), "uri": uri or f"s3://{bucket}/{key}"}
        try:
            if os.path.exists(paths["manifest"]):
                raise _Skip("already cached")
            _unlink(paths["data"])   # an orphan from a crash between two renames
            with self._budget_lock():   # room and reservation (the partial's full size) in one step
                if not self._make_room_locked(int(size), exclude=k):
                    raise _Skip(f"{size} bytes do not fit in the {self.tier} cache budget of {self.budget()} "
                                f"bytes (entries being read are never evicted)")
                return Fill(self, ident, k, lock_fd)
        except _Skip as why:
            log.info("%s: not caching in the %s tier: %s", ident["uri"], self.tier, why)
        except OSError as exc:
            log.warning("%s: cannot start a %s cache entry (%s); loading without it", ident["uri"], self.tier, exc)
        _unlink(paths["partial"])
        _unlink(paths["fill"])
        os.close(lock_fd)
        return None

    # -- listing, budget, eviction ---------------------------------------------------------
    def entries(self) -> list[dict]:
        """Complete entries: manifest fields plus ``cache_key``, ``last_used``, ``path``, ``in_use``."""
        out = []
        for mpath in self.objects.glob("*/*.json"):
            manifest = _read_manifest(str(mpath))
            if manifest is None:
                continue
            k = mpath.name[:-len(".json")]
            data = self._paths(k)["data"]
            try:
                mtime = mpath.stat().st_mtime
            except FileNotFoundError:
                continue
            out.append({**manifest, "cache_key": k, "last_used": mtime, "path": data,
                        "in_use": self._in_use(data)})
        out.sort(key=lambda e: e["last_used"])
        return out

    def _in_use(self, data_path: str) -> bool:
        fd = _open_locked(data_path, fcntl.LOCK_EX | fcntl.LOCK_NB, create=False)
        if fd is None:
            return os.path.exists(data_path)
        os.close(fd)
        return False

    def usage(self) -> int:
        """Bytes held: data files, partial files (reserved at their full size) and orphans."""
        total = 0
        for path in self.objects.glob("*/*"):
            if path.suffix in (".data", ".partial"):
                with contextlib.suppress(FileNotFoundError):
                    total += path.stat().st_size
        return total

    @contextlib.contextmanager
    def _budget_lock(self) -> Iterator[None]:
        fd = os.open(self.root / "budget.lock", os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o644)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX)
            yield
        finally:
            os.close(fd)

    def make_room(self, nbytes: int, *, exclude: str | None = None) -> bool:
        """Evict least recently used entries not being read until ``nbytes`` more fit in the budget."""
        with self._budget_lock():
            return self._make_room_locked(nbytes, exclude=exclude)

    def _make_room_locked(self, nbytes: int, *, exclude: str | None = None) -> bool:
        budget = self.budget()
        if not budget:
            return True
        if nbytes > budget:
            return False
        used = self.usage()
        if used + nbytes <= budget:
            return True
        for entry in self.entries():
            if entry["cache_key"] == exclude or entry["in_use"]:
                continue
            if self.evict_key(entry["cache_key"]):
                used -= int(entry["size"])
                if used + nbytes <= budget:
                    return True
        return self.usage() + nbytes <= budget

    def enforce_budget(self) -> int:
        """Evict LRU entries not being read until usage fits the budget; returns bytes freed."""
        budget = self.budget()
        if not budget:
            return 0
        freed = 0
        with self._budget_lock():
            used = self.usage()
            for entry in self.entries():
                if used <= budget:
                    break
                if not entry["in_use"] and self.evict_key(entry["cache_key"]):
                    used -= int(entry["size"])
                    freed += int(entry["size"])
        return freed

    def evict_key(self, k: str) -> bool:
        """Remove one entry unless someone is reading it (never waits); True when removed."""
        paths = self._paths(k)
        fd = _open_locked(paths["data"], fcntl.LOCK_EX | fcntl.LOCK_NB, create=False)
        if fd is None:
            if os.path.exists(paths["data"]):
                return False              # being read
            _unlink(paths["manifest"])     # a manifest without data is no entry
            return False
        try:
            _unlink(paths["manifest"])     # first: no new reader sees it complete
            _unlink(paths["data"])
        finally:
            os.close(fd)
        metrics.evicted(self.tier)
        log.info("evicted %s cache entry %s", self.tier, k)
        return True

    def _remove_entry(self, k: str) -> None:
        self.evict_key(k)

    def evict_matching(self, bucket: str | None = None, prefix: str = "") -> tuple[list[dict], list[dict]]:
        """Evict entries of ``bucket`` whose key starts with ``prefix`` (all when bucket is None).

        Returns (evicted, skipped because in use)."""
        evicted, skipped = [], []
        for entry in self.entries():
            key = str(entry.get("key", ""))
            if bucket is not None and (entry.get("bucket") != bucket or not key.startswith(prefix)):
                continue
            (evicted if self.evict_key(entry["cache_key"]) else skipped).append(entry)
        return evicted, skipped

    def sweep(self) -> int:
        """Reclaim what crashed writers left (partial files, data without manifest); returns files removed."""
        removed = 0
        for path in list(self.objects.glob("*/*")):
            name = path.name
            if name.endswith(".tmp"):
                k = name.split(".", 1)[0]
            elif path.suffix in (".partial", ".data", ".fill"):
                k = path.stem
            else:
                continue
            paths = self._paths(k)
            if path.suffix == ".data" and os.path.exists(paths["manifest"]):
                continue
            fd = _open_locked(paths["fill"], fcntl.LOCK_EX | fcntl.LOCK_NB, create=True)
            if fd is None:
                continue                  # a live writer
            try:
                if path.suffix == ".data" and os.path.exists(paths["manifest"]):
                    continue
                if path.exists() and path.suffix != ".fill":
                    _unlink(path)
                    removed += 1
            finally:
                _unlink(paths["fill"])
                os.close(fd)
        return removed

    def clear(self) -> tuple[int, int]:
        """Evict every entry not in use and sweep leftovers; returns (evicted, skipped)."""
        evicted, skipped = self.evict_matching()
        self.sweep()
        return len(evicted), len(skipped)

    def status(self) -> dict:
        entries = self.entries()
        return {"tier": self.tier, "root": str(self.root), "max_bytes": self.budget(), "used_bytes": self.usage(),
                "entries": [{k: e.get(k) for k in ("uri", "etag", "size", "last_used", "in_use", "cache_key")}
                            for e in entries]}


class _Skip(Exception):
    pass


def _read_manifest(path: str) -> dict | None:
    try:
        with open(path) as f:
            manifest = json.load(f)
    except (OSError, ValueError):
        return None
    if not isinstance(manifest, dict) or manifest.get("version") != MANIFEST_VERSION:
        return None
    if not all(k in manifest for k in ("bucket", "key", "etag", "size")):
        return None
    return manifest


class DiskTier(EntryStore):
    """The local disk tier: durable entries (fsync before publishing) under ``config.cache_dir``."""

    durable = True
    tier = "disk"


def disk_tier(config: "StreamerConfig") -> DiskTier | None:
    """The disk tier ``config`` names (None without ``cache_dir``)."""
    return DiskTier(config.cache_dir, config.cache_max_bytes) if getattr(config, "cache_dir", None) else None
