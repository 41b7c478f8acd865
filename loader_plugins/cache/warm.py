"""Filling and emptying tiers outside a load: ``cache warm`` (:func:`warm`), promotion from disk
to DRAM (:func:`copy_entry`), ``cache evict`` (:func:`evict`)."""

from __future__ import annotations

import contextlib
import errno
import logging
import mmap
import threading
import time
from concurrent.futures import FIRST_EXCEPTION, ThreadPoolExecutor, wait
from typing import TYPE_CHECKING

from ..core.sources.base import BufferPool, Source, scheme_of
from ..core.sources.local import LocalSource
from ..errors import ConfigError, SourceError
from .disk import EntryStore, Fill, disk_tier, wait_for_commits
from .dram import dram_tier
from .remotes import remote_for
from .tiered import TieredStorage, WriteThroughSource, tiered_storage_for

if TYPE_CHECKING:
    from ..config import StreamerConfig

log = logging.getLogger(__name__)


def copy_source_into(src: Source, fill: Fill | None, config: "StreamerConfig",
                     cancelled: threading.Event | None = None) -> None:
    """Read every byte of ``src`` (into ``fill`` when given) with ``config.workers()`` threads,
    staged in ``chunk_bytes`` buffers, one per thread, page aligned so O_DIRECT lands in place.

    Without ``fill`` the bytes are only read: a write-through source fills its own entry."""
    size = src.size()
    if fill is not None and fill.size != size:
        raise SourceError(errno.EIO, f"{src.uri}: {size} bytes, the cache entry expects {fill.size}")
    if size == 0:
        return
    chunk = config.chunk_bytes
    items = [(off, min(chunk, size - off)) for off in range(0, size, chunk)]
    threads = max(1, min(config.workers(src.remote), len(items)))
    cancelled = cancelled or threading.Event()
    pool = BufferPool(chunk + config.alignment, threads, cancelled) if src.wants_staging else None
    local = threading.local()
    buffers: list[mmap.mmap] = []
    buffers_lock = threading.Lock()

    def one(offset: int, length: int) -> None:
        if cancelled.is_set():
            return
        buf = getattr(local, "buf", None)
        if buf is None:
            buf = local.buf = mmap.mmap(-1, chunk)
            with buffers_lock:
                buffers.append(buf)
        view = memoryview(buf)[:length]
        try:
            src.read_into(offset, view, pool=pool, cancelled=cancelled)
            if fill is not None:
                fill.write(offset, view)
        finally:
            view.release()
        if fill is not None and fill.failed is not None:
            raise SourceError(errno.EIO, f"{src.uri}: writing the {fill.store.tier} cache entry failed: "
                              f"{fill.failed}")

    try:
        with ThreadPoolExecutor(max_workers=threads, thread_name_prefix="cache-fill") as ex:
            futures = [ex.submit(one, off, n) for off, n in items]
            done, pending = wait(futures, return_when=FIRST_EXCEPTION)
            for f in done:
                if f.exception() is not None:
                    cancelled.set()
                    for p in pending:
                        p.cancel()
                    raise f.exception()
    finally:
        if pool is not None:
            pool.close()
        for buf in buffers:
            with contextlib.suppress(BufferError):
                buf.close()


def copy_entry(src_store: EntryStore, dst_store: EntryStore, entry: dict, config: "StreamerConfig") -> str:
    """Copy one complete entry (manifest fields in ``entry``) between tiers; returns what happened."""
    bucket, key, etag, size = entry["bucket"], entry["key"], entry["etag"], int(entry["size"])
    if dst_store.contains(bucket, key, etag, size):
        return "already there"
    handle = src_store.lookup(bucket, key, etag, size, touch=False)
    if handle is None:
        return f"gone from the {src_store.tier} tier"
    try:
        fill = dst_store.begin_fill(bucket, key, etag, size, entry.get("uri"))
        if fill is None:
            return "skipped (being written elsewhere, or over budget)"
        direct = "off" if src_store.tier == "dram" else config.direct_io
        src = LocalSource(handle.data_path, direct_io=direct, alignment=config.alignment)
        try:
            copy_source_into(src, fill, config)
        except BaseException:
            fill.abort()
            raise
        finally:
            src.close()
        return f"copied from the {src_store.tier} tier" if fill.commit() else "failed"
    finally:
        handle.close()


