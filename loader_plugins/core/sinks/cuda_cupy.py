"""CUDA through CuPy: the only code that talks to the device (CuPy imported when a
:class:`CupyBackend` is created)."""

from __future__ import annotations

import logging
import threading
from typing import TYPE_CHECKING, Any

from ...errors import MissingDependencyError
from .cuda_plan import CONVERT_FILE, STRIDED_FILE, kernel_source
from .cuda_ring import CudaBackend

if TYPE_CHECKING:

    pass

log = logging.getLogger(__name__)

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

    def ring_key(self):
        return ("cuda", self.device)

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

