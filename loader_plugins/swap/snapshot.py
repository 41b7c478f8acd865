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

import ctypes
import dataclasses
import json
import logging
import mmap
import os
import threading
import time
import types
import weakref
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import TYPE_CHECKING, Any, Callable, Iterator, Mapping, Sequence

from ..core.header import encode_header, safetensors_dtype
from ..core.plan import balance
from ..core._libc import HUGE_PAGE as _HUGE
from ..core._libc import MADV_HUGEPAGE as _MADV_HUGEPAGE
from ..core._libc import MADV_POPULATE_WRITE as _MADV_POPULATE_WRITE
from ..core._libc import residency
from ..core._libc import madvise_range as _madvise
from ..core.sinks.cpu import tensor_buffer
from ..errors import StreamerError
from .metrics import SwapMetrics, default_metrics

if TYPE_CHECKING:
    import torch

    from ..config import StreamerConfig

log = logging.getLogger(__name__)

DEFAULT_CHUNK_BYTES = 32 << 20
ARENA_ALIGN = 4096
RELEASE_MODES = ("auto", "pages", "resize", "none")
METADATA_KEY = "loader_plugins.swap"
STORAGE_SUFFIX = "@storage"
_MADV_DONTNEED = getattr(mmap, "MADV_DONTNEED", 4)
_PAGE = mmap.PAGESIZE
_PREFAULT_MIN = 1 << 20


class SwapError(StreamerError, RuntimeError):
    """An offload or restore cannot be done (wrong state, model changed, bad arguments)."""


# ----------------------------------------------------------------------------------------------
# What a snapshot holds
# ----------------------------------------------------------------------------------------------

@dataclasses.dataclass(frozen=True)
class TensorView:
    """One named tensor over a storage: enough to rebuild it from the storage's bytes."""

    name: str
    dtype: Any                      # torch.dtype
    shape: tuple[int, ...]
    stride: tuple[int, ...]
    storage_offset: int             # in elements

    @property
    def itemsize(self) -> int:
        return self.dtype.itemsize

    @property
    def nbytes(self) -> int:
        n = 1
        for d in self.shape:
            n *= d
        return n * self.itemsize

    def covers(self, storage_nbytes: int) -> bool:
        """True when this view is the whole storage, contiguous, from byte 0."""
        expected, step = [], 1
        for d in reversed(self.shape):
            expected.append(step)
            step *= max(d, 1)
        contiguous = all(s == e for s, e, d in zip(self.stride, reversed(expected), self.shape) if d != 1)
        return self.storage_offset == 0 and contiguous and self.nbytes == storage_nbytes

    def describe(self) -> list:
        return [self.name, str(self.dtype).replace("torch.", ""), list(self.shape), list(self.stride),
                self.storage_offset]


@dataclasses.dataclass
class StorageEntry:
    """One storage of the model: its views, where its bytes sit in the arena, how it was released."""

    views: list[TensorView]
    device: str
    nbytes: int
    arena_offset: int
    address: int                    # data_ptr when the snapshot was planned
    ref: Callable[[], Any]          # the first tensor over the storage (weak or strong)
    release: str = "none"           # how its memory was given back: pages / resize / none
    released_bytes: int = 0

    @property
    def name(self) -> str:
        return self.views[0].name

    @property
    def is_cuda(self) -> bool:
        return self.device.startswith("cuda")

    def tensor(self):
        return self.ref()

    def file_entry(self) -> tuple[str, str, tuple[int, ...]]:
        """(key, safetensors dtype, shape) this storage is written under in a spill file."""
        for view in self.views:
            if view.covers(self.nbytes):
                try:
                    return view.name, safetensors_dtype(view.dtype), view.shape
                except StreamerError:
                    break
        return self.name + STORAGE_SUFFIX, "U8", (self.nbytes,)


def _strong(obj):
    return lambda: obj


# ----------------------------------------------------------------------------------------------
# Finding the tensors
# ----------------------------------------------------------------------------------------------

def _function_tensors(fn: Any) -> Iterator[tuple[str, Any]]:
    """Tensors captured by a function stored on a module (closure cells, default arguments)."""
    import torch

    if isinstance(fn, types.FunctionType):
        for var, cell in zip(fn.__code__.co_freevars, fn.__closure__ or ()):
            try:
                value = cell.cell_contents
            except ValueError:  # empty cell
                continue
            if isinstance(value, torch.Tensor):
                yield f"<closure>.{var}", value
        for i, value in enumerate(fn.__defaults__ or ()):
            if isinstance(value, torch.Tensor):
                yield f"<default>.{i}", value


_MODULE_INTERNALS = frozenset({"_parameters", "_buffers", "_modules", "_non_persistent_buffers_set"})