def _shards(uri: str, config: "StreamerConfig") -> list[str]:
    from ..core.checkpoint import expand

    files, _ = expand(uri, config)
    return files


def warm(uri: str, config: "StreamerConfig", *, tier: str = "dram") -> list[dict]:
    """Put every shard of the checkpoint at ``uri`` (s3://, gs://, az://) into ``tier`` ("dram" or "disk"),
    reading each from the fastest tier holding it. Returns one row per shard."""
    if tier not in ("dram", "disk"):
        raise ConfigError(f"tier {tier!r}: must be dram or disk")
    target = dram_tier(config) if tier == "dram" else disk_tier(config)
    if target is None:
        flag = "--dram-cache-dir" if tier == "dram" else "--cache-dir"
        raise ConfigError(f"warming the {tier} tier needs {flag}")
    rows = []
    storage: TieredStorage | None = None
    try:
        for shard in _shards(uri, config):
            t0 = time.perf_counter()
            remote = remote_for(shard)
            if remote is None:
                rows.append({"uri": shard, "result": f"skipped (only object-store objects are cached, not "
                                                     f"{scheme_of(shard)}://)", "bytes": 0})
                continue
            if storage is None:
                storage = tiered_storage_for(shard, config, record=False)   # type: ignore[assignment]
            src = storage.open(shard)
            try:
                size = src.size()
                if src.tier == tier:
                    result = "already there"
                elif isinstance(src, WriteThroughSource) and src.fill.store.tier == tier:
                    copy_source_into(src, None, config)     # the source writes its own entry
                    src.check_unchanged()                   # hands it to the committer
                    wait_for_commits()
                    result = f"fetched from {src.tier}" if src.fill.state == "committed" else "failed"
                elif not src.etag:
                    result = "skipped (the server sent no version: no ETag or generation)"
                else:
                    bucket, key = remote.identity(shard, config)
                    fill = target.begin_fill(bucket, key, src.etag, size, shard)
                    if fill is None:
                        result = "skipped (being written by another process, or over budget)"
                    else:
                        try:
                            copy_source_into(src, fill, config)
                            src.check_unchanged()   # the store: still the same object; write-through: publish
                        except BaseException:
                            fill.abort()
                            raise
                        result = f"copied from {src.tier}" if fill.commit() else "failed"
            finally:
                src.close()
            seconds = time.perf_counter() - t0
            rows.append({"uri": shard, "result": result, "bytes": size, "seconds": round(seconds, 4)})
    finally:
        if storage is not None:
            storage.close()
    return rows


def evict(uri: str | None, config: "StreamerConfig", *, tiers: tuple[str, ...] = ("dram", "disk")) -> dict:
    """Evict the entries of ``uri`` (an s3://, gs:// or az:// object or prefix; None = everything)
    from ``tiers`` without contacting the store. Entries being read are skipped and reported."""
    out: dict[str, dict] = {}
    bucket = prefix = None
    if uri is not None:
        remote = remote_for(uri)
        if remote is None:
            raise ConfigError(f"{uri}: the cache holds object-store checkpoints only; give an s3://, gs:// or az:// "
                              f"object or prefix, or --all")
        bucket, prefix = remote.identity(uri, config)
    for name in tiers:
        store = dram_tier(config) if name == "dram" else disk_tier(config)
        if store is None:
            continue
        evicted, skipped = [], []
        for entry in store.entries():
            k = str(entry.get("key", ""))
            if bucket is not None and (entry.get("bucket") != bucket or not (
                    not prefix or k == prefix or k.startswith(prefix.rstrip("/") + "/"))):
                continue
            (evicted if store.evict_key(entry["cache_key"]) else skipped).append(entry.get("uri"))
        store.sweep()
        out[name] = {"evicted": evicted, "in_use": skipped}
    return out
