"""What a cache tier needs to serve a checkpoint while its object store cannot be reached.

A load of ``s3://bucket/llama/`` (or ``gs://``, ``az://``) asks the store four kinds of things: the
directory's listing, the small files it reads whole (``model.safetensors.index.json``), each shard's
size and version (HEAD: an ETag, a GCS generation), then the shards' bytes. The tiers hold the bytes
(entries keyed by namespace, key and version: :mod:`.remotes`); a
:class:`DirRecord` holds the rest, as the last load that reached the store saw it: one JSON file per
directory next to the tier's entries (``dirs/<sha256 of the URI>.json``, replaced atomically).

When the store cannot be reached (connection refused or reset, timeouts, 5xx after the retries, a
revoked credential) and ``cache_revalidate`` is ``auto``, :class:`~.tiered.TieredStorage` serves the
directory from its record and each shard from the entry of the version recorded for it, with a warning
that nothing was revalidated; with ``required`` the load fails as it would without a cache. A
directory served this way is remembered for :data:`OFFLINE_SECONDS` (:func:`mark_offline`), so the
shards' opens in the same load do not wait for the store's retries one by one.
"""

from __future__ import annotations

import base64
import contextlib
import hashlib
import json
import logging
import os
import threading
import time
from pathlib import Path
from typing import Any

log = logging.getLogger(__name__)

#: a small file larger than this is not kept in the record (the load reads only the index)
SMALL_FILE_MAX_BYTES = 16 << 20
#: how long a directory found unreachable is served from its record without asking the store again
OFFLINE_SECONDS = 60.0

_offline: dict[str, float] = {}          # directory URI -> until (monotonic)
_offline_lock = threading.Lock()
#: one writer of record files at a time in this process: two records of one directory (two
#: storages, or shards opened in parallel) would otherwise each write what they read before the
#: other's update, and one object's version would be lost
_write_lock = threading.Lock()


def dir_of(uri: str) -> str:
    """The directory URI of an object URI, with one trailing slash."""
    return uri.rstrip("/").rsplit("/", 1)[0] + "/"


def _norm(directory: str) -> str:
    return directory.rstrip("/") + "/"


def mark_offline(directory: str) -> None:
    with _offline_lock:
        _offline[_norm(directory)] = time.monotonic() + OFFLINE_SECONDS


def is_offline(directory: str) -> bool:
    with _offline_lock:
        until = _offline.get(_norm(directory))
        if until is None:
            return False
        if time.monotonic() >= until:
            del _offline[_norm(directory)]
            return False
        return True


def clear_offline() -> None:
    """Forget every verdict (tests; a store back up is noticed after OFFLINE_SECONDS anyway)."""
    with _offline_lock:
        _offline.clear()


class DirRecord:
    """The store's answers about one directory, as last seen: listing, small files, objects' versions
    (the ``etag`` of an object's entry is its version: an ETag, a GCS generation)."""

    def __init__(self, root: str | os.PathLike, directory: str):
        self.directory = _norm(directory)
        name = hashlib.sha256(self.directory.encode()).hexdigest()[:32]
        self.path = Path(root) / "dirs" / f"{name}.json"
        self._lock = threading.Lock()
        self.data: dict[str, Any] = self._read()

    def _read(self) -> dict[str, Any]:
        try:
            data = json.loads(self.path.read_text())
        except (OSError, ValueError):
            return {}
        if not isinstance(data, dict) or data.get("directory") != self.directory:
            return {}
        return data

    @property
    def exists(self) -> bool:
        return bool(self.data.get("names"))

    @property
    def seen_at(self) -> str:
        t = self.data.get("time")
        return time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(t)) if t else "an unknown time"

    def names(self) -> list[str] | None:
        names = self.data.get("names")
        return list(names) if isinstance(names, list) else None

    def small(self, name: str) -> bytes | None:
        text = (self.data.get("small") or {}).get(name)
        return base64.b64decode(text) if isinstance(text, str) else None

    def object(self, name: str) -> tuple[str, int] | None:
        """``(version, size)`` recorded for the object ``name`` of this directory."""
        entry = (self.data.get("objects") or {}).get(name)
        if isinstance(entry, dict) and isinstance(entry.get("etag"), str) and isinstance(entry.get("size"), int):
            return entry["etag"], entry["size"]
        return None

    # updates: each writes the file only when something changed ---------------------------------
    def set_names(self, names: list[str]) -> None:
        self._update(lambda d: d.__setitem__("names", sorted(names)) if d.get("names") != sorted(names) else False)

    def set_small(self, name: str, data: bytes) -> None:
        if len(data) > SMALL_FILE_MAX_BYTES:
            return
        text = base64.b64encode(data).decode()

        def change(d):
            small = d.setdefault("small", {})
            if small.get(name) == text:
                return False
            small[name] = text
        self._update(change)

    def set_object(self, name: str, etag: str, size: int) -> None:
        def change(d):
            objects = d.setdefault("objects", {})
            if objects.get(name) == {"etag": etag, "size": size}:
                return False
            objects[name] = {"etag": etag, "size": size}
        self._update(change)

    def _update(self, change) -> None:
        with self._lock, _write_lock:
            fresh = self._read() or {"directory": self.directory}
            fresh.update({k: v for k, v in self.data.items() if k not in fresh})
            if change(fresh) is False:
                self.data = fresh
                return
            fresh["directory"] = self.directory
            fresh["time"] = time.time()
            self.data = fresh
            tmp = self.path.with_name(f".{self.path.name}.{os.getpid()}.{threading.get_ident()}")
            try:
                self.path.parent.mkdir(parents=True, exist_ok=True)
                tmp.write_text(json.dumps(fresh))
                os.replace(tmp, self.path)
            except OSError as exc:   # a cache that cannot write its record never fails a load
                log.warning("%s: cannot write the cache's record of this directory (%s)", self.directory, exc)
                with contextlib.suppress(OSError):
                    tmp.unlink()
