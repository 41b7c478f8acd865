"""Offloaded models by key, within a host-memory budget; the least recently used spill to disk.

>>> pool = SnapshotPool(host_budget="64GiB", spill_dir="/var/cache/swap")
>>> pool.offload("llama-8b", model_a)       # host arena; older snapshots spill if over budget
>>> pool.restore("llama-8b")                # from the arena, or streamed back from its file

A spilled snapshot is one safetensors file (``<key>-<hash>.safetensors``; see
:meth:`Snapshot.spill`); restoring it streams the file with the streamer straight into the
model's storage. Keys are any strings; the pool is safe to use from several threads.
"""

from __future__ import annotations

import collections
import hashlib
import logging
import re
import threading
from pathlib import Path
from typing import Any

from ..config import parse_size
from .metrics import SwapMetrics
from .snapshot import DEFAULT_CHUNK_BYTES, Snapshot, SwapError, _offload, plan, restore

log = logging.getLogger(__name__)


def _file_name(key: str) -> str:
    safe = re.sub(r"[^A-Za-z0-9._-]+", "_", key).strip("._")[:80] or "snapshot"
    return f"{safe}-{hashlib.sha1(key.encode()).hexdigest()[:10]}.safetensors"


class SnapshotPool:
    """Snapshots kept in host memory up to ``host_budget`` bytes (``"64GiB"`` or an int).

    When an offload would go over the budget, the least recently used host snapshots are written
    to ``spill_dir`` (and their arenas freed) first; a snapshot larger than the whole budget is
    spilled right after it is taken. :meth:`get`, :meth:`offload` and :meth:`restore` count as
    use. ``keep_files`` keeps spill files after a restore (they are deleted by default).
    """

    def __init__(self, host_budget: int | str, spill_dir: str | Path, *, release: str = "auto",
                 workers: int | None = None, chunk_bytes: int = DEFAULT_CHUNK_BYTES,
                 metrics: SwapMetrics | None = None, streamer_config: Any = None, keep_files: bool = False):
        try:
            self.host_budget = parse_size(host_budget)
        except ValueError as exc:
            raise SwapError(f"host_budget: {exc}") from None
        if self.host_budget < 0:
            raise SwapError(f"host_budget must be >= 0, got {host_budget!r}")
        self.spill_dir = Path(spill_dir)
        self.release = release
        self.workers = workers
        self.chunk_bytes = chunk_bytes
        self.metrics = metrics
        self.streamer_config = streamer_config
        self.keep_files = keep_files
        self._entries: collections.OrderedDict[str, Snapshot] = collections.OrderedDict()  # LRU first
        self._lock = threading.RLock()

    # ---- inspection ---------------------------------------------------------------------------
    def __contains__(self, key: str) -> bool:
        return key in self._entries

    def __len__(self) -> int:
        return len(self._entries)

    def keys(self) -> list[str]:
        """Keys from least to most recently used."""
        with self._lock:
            return list(self._entries)

    @property
    def host_bytes(self) -> int:
        with self._lock:
            return sum(s.host_bytes for s in self._entries.values())

    def tier(self, key: str) -> str:
        """``"host"`` or ``"disk"``."""
        snapshot = self._snapshot(key)
        return "disk" if snapshot.state == "spilled" else "host"

    def get(self, key: str) -> Snapshot:
        """The snapshot under ``key`` (marks it used)."""
        with self._lock:
            snapshot = self._snapshot(key)
            self._entries.move_to_end(key)
            return snapshot

    def stats(self) -> dict[str, Any]:
        with self._lock:
            return {
                "host_budget": self.host_budget, "host_bytes": self.host_bytes, "spill_dir": str(self.spill_dir),
                "entries": {k: {"tier": "disk" if s.state == "spilled" else "host", "bytes": s.nbytes,
                                "host_bytes": s.host_bytes, "path": str(s.path) if s.path else None}
                            for k, s in self._entries.items()},
            }

    def _snapshot(self, key: str) -> Snapshot:
        try:
            return self._entries[key]
        except KeyError:
            raise SwapError(f"no snapshot {key!r} in the pool (have: {', '.join(self._entries) or 'none'})") from None

    # ---- swaps --------------------------------------------------------------------------------
    def offload(self, key: str, obj: Any) -> Snapshot:
        """Offload ``obj`` under ``key``, spilling least recently used snapshots to stay in budget."""
        with self._lock:
            if key in self._entries:
                raise SwapError(f"{key!r} is already offloaded ({self._entries[key]!r}); restore it first")
            snapshot = plan(obj, name=key)
            self._make_room(snapshot.arena_bytes)
            _offload(snapshot, release=self.release, contents=True, reuse=None, workers=self.workers,
                     chunk_bytes=self.chunk_bytes, empty_cache=True, metrics=self.metrics)
            self._entries[key] = snapshot
            if snapshot.host_bytes > self.host_budget:
                log.warning("snapshot %r (%d bytes) is larger than the host budget (%d bytes): spilled at once",
                            key, snapshot.host_bytes, self.host_budget)
                self._spill(key)
            return snapshot

    def restore(self, key: str, **kwargs: Any) -> dict[str, Any]:
        """Restore ``key`` into its model (from host memory or disk) and forget it."""
        with self._lock:
            snapshot = self._snapshot(key)
            kwargs.setdefault("workers", self.workers)
            kwargs.setdefault("chunk_bytes", self.chunk_bytes)
            kwargs.setdefault("streamer_config", self.streamer_config)
            kwargs.setdefault("metrics", self.metrics)
            stats = restore(snapshot, **kwargs)
            del self._entries[key]
            self._remove_file(snapshot)
            return stats

    def spill(self, key: str) -> Path:
        """Write ``key`` to disk now and free its host memory."""
        with self._lock:
            return self._spill(key)

    def discard(self, key: str) -> None:
        """Forget ``key`` without restoring it (its file is deleted)."""
        with self._lock:
            snapshot = self._snapshot(key)
            del self._entries[key]
            if snapshot.arena is not None:
                snapshot.arena.close()
                snapshot.arena = None
            snapshot.state = "discarded-by-pool"
            self._remove_file(snapshot)

    def _spill(self, key: str) -> Path:
        snapshot = self._snapshot(key)
        if snapshot.state == "spilled":
            return snapshot.path
        self.spill_dir.mkdir(parents=True, exist_ok=True)
        path = snapshot.spill(self.spill_dir / _file_name(key), metrics=self.metrics)
        log.info("swap pool: spilled %r (%.3f GB) to %s", key, snapshot.nbytes / 1e9, path)
        return path

    def _make_room(self, need: int) -> None:
        for key in list(self._entries):  # least recently used first
            if self.host_bytes + need <= self.host_budget:
                return
            if self._entries[key].state == "offloaded":
                self._spill(key)

    def _remove_file(self, snapshot: Snapshot) -> None:
        if snapshot.path is not None and not self.keep_files:
            try:
                Path(snapshot.path).unlink()
            except FileNotFoundError:
                pass

    def close(self) -> None:
        """Forget every snapshot (host memory freed, spill files deleted unless ``keep_files``)."""
        with self._lock:
            for key in list(self._entries):
                self.discard(key)

    def __enter__(self) -> "SnapshotPool":
        return self

    def __exit__(self, *exc) -> None:
        self.close()


__all__ = ["SnapshotPool"]
