"""CPU destinations: tensors the reader allocates, or tensors the caller already owns.

Bytes are read straight into the destination's memory when it is a contiguous CPU tensor of
the checkpoint's dtype. Otherwise (another dtype, another device, non-contiguous) they land in
a staging tensor of the checkpoint's dtype and are copied (and cast) once when complete.

Tensors the reader allocates are placed so that their address has the same alignment as their
bytes in the file, with a little slack before and after: O_DIRECT can then read into them in
place. Each read's pages are faulted in just before it (``madvise(MADV_POPULATE_WRITE)``) by
the worker doing it. With huge pages (``hugepages``; ``auto`` measures which page size faults
in faster on this machine, per load), large tensors also start on a 2 MiB boundary and are
advised ``MADV_HUGEPAGE``, so those faults hand out 2 MiB pages.
"""

from __future__ import annotations

import ctypes
import logging
import mmap
import threading
import time
from typing import TYPE_CHECKING, Callable

from .._libc import HUGE_PAGE as _HUGE
from .._libc import MADV_HUGEPAGE as _MADV_HUGEPAGE
from .._libc import MADV_NOHUGEPAGE as _MADV_NOHUGEPAGE
from .._libc import MADV_POPULATE_WRITE as _MADV_POPULATE_WRITE
from .._libc import madvise_range as _madvise
from .._libc import residency as _residency
from ...errors import DestinationError
from ..header import TensorSpec

if TYPE_CHECKING:
    import torch

    from ...config import StreamerConfig
    from ..tp import ColumnBlock

log = logging.getLogger(__name__)

