"""Tiered storage for object-store URIs: the fastest tier holding the exact object serves it.

:class:`TieredStorage` is a :class:`~loader_plugins.core.sources.base.Storage` for ``s3://``,
``gs://``, ``az://`` and Azure's ``https://ACCOUNT.blob.core.windows.net/`` URIs (:mod:`.remotes`:
how each store names an object version). Opening an object costs one metadata request (size
and ETag or GCS generation, as without a cache); then, in order:

1. the DRAM tier (the ``dram_cache_dir`` option) holds ``(namespace, key, version)``: a preadv
   source on the shared-memory file;
2. the disk tier (the ``cache_dir`` option) holds it: the local-file source (O_DIRECT for what is
   not in the page cache);
3. otherwise the store itself, and with a disk tier a *write-through* source: every range read
   from the store into the caller's tensor is also ``pwrite``-n at the same offset into the entry's
   partial file (no second download); when the load ends with every byte written (gaps up to
   :data:`GAP_FILL_BYTES`, e.g. padding, are fetched then) the entry is fsynced and published
   by a background thread, so the load does not wait for the disk (the process waits for it at
   exit; :func:`~loader_plugins.cache.disk.wait_for_commits`).

Listing, ``exists`` and small files (index.json) always go to the store, through one plain
storage per process, store and settings (:func:`.remotes.shared_storage`), not one per storage;
when the store cannot be reached, the directory's record answers them (:mod:`.offline`). Cached
entries are immutable and pinned by version, so a hit needs no further request for its bytes.
When every object of a load came from one tier, the load's bytes and seconds are recorded for
:mod:`.estimate` and the metrics.

Hooks: ``s3_storage``, ``gs_storage`` and ``az_storage`` (also for ``https``) are the registry's
targets (:mod:`.plugin`); each returns the core's plain storage when no cache tier is configured.
"""

from __future__ import annotations

import collections
import logging
import threading
import time
from typing import TYPE_CHECKING

from ..core.sources.base import BufferPool, ForwardingSource, Source, Storage, scheme_of, storage_for
from ..core.sources.local import LocalSource
from ..errors import ConfigError, SourceError, SourceNotFoundError
from . import metrics
from .config import cache_config
from .disk import EntryHandle, EntryStore, Fill, disk_tier
from .dram import dram_tier
from .offline import DirRecord, dir_of, is_offline, mark_offline
from .remotes import REMOTES, Remote, remote_for, shared_storage

if TYPE_CHECKING:
    from ..config import StreamerConfig

log = logging.getLogger(__name__)

#: bytes of an object a load left unread (padding, tensors not asked for) that are fetched at the
#: end so the entry can be published; a load of a subset leaving more gets no entry
GAP_FILL_BYTES = 16 << 20

#: bytes read per tier by this process (all storages), for tests and the bench
TIER_BYTES: collections.Counter = collections.Counter()
_tier_lock = threading.Lock()


def _count(tier: str, n: int) -> None:
    with _tier_lock:
        TIER_BYTES[tier] += n
    metrics.read_bytes(tier, n)


def caching_enabled(config: "StreamerConfig") -> bool:
    return cache_config(config).enabled


def _storage(scheme: str, config: "StreamerConfig") -> Storage:
    """Tiered when a cache tier is configured, else the core's plain storage for ``scheme``."""
    remote = REMOTES[scheme]
    if caching_enabled(config):
        return TieredStorage(config, scheme=scheme)
    return remote.plain_storage(config)


def s3_storage(config: "StreamerConfig") -> Storage:
    """Registry target for ``s3://``: tiered when a cache tier is configured, else plain S3."""
    return _storage("s3", config)


def gs_storage(config: "StreamerConfig") -> Storage:
    """Registry target for ``gs://``: tiered when a cache tier is configured, else plain GCS."""
    return _storage("gs", config)


def az_storage(config: "StreamerConfig") -> Storage:
    """Registry target for ``az://`` and Azure's ``https://`` blob URLs: tiered when a cache tier
    is configured, else plain Azure Blob."""
    return _storage("az", config)


