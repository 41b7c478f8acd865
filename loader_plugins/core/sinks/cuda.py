"""CUDA destinations: the engine's own CUDA tensors, filled in place from a ring of pinned buffers.

Reads land in page-locked host buffers (a :class:`PinnedRing` allocated once, within
``memory_limit``); each filled buffer is copied to its destination with ``cudaMemcpyAsync`` on
one of two or more CUDA streams (round robin) while the next reads proceed. The copy records
the buffer's CUDA event, and the buffer goes back to the ring: it is lent out again only once
that event has completed, so the host waits only when every buffer is still in flight, never
per tensor. :meth:`CudaSink.finish` synchronises once, at the end of the load.

On the device, CuPy raw kernels compiled from ``native/`` at first use (and cached) convert
between floating-point dtypes (checkpoint dtype -> model dtype, no CPU pass) and cut
tensor-parallel shards along dim >= 1 (:class:`~loader_plugins.core.tp.ColumnBlock`).

Layered so that everything but the CUDA calls runs on a CPU-only machine, one module a layer
(this module re-exports their names):

* :mod:`.cuda_plan`: :func:`plan_chunk`, :func:`column_rects`, :func:`ring_geometry`, the kernels'
  dtypes and sources; pure.
* :mod:`.cuda_ring`: :class:`PinnedRing`, the buffers' bookkeeping, over a :class:`CudaBackend`
  (events, memory).
* :mod:`.cuda_cupy`: :class:`CupyBackend`, the only code that talks to CUDA; CuPy is imported when
  it is created.
* here: :class:`CudaSink`, a :class:`~.base.Sink` (:meth:`CudaSink.read_into`,
  :meth:`CudaSink.write`); :func:`sink_for_destinations` builds one when a load has CUDA
  destinations and CuPy is there.
"""

from __future__ import annotations

import ctypes
import itertools
import logging
import threading
import time
from typing import TYPE_CHECKING, Sequence

from ...errors import DestinationError, StreamerError
from ..header import dtype_itemsize, safetensors_dtype
from ..tp import ColumnBlock
from .cuda_cupy import CupyBackend
from .cuda_plan import (
    COMPACT,
    CONVERT_FILE,
    DEST,
    HOST,
    MIN_2D_WIDTH,
    NATIVE_DTYPES,
    STAGE,
    STRIDED_FILE,
    Convert,
    Copy,
    Copy2D,
    Op,
    Rect,
    StridedCopy,
    column_rects,
    convert_kernel,
    convert_kernels,
    kernel_source,
    native_dir,
    plan_chunk,
    ring_geometry,
)
from .cuda_ring import CudaBackend, PinnedRing, Slot, free_idle_rings, give_back_ring, take_ring

if TYPE_CHECKING:

    from ...config import StreamerConfig
    from ..sources.base import BufferPool, Source

log = logging.getLogger(__name__)

# ------------------------------------------------------------------------------------------
# the sink
# ------------------------------------------------------------------------------------------

def _as_tensor(dest):
    """A torch tensor for ``dest`` (a torch tensor, or any DLPack / CUDA array interface object)."""
    import torch

    if isinstance(dest, torch.Tensor):
        return dest
    if hasattr(dest, "__dlpack__"):
        return torch.from_dlpack(dest)
    raise DestinationError(f"destination of type {type(dest).__name__} is neither a torch tensor nor a DLPack "
                           f"array")


