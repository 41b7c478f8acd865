"""Moving a snapshot's bytes between the model's storages and its arena: chunks balanced over
threads (CPU ``memmove`` without the GIL) or CUDA streams."""

from __future__ import annotations

import ctypes
import logging
import threading
from concurrent.futures import ThreadPoolExecutor
from typing import TYPE_CHECKING, Any, Sequence

from ..core._libc import HUGE_PAGE as _HUGE
from ..core._libc import MADV_HUGEPAGE as _MADV_HUGEPAGE
from ..core._libc import MADV_POPULATE_WRITE as _MADV_POPULATE_WRITE
from ..core._libc import madvise_range as _madvise
from ..core.plan import balance
from .arena import HostArena
from .common import PAGE as _PAGE
from .common import PREFAULT_MIN as _PREFAULT_MIN
from .entries import StorageEntry

if TYPE_CHECKING:

    pass

log = logging.getLogger(__name__)


# ----------------------------------------------------------------------------------------------
# Copies
# ----------------------------------------------------------------------------------------------

def _balance(entries: Sequence[StorageEntry], workers: int, chunk_bytes: int) -> list[list[tuple[int, int, int]]]:
    """(entry index, start, length) chunks over ``workers``, largest first to the lightest worker."""
    chunks = [(i, start, min(chunk_bytes, entry.nbytes - start))
              for i, entry in enumerate(entries) for start in range(0, entry.nbytes, chunk_bytes)]
    out = balance(chunks, max(1, workers), size=lambda c: c[2], order=lambda c: c)
    return [lst for lst in out if lst]


def _storage_bytes(storage, device: str):
    import torch

    return torch.empty(0, dtype=torch.uint8, device=device).set_(storage)


_streams: dict[str, list] = {}
_streams_lock = threading.Lock()


def _cuda_streams(device: str, n: int) -> list:
    import torch

    with _streams_lock:
        streams = _streams.setdefault(device, [])
        while len(streams) < n:
            streams.append(torch.cuda.Stream(device=device))
        return streams[:n]


def _copy(entries: Sequence[StorageEntry], storages: Sequence[Any], arena: HostArena, *, to_host: bool,
          workers: int, chunk_bytes: int) -> None:
    """Move every entry's bytes between its storage and the arena (both directions, all devices)."""
    cpu = [i for i, e in enumerate(entries) if not e.is_cuda]
    if cpu:
        _copy_cpu([entries[i] for i in cpu], [storages[i] for i in cpu], arena, to_host, workers, chunk_bytes)
    by_device: dict[str, list[int]] = {}
    for i, e in enumerate(entries):
        if e.is_cuda:
            by_device.setdefault(e.device, []).append(i)
    for device, idx in by_device.items():
        _copy_cuda(device, [entries[i] for i in idx], [storages[i] for i in idx], arena, to_host, workers,
                   chunk_bytes)


def _copy_cpu(entries, storages, arena: HostArena, to_host: bool, workers: int, chunk_bytes: int) -> None:
    plan = _balance(entries, workers, chunk_bytes)
    bases = [s.data_ptr() for s in storages]
    memmove = ctypes.memmove  # a foreign call: the GIL is released while it copies
    if not to_host:
        # Memory given back comes back as huge pages where the kernel allows: first touch of huge
        # pages is several times faster than of 4 KiB ones (docs/swap.md, docs/measurements.md).
        for entry, base in zip(entries, bases):
            if entry.release in ("pages", "resize") and entry.nbytes >= 2 * _HUGE:
                _madvise(base, entry.nbytes, _MADV_HUGEPAGE, _HUGE)

    def run(chunks):
        for i, start, n in chunks:
            host = arena.address + entries[i].arena_offset + start
            dev = bases[i] + start
            dst = host if to_host else dev
            if n >= _PREFAULT_MIN:  # one syscall faults the chunk in, instead of one fault per page
                _madvise(dst, n, _MADV_POPULATE_WRITE, _PAGE)
            if to_host:
                memmove(host, dev, n)
            else:
                memmove(dev, host, n)

    if len(plan) <= 1:
        for chunks in plan:
            run(chunks)
        return
    with ThreadPoolExecutor(max_workers=len(plan), thread_name_prefix="swap-copy") as pool:
        for fut in [pool.submit(run, chunks) for chunks in plan]:
            fut.result()


def _copy_cuda(device: str, entries, storages, arena: HostArena, to_host: bool, workers: int,
               chunk_bytes: int) -> None:
    import torch

    plan = _balance(entries, workers, chunk_bytes)
    streams = _cuda_streams(device, len(plan))
    views = [_storage_bytes(s, device) for s in storages]
    current = torch.cuda.current_stream(device)
    for stream in streams:
        stream.wait_stream(current)  # the engine's last kernels wrote these weights
    # Issue round robin so that every stream has work queued from the start.
    for step in range(max(len(c) for c in plan)):
        for stream, chunks in zip(streams, plan):
            if step >= len(chunks):
                continue
            i, start, n = chunks[step]
            host = arena.view(entries[i].arena_offset + start, n)
            dev = views[i][start:start + n]
            with torch.cuda.stream(stream):
                if to_host:
                    host.copy_(dev, non_blocking=True)
                else:
                    dev.copy_(host, non_blocking=True)
    for stream in streams:
        stream.synchronize()
    if not to_host:
        for stream in streams:
            current.wait_stream(stream)