def tiered_storage_for(uri: str, config: "StreamerConfig", *, record: bool = True) -> Storage:
    """``storage_for`` with the cache tiers in front of the store when ``config`` enables them
    (whether or not the registry's entry for the scheme is the tiered hook yet)."""
    storage = storage_for(uri, config)
    if remote_for(uri) is None or not caching_enabled(config):
        return storage
    if isinstance(storage, TieredStorage):
        storage.record = record
        return storage
    return TieredStorage(config, scheme=scheme_of(uri), remote=storage, record=record)


def _tier_or_none(make, config: "StreamerConfig") -> EntryStore | None:
    """A tier that cannot be set up (unwritable directory...) is skipped with a warning: a
    broken cache must never fail a load that the store can serve."""
    try:
        return make(config)
    except ConfigError as exc:
        log.warning("cache tier disabled for this load: %s", exc)
        return None


# ------------------------------------------------------------------------------------------
# sources
# ------------------------------------------------------------------------------------------

class TierSource(ForwardingSource):
    """An object served by one tier: wraps the tier's source, counts bytes, keeps the entry locked."""

    def __init__(self, uri: str, inner: Source, tier: str, owner: "TieredStorage | None" = None,
                 handle: EntryHandle | None = None, etag: str | None = None):
        super().__init__(inner, uri)
        # the reader must call check_unchanged even when the inner source's reads are pinned: that is
        # where a write-through fill is published and the load recorded for estimates
        self.reads_pinned = False
        self.tier = tier
        self.etag = etag if etag is not None else getattr(inner, "etag", None)
        self.handle = handle
        self.bytes_read = 0
        self.checked = False          # passed the reader's end-of-load check
        self._owner = owner
        self._count_lock = threading.Lock()
        self._closed = False

    def read_into(self, offset: int, dest: memoryview, *, pool: BufferPool | None = None,
                  cancelled: threading.Event | None = None, slack: bool = False, fresh: bool = False) -> None:
        try:
            self.inner.read_into(offset, dest, pool=pool, cancelled=cancelled, slack=slack, fresh=fresh)
        except SourceError as exc:
            raise self._named(exc) from exc
        self._counted(memoryview(dest).nbytes)

    def read_rows(self, offset: int, stride: int, width: int, dest: memoryview, *,
                  cancelled: threading.Event | None = None) -> None:
        try:
            self.inner.read_rows(offset, stride, width, dest, cancelled=cancelled)
        except SourceError as exc:
            raise self._named(exc) from exc
        self._counted(memoryview(dest).nbytes)

    def _named(self, exc: SourceError) -> SourceError:
        """An error of a tier's copy names the object the caller asked for, not only the cache file."""
        if self.uri in str(exc):
            return exc
        return type(exc)(exc.errno, f"{self.uri} (its {self.tier}-tier copy): {exc.strerror or exc}")

    def _counted(self, n: int) -> None:
        with self._count_lock:
            self.bytes_read += n
        _count(self.tier, n)

    def check_unchanged(self) -> None:
        if self.handle is None and not self.inner.reads_pinned:   # S3: its GETs pinned to the ETag need no HEAD
            self.inner.check_unchanged()
        self._finish()
        if self._owner is not None:
            self._owner._checked(self)

    def _finish(self) -> None:
        """Publish what this source wrote (write-through); nothing for plain tiers."""

    def close(self) -> None:
        if self._closed:
            return
        self._closed = True
        try:
            self.inner.close()
        finally:
            if self.handle is not None:
                self.handle.close()
            if self._owner is not None:
                self._owner._closed(self)