def _resident(addr: int, nbytes: int) -> bool:
    """True when every page of the range is already mapped (``mincore``)."""
    page = mmap.PAGESIZE
    start = addr - addr % page
    pages = -(-(addr + nbytes - start) // page)
    if pages <= 0:
        return False
    try:
        return b"\x00" not in _residency(start, pages * page)
    except OSError:
        return False


def tensor_buffer(tensor: "torch.Tensor") -> memoryview:
    """A writable byte view of a contiguous CPU tensor's memory (no copy)."""
    nbytes = tensor.numel() * tensor.element_size()
    if nbytes == 0:
        return memoryview(bytearray(0))
    return memoryview((ctypes.c_char * nbytes).from_address(tensor.data_ptr())).cast("B")


class Allocation:
    """A tensor the reader allocated: the tensor, its backing bytes, and whether the
    ``alignment`` bytes around it are ours (O_DIRECT may overwrite them). ``huge``: its pages
    are (True) or are not (False) transparent huge pages, None while that is still to decide
    (``hugepages="auto"``: decided by the first read that lands in it)."""

    __slots__ = ("tensor", "raw", "slack", "owned", "huge", "span")

    def __init__(self, tensor, raw, slack: bool, owned: bool = True, huge: bool | None = False,
                 span: tuple[int, int] = (0, 0)):
        self.tensor = tensor
        self.raw = raw
        self.slack = slack
        self.owned = owned      # False: the caller's memory (pre-fault it, change nothing else)
        self.huge = huge
        self.span = span        # (address, bytes) that page-size advice may cover


#: Fresh bytes below which ``hugepages="auto"`` keeps small pages without measuring: faulting
#: in a small load takes too little time for the choice to matter.
AUTO_MIN_BYTES = 256 << 20


def _thp_mode() -> str:
    """The kernel's transparent huge page mode: ``always``, ``madvise`` or ``never``."""
    try:
        text = open("/sys/kernel/mm/transparent_hugepage/enabled").read()
    except OSError:
        return "never"
    return text[text.find("[") + 1:text.find("]")] if "[" in text else "never"


class PageSizeChooser:
    """Chooses, tensor by tensor, small (4 KiB) or transparent huge (2 MiB) pages for the
    memory a load allocates, from what faulting each kind in has cost so far in this load.

    Why measure instead of fixing one: in a VM whose host takes freed memory back (free page
    reporting), fresh memory costs a host fault per page, and which page size faults in faster
    has been seen to flip from day to day and within minutes (docs/measurements.md, "Page
    sizes"); a probe of a few MiB right before a load did not predict how gigabytes would go. So the load itself is the probe:
    each read that faults pages in is timed, fault and read together (CPU time of the thread
    doing it, which includes the host's share and excludes waiting; :meth:`CpuSink.fill`); the
    first ``explore_bytes`` of each kind are taken alternately, and then each new tensor gets
    the cheaper kind per byte, with every ``recheck``-th tensor given the other kind so that a
    change of the machine's state shows.
    """

    def __init__(self, explore_bytes: int = 96 << 20, recheck: int = 8):
        self._lock = threading.Lock()
        self._explore = explore_bytes
        self._recheck = recheck
        self._bytes = {False: 0, True: 0}
        self._seconds = {False: 0.0, True: 0.0}
        self._placed = {False: 0, True: 0}
        self._decisions = 0

    def choose(self, nbytes: int) -> bool:
        with self._lock:
            self._decisions += 1
            if min(self._bytes.values()) < self._explore:
                huge = self._placed[True] + self._bytes[True] <= self._placed[False] + self._bytes[False]
                huge = huge if self._bytes[huge] < self._explore else not huge
            else:
                huge = self.cost(True) < self.cost(False)
                if self._decisions % self._recheck == 0:
                    huge = not huge
            self._placed[huge] += nbytes
            return huge

    def record(self, huge: bool, nbytes: int, seconds: float) -> None:
        with self._lock:
            self._placed[huge] = max(0, self._placed[huge] - nbytes)
            self._bytes[huge] += nbytes
            self._seconds[huge] += seconds

    def cost(self, huge: bool) -> float:
        """CPU seconds per byte measured for one kind (infinite before any measurement)."""
        return self._seconds[huge] / self._bytes[huge] if self._bytes[huge] else float("inf")

    def summary(self) -> dict[str, float]:
        """Bytes faulted in each way and the rate measured for each (GB/s of CPU time)."""
        with self._lock:
            out: dict[str, float] = {}
            for huge, name in ((False, "small"), (True, "huge")):
                out[f"{name}_bytes"] = self._bytes[huge]
                out[f"{name}_gbps"] = (self._bytes[huge] / self._seconds[huge] / 1e9) if self._seconds[huge] else 0.0
            return out


class CpuSink:
    """Allocates output tensors and checks caller-provided destinations."""

    def __init__(self, config: "StreamerConfig"):
        import torch

        self._torch = torch
        self._align = config.alignment
        if config.pin_memory == "auto":
            self._pin = bool(torch.cuda.is_available())
        else:
            self._pin = config.pin_memory == "on"
        self._thp = "never" if self._pin else _thp_mode()
        self._hugepages_mode = "off" if self._thp == "never" else config.hugepages
        self.chooser: PageSizeChooser | None = None
        self._decide = threading.Lock()

    @property
    def pinned(self) -> bool:
        return self._pin

    def choose_pages(self, fresh_bytes: int) -> str:
        """Set the page policy for a load that allocates ``fresh_bytes`` of tensors: ``"on"``,
        ``"off"``, or ``"auto"`` (measured during the load, :class:`PageSizeChooser`; only
        for loads of at least :data:`AUTO_MIN_BYTES`). Pinned tensors (cudaHostAlloc) and a
        kernel without transparent huge pages always get ``"off"``."""
        mode = self._hugepages_mode
        if mode == "auto" and fresh_bytes < AUTO_MIN_BYTES:
            mode = "off"
        self.chooser = PageSizeChooser() if mode == "auto" else None
        self._hugepages_mode = mode
        return mode

    def allocate(self, spec: TensorSpec) -> Allocation:
        torch = self._torch
        dtype = spec.torch_dtype()
        itemsize = spec.itemsize
        align = self._align
        want = spec.offset % align
        if spec.nbytes < align or want % itemsize:
            return Allocation(torch.empty(spec.shape, dtype=dtype, pin_memory=self._pin), None, False)
        if self._hugepages_mode != "off" and spec.nbytes >= 2 * _HUGE:
            return self._allocate_mapping(spec, want)
        raw = torch.empty(spec.nbytes + 3 * align, dtype=torch.uint8, pin_memory=self._pin)
        base = raw.data_ptr()
        start = align + (want - (base + align)) % align
        tensor = raw[start:start + spec.nbytes].view(dtype).reshape(spec.shape)
        return Allocation(tensor, raw, True)

    def _allocate_mapping(self, spec: TensorSpec, want: int) -> Allocation:
        """A tensor that may get huge pages: its own anonymous mapping (so page-size advice
        never outlives it or reaches memory the allocator hands out later), unmapped when the
        last view of it is freed. Its first page starts a 2 MiB page; the bytes before it and
        the ``alignment`` after it are slack that O_DIRECT may overwrite."""
        torch = self._torch
        length = -(-(_HUGE + want + spec.nbytes + self._align) // mmap.PAGESIZE) * mmap.PAGESIZE
        region = mmap.mmap(-1, length, flags=mmap.MAP_PRIVATE | mmap.MAP_ANONYMOUS)
        base = torch.frombuffer(region, dtype=torch.uint8, count=1).data_ptr()
        page = -(-base // _HUGE) * _HUGE
        # the storage spans the tensor's bytes only (torch.save writes no padding); it keeps
        # the mapping alive and shares its memory
        raw = torch.frombuffer(region, dtype=torch.uint8, count=spec.nbytes, offset=page - base + want)
        del region
        tensor = raw.view(spec.torch_dtype()).reshape(spec.shape)
        alloc = Allocation(tensor, raw, True, huge=None, span=(page, want + spec.nbytes))
        if self.chooser is None:
            self._advise(alloc, True)
        return alloc

    def _advise(self, alloc: Allocation, huge: bool) -> None:
        alloc.huge = huge
        if huge:
            _madvise(*alloc.span, _MADV_HUGEPAGE, _HUGE)
        elif self._thp == "always":
            _madvise(*alloc.span, _MADV_NOHUGEPAGE, _HUGE)

    def fill(self, view: memoryview, alloc: Allocation | None, read: Callable[[bool], None]) -> None:
        """Land one read in ``view``: fault its pages in (:meth:`prefault`), then ``read(fresh)``.

        ``fresh`` is True when small pages were freshly faulted in here. Such memory is
        physically scattered 4 KiB pages, and an O_DIRECT read into it goes out as many short
        device requests (the block layer takes a bounded number of segments per request), so
        sources read it through their huge-page staging buffers and copy
        (``read_into(fresh=True)``). Fresh huge pages are 2 MiB physically contiguous each:
        O_DIRECT reads into them in place, which saves that copy (measured faster:
        docs/measurements.md, "Page sizes").

        Under ``hugepages="auto"`` the chooser compares the thread CPU time of both steps per
        byte: faulting in, and the copy out of staging that small pages cost when the read is
        direct (as fast as timing the fault alone, and it also counts what the fault alone hides)."""
        chooser = self._chooser_for(alloc)
        t0 = time.thread_time() if chooser is not None else 0.0
        fresh = self.prefault(view, alloc)
        read(fresh and not (alloc is not None and alloc.huge))
        if chooser is not None and fresh:
            chooser.record(alloc.huge, len(view), time.thread_time() - t0)

    def _chooser_for(self, alloc: Allocation | None) -> PageSizeChooser | None:
        """The chooser deciding ``alloc``'s page size: only memory the reader made, under ``auto``."""
        return self.chooser if alloc is not None and alloc.owned else None

    def prefault(self, view: memoryview, alloc: Allocation | None = None) -> bool:
        """Fault the pages under ``view`` in with one ``madvise(MADV_POPULATE_WRITE)`` before a
        read lands there: cheaper than the kernel taking one fault per 4 KiB page inside
        ``preadv``. Skipped when the range's first whole page is already mapped (memory the
        engine touched before: walking its page tables again costs ~25% of a warm load).
        Contents never change. ``alloc``: the allocation ``view`` lies in, when the reader
        made it (its page size is decided here, on its first read, under ``hugepages="auto"``).
        Returns True when the pages were faulted in here."""
        if self._pin or len(view) < 2 * mmap.PAGESIZE:
            return False
        chooser = self._chooser_for(alloc)
        if chooser is not None and alloc.huge is None:
            with self._decide:
                if alloc.huge is None:
                    self._advise(alloc, chooser.choose(alloc.span[1]))
        addr = ctypes.addressof(ctypes.c_char.from_buffer(view))
        first = -(-addr // mmap.PAGESIZE) * mmap.PAGESIZE
        if _resident(first, mmap.PAGESIZE):
            return False
        _madvise(addr, len(view), _MADV_POPULATE_WRITE, mmap.PAGESIZE)   # pre-5.14: faults come in preadv
        return True

    def wrap_destination(self, dest: "torch.Tensor") -> Allocation:
        """A caller's tensor to read into directly; pre-faulting it never changes its contents."""
        return Allocation(dest, dest, False, owned=False)

    # ---- the Sink protocol (core/sinks/base.py) ----------------------------------------------
    allocates = True
    deferred = False

    def takes(self, spec: TensorSpec, dest) -> bool:
        return True    # the last resort: anything else is checked (and refused) by check()

    def check(self, spec: TensorSpec, dest, block: "ColumnBlock | None") -> bool:
        return self.check_destination(spec, dest) if block is None else check_shard_destination(spec, dest, block)

    def wrap(self, dest) -> Allocation:
        return self.wrap_destination(dest)

    def buffer_for(self, target) -> memoryview:
        return tensor_buffer(target)

    def land(self, job, item, source, *, pool, cancelled) -> None:
        at = item.dest_offset - job.base
        view = job.buffer[at:at + item.length]
        if item.row_stride:     # the rows of a strided shard (a short buffered read each)
            self.fill(view, job.alloc, lambda fresh: source.read_rows(
                item.file_offset, item.row_stride, item.row_width, view, cancelled=cancelled))
            return
        self.fill(view, job.alloc, lambda fresh: source.read_into(
            item.file_offset, view, pool=pool, cancelled=cancelled, slack=job.slack, fresh=fresh))

    def reserved_bytes(self) -> int:
        return 0

    def attach(self, cancelled) -> None:
        pass

    def finish(self) -> None:
        pass

    def report(self) -> None:
        return None

    def close(self) -> None:
        pass

    def check_destination(self, spec: TensorSpec, dest: "torch.Tensor") -> bool:
        """Validate ``dest`` for ``spec``; True when bytes can be read straight into it."""
        torch = self._torch
        if not isinstance(dest, torch.Tensor):
            raise DestinationError(f"destination for {spec.describe()} is a {type(dest).__name__}, not a tensor")
        if tuple(dest.shape) != tuple(spec.shape):
            raise DestinationError(
                f"destination for {spec.describe()} has shape {tuple(dest.shape)} but the checkpoint holds "
                f"{spec.dtype} {list(spec.shape)} ({spec.nbytes} bytes); allocate it with that shape or load this "
                f"tensor through the model's own weight loader")
        src_dtype = spec.torch_dtype()
        if dest.dtype != src_dtype and (dest.dtype.is_floating_point != src_dtype.is_floating_point
                                        or dest.dtype == torch.bool or src_dtype == torch.bool):
            raise DestinationError(
                f"destination for {spec.describe()} is {dest.dtype} but the checkpoint holds {src_dtype}; only "
                f"casts between floating-point types are done on load")
        return (dest.device.type == "cpu" and dest.dtype == src_dtype and dest.is_contiguous()
                and not dest.is_quantized)


def reads_straight_into(spec: TensorSpec, dest) -> bool:
    """True when a shard's bytes, in the checkpoint's row-major order, can be read straight into
    ``dest`` (already checked to hold the shard): a contiguous, unquantized CPU tensor of the
    checkpoint's dtype."""
    return (dest.device.type == "cpu" and dest.is_contiguous() and dest.dtype == spec.torch_dtype()
            and not dest.is_quantized)


def check_shard_destination(spec: TensorSpec, dest, block: "ColumnBlock") -> bool:
    """A destination for a tensor-parallel shard, filled without a device sink: True when its
    bytes can be read straight into it (a contiguous CPU tensor of the checkpoint's dtype and a
    dim-0 shard), False when they are staged and copied once (cut, cast or moved to another
    device by torch); an error when it cannot hold the shard."""
    import torch

    if not isinstance(dest, torch.Tensor) or dest.numel() * spec.itemsize != block.nbytes:
        raise DestinationError(f"destination for a shard of {spec.describe()} must be a tensor holding the "
                               f"{block.nbytes // max(spec.itemsize, 1)} elements of the shard")
    src_dtype = spec.torch_dtype()
    if dest.dtype != src_dtype and not (dest.dtype.is_floating_point and src_dtype.is_floating_point):
        raise DestinationError(f"destination for a shard of {spec.describe()} is {dest.dtype} but the checkpoint "
                               f"holds {src_dtype}; only casts between floating-point types are done on load")
    return block.contiguous and reads_straight_into(spec, dest)