class CudaSink:
    """Fills CUDA tensors in place from pinned buffers; see the module docstring.

    ``memory_limit`` (default ``config.memory_limit``) bounds the pinned ring; ``backend``
    replaces CuPy (tests); ``streams`` (at least 2) copy in turn.

    Thread-safe: the reader's workers call :meth:`read_into` (or :meth:`acquire` /
    :meth:`submit`) concurrently; one thread calls :meth:`finish` after the last submit.
    """

    def __init__(self, config: "StreamerConfig", *, device: int | None = None, backend: CudaBackend | None = None,
                 streams: int = 2, cancelled: threading.Event | None = None, min_2d_width: int = MIN_2D_WIDTH,
                 memory_limit: int | None = None, workers: int | None = None):
        self._backend = backend if backend is not None else CupyBackend(device)
        streams = max(2, streams)
        count, capacity = ring_geometry(memory_limit or config.memory_limit, config.chunk_bytes, config.alignment,
                                        workers or config.workers(), streams)
        self._ring = take_ring(self._backend, count, capacity, config.alignment, cancelled)
        self._keep_ring = config.pinned_ring == "keep"
        self._streams = [self._backend.new_stream() for _ in range(streams)]
        self._turn = itertools.count()
        self._min_2d = min_2d_width
        self._lock = threading.Lock()
        self._started = False
        self._closed = False
        self.bytes_submitted = 0
        self._times = StageTimes()
        self._device_at_start = dict(getattr(self._backend, "stats", None) or {})   # a device that counts

    @property
    def ring(self) -> PinnedRing:
        return self._ring

    @property
    def slot_bytes(self) -> int:
        """Largest chunk one pinned buffer takes (:meth:`read_into` and :meth:`write` split)."""
        return self._ring.capacity

    # ---- destinations ----------------------------------------------------------------------
    def can_write(self, src_dtype: str, dest) -> bool:
        """True when this sink can fill ``dest`` from ``src_dtype`` bytes (same device,
        contiguous, same dtype or a conversion kernel)."""
        try:
            dest = _as_tensor(dest)
            dst_dtype = safetensors_dtype(dest.dtype)
        except (DestinationError, StreamerError):
            return False
        return (self._backend.owns(dest) and dest.is_contiguous()
                and (dst_dtype == src_dtype or convert_kernel(src_dtype, dst_dtype) is not None))

    def check_destination(self, spec, dest, block: ColumnBlock | None = None) -> None:
        """Raise :class:`DestinationError` unless ``dest`` can take ``spec`` (or its ``block``)."""
        dest = _as_tensor(dest)
        if not self._backend.owns(dest):
            raise DestinationError(f"destination for {spec.describe()} is on {dest.device}, not this sink's device")
        if not dest.is_contiguous():
            raise DestinationError(f"destination for {spec.describe()} is not contiguous; the CUDA sink fills "
                                   f"contiguous tensors only")
        dst_dtype = safetensors_dtype(dest.dtype)
        if dst_dtype != spec.dtype and convert_kernel(spec.dtype, dst_dtype) is None:
            raise DestinationError(f"destination for {spec.describe()} is {dest.dtype} but the checkpoint holds "
                                   f"{spec.dtype}; the device converts only between {sorted(NATIVE_DTYPES)} "
                                   f"(to BF16, F16, F32)")
        want = (block.nbytes if block is not None else spec.nbytes) // spec.itemsize
        if dest.numel() != want:
            raise DestinationError(f"destination for {spec.describe()} has {dest.numel()} elements but "
                                   f"{'its shard' if block is not None else 'the tensor'} has {want}")

    # ---- the Sink protocol (core/sinks/base.py) ----------------------------------------------
    allocates = False
    deferred = True      # copies are asynchronous: complete after finish()

    def takes(self, spec, dest) -> bool:
        return self.can_write(spec.dtype, dest)

    def check(self, spec, dest, block: ColumnBlock | None) -> bool:
        self.check_destination(spec, dest, block)
        return True

    def wrap(self, dest) -> None:
        return None

    def buffer_for(self, target) -> None:
        return None

    def land(self, job, item, source, *, pool, cancelled) -> None:
        self.read_into(source, item.file_offset, item.length, job.target, item.dest_offset, src_dtype=job.spec.dtype,
                       block=job.block, pool=pool, cancelled=cancelled)

    def reserved_bytes(self) -> int:
        return self._ring.count * (self._ring.capacity + 2 * self._ring.alignment)

    def attach(self, cancelled: threading.Event) -> None:
        self._ring.cancelled = cancelled

    # ---- moving bytes ----------------------------------------------------------------------
    def start(self) -> None:
        """Order this load after the device work queued so far (e.g. the destinations' own
        initialisation): one device-wide synchronisation, once."""
        with self._lock:
            if self._started:
                return
            self._started = True
        t = self._times.begin()
        self._backend.device_synchronize()
        self._times.add("start_sync_s", time.perf_counter() - t)

    def acquire(self) -> Slot:
        self.start()
        return self._ring.acquire()

    def release(self, slot: Slot) -> None:
        """Give back a slot whose read failed (nothing was queued from it)."""
        self._ring.release(slot, recorded=False)

    def submit(self, slot: Slot, dest, byte_offset: int, nbytes: int, *, src_dtype: str | None = None,
               block: ColumnBlock | None = None) -> None:
        """Queue the copy of the ``nbytes`` read into ``slot`` (tensor bytes ``[byte_offset, ...)``
        of dtype ``src_dtype``, default: the destination's) into ``dest``; returns at once.

        ``block``: ``dest`` is this rank's shard (see :func:`~loader_plugins.core.tp.shard_block`)
        and only the chunk's bytes inside it are copied.
        """
        try:
            dest = _as_tensor(dest)
            dst_dtype = safetensors_dtype(dest.dtype)
            src_dtype = src_dtype or dst_dtype
            kernel = None if src_dtype == dst_dtype else convert_kernel(src_dtype, dst_dtype)
            if src_dtype != dst_dtype and kernel is None:
                raise DestinationError(f"no device conversion from {src_dtype} to {dst_dtype}")
            src_size, dst_size = dtype_itemsize(src_dtype), dtype_itemsize(dst_dtype)
            dest_bytes = dest.numel() * dst_size
            ops = plan_chunk(byte_offset, nbytes, src_size, dst_size, kernel, block, min_2d_width=self._min_2d)
            _check_bounds(ops, src_size, dst_size, dest_bytes, nbytes, slot.capacity)
        except BaseException:
            self._ring.release(slot, recorded=False)
            raise
        if not ops:
            self._ring.release(slot, recorded=False)
            return
        stream = self._streams[next(self._turn) % len(self._streams)]
        issued = False
        try:
            ptrs = self._pointers(slot, dest, ops)
            for op in ops:
                self._issue(op, ptrs, stream)
                issued = True
        finally:
            if issued:
                self._backend.record(slot.event, stream)
            self._ring.release(slot, recorded=issued)
        with self._lock:
            self.bytes_submitted += nbytes

    def _pointers(self, slot: Slot, dest, ops: Sequence[Op]) -> dict[str, int]:
        names = {op.src for op in ops} | {op.dst for op in ops}
        if STAGE in names and slot.stage is None:
            slot.stage = self._backend.alloc_device(slot.capacity)
        if COMPACT in names and slot.compact is None:
            slot.compact = self._backend.alloc_device(slot.capacity)
        return {HOST: slot.ptr + slot.data_offset, STAGE: slot.stage or 0, COMPACT: slot.compact or 0,
                DEST: self._backend.address(dest)}

    def _issue(self, op: Op, ptrs: dict[str, int], stream) -> None:
        b = self._backend
        src, dst = ptrs[op.src] + op.src_offset, ptrs[op.dst] + op.dst_offset
        if isinstance(op, Copy):
            b.memcpy(dst, src, op.nbytes, stream)
        elif isinstance(op, Copy2D):
            b.memcpy2d(dst, op.dst_pitch, src, op.src_pitch, op.width, op.height, stream)
        elif isinstance(op, StridedCopy):
            b.launch_strided(op.itemsize, src, dst, op.rows, op.cols, op.in_pitch, op.out_pitch, stream)
        else:
            b.launch_convert(op.kernel, src, dst, op.count, stream)

    def read_into(self, source: "Source", file_offset: int, length: int, dest, byte_offset: int, *,
                  src_dtype: str | None = None, block: ColumnBlock | None = None,
                  pool: "BufferPool | None" = None, cancelled: threading.Event | None = None) -> None:
        """Read ``length`` bytes at ``file_offset`` of ``source`` (tensor bytes from ``byte_offset``)
        into pinned buffers and queue their copies into ``dest``: the reader's per-chunk call."""
        done = 0
        times = self._times
        while done < length:
            n = min(self.slot_bytes, length - done)
            slot = self.acquire()
            t = time.perf_counter()
            try:
                view = slot.view_for(file_offset + done, n)
                source.read_into(file_offset + done, view, pool=pool, cancelled=cancelled, slack=True)
                del view
            except BaseException:
                self.release(slot)
                raise
            t2 = time.perf_counter()
            times.read(t, t2)
            self.submit(slot, dest, byte_offset + done, n, src_dtype=src_dtype, block=block)
            times.add("submit_s", time.perf_counter() - t2)
            done += n

    def write(self, dest, byte_offset: int, host_view, *, src_dtype: str | None = None,
              block: ColumnBlock | None = None) -> None:
        """Copy ``host_view`` (any bytes-like object: tensor bytes from ``byte_offset``) into
        ``dest`` through the pinned ring; returns once the data is in pinned memory."""
        import numpy

        data = numpy.frombuffer(memoryview(host_view).cast("B"), dtype=numpy.uint8)   # read-only is fine
        base = data.ctypes.data
        done = 0
        while done < data.size:
            n = min(self.slot_bytes, data.size - done)
            slot = self.acquire()
            slot.data_offset = 0
            ctypes.memmove(slot.ptr, base + done, n)
            self.submit(slot, dest, byte_offset + done, n, src_dtype=src_dtype, block=block)
            done += n

    def finish(self) -> None:
        """Wait, once, until every queued copy has landed; the destinations are then complete."""
        t = time.perf_counter()
        for stream in self._streams:
            self._backend.synchronize(stream)
        self._ring.all_done()
        self._times.end(t)

    def report(self) -> dict:
        """Where this load's time went, stage by stage (see :class:`StageTimes`)."""
        ring = self._ring
        device = getattr(self._backend, "stats", None)
        if device is not None:      # this load's share of the device's counters
            device = {k: v - self._device_at_start.get(k, 0) for k, v in device.items()}
        return self._times.report(ring_alloc_s=ring.alloc_seconds, slot_wait_s=ring.wait_seconds,
                                  event_waits=ring.event_waits, ring_bytes=ring.allocated_bytes,
                                  bytes=self.bytes_submitted, streams=len(self._streams), ring_reused=ring.reused,
                                  device=None if device is None else {
                                      "link_busy_s": round(device.get("link_busy_ns", 0) / 1e9, 4),
                                      "link_bytes": device.get("link_bytes", 0),
                                      "kernel_s": round(device.get("kernel_ns", 0) / 1e9, 4)})

    def close(self) -> None:
        if self._closed:
            return
        self._closed = True
        try:
            give_back_ring(self._ring, self._keep_ring)   # kept for the next load, or freed
        finally:
            self._backend.close()

    def __enter__(self) -> "CudaSink":
        return self

    def __exit__(self, *exc) -> None:
        self.close()


