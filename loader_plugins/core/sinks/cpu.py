"""CPU destinations: tensors the reader allocates, or tensors the caller already owns.

Bytes are read straight into the destination's memory when it is a contiguous CPU tensor of
the checkpoint's dtype. Otherwise (another dtype, another device, non-contiguous) they land in
a staging tensor of the checkpoint's dtype and are copied (and cast) once when complete.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import logging
import mmap
from typing import TYPE_CHECKING

from ...errors import DestinationError
from ..header import TensorSpec

if TYPE_CHECKING:
    import torch

    from ...config import StreamerConfig

log = logging.getLogger(__name__)

_HUGE = 2 << 20
_MADV_HUGEPAGE = getattr(mmap, "MADV_HUGEPAGE", 14)
_libc = None


def _madvise_huge(addr: int, nbytes: int) -> None:
    """Ask for transparent huge pages on the 2 MiB-aligned interior of ``[addr, addr+nbytes)``."""
    global _libc
    if _libc is None:
        try:
            _libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6", use_errno=True)
            _libc.madvise.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int]
        except OSError:
            _libc = False
    if not _libc:
        return
    start = -(-addr // _HUGE) * _HUGE
    end = (addr + nbytes) // _HUGE * _HUGE
    if end > start:
        _libc.madvise(start, end - start, _MADV_HUGEPAGE)


def tensor_buffer(tensor: "torch.Tensor") -> memoryview:
    """A writable byte view of a contiguous CPU tensor's memory (no copy)."""
    nbytes = tensor.numel() * tensor.element_size()
    if nbytes == 0:
        return memoryview(bytearray(0))
    return memoryview((ctypes.c_char * nbytes).from_address(tensor.data_ptr())).cast("B")


class CpuSink:
    """Allocates output tensors and checks caller-provided destinations."""

    def __init__(self, config: "StreamerConfig"):
        import torch

        self._torch = torch
        self._hugepages = config.hugepages
        if config.pin_memory == "auto":
            self._pin = bool(torch.cuda.is_available())
        else:
            self._pin = config.pin_memory == "on"

    @property
    def pinned(self) -> bool:
        return self._pin

    def allocate(self, spec: TensorSpec) -> "torch.Tensor":
        torch = self._torch
        tensor = torch.empty(spec.shape, dtype=spec.torch_dtype(), pin_memory=self._pin)
        if self._hugepages and spec.nbytes >= 2 * _HUGE and not self._pin:
            _madvise_huge(tensor.data_ptr(), spec.nbytes)
        return tensor

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