class WriteThroughSource(TierSource):
    """A remote object read into the caller's memory and, at the same offsets, into a cache fill."""

    def __init__(self, uri: str, inner: Source, fill: Fill, owner: "TieredStorage | None" = None, tier: str = "s3"):
        super().__init__(uri, inner, tier, owner)
        self.gathers = False   # every byte goes through read_into, which writes it into the fill
        self.fill = fill
        self._handed_off = False

    def read_into(self, offset: int, dest: memoryview, *, pool: BufferPool | None = None,
                  cancelled: threading.Event | None = None, slack: bool = False, fresh: bool = False) -> None:
        self.inner.read_into(offset, dest, pool=pool, cancelled=cancelled, slack=slack, fresh=fresh)
        n = memoryview(dest).nbytes
        self.fill.write(offset, dest)    # never raises: a failed fill only loses the cache entry
        metrics.wrote_through(self.fill.store.tier, n)
        self._counted(n)

    def _finish(self) -> None:
        fill = self.fill
        if fill.state != "open":
            return
        gaps = fill.missing() if fill.failed is None else None
        if gaps and sum(b - a for a, b in gaps) <= GAP_FILL_BYTES:
            try:
                for start, end in gaps:     # a few bytes no tensor covers: fetch them to complete the entry
                    buf = bytearray(end - start)
                    self.inner.read_into(start, memoryview(buf))
                    fill.write(start, buf)
            except (OSError, SourceError) as exc:   # the load itself is complete: never fail it here
                log.warning("%s: could not fetch the %d byte(s) the load skipped (%s); not caching it", self.uri,
                            sum(b - a for a, b in gaps), exc)
                fill.abort()
                return
        if fill.complete:
            self._handed_off = True
            fill.commit_later()   # fsync + publish off the load's critical path
        else:
            fill.abort()

    def close(self) -> None:
        try:
            if self.fill.state == "open" and not self._handed_off:
                if self.fill.complete:
                    self._handed_off = True
                    self.fill.commit_later()   # every byte came through (a reader that never checks)
                else:
                    self.fill.abort()
        finally:
            super().close()


# ------------------------------------------------------------------------------------------
# storage
# ------------------------------------------------------------------------------------------