class StageTimes:
    """Seconds per stage of one CUDA load, summed over the reader's threads where several run
    it at once (thread-safe):

    * ``start_sync_s``: the one device synchronisation before the first copy;
    * ``ring_alloc_s``: allocating and pinning the ring's buffers (first use of each);
    * ``first_byte_s``: from the start to the first read that landed in a pinned buffer;
    * ``read_s``: reading (page cache, disk or network) into pinned buffers; ``workers``: the
      same per thread (each worker's busy time);
    * ``slot_wait_s``: waiting for a free pinned buffer: the device's copies were behind;
    * ``submit_s``: queueing the copies and kernels (host side of ``cudaMemcpyAsync``);
    * ``final_sync_s``: waiting, at the end, for the copies still in flight;
    * ``device`` (a device that counts: the simulated one): link busy seconds and kernel seconds.

    ``bound`` names the stage that bounded the load: the largest per-worker share among reads,
    waiting on the device (slot waits and the final sync), submitting, and fixed costs (ring
    allocation and the first sync).
    """

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._t0: float | None = None
        self._t_end: float | None = None
        self._first: float | None = None
        self._sums: dict[str, float] = {"start_sync_s": 0.0, "submit_s": 0.0, "final_sync_s": 0.0, "read_s": 0.0}
        self._workers: dict[str, float] = {}

    def begin(self) -> float:
        t = time.perf_counter()
        with self._lock:
            if self._t0 is None:
                self._t0 = t
        return t

    def add(self, key: str, seconds: float) -> None:
        with self._lock:
            self._sums[key] += seconds

    def read(self, t_start: float, t_end: float) -> None:
        name = threading.current_thread().name
        with self._lock:
            self._sums["read_s"] += t_end - t_start
            self._workers[name] = self._workers.get(name, 0.0) + (t_end - t_start)
            if self._first is None:
                self._first = t_end

    def end(self, t_sync: float) -> None:
        t = time.perf_counter()
        with self._lock:
            self._sums["final_sync_s"] += t - t_sync
            self._t_end = t

    def report(self, *, ring_alloc_s: float, slot_wait_s: float, **extra) -> dict:
        with self._lock:
            sums, workers = dict(self._sums), dict(self._workers)
            t0, t_end, first = self._t0, self._t_end, self._first
        n = max(1, len(workers))
        wall = (t_end - t0) if t0 is not None and t_end is not None else 0.0
        shares = {"reads": sums["read_s"] / n,
                  "device (copies behind: waits for pinned buffers, final sync)": slot_wait_s / n + sums["final_sync_s"],
                  "submitting copies": sums["submit_s"] / n,
                  "fixed costs (ring allocation, first sync)": ring_alloc_s / n + sums["start_sync_s"]}
        out = {"wall_s": round(wall, 4),
               "first_byte_s": round(first - t0, 4) if first is not None and t0 is not None else None,
               "ring_alloc_s": round(ring_alloc_s, 4), "slot_wait_s": round(slot_wait_s, 4),
               **{k: round(v, 4) for k, v in sums.items()},
               "workers": {k: round(v, 4) for k, v in sorted(workers.items())},
               "bound": max(shares, key=shares.__getitem__) if wall else None, **extra}
        return out


