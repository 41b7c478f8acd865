"""A directory of immutable cached objects, and the local disk tier built on it.

One entry is one remote object at one version, keyed by ``sha256(namespace/key/version)``
(:func:`entry_key`; what each store's namespace and version are: :mod:`.remotes`)::

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

import contextlib
import fcntl
import hashlib
import json
import logging
import os
from pathlib import Path
from typing import TYPE_CHECKING, Iterator

from ..errors import ConfigError
from . import metrics
from .config import cache_config
from .files import _open_locked, _unlink
from .fill import MANIFEST_VERSION, Fill, _committer, _wait_published, wait_for_commits  # noqa: F401  (wait_for_commits: re-exported)

if TYPE_CHECKING:
    from ..config import StreamerConfig

log = logging.getLogger(__name__)


def entry_key(bucket: str, key: str, etag: str) -> str:
    """The cache key of one object version: ``sha256("bucket/key/etag")`` in hex, where ``bucket``
    is the store's namespace and ``etag`` the object's version (:mod:`.remotes`: ``gs://bucket``
    and a generation for GCS, ``az://account/container`` and an ETag for Azure)."""
    return hashlib.sha256(f"{bucket}/{key}/{etag}".encode()).hexdigest()


def object_uri(bucket: str, key: str) -> str:
    """The URI an entry's namespace and key name, for messages (an S3 namespace is the bare bucket)."""
    return f"{bucket}/{key}" if "://" in bucket else f"s3://{bucket}/{key}"


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
                log.warning("%s: %s cache entry %s is invalid (%s); dropping it", object_uri(bucket, key), self.tier, k,
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
        ident = {"bucket": bucket, "key": key, "etag": etag, "size": int(size), "uri": uri or object_uri(bucket, key)}
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
    """The local disk tier: durable entries (fsync before publishing) under the ``cache_dir`` option."""

    durable = True
    tier = "disk"


def disk_tier(config: "StreamerConfig") -> DiskTier | None:
    """The disk tier ``config`` names (None without ``cache_dir``)."""
    section = cache_config(config)
    return DiskTier(section.cache_dir, section.cache_max_bytes) if section.cache_dir else None