class TieredStorage(Storage):
    """One store's URIs (``scheme``: s3, gs, az or https) through DRAM -> disk -> the store; see
    the module docstring."""

    def __init__(self, config: "StreamerConfig", *, scheme: str = "s3", remote: Storage | None = None,
                 disk: EntryStore | None = None, dram: EntryStore | None = None, record: bool = True):
        super().__init__(config)
        if scheme not in REMOTES:
            raise ConfigError(f"the cache tiers serve {', '.join(s + '://' for s in REMOTES)} URIs, not "
                              f"{scheme}://")
        self.kind: Remote = REMOTES[scheme]
        self.record = record          # record whole loads for estimates (off for warm/promote copies)
        self._owns_remote = remote is not None
        self.remote = remote if remote is not None else shared_storage(self.kind, config)
        self.deadline_at: float | None = None
        self.disk = disk if disk is not None else _tier_or_none(disk_tier, config)
        self.dram = dram if dram is not None else _tier_or_none(dram_tier, config)
        self._lock = threading.Lock()
        self._session: list[TierSource] = []
        self._open = 0
        self._t0 = 0.0
        self._recorded = False
        self._records: dict[str, DirRecord] = {}
        self._probe_storage: Storage | None = None

    # pass-through to the store ---------------------------------------------------------------------
    @property
    def stats(self):
        return getattr(self.remote, "stats", None)

    def is_dir(self, uri: str) -> bool:
        record = self._offline_record(uri)
        if record is not None:
            return bool(record.names())
        return self.remote.is_dir(uri)

    def exists(self, uri: str) -> bool:
        record = self._offline_record(dir_of(uri))
        if record is not None:
            return uri.rstrip("/").rsplit("/", 1)[-1] in (record.names() or ())
        return self.remote.exists(uri)

    def list_dir(self, uri: str) -> list[str]:
        names = self.listing(uri)
        return names if names is not None else self.remote.list_dir(uri)

    def listing(self, uri: str) -> list[str] | None:
        record = self._record(uri)
        if record is None:
            return self.remote.listing(uri)
        offline = self._offline_record(uri)
        if offline is not None:
            return offline.names()
        remote = self._probe if record.exists and self._may_serve_cached else self.remote
        try:
            names = remote.listing(uri)
        except SourceNotFoundError:
            raise
        except SourceError as exc:
            self._go_offline(record, uri, exc)
            return record.names()
        if names is not None:
            record.set_names(names)
        return names

    def join(self, base: str, name: str) -> str:
        return self.remote.join(base, name)

    def read_small(self, uri: str, limit: int = 64 << 20) -> bytes:
        # index.json, config: not worth an entry, but kept in the directory's record
        directory, name = dir_of(uri), uri.rstrip("/").rsplit("/", 1)[-1]
        offline = self._offline_record(directory)
        if offline is not None:
            data = offline.small(name)
            if data is None:
                raise SourceError(2, f"{uri}: the object store cannot be reached and the cache's record of "
                                  f"{directory} holds no copy of this file; load it once with the store reachable")
            return data
        data = self.remote.read_small(uri, limit)
        record = self._record(directory)
        if record is not None:
            record.set_small(name, data)
        return data

    # serving a cached copy while the store cannot be reached ---------------------------------
    @property
    def _may_serve_cached(self) -> bool:
        return cache_config(self.config).cache_revalidate == "auto"

    @property
    def _probe(self) -> Storage:
        """The store with one retry and a short timeout: asked first when the cache could serve
        the directory anyway, so an unreachable store costs seconds, not the full retry policy."""
        if self._probe_storage is None:
            cfg = self.config.replace(max_retries=1, request_timeout=min(10.0, self.config.request_timeout))
            self._probe_storage = shared_storage(self.kind, cfg) if not self._owns_remote else self.remote
        return self._probe_storage

    def _record(self, directory: str) -> DirRecord | None:
        """The directory's record in the first tier that can keep one (None without a tier)."""
        root = self.disk.root if self.disk is not None else self.dram.root if self.dram is not None else None
        if root is None or remote_for(directory) is None:
            return None
        key = directory.rstrip("/") + "/"
        with self._lock:   # shards are opened in parallel: one record per directory
            record = self._records.get(key)
            if record is None:
                record = self._records[key] = DirRecord(root, key)
        return record

    def _offline_record(self, directory: str) -> DirRecord | None:
        if not is_offline(directory):
            return None
        return self._record(directory)

    def _go_offline(self, record: DirRecord, uri: str, cause: SourceError) -> None:
        """Serve ``uri``'s directory from the cache from now on, or raise ``cause``."""
        if not self._may_serve_cached or not record.exists:
            raise cause
        log.warning("%s: cannot reach the object store to revalidate the cached checkpoint (%s); serving the "
                    "cache's copy as the store listed it at %s, NOT revalidated (cache_revalidate=\"required\" "
                    "fails instead)", uri, cause, record.seen_at)
        metrics.hit("offline")
        mark_offline(record.directory)

    def _open_recorded(self, uri: str, cause: BaseException | None = None) -> TierSource:
        """The tier entry of the object version the directory's record names, without the store."""
        directory, name = dir_of(uri), uri.rstrip("/").rsplit("/", 1)[-1]
        record = self._record(directory)
        recorded = record.object(name) if record is not None else None
        why = f" ({cause})" if cause is not None else ""
        if recorded is None:
            raise SourceError(2, f"{uri}: the object store cannot be reached{why} and the cache has no record of "
                              f"this object's version; load the checkpoint once with the store reachable")
        etag, size = recorded
        bucket, key = self._identity(uri)
        for store in (self.dram, self.disk):
            if store is None:
                continue
            try:
                handle = store.lookup(bucket, key, etag, size)
            except OSError as exc:
                log.warning("%s: the %s tier cannot be read (%s); skipping it", uri, store.tier, exc)
                continue
            if handle is None:
                continue
            try:
                local = LocalSource(handle.data_path, direct_io="off" if store.tier == "dram" else
                                    self.config.direct_io, alignment=self.config.alignment)
            except BaseException:
                handle.close()
                raise
            local.uri = uri
            return TierSource(uri, local, store.tier, self, handle, etag)
        raise SourceError(2, f"{uri}: the object store cannot be reached{why} and no cache tier holds this object "
                          f"(version {etag}, {size} bytes) complete; load the checkpoint once with the store reachable")

    def _identity(self, uri: str) -> tuple[str, str]:
        """(namespace, key) of ``uri``'s entries (:mod:`.remotes`), from the URI alone."""
        remote = remote_for(uri) or self.kind
        return remote.identity(uri, self.config)

    def close(self) -> None:
        if self._owns_remote:
            self.remote.close()   # a shared client stays open for the next load

    # opening --------------------------------------------------------------------------------
    def open(self, uri: str) -> TierSource:
        with self._lock:
            if self._open == 0:
                self._session = []
                self._t0 = time.perf_counter()
                self._recorded = False
            self._open += 1
        try:
            src = self._open_fastest(uri)
        except BaseException:
            with self._lock:
                self._open -= 1
            raise
        with self._lock:
            self._session.append(src)
        metrics.hit(src.tier)
        log.debug("%s: served by the %s tier", uri, src.tier)
        return src

    def _open_fastest(self, uri: str) -> TierSource:
        if is_offline(dir_of(uri)):
            return self._open_recorded(uri)
        try:
            remote_src = self.remote.open(uri)           # HEAD: size and ETag (GCS: generation)
        except SourceNotFoundError:
            raise
        except SourceError as exc:
            record = self._record(dir_of(uri))
            if record is None or not self._may_serve_cached or record.object(uri.rstrip("/").rsplit("/", 1)[-1]) is None:
                raise
            self._go_offline(record, uri, exc)
            return self._open_recorded(uri, exc)
        try:
            remote = remote_for(uri) or self.kind
            etag = remote.version(remote_src)            # the version an entry is keyed by
            size = remote_src.size()
            if not etag:
                return TierSource(uri, remote_src, remote.tier, self, etag=None)
            bucket, key = remote.identity(uri, self.config)
            record = self._record(dir_of(uri))
            if record is not None:
                record.set_object(uri.rstrip("/").rsplit("/", 1)[-1], etag, size)
            for store in (self.dram, self.disk):
                if store is None:
                    continue
                try:
                    handle = store.lookup(bucket, key, etag, size)
                except OSError as exc:
                    log.warning("%s: the %s tier cannot be read (%s); skipping it", uri, store.tier, exc)
                    continue
                if handle is None:
                    continue
                try:
                    direct = "off" if store.tier == "dram" else self.config.direct_io
                    local = LocalSource(handle.data_path, direct_io=direct, alignment=self.config.alignment)
                except BaseException:
                    handle.close()
                    raise
                remote_src.close()
                local.uri = uri
                return TierSource(uri, local, store.tier, self, handle, etag)
            if self.disk is not None:
                try:
                    fill = self.disk.begin_fill(bucket, key, etag, size, uri)
                except OSError as exc:
                    log.warning("%s: cannot write the disk tier (%s); loading without it", uri, exc)
                    fill = None
                if fill is not None:
                    return WriteThroughSource(uri, remote_src, fill, self, remote.tier)
            return TierSource(uri, remote_src, remote.tier, self, etag=etag)
        except BaseException:
            remote_src.close()
            raise

    # load accounting ------------------------------------------------------------------------
    def _checked(self, src: TierSource) -> None:
        """A source passed the reader's end-of-load check; record the load once all have."""
        src.checked = True
        with self._lock:
            session = list(self._session)
            done = all(s.checked for s in session)
            if not self.record or self._recorded or not session or not done:
                return
            self._recorded = True
            seconds = time.perf_counter() - self._t0
        tiers = {s.tier for s in session}
        nbytes = sum(s.size() for s in session)
        read = sum(s.bytes_read for s in session)
        if len(tiers) != 1 or nbytes == 0 or read < 0.9 * nbytes:
            return   # mixed tiers or a partial load: no clean bandwidth sample
        tier = tiers.pop()
        metrics.load_done(tier, nbytes, seconds)
        log.info("loaded %.3f GB from the %s tier in %.3f s (%.2f GB/s)", nbytes / 1e9, tier, seconds,
                 nbytes / seconds / 1e9)
        try:
            from .estimate import record_load
            record_load(self.config, tier, nbytes, seconds)
        except OSError as exc:
            log.warning("could not record the load time for estimates: %s", exc)

    def _closed(self, src: TierSource) -> None:
        with self._lock:
            self._open = max(0, self._open - 1)