def _check_bounds(ops: Sequence[Op], src_size: int, dst_size: int, dest_bytes: int, nbytes: int,
                  capacity: int) -> None:
    """Every operation stays inside its buffers (a wrong offset is an error, never a stray write)."""
    for op in ops:
        if isinstance(op, Copy):
            extents = [(op.src, op.src_offset + op.nbytes), (op.dst, op.dst_offset + op.nbytes)]
        elif isinstance(op, Copy2D):
            extents = [(op.src, op.src_offset + (op.height - 1) * op.src_pitch + op.width),
                       (op.dst, op.dst_offset + (op.height - 1) * op.dst_pitch + op.width)]
        elif isinstance(op, StridedCopy):
            s = op.itemsize
            extents = [(op.src, op.src_offset + ((op.rows - 1) * op.in_pitch + op.cols) * s),
                       (op.dst, op.dst_offset + ((op.rows - 1) * op.out_pitch + op.cols) * s)]
        else:
            extents = [(op.src, op.src_offset + op.count * src_size), (op.dst, op.dst_offset + op.count * dst_size)]
        for name, end in extents:
            limit = {HOST: nbytes, STAGE: capacity, COMPACT: capacity, DEST: dest_bytes}[name]
            if end > limit:
                raise DestinationError(f"a copy would go past the end of the {name} buffer ({end} > {limit} bytes): "
                                       f"the chunk does not fit the destination")


