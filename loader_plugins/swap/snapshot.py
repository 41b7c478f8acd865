"""Snapshots of a model's weight storage in one host arena: :func:`offload` and :func:`restore`.

What is copied is the model's *storage*, as the engine holds it after its own post-load
processing, not a fresh state dict:

* the tensors are found on the module (parameters, buffers, plain tensor attributes, and tensors
  captured by functions stored on a module, such as the packed weights a CPU engine keeps in a
  ``cpu_linear`` closure), or given as a mapping / sequence of tensors;
* tensors that share a storage (tied embeddings, views, non-contiguous slices) are grouped and
  the *whole* storage is copied once, so ties and views come back consistent;
* every storage gets an aligned range of one host arena (page-locked when CUDA tensors are
  involved, otherwise anonymous memory on transparent huge pages); the bytes move in chunks of
  ``chunk_bytes``, balanced largest first over several threads (CPU: ``memmove`` without the GIL)
  or several CUDA streams.

How the engine's memory is given back (``release``):

* ``"pages"`` (CPU default): ``madvise(MADV_DONTNEED)`` on the whole pages inside each storage.
  The memory returns to the kernel, **addresses stay the same** (a read while offloaded sees
  zeros, never freed memory), and :func:`restore` copies the bytes back into the same pages.
* ``"resize"`` (CUDA default): ``untyped_storage().resize_(0)``, then ``torch.cuda.empty_cache()``
  so the driver sees the memory free. :func:`restore` resizes the same storage objects back (every
  tensor and view of them follows), but the allocator picks the address: CUDA graphs captured
  on the old addresses are invalid. vLLM's sleep backend (:mod:`.vllm_backend`) keeps addresses
  on CUDA by unmapping the cumem allocations instead.
* ``"none"``: copy only (the caller frees the memory, e.g. by unmapping it).

The disk tier (:meth:`Snapshot.spill`) writes the arena as one safetensors file: a storage that a
single tensor covers exactly is written under that tensor's name, dtype and shape (a normal
checkpoint); any other storage as ``NAME@storage`` (``U8``), with every view described in the
metadata. :func:`restore` of a spilled snapshot streams the file with
:class:`~loader_plugins.SafetensorsStreamer` straight into the model's own storage.
"""

from __future__ import annotations

import json
import logging
import os
import threading
import time
import weakref
from pathlib import Path
from typing import TYPE_CHECKING, Any, Mapping, Sequence

from ..core.header import encode_header
from .arena import HostArena, _cuda_available, _host_unregister  # noqa: F401
from .common import (
    DEFAULT_CHUNK_BYTES,
    METADATA_KEY,
    RELEASE_MODES,
    STORAGE_SUFFIX,
    SwapError,
)
from .copies import _balance, _copy, _storage_bytes  # noqa: F401
from .entries import StorageEntry, TensorView, _plan_entries, _strong, named_tensors  # noqa: F401
from .metrics import SwapMetrics, default_metrics
from .release import (  # noqa: F401
    _drop_pages,
    _release,
    _rematerialise,
    _resolve_release,
    resident_pages,
)

if TYPE_CHECKING:
    import torch

    from ..config import StreamerConfig

log = logging.getLogger(__name__)


# ----------------------------------------------------------------------------------------------
# Snapshot
# ----------------------------------------------------------------------------------------------

def _default_workers(entries: Sequence[StorageEntry]) -> int:
    if any(e.is_cuda for e in entries):
        return 4  # streams
    return max(1, min(8, os.cpu_count() or 1))


