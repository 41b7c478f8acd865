"""CPU destinations: tensors the reader allocates, or tensors the caller already owns.

Bytes are read straight into the destination's memory when it is a contiguous CPU tensor of
the checkpoint's dtype. Otherwise (another dtype, another device, non-contiguous) they land in
a staging tensor of the checkpoint's dtype and are copied (and cast) once when complete.

Tensors the reader allocates are placed so that their address has the same alignment as their
bytes in the file, with a little slack before and after: O_DIRECT can then read into them in
place. With ``hugepages`` on, large tensors get transparent huge pages, pre-faulted in one
``madvise(MADV_POPULATE_WRITE)`` call by the worker that first reads into them.
"""

from __future__ import annotations

import ctypes
import logging
import mmap
from typing import TYPE_CHECKING

from .._libc import HUGE_PAGE as _HUGE
from .._libc import MADV_HUGEPAGE as _MADV_HUGEPAGE
from .._libc import MADV_POPULATE_WRITE as _MADV_POPULATE_WRITE
from .._libc import madvise_range as _madvise
from .._libc import residency as _residency
from ...errors import DestinationError
from ..header import TensorSpec

if TYPE_CHECKING:
    import torch

    from ...config import StreamerConfig

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
    ``alignment`` bytes around it are ours (O_DIRECT may overwrite them)."""

    __slots__ = ("tensor", "raw", "slack", "populated", "owned")

    def __init__(self, tensor, raw, slack: bool, owned: bool = True):
        self.tensor = tensor
        self.raw = raw
        self.slack = slack
        self.populated = raw is None
        self.owned = owned      # False: the caller's memory (pre-fault it, change nothing else)


class CpuSink:
    """Allocates output tensors and checks caller-provided destinations."""

    def __init__(self, config: "StreamerConfig"):
        import torch

        self._torch = torch
        self._hugepages = config.hugepages
        self._align = config.alignment
        if config.pin_memory == "auto":
            self._pin = bool(torch.cuda.is_available())
        else:
            self._pin = config.pin_memory == "on"

    @property
    def pinned(self) -> bool:
        return self._pin

    def allocate(self, spec: TensorSpec) -> Allocation:
        torch = self._torch
        dtype = spec.torch_dtype()
        itemsize = spec.itemsize
        align = self._align
        want = spec.offset % align
        if spec.nbytes < align or want % itemsize:
            return Allocation(torch.empty(spec.shape, dtype=dtype, pin_memory=self._pin), None, False)
        raw = torch.empty(spec.nbytes + 3 * align, dtype=torch.uint8, pin_memory=self._pin)
        base = raw.data_ptr()
        start = align + (want - (base + align)) % align
        tensor = raw[start:start + spec.nbytes].view(dtype).reshape(spec.shape)
        return Allocation(tensor, raw, True)

    def populate(self, alloc: Allocation) -> None:
        """With ``hugepages``: back the allocation with transparent huge pages, faulted in at once.

        Off by default: where the hypervisor takes free memory back (virtio-balloon free page
        reporting), every fresh huge page costs more than 512 small ones (measured 0.5-0.8 vs
        2-3.5 GB/s warm on the 2-core reference VM); on bare metal huge pages fill at 7+ GB/s.
        Small pages are faulted in by the kernel during ``preadv``, in parallel across workers.
        """
        if alloc.populated:
            return
        alloc.populated = True
        raw = alloc.raw
        if not (alloc.owned and self._hugepages) or raw.device.type != "cpu" or self._pin:
            return
        addr, nbytes = raw.data_ptr(), raw.numel() * raw.element_size()
        if nbytes >= 2 * _HUGE and _madvise(addr, nbytes, _MADV_HUGEPAGE, _HUGE):
            _madvise(addr, nbytes, _MADV_POPULATE_WRITE, mmap.PAGESIZE)

    def prefault(self, view: memoryview) -> bool:
        """Fault the pages under ``view`` in with one ``madvise(MADV_POPULATE_WRITE)`` before a
        read lands there: cheaper than the kernel taking one fault per 4 KiB page inside
        ``preadv``. Skipped when the range's first whole page is already mapped (memory the
        engine touched before: walking its page tables again costs ~25% of a warm load).
        Contents never change.

        Returns True when the pages were freshly faulted in here. Such memory is physically
        scattered 4 KiB pages, and an O_DIRECT read into it goes out as many short device
        requests (the block layer takes a bounded number of segments per request), so sources
        read it through their huge-page staging buffers instead (``read_into(fresh=True)``)."""
        if self._pin or len(view) < 2 * mmap.PAGESIZE:
            return False
        addr = ctypes.addressof(ctypes.c_char.from_buffer(view))
        first = -(-addr // mmap.PAGESIZE) * mmap.PAGESIZE
        if _resident(first, mmap.PAGESIZE):
            return False
        _madvise(addr, len(view), _MADV_POPULATE_WRITE, mmap.PAGESIZE)   # pre-5.14: faults come in preadv
        return True

    def wrap_destination(self, dest: "torch.Tensor") -> Allocation:
        """A caller's tensor to read into directly; pre-faulting it never changes its contents."""
        return Allocation(dest, dest, False, owned=False)

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