def sink_for_destinations(config: "StreamerConfig", destinations, *, cancelled: threading.Event | None = None,
                          memory_limit: int | None = None, workers: int | None = None) -> CudaSink | None:
    """A :class:`CudaSink` for the CUDA tensors among ``destinations`` (name -> tensor), or None
    when there are none or CuPy is not installed (the reader then stages on the CPU and copies
    with torch, as before). Only destinations on the first CUDA tensor's device use the sink."""
    device = next((d.device.index or 0 for d in destinations.values()
                   if getattr(getattr(d, "device", None), "type", None) == "cuda"), None)
    if device is None:
        return None
    if not cuda_sink_available():
        log.info("CuPy is not installed: CUDA destinations are filled through CPU staging (install "
                 "loader-plugins[cuda] for the pinned ring, multi-stream copies and device-side casts)")
        return None
    return CudaSink(config, device=device, cancelled=cancelled, memory_limit=memory_limit, workers=workers)


def cuda_sink_available() -> bool:
    """True when CuPy is installed (checked without importing it): CUDA destinations, including
    strided tensor-parallel shards and dtype casts, can then go through :class:`CudaSink`."""
    import importlib.util

    return importlib.util.find_spec("cupy") is not None


__all__ = [
    "COMPACT", "CONVERT_FILE", "DEST", "HOST", "MIN_2D_WIDTH", "NATIVE_DTYPES", "STAGE", "STRIDED_FILE", "Convert",
    "Copy", "Copy2D", "CudaBackend", "CudaSink", "CupyBackend", "Op", "PinnedRing", "Rect", "Slot", "StageTimes", "free_idle_rings",
    "StridedCopy",
    "column_rects", "convert_kernel", "convert_kernels", "cuda_sink_available", "kernel_source", "native_dir",
    "plan_chunk", "ring_geometry", "sink_for_destinations",
]
