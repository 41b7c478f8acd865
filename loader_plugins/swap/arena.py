"""The host arena a snapshot's bytes live in (:class:`HostArena`): one aligned mapping, pinned
for CUDA when CUDA is there."""

from __future__ import annotations

import logging
import mmap
import time
import weakref
from typing import TYPE_CHECKING

from ..core._libc import HUGE_PAGE as _HUGE
from ..core._libc import MADV_HUGEPAGE as _MADV_HUGEPAGE
from ..core._libc import madvise_range as _madvise
from ..core.sinks.cpu import tensor_buffer

if TYPE_CHECKING:

    pass

log = logging.getLogger(__name__)


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