def named_tensors(obj: Any) -> list[tuple[str, Any]]:
    """Every (name, tensor) a snapshot of ``obj`` covers, in a stable order.

    A module contributes its parameters and buffers (tied ones under each name), tensors held as
    plain attributes, and tensors captured by functions held as attributes (``layer.cpu_linear``
    closures). Lists and dicts of tensors on a module (a KV cache) are not model state and are
    left out. A mapping contributes its items; a tensor or sequence of tensors, ``"0"``, ``"1"``...
    """
    import torch

    if isinstance(obj, torch.nn.Module):
        out: list[tuple[str, Any]] = []
        for mod_name, mod in obj.named_modules(remove_duplicate=False):
            prefix = f"{mod_name}." if mod_name else ""
            out.extend((prefix + n, p) for n, p in mod._parameters.items() if p is not None)
            out.extend((prefix + n, b) for n, b in mod._buffers.items() if b is not None)
            for attr, value in vars(mod).items():
                if attr in _MODULE_INTERNALS:
                    continue
                if isinstance(value, torch.Tensor):
                    out.append((prefix + attr, value))
                elif callable(value):
                    out.extend((f"{prefix}{attr}.{n}", t) for n, t in _function_tensors(value))
        return out
    if isinstance(obj, torch.Tensor):
        return [("0", obj)]
    if isinstance(obj, Mapping):
        return [(str(k), v) for k, v in obj.items()]
    if isinstance(obj, Sequence) and not isinstance(obj, (str, bytes)):
        return [(str(i), t) for i, t in enumerate(obj)]
    raise SwapError(f"cannot snapshot a {type(obj).__name__}: pass a torch.nn.Module, a tensor, a mapping "
                    f"name -> tensor or a sequence of tensors")


def _device_name(tensor) -> str:
    device = tensor.device
    return f"{device.type}:{device.index or 0}" if device.type == "cuda" else str(device)


