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

The module is layered so that everything but the CUDA calls runs on a CPU-only machine:

* :func:`plan_chunk`, :func:`column_rects`, :func:`ring_geometry`: pure; which device operations
  one chunk needs.
* :class:`PinnedRing`: the buffers' bookkeeping, over a :class:`CudaBackend` (events, memory).
* :class:`CupyBackend`: the only code that talks to CUDA; CuPy is imported when it is created.
* :class:`CudaSink`: the API the reader uses (:meth:`CudaSink.read_into`, :meth:`CudaSink.write`);
  :func:`sink_for_destinations` builds one when a load has CUDA destinations and CuPy is there.
"""

from __future__ import annotations

import collections
import ctypes
import dataclasses
import itertools
import logging
import re
import threading
from pathlib import Path
from typing import TYPE_CHECKING, Any, Sequence, Union

from ...errors import CancelledError, DestinationError, InternalError, MissingDependencyError, StreamerError
from ..header import dtype_itemsize, safetensors_dtype
from ..tp import ColumnBlock

if TYPE_CHECKING:
    import torch

    from ...config import StreamerConfig
    from ..sources.base import BufferPool, Source

log = logging.getLogger(__name__)

# safetensors dtype -> the name the kernels in native/convert.cu use
NATIVE_DTYPES = {
    "BF16": "bf16",
    "F16": "f16",
    "F32": "f32",
    "F8_E4M3": "e4m3fn",
    "F8_E5M2": "e5m2",
    "F8_E4M3FNUZ": "e4m3fnuz",
    "F8_E5M2FNUZ": "e5m2fnuz",
}
_CONVERT_TARGETS = ("bf16", "f16", "f32")
CONVERT_FILE = "convert.cu"
STRIDED_FILE = "strided_copy.cu"

#: narrower rows than this (bytes) are cut by the strided kernel on the device instead of a
#: cudaMemcpy2DAsync straight from host memory (the DMA engine moves narrow rows slowly)
MIN_2D_WIDTH = 512


def convert_kernel(src_dtype: str, dst_dtype: str) -> str | None:
    """Name of the kernel converting safetensors dtype ``src_dtype`` to ``dst_dtype`` (None: none)."""
    src, dst = NATIVE_DTYPES.get(src_dtype), NATIVE_DTYPES.get(dst_dtype)
    if src is None or dst not in _CONVERT_TARGETS or src == dst:
        return None
    return f"lp_convert_{src}_to_{dst}"


def convert_kernels() -> list[str]:
    """Every conversion kernel native/convert.cu defines."""
    return sorted({k for s in NATIVE_DTYPES for d in NATIVE_DTYPES if (k := convert_kernel(s, d))})


# ------------------------------------------------------------------------------------------
# kernel sources
# ------------------------------------------------------------------------------------------

def native_dir() -> Path:
    """The directory holding the CUDA C sources: ``native/`` of a source checkout, else the
    copy installed with the package (``loader_plugins/_native``)."""
    package = Path(__file__).resolve().parents[2]
    candidates = [package.parent / "native", package / "_native"]
    for path in candidates:
        if (path / CONVERT_FILE).is_file():
            return path
    raise InternalError(f"the CUDA kernel sources ({CONVERT_FILE}, {STRIDED_FILE}) are not in "
                        f"{' or '.join(map(str, candidates))}; reinstall loader-plugins")


_INCLUDE = re.compile(r'^[ \t]*#[ \t]*include[ \t]+"([^"]+)"[ \t]*$', re.MULTILINE)


def kernel_source(name: str) -> str:
    """The source of ``native/<name>`` with its local ``#include "..."`` files pasted in (NVRTC
    compiles one string and has no include path to the package)."""
    directory = native_dir()

    def paste(match: re.Match) -> str:
        included = directory / match.group(1)
        if included.parent != directory or not included.is_file():
            raise InternalError(f"{name}: #include \"{match.group(1)}\" is not a file in {directory}")
        return f"// ---- {match.group(1)} ----\n{included.read_text()}\n// ---- end {match.group(1)} ----"

    return _INCLUDE.sub(paste, (directory / name).read_text())


# ------------------------------------------------------------------------------------------
# pure planning: which device operations one chunk needs
# ------------------------------------------------------------------------------------------

HOST, STAGE, COMPACT, DEST = "host", "stage", "compact", "dest"
"""Buffers an operation names: the chunk in its pinned slot, two device staging buffers of the
slot's size, and the destination tensor."""