class Snapshot:
    """A model's weight storage copied into one host arena (or spilled to a safetensors file).

    States: ``"offloaded"`` (bytes in the host arena), ``"spilled"`` (bytes in :attr:`path`),
    ``"restored"`` (back in the model; the arena may be kept for reuse), ``"discarded"``
    (``contents=False``: nothing kept, restore zero-fills). Created by :func:`offload`.
    """

    def __init__(self, entries: list[StorageEntry], arena_bytes: int, *, name: str = "",
                 skipped: Sequence[str] = ()):
        self.entries = entries
        self.arena_bytes = arena_bytes
        self.name = name
        self.skipped = list(skipped)
        self.arena: HostArena | None = None
        self.state = "planned"
        self.path: Path | None = None
        self.stats: dict[str, Any] = {}          # of the offload
        self.restore_stats: dict[str, Any] = {}  # of the last restore
        self._lock = threading.Lock()

    # ---- sizes ------------------------------------------------------------------------------------
    @property
    def nbytes(self) -> int:
        """Bytes of model storage the snapshot holds."""
        return sum(e.nbytes for e in self.entries)

    @property
    def host_bytes(self) -> int:
        """Host memory held now (the arena), 0 once spilled or freed."""
        return self.arena.nbytes if self.arena is not None and not self.arena.closed else 0

    @property
    def names(self) -> list[str]:
        return [v.name for e in self.entries for v in e.views]

    def __repr__(self) -> str:
        return (f"Snapshot({self.name or 'unnamed'}: {self.state}, {len(self.entries)} storages, "
                f"{self.nbytes / 1e9:.3f} GB)")

    # ---- access to the copy -------------------------------------------------------------------
    def host_tensors(self) -> dict[str, "torch.Tensor"]:
        """name -> CPU tensor viewing the snapshot's copy in the arena (no copy)."""
        import torch

        if self.arena is None or self.arena.closed:
            raise SwapError(f"{self!r} holds no host copy (state {self.state}); spilled snapshots are read with "
                            f"loader_plugins.load_file({str(self.path)!r})")
        storage = self.arena.tensor.untyped_storage()
        out = {}
        for entry in self.entries:
            for view in entry.views:
                if entry.arena_offset % view.itemsize:
                    raise SwapError(f"{view.name!r}: arena offset not aligned to its dtype")  # cannot happen
                out[view.name] = torch.empty(0, dtype=view.dtype).set_(
                    storage, entry.arena_offset // view.itemsize + view.storage_offset, view.shape, view.stride)
        return out

    # ---- disk tier ------------------------------------------------------------------------------
    def _metadata(self) -> dict[str, str]:
        storages = [[e.file_entry()[0], [v.describe() for v in e.views]] for e in self.entries]
        return {"format": "pt", METADATA_KEY: json.dumps({"version": 1, "name": self.name, "storages": storages})}

    def save(self, path: str | os.PathLike) -> Path:
        """Write the host copy as one safetensors file (names, dtypes, shapes and bytes exact)."""
        if self.arena is None or self.arena.closed:
            raise SwapError(f"{self!r} holds no host copy to save (state {self.state})")
        path = Path(path)
        layout = {}
        for e in self.entries:
            key, dtype, shape = e.file_entry()
            layout[key] = (dtype, shape, e.nbytes)
        header, _ = encode_header(layout, self._metadata())
        tmp = path.with_name(path.name + ".partial")
        with open(tmp, "wb", buffering=0) as f:
            _write_all(f, header)
            for e in self.entries:
                if e.nbytes:
                    _write_all(f, self.arena.buffer(e.arena_offset, e.nbytes))
        os.replace(tmp, path)
        return path

    def spill(self, path: str | os.PathLike, *, metrics: SwapMetrics | None = None) -> Path:
        """Move the host copy to a safetensors file and free the arena (state ``"spilled"``)."""
        with self._lock:
            if self.state != "offloaded":
                raise SwapError(f"only an offloaded snapshot can be spilled; {self!r}")
            t0 = time.perf_counter()
            self.path = self.save(path)
            seconds = time.perf_counter() - t0
            self.arena.close()
            self.arena = None
            self.state = "spilled"
        (metrics or default_metrics()).record("spill", self.nbytes, seconds, tier="disk", name=self.name)
        return self.path


def _write_all(f, data) -> None:
    view = memoryview(data)
    while view:  # unbuffered writes may be short
        view = view[f.write(view):]


def _live(snapshot: Snapshot) -> tuple[list[StorageEntry], list[Any], int]:
    """Entries whose tensors still exist, with their storages; and how many are gone."""
    entries, storages, gone = [], [], 0
    for entry in snapshot.entries:
        tensor = entry.tensor()
        if tensor is None:
            gone += 1
            continue
        entries.append(entry)
        storages.append(tensor.untyped_storage())
    return entries, storages, gone


# (device, address) of the storages offloaded snapshots hold in place ("pages", "none": the memory stays
# the storage's). A storage belongs to one snapshot at a time: a second offload would copy released
# memory and the restores would race. Storages released with "resize" own no memory while offloaded
# (the address may be reused by anyone) and show 0 bytes, which planning skips.
_claimed: dict[tuple[str, int], "weakref.ref[Snapshot]"] = {}
_claimed_lock = threading.Lock()


def _check_unclaimed(snapshot: Snapshot, entries: Sequence[StorageEntry]) -> None:
    with _claimed_lock:
        for entry in entries:
            holder = _claimed.get((entry.device, entry.address))
            other = holder() if holder is not None else None
            if other is not None and other is not snapshot and other.state in ("offloaded", "spilled", "discarded"):
                key = (entry.device, entry.address)
                as_name = next((e.name for e in other.entries if (e.device, e.address) == key), "?")
                raise SwapError(f"the storage of {entry.name!r} ({entry.device}) is already offloaded by {other!r} "
                                f"(as {as_name!r}); restore that snapshot first")


def _claim(snapshot: Snapshot, entries: Sequence[StorageEntry]) -> None:
    with _claimed_lock:
        for entry in entries:
            if entry.release != "resize":
                _claimed[(entry.device, entry.address)] = weakref.ref(snapshot)


def _unclaim(snapshot: Snapshot) -> None:
    with _claimed_lock:
        for entry in snapshot.entries:
            holder = _claimed.get((entry.device, entry.address))
            if holder is not None and holder() in (snapshot, None):
                del _claimed[(entry.device, entry.address)]


def _sync_cuda(entries: Sequence[StorageEntry]) -> None:
    devices = {e.device for e in entries if e.is_cuda}
    if devices:
        import torch

        for device in devices:
            torch.cuda.synchronize(device)


def offload(obj: Any, *, release: str = "auto", contents: bool = True, reuse: Snapshot | None = None,
            workers: int | None = None, chunk_bytes: int = DEFAULT_CHUNK_BYTES, empty_cache: bool = True,
            exclude: Sequence[Any] = (), name: str = "", metrics: SwapMetrics | None = None) -> Snapshot:
    """Copy ``obj``'s weight storage into one host arena and release the engine's memory.

    ``obj`` is a :class:`torch.nn.Module` (held weakly: dropping the model drops its entries), a
    tensor, a mapping name -> tensor or a sequence of tensors (held strongly). ``release``:
    ``"auto"`` (``"pages"`` on CPU, ``"resize"`` on CUDA), ``"pages"``, ``"resize"`` or ``"none"``
    (see the module docstring). ``contents=False`` keeps nothing (a KV cache): :func:`restore`
    gives the memory back zero-filled. ``reuse`` is a restored snapshot whose arena is large enough
    (saves allocating and pinning a new one). ``workers``: threads (CPU) or CUDA streams.
    ``exclude``: tensors whose storages stay out of the snapshot (a KV cache the model references).
    """
    entries, arena_bytes, skipped = _plan_entries(obj, exclude)
    snapshot = Snapshot(entries, arena_bytes if contents else 0, name=name, skipped=skipped)
    return _offload(snapshot, release=release, contents=contents, reuse=reuse, workers=workers,
                    chunk_bytes=chunk_bytes, empty_cache=empty_cache, metrics=metrics)


def plan(obj: Any, *, name: str = "", exclude: Sequence[Any] = ()) -> Snapshot:
    """The snapshot :func:`offload` would take (sizes, names), without copying anything."""
    entries, arena_bytes, skipped = _plan_entries(obj, exclude)
    return Snapshot(entries, arena_bytes, name=name, skipped=skipped)


def _take_arena(reuse: Snapshot | None, nbytes: int, pinned: bool) -> HostArena | None:
    if reuse is None:
        return None
    with reuse._lock:
        if reuse.state not in ("restored", "discarded"):
            raise SwapError(f"cannot reuse the arena of {reuse!r}: it still holds offloaded weights")
        arena = reuse.arena
        if arena is None or arena.closed or arena.nbytes < nbytes or arena.pinned != pinned:
            return None
        reuse.arena = None
        return arena


def _offload(snapshot: Snapshot, *, release: str, contents: bool, reuse: Snapshot | None, workers: int | None,
             chunk_bytes: int, empty_cache: bool, metrics: SwapMetrics | None) -> Snapshot:
    if chunk_bytes <= 0:
        raise SwapError(f"chunk_bytes must be positive, got {chunk_bytes}")
    if release not in RELEASE_MODES:
        raise SwapError(f"release must be one of {', '.join(RELEASE_MODES)}, got {release!r}")
    t0 = time.perf_counter()
    entries, storages, _ = _live(snapshot)
    _check_unclaimed(snapshot, entries)
    arena_seconds = 0.0
    copy_seconds = 0.0
    reused = False
    if contents:
        pinned = any(e.is_cuda for e in entries) and _cuda_available()
        arena = _take_arena(reuse, snapshot.arena_bytes, pinned)
        reused = arena is not None
        if arena is None:
            arena = HostArena(snapshot.arena_bytes, pinned=pinned)
            arena_seconds = arena.seconds
        snapshot.arena = arena
        _sync_cuda(entries)
        t1 = time.perf_counter()
        _copy(entries, storages, arena, to_host=True, workers=workers or _default_workers(entries),
              chunk_bytes=chunk_bytes)
        copy_seconds = time.perf_counter() - t1
    # The copy is complete: from here on the snapshot can be restored, even if a release fails midway.
    snapshot.state = "offloaded" if contents else "discarded"
    try:
        freed = _release(entries, storages, release, empty_cache)
    finally:
        _claim(snapshot, entries)
    seconds = time.perf_counter() - t0
    nbytes = snapshot.nbytes if contents else 0
    modes: dict[str, int] = {}
    for e in entries:
        modes[e.release] = modes.get(e.release, 0) + 1
    snapshot.stats = {
        "op": "offload", "name": snapshot.name, "bytes": nbytes, "seconds": seconds,
        "gbps": nbytes / seconds / 1e9 if seconds > 0 and nbytes else 0.0,
        "copy_seconds": copy_seconds, "arena_seconds": arena_seconds, "arena_reused": reused,
        "pinned": bool(snapshot.arena and snapshot.arena.pinned), "released_bytes": freed, "release": modes,
        "storages": len(entries), "tensors": sum(len(e.views) for e in entries), "skipped": len(snapshot.skipped),
        "devices": sorted({e.device for e in entries}),
    }
    if contents:
        (metrics or default_metrics()).record("offload", nbytes, seconds, tier="host", name=snapshot.name,
                                              extra=f"copy {copy_seconds:.3f} s, released "
                                                    f"{freed / 1e9:.3f} GB")
    return snapshot


def restore(snapshot: Snapshot, *, workers: int | None = None, chunk_bytes: int = DEFAULT_CHUNK_BYTES,
            keep_arena: bool = False, streamer_config: "StreamerConfig | Mapping[str, Any] | None" = None,
            metrics: SwapMetrics | None = None) -> dict[str, Any]:
    """Copy a snapshot back into the same tensors; returns the swap's statistics.

    Storages released with ``"resize"`` are resized back (the same storage objects, so every
    tensor, view and tie follows); ``"pages"`` storages are refilled at their old addresses. A
    spilled snapshot is streamed from its file straight into the storages. ``keep_arena`` keeps the
    host copy for reuse by the next :func:`offload` (``reuse=``).
    """
    with snapshot._lock:
        if snapshot.state not in ("offloaded", "spilled", "discarded"):
            raise SwapError(f"cannot restore {snapshot!r}: it is {snapshot.state}, not offloaded")
        t0 = time.perf_counter()
        entries, storages, gone = _live(snapshot)
        for entry, storage in zip(entries, storages):
            _rematerialise(entry, storage)
        tier = {"offloaded": "host", "spilled": "disk", "discarded": "none"}[snapshot.state]
        if snapshot.state == "offloaded":
            _copy(entries, storages, snapshot.arena, to_host=False,
                  workers=workers or _default_workers(entries), chunk_bytes=chunk_bytes)
            _sync_cuda(entries)
            nbytes = sum(e.nbytes for e in entries)
        elif snapshot.state == "spilled":
            nbytes = _restore_from_file(snapshot, entries, storages, streamer_config)
            _sync_cuda(entries)
        else:
            for entry, storage in zip(entries, storages):
                _storage_bytes(storage, entry.device).zero_()
            _sync_cuda(entries)
            nbytes = 0
        seconds = time.perf_counter() - t0
        preserved = sum(1 for e, s in zip(entries, storages) if s.data_ptr() == e.address)
        if snapshot.arena is not None and not keep_arena:
            snapshot.arena.close()
            snapshot.arena = None
        snapshot.state = "restored"
        _unclaim(snapshot)
        stats = {
            "op": "restore", "name": snapshot.name, "tier": tier, "bytes": nbytes, "seconds": seconds,
            "gbps": nbytes / seconds / 1e9 if seconds > 0 and nbytes else 0.0, "storages": len(entries),
            "tensors": sum(len(e.views) for e in entries), "gone": gone,
            "addresses_preserved": preserved, "addresses_changed": len(entries) - preserved,
        }
        snapshot.restore_stats = stats
    if tier != "none":
        (metrics or default_metrics()).record("restore", nbytes, seconds, tier=tier, name=snapshot.name,
                                              extra=f"addresses kept {preserved}/{len(entries)}")
    return stats


def _restore_from_file(snapshot: Snapshot, entries, storages, streamer_config) -> int:
    import torch

    from ..streamer import SafetensorsStreamer

    destinations = {}
    for entry, storage in zip(entries, storages):
        key, dtype, shape = entry.file_entry()
        raw = _storage_bytes(storage, entry.device)
        if dtype == "U8" and key.endswith(STORAGE_SUFFIX):
            destinations[key] = raw
        else:
            view = next(v for v in entry.views if v.name == key)
            destinations[key] = torch.empty(0, dtype=view.dtype, device=entry.device).set_(
                storage, 0, view.shape, view.stride)
    done = 0
    with SafetensorsStreamer(streamer_config) as streamer:
        streamer.stream_file(snapshot.path, names=list(destinations), destinations=destinations)
        for _name, _tensor in streamer.get_tensors():
            pass
        done = int(streamer.stats.get("bytes", 0))
    return done


__all__ = ["DEFAULT_CHUNK_BYTES", "HostArena", "RELEASE_MODES", "Snapshot", "StorageEntry", "SwapError",
           "TensorView", "named_tensors", "offload", "plan", "resident_pages", "restore"]