def _plan_entries(obj: Any, exclude: Sequence[Any] = ()) -> tuple[list[StorageEntry], int, list[str]]:
    """Group the tensors by storage; lay the storages out in the arena. Returns (entries, bytes, skipped).

    Tensors over a storage of one of the ``exclude`` tensors (a KV cache the model references) are left out.
    """
    import torch

    weak = isinstance(obj, torch.nn.Module)
    entries: dict[tuple[str, int], StorageEntry] = {}
    skipped: list[str] = []
    excluded = {(_device_name(t), t.untyped_storage().data_ptr()) for t in exclude}
    for name, tensor in named_tensors(obj):
        if not isinstance(tensor, torch.Tensor):
            raise SwapError(f"{name!r} is a {type(tensor).__name__}, not a tensor")
        if tensor.layout != torch.strided or tensor.is_meta or tensor.is_quantized:
            skipped.append(name)
            continue
        storage = tensor.untyped_storage()
        nbytes = storage.nbytes()
        if nbytes == 0:  # already empty (vLLM CPU leaves 0-element weights behind repacked layers)
            continue
        device = _device_name(tensor)
        key = (device, storage.data_ptr())
        if key in excluded:
            continue
        view = TensorView(name, tensor.dtype, tuple(tensor.shape), tuple(tensor.stride()), tensor.storage_offset())
        entry = entries.get(key)
        if entry is None:
            ref = weakref.ref(tensor) if weak else _strong(tensor)
            entries[key] = StorageEntry([view], device, nbytes, 0, storage.data_ptr(), ref)
        elif view not in entry.views:
            entry.views.append(view)
    pos = 0
    out = list(entries.values())
    for entry in out:
        entry.arena_offset = pos
        pos += -(-entry.nbytes // ARENA_ALIGN) * ARENA_ALIGN
    return out, pos, skipped


# ----------------------------------------------------------------------------------------------
# Host arena
# ----------------------------------------------------------------------------------------------

def _cuda_available() -> bool:
    import torch

    return bool(torch.cuda.is_available())


def _host_unregister(address: int) -> None:
    import torch

    try:
        torch.cuda.cudart().cudaHostUnregister(address)
    except Exception as exc:  # noqa: BLE001 - never fail a restore on cleanup
        log.debug("cudaHostUnregister failed: %s", exc)


class HostArena:
    """One host buffer for a snapshot: anonymous memory (page aligned, huge pages), page-locked
    with ``cudaHostRegister`` when it will feed CUDA copies (no power-of-two rounding, unlike
    ``pin_memory=True``)."""

    def __init__(self, nbytes: int, *, pinned: bool):
        import torch

        self.nbytes = nbytes
        self.pinned = False
        self._mm: mmap.mmap | None = None
        self._unregister: weakref.finalize | None = None
        t0 = time.perf_counter()
        if nbytes == 0:
            self.tensor = torch.empty(0, dtype=torch.uint8)
        else:
            self._mm = mmap.mmap(-1, nbytes, flags=mmap.MAP_PRIVATE | mmap.MAP_ANONYMOUS)
            self.tensor = torch.frombuffer(self._mm, dtype=torch.uint8)
            if nbytes >= 2 * _HUGE:
                _madvise(self.tensor.data_ptr(), nbytes, _MADV_HUGEPAGE, _HUGE)
            if pinned:
                self.pinned = self._register(torch)
                if not self.pinned:  # no cudaHostRegister in this torch: torch's pinned allocator
                    self.tensor = torch.empty(nbytes, dtype=torch.uint8, pin_memory=True)
                    self._mm = None
                    self.pinned = True
        self.address = self.tensor.data_ptr()
        self.seconds = time.perf_counter() - t0

    def _register(self, torch) -> bool:
        cudart = getattr(torch.cuda, "cudart", None)
        try:
            rt = cudart() if cudart is not None else None
            register = getattr(rt, "cudaHostRegister", None)
            if register is None:
                return False
            err = register(self.tensor.data_ptr(), self.nbytes, 0)
            if int(getattr(err, "value", err)) != 0:
                log.warning("cudaHostRegister of %d bytes failed (error %s); using pin_memory", self.nbytes, err)
                return False
        except Exception as exc:  # noqa: BLE001 - feature probe; fall back to torch's pinned memory
            log.debug("cudaHostRegister unavailable (%s)", exc)
            return False
        # Unregistered on close, or when the arena is dropped without one (a restored snapshot that
        # kept its arena and went out of scope): weakref callbacks run before the mapping goes.
        # Unmapped while registered, the range stays known to the driver, and a later pinned
        # allocation there fails with "resource already mapped".
        self._unregister = weakref.finalize(self, _host_unregister, self.tensor.data_ptr())
        return True

    def view(self, offset: int, nbytes: int):
        return self.tensor[offset:offset + nbytes]

    def buffer(self, offset: int, nbytes: int) -> memoryview:
        return tensor_buffer(self.view(offset, nbytes))

    def close(self) -> None:
        if self._unregister is not None:
            self._unregister()
            self._unregister = None
        self.tensor = None
        self._mm = None  # unmapped when the last view of it is gone

    @property
    def closed(self) -> bool:
        return self.tensor is None


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


# ----------------------------------------------------------------------------------------------
# Releasing and re-materialising device memory
# ----------------------------------------------------------------------------------------------

def _drop_pages(address: int, nbytes: int) -> int:
    """MADV_DONTNEED on the whole pages inside [address, address+nbytes); bytes given back."""
    start = -(-address // _PAGE) * _PAGE
    end = (address + nbytes) // _PAGE * _PAGE
    if end <= start:
        return 0
    return end - start if _madvise(start, end - start, _MADV_DONTNEED, _PAGE) else 0


def resident_pages(address: int, nbytes: int) -> tuple[int, int]:
    """(bytes of the whole pages inside a CPU memory range, bytes of those resident in RAM), by ``mincore``."""
    start = -(-address // _PAGE) * _PAGE
    end = (address + nbytes) // _PAGE * _PAGE
    if end <= start:
        return 0, 0
    return end - start, sum(b & 1 for b in residency(start, end - start)) * _PAGE


def _resolve_release(release: str, entry: StorageEntry, storage) -> str:
    if release not in RELEASE_MODES:
        raise SwapError(f"release must be one of {', '.join(RELEASE_MODES)}, got {release!r}")
    if release == "auto":
        release = "pages" if entry.device == "cpu" else "resize"
    if release == "pages" and entry.device != "cpu":
        raise SwapError(f"release='pages' is for CPU memory; {entry.name!r} is on {entry.device} "
                        f"(use 'resize' or 'none')")
    if release == "resize" and not storage.resizable():
        # numpy / mmap'd / from_blob storages cannot be freed by torch; CPU ones can still drop pages
        return "pages" if entry.device == "cpu" else "none"
    return release


def _release(entries: Sequence[StorageEntry], storages: Sequence[Any], release: str, empty_cache: bool) -> int:
    freed = 0
    cuda_freed = False
    for entry, storage in zip(entries, storages):
        mode = _resolve_release(release, entry, storage)
        if mode == "pages":
            entry.released_bytes = _drop_pages(storage.data_ptr(), entry.nbytes)
            entry.release = "pages" if entry.released_bytes else "none"
        elif mode == "resize":
            storage.resize_(0)
            entry.release, entry.released_bytes = "resize", entry.nbytes
            cuda_freed |= entry.is_cuda
        else:
            entry.release, entry.released_bytes = "none", 0
        freed += entry.released_bytes
    if cuda_freed and empty_cache:
        import torch

        torch.cuda.empty_cache()  # hand the blocks back to the driver: another process can use them
    return freed


def _rematerialise(entry: StorageEntry, storage) -> None:
    current = storage.nbytes()
    if current == entry.nbytes:
        return
    if current == 0 and entry.release == "resize":
        storage.resize_(entry.nbytes)
        return
    raise SwapError(f"storage of {entry.name!r} on {entry.device} is now {current} bytes but the snapshot holds "
                    f"{entry.nbytes}: the model was changed after offload; restore into the model the snapshot "
                    f"was taken from")


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