@dataclasses.dataclass(frozen=True)
class Copy:
    """cudaMemcpyAsync of ``nbytes`` (host to device, or device to device)."""

    src: str
    src_offset: int
    dst: str
    dst_offset: int
    nbytes: int


@dataclasses.dataclass(frozen=True)
class Copy2D:
    """cudaMemcpy2DAsync: ``height`` rows of ``width`` bytes at the given pitches."""

    src: str
    src_offset: int
    src_pitch: int
    dst: str
    dst_offset: int
    dst_pitch: int
    width: int
    height: int


@dataclasses.dataclass(frozen=True)
class StridedCopy:
    """The lp_strided_copy_<itemsize> kernel; ``cols`` and pitches in elements."""

    src: str
    src_offset: int
    dst: str
    dst_offset: int
    itemsize: int
    rows: int
    cols: int
    in_pitch: int
    out_pitch: int


@dataclasses.dataclass(frozen=True)
class Convert:
    """A conversion kernel over ``count`` elements."""

    kernel: str
    src: str
    src_offset: int
    dst: str
    dst_offset: int
    count: int


Op = Union[Copy, Copy2D, StridedCopy, Convert]


@dataclasses.dataclass(frozen=True)
class Rect:
    """Part of a chunk inside a column block: ``height`` rows of ``width`` bytes starting at
    ``src_offset`` of the chunk (rows ``pitch`` apart), landing at ``dst_offset`` of the shard."""

    src_offset: int
    dst_offset: int
    width: int
    height: int


def column_rects(offset: int, nbytes: int, block: ColumnBlock) -> list[Rect]:
    """Cut the chunk holding tensor bytes ``[offset, offset + nbytes)`` into at most three
    rectangles inside ``block`` (a partial first row, whole rows, a partial last row).

    Together they fill one contiguous byte range of the (contiguous) shard, in order.
    """
    if nbytes <= 0 or block.width == 0 or block.rows == 0:
        return []
    end = offset + nbytes
    pitch = block.row_bytes

    def segment(row: int) -> tuple[int, int] | None:
        lo = max(row * pitch + block.start, offset)
        hi = min(row * pitch + block.start + block.width, end)
        return (lo, hi) if hi > lo else None

    def rect(lo: int, width: int, row: int, height: int) -> Rect:
        return Rect(lo - offset, row * block.width + (lo - row * pitch - block.start), width, height)

    first, last = offset // pitch, min((end - 1) // pitch, block.rows - 1)
    if first > last:
        return []
    if first == last:
        seg = segment(first)
        return [rect(seg[0], seg[1] - seg[0], first, 1)] if seg else []
    rects: list[Rect] = []
    full_lo, full_hi = first + 1, last          # rows [full_lo, full_hi) are whole inside the chunk
    head, tail = segment(first), segment(last)
    if head and head[1] - head[0] == block.width:
        full_lo, head = first, None
    if tail and tail[1] - tail[0] == block.width:
        full_hi, tail = last + 1, None
    if head:
        rects.append(rect(head[0], head[1] - head[0], first, 1))
    if full_hi > full_lo:
        rects.append(rect(full_lo * pitch + block.start, block.width, full_lo, full_hi - full_lo))
    if tail:
        rects.append(rect(tail[0], tail[1] - tail[0], last, 1))
    return rects


def plan_chunk(offset: int, nbytes: int, src_itemsize: int, dst_itemsize: int, kernel: str | None,
               block: ColumnBlock | None = None, *, min_2d_width: int = MIN_2D_WIDTH) -> list[Op]:
    """The device operations that move one chunk (tensor bytes ``[offset, offset + nbytes)`` of
    the checkpoint dtype, in the pinned slot) into the destination.

    ``kernel`` converts to the destination dtype (None: same dtype); ``block`` selects a
    tensor-parallel shard (None: the destination is the whole tensor). Destination offsets are
    in the destination's bytes.
    """
    if offset % src_itemsize or nbytes % src_itemsize:
        raise ValueError(f"chunk [{offset}, {offset + nbytes}) is not aligned to the {src_itemsize}-byte element")
    if kernel is None and dst_itemsize != src_itemsize:
        raise ValueError("a dtype change needs a conversion kernel")

    def scale(n: int) -> int:
        return n // src_itemsize * dst_itemsize

    if nbytes == 0:
        return []
    if block is None:
        if kernel is None:
            return [Copy(HOST, 0, DEST, offset, nbytes)]
        return [Copy(HOST, 0, STAGE, 0, nbytes), Convert(kernel, STAGE, 0, DEST, scale(offset), nbytes // src_itemsize)]
    if block.row_bytes % src_itemsize or block.start % src_itemsize or block.width % src_itemsize:
        raise ValueError(f"{block} is not aligned to the {src_itemsize}-byte element")
    if block.contiguous:   # a dim-0 shard: a linear copy of the part of the chunk inside it
        lo, hi = block.byte_range()
        a, b = max(offset, lo), min(offset + nbytes, hi)
        if b <= a:
            return []
        if kernel is None:
            return [Copy(HOST, a - offset, DEST, a - lo, b - a)]
        return [Copy(HOST, a - offset, STAGE, 0, b - a),
                Convert(kernel, STAGE, 0, DEST, scale(a - lo), (b - a) // src_itemsize)]
    rects = column_rects(offset, nbytes, block)
    if not rects:
        return []
    if kernel is None and block.width >= min_2d_width:
        return [Copy2D(HOST, r.src_offset, block.row_bytes, DEST, r.dst_offset, block.width, r.width, r.height)
                for r in rects]
    # one linear host-to-device copy of the span the rectangles cover, then cut on the device
    span_lo = rects[0].src_offset
    last = rects[-1]
    span_hi = last.src_offset + (last.height - 1) * block.row_bytes + last.width
    ops: list[Op] = [Copy(HOST, span_lo, STAGE, 0, span_hi - span_lo)]
    out_lo = rects[0].dst_offset
    target, base = (DEST, 0) if kernel is None else (COMPACT, out_lo)
    for r in rects:
        ops.append(StridedCopy(STAGE, r.src_offset - span_lo, target, r.dst_offset - base, src_itemsize, r.height,
                               r.width // src_itemsize, block.row_bytes // src_itemsize,
                               block.width // src_itemsize))
    if kernel is not None:
        total = sum(r.width * r.height for r in rects)
        ops.append(Convert(kernel, COMPACT, 0, DEST, scale(out_lo), total // src_itemsize))
    return ops


def ring_geometry(memory_limit: int, chunk_bytes: int, alignment: int, concurrency: int,
                  streams: int = 2) -> tuple[int, int]:
    """``(count, capacity)`` of the pinned ring: buffers of ``chunk_bytes`` (plus ``2 * alignment``
    so O_DIRECT can read in place), as many as ``memory_limit`` holds, at most one per reader
    thread plus two per stream, and at least two (smaller ones when the limit is tight)."""
    per = chunk_bytes + 2 * alignment
    count = min(memory_limit // per, concurrency + 2 * streams)
    if count >= 2:
        return count, chunk_bytes
    capacity = max(alignment, (memory_limit // 2 - 2 * alignment) // alignment * alignment)
    return 2, min(capacity, chunk_bytes)


# ------------------------------------------------------------------------------------------
# the ring of pinned buffers
# ------------------------------------------------------------------------------------------

class CudaBackend:
    """What the sink needs from CUDA. :class:`CupyBackend` implements it with CuPy; tests use a
    fake that runs on the CPU. Pointers are ints; streams and events are opaque objects."""

    def owns(self, dest: "torch.Tensor") -> bool:
        """True when ``dest`` lives on this backend's device."""
        raise NotImplementedError

    def address(self, dest: "torch.Tensor") -> int:
        raise NotImplementedError

    def alloc_pinned(self, nbytes: int) -> int:
        raise NotImplementedError

    def free_pinned(self, ptr: int) -> None:
        raise NotImplementedError

    def alloc_device(self, nbytes: int) -> int:
        raise NotImplementedError

    def free_device(self, ptr: int) -> None:
        raise NotImplementedError

    def new_stream(self) -> Any:
        raise NotImplementedError

    def new_event(self) -> Any:
        raise NotImplementedError

    def record(self, event: Any, stream: Any) -> None:
        raise NotImplementedError

    def query(self, event: Any) -> bool:
        """True when the work recorded before ``event`` has completed (never blocks)."""
        raise NotImplementedError

    def wait_event(self, event: Any) -> None:
        raise NotImplementedError

    def synchronize(self, stream: Any) -> None:
        raise NotImplementedError

    def device_synchronize(self) -> None:
        raise NotImplementedError

    def memcpy(self, dst: int, src: int, nbytes: int, stream: Any) -> None:
        raise NotImplementedError

    def memcpy2d(self, dst: int, dst_pitch: int, src: int, src_pitch: int, width: int, height: int,
                 stream: Any) -> None:
        raise NotImplementedError

    def launch_convert(self, kernel: str, src: int, dst: int, count: int, stream: Any) -> None:
        raise NotImplementedError

    def launch_strided(self, itemsize: int, src: int, dst: int, rows: int, cols: int, in_pitch: int,
                       out_pitch: int, stream: Any) -> None:
        raise NotImplementedError

    def close(self) -> None:
        pass


class Slot:
    """One pinned buffer of the ring (with its event and, when needed, its device staging)."""

    __slots__ = ("index", "ptr", "capacity", "alignment", "event", "stage", "compact", "data_offset")

    def __init__(self, index: int, ptr: int, capacity: int, alignment: int, event: Any):
        self.index = index
        self.ptr = ptr
        self.capacity = capacity
        self.alignment = alignment
        self.event = event
        self.stage: int | None = None
        self.compact: int | None = None
        self.data_offset = 0

    def view_for(self, file_offset: int, length: int) -> memoryview:
        """Where to read ``length`` bytes found at ``file_offset``: placed at the same alignment
        as in the file, with ``alignment`` spare bytes on both sides (read with ``slack=True``)."""
        if length > self.capacity:
            raise ValueError(f"{length} bytes do not fit a {self.capacity}-byte pinned buffer")
        self.data_offset = file_offset % self.alignment
        if length == 0:
            return memoryview(bytearray(0))
        return memoryview((ctypes.c_char * length).from_address(self.ptr + self.data_offset)).cast("B")

    @property
    def allocation_bytes(self) -> int:
        return self.capacity + 2 * self.alignment


class PinnedRing:
    """``count`` pinned buffers of ``capacity`` bytes, allocated on first need and kept.

    :meth:`acquire` lends a free buffer; one given back with :meth:`release` after copies were
    queued (``recorded=True``) is free again once its event completes. When every buffer is
    lent out or in flight, acquire waits for the oldest in-flight one's event (the only host
    wait, and only while the device is behind).
    """

    def __init__(self, backend: CudaBackend, count: int, capacity: int, alignment: int = 4096,
                 cancelled: threading.Event | None = None):
        if count < 1:
            raise ValueError("a pinned ring needs at least one buffer")
        self._backend = backend
        self.count = count
        self.capacity = capacity
        self.alignment = alignment
        self.cancelled = cancelled or threading.Event()   # set it to abort waiting acquires (the reader's)
        self._cond = threading.Condition()
        self._free: list[Slot] = []
        self._in_flight: collections.deque[Slot] = collections.deque()
        self._slots: list[Slot] = []
        self._made = 0
        self._closed = False
        self.event_waits = 0     # times acquire blocked on an event (the device was behind)

    @property
    def allocated_bytes(self) -> int:
        return sum(s.allocation_bytes for s in self._slots)

    @property
    def in_flight(self) -> int:
        return len(self._in_flight)

    def _reclaim_done(self) -> None:
        while self._in_flight and self._backend.query(self._in_flight[0].event):
            self._free.append(self._in_flight.popleft())

    def acquire(self) -> Slot:
        while True:
            with self._cond:
                if self._closed or self.cancelled.is_set():
                    raise CancelledError("pinned ring closed: the load was cancelled")
                self._reclaim_done()
                if self._free:
                    return self._free.pop()
                if self._made < self.count:
                    index = self._made
                    self._made += 1
                    break
                if self._in_flight:
                    slot = self._in_flight.popleft()
                    self.event_waits += 1
                else:
                    self._cond.wait(0.1)   # every buffer is being filled by another reader
                    continue
            self._backend.wait_event(slot.event)
            return slot
        try:
            ptr = self._backend.alloc_pinned(self.capacity + 2 * self.alignment)
            slot = Slot(index, ptr, self.capacity, self.alignment, self._backend.new_event())
        except BaseException:
            with self._cond:
                self._made -= 1
                self._cond.notify()
            raise
        with self._cond:
            self._slots.append(slot)
        return slot

    def release(self, slot: Slot, recorded: bool) -> None:
        """Give ``slot`` back; ``recorded``: copies reading it were queued and its event recorded."""
        with self._cond:
            (self._in_flight if recorded else self._free).append(slot)
            self._cond.notify()

    def all_done(self) -> None:
        """Every queued copy has completed (the caller synchronised): all buffers are free."""
        with self._cond:
            self._free.extend(self._in_flight)
            self._in_flight.clear()

    def close(self) -> None:
        """Wait for the copies still in flight, then free every buffer."""
        with self._cond:
            if self._closed:
                return
            self._closed = True
            in_flight, self._in_flight = list(self._in_flight), collections.deque()
            slots, self._slots = self._slots, []
            self._free.clear()
            self._cond.notify_all()
        for slot in in_flight:
            try:
                self._backend.wait_event(slot.event)
            except Exception:  # noqa: BLE001 - a failed device: free what can be freed
                log.debug("waiting for a pinned buffer's event failed", exc_info=True)
        for slot in slots:
            for ptr in (slot.stage, slot.compact):
                if ptr is not None:
                    self._backend.free_device(ptr)
            self._backend.free_pinned(slot.ptr)


# ------------------------------------------------------------------------------------------
# CUDA through CuPy (imported on first use)
# ------------------------------------------------------------------------------------------

class CupyBackend(CudaBackend):
    """CUDA runtime calls and raw kernels through CuPy, on one device."""

    _modules: dict[tuple[int, str], Any] = {}
    _functions: dict[tuple[int, str, str], Any] = {}
    _lock = threading.Lock()

    def __init__(self, device: int | None = None):
        try:
            import cupy
        except ImportError as exc:
            raise MissingDependencyError(f"the CUDA sink needs CuPy ({exc}): install loader-plugins[cuda] "
                                f"(cupy-cuda12x) or the cupy wheel matching your CUDA (cupy-cuda13x)") from exc
        import numpy

        self._cp = cupy
        self._np = numpy
        self._rt = cupy.cuda.runtime
        self.device = int(self._rt.getDevice() if device is None else device)

    def _ctx(self):
        return self._cp.cuda.Device(self.device)

    def owns(self, dest) -> bool:
        return dest.device.type == "cuda" and (dest.device.index or 0) == self.device

    def address(self, dest) -> int:
        return int(dest.data_ptr())

    def alloc_pinned(self, nbytes: int) -> int:
        with self._ctx():
            return int(self._rt.hostAlloc(nbytes, self._rt.hostAllocPortable))   # page-locked, page-aligned

    def free_pinned(self, ptr: int) -> None:
        with self._ctx():
            self._rt.freeHost(ptr)

    def alloc_device(self, nbytes: int) -> int:
        with self._ctx():   # straight cudaMalloc: nothing stays cached in a pool after the load
            return int(self._rt.malloc(nbytes))

    def free_device(self, ptr: int) -> None:
        with self._ctx():
            self._rt.free(ptr)

    def new_stream(self):
        with self._ctx():
            return self._cp.cuda.Stream(non_blocking=True)

    def new_event(self):
        with self._ctx():
            return self._cp.cuda.Event(block=True, disable_timing=True)   # a waiting reader sleeps, not spins

    def record(self, event, stream) -> None:
        with self._ctx():
            event.record(stream)

    def query(self, event) -> bool:
        return bool(event.done)

    def wait_event(self, event) -> None:
        event.synchronize()

    def synchronize(self, stream) -> None:
        stream.synchronize()

    def device_synchronize(self) -> None:
        with self._ctx():
            self._rt.deviceSynchronize()

    def memcpy(self, dst: int, src: int, nbytes: int, stream) -> None:
        with self._ctx():
            self._rt.memcpyAsync(dst, src, nbytes, self._rt.memcpyDefault, stream.ptr)

    def memcpy2d(self, dst, dst_pitch, src, src_pitch, width, height, stream) -> None:
        with self._ctx():
            self._rt.memcpy2DAsync(dst, dst_pitch, src, src_pitch, width, height, self._rt.memcpyDefault,
                                   stream.ptr)

    def function(self, file: str, name: str):
        """Kernel ``name`` of ``native/<file>``, compiled once per process and device."""
        key = (self.device, file, name)
        fn = self._functions.get(key)
        if fn is not None:
            return fn
        with self._lock:
            fn = self._functions.get(key)
            if fn is None:
                module = self._modules.get((self.device, file))
                if module is None:
                    module = self._cp.RawModule(code=kernel_source(file))
                    self._modules[(self.device, file)] = module
                with self._ctx():
                    fn = module.get_function(name)
                self._functions[key] = fn
        return fn

    def launch_convert(self, kernel: str, src: int, dst: int, count: int, stream) -> None:
        u64 = self._np.uint64
        threads = 256
        blocks = max(1, min(-(-count // threads), 8192))
        fn = self.function(CONVERT_FILE, kernel)
        with self._ctx():
            fn((blocks,), (threads,), (u64(src), u64(dst), u64(count)), stream=stream)

    def launch_strided(self, itemsize, src, dst, rows, cols, in_pitch, out_pitch, stream) -> None:
        u64 = self._np.uint64
        threads = 256
        grid = (max(1, min(-(-cols // threads), 1024)), max(1, min(rows, 65535)))
        fn = self.function(STRIDED_FILE, f"lp_strided_copy_{itemsize}")
        with self._ctx():
            fn(grid, (threads,), (u64(src), u64(dst), u64(rows), u64(cols), u64(in_pitch), u64(0), u64(out_pitch)),
               stream=stream)


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
        self._ring = PinnedRing(self._backend, count, capacity, config.alignment, cancelled)
        self._streams = [self._backend.new_stream() for _ in range(streams)]
        self._turn = itertools.count()
        self._min_2d = min_2d_width
        self._lock = threading.Lock()
        self._started = False
        self._closed = False
        self.bytes_submitted = 0

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

    # ---- moving bytes ----------------------------------------------------------------------
    def start(self) -> None:
        """Order this load after the device work queued so far (e.g. the destinations' own
        initialisation): one device-wide synchronisation, once."""
        with self._lock:
            if self._started:
                return
            self._started = True
        self._backend.device_synchronize()

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
        while done < length:
            n = min(self.slot_bytes, length - done)
            slot = self.acquire()
            try:
                view = slot.view_for(file_offset + done, n)
                source.read_into(file_offset + done, view, pool, cancelled, True)
                del view
            except BaseException:
                self.release(slot)
                raise
            self.submit(slot, dest, byte_offset + done, n, src_dtype=src_dtype, block=block)
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
        for stream in self._streams:
            self._backend.synchronize(stream)
        self._ring.all_done()

    def close(self) -> None:
        if self._closed:
            return
        self._closed = True
        try:
            self._ring.close()
        finally:
            self._backend.close()

    def __enter__(self) -> "CudaSink":
        return self

    def __exit__(self, *exc) -> None:
        self.close()


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
