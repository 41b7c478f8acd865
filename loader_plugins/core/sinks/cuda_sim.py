"""A CUDA device simulated on the CPU, for machines without one: :class:`SimulatedCudaBackend`.

It implements :class:`~.cuda_ring.CudaBackend` with CUDA's ordering, so the real
:class:`~.cuda.CudaSink` and :class:`~.cuda_ring.PinnedRing` run against it unchanged:

* device memory is host memory (anonymous mappings, filled with garbage, never zeros);
* each stream is a thread that runs its operations one after another, in the order queued;
  the host never waits for a queued operation unless it asks to (an event, a synchronisation);
* an event records its stream's position when recorded; it completes when the stream has run
  everything queued before it (``query`` never blocks, ``wait_event`` blocks);
* copies cross one host-to-device link shared by every stream, throttled to ``link_gbps``:
  each copy takes the link for ``bytes / bandwidth`` seconds after the previous copy's turn.
  The bytes are moved with ``memmove`` on the stream's thread; the copy *completes* at the end
  of its turn on the link (events and synchronisations wait for that time), so how promptly
  the host schedules the stream's thread does not change the link's rate;
* kernels (dtype casts, strided cuts) run on the stream thread with torch's CPU casts: they
  occupy their stream, not the link;
* an operation that fails makes its stream's error sticky: every later wait raises it, as a
  CUDA error does;
* ``move_bytes=False`` models a DMA engine that costs the host no CPU: copies and kernels only
  take their time (the link's turn), no byte moves. On a machine with few cores the ``memmove``
  of the default mode competes with the reads for the same cores, which a real device does not;
  this mode shows the pipeline's overlap alone. Nothing lands in it: never for correctness.

:attr:`SimulatedCudaBackend.stats` counts the link's busy time and bytes, so a benchmark can
say whether the link or the reads bounded a load.
"""

from __future__ import annotations

import collections
import ctypes
import mmap
import threading
import time
from typing import Any, Callable

from ...errors import StreamerError
from ..header import torch_dtype
from .cuda_plan import NATIVE_DTYPES
from .cuda_ring import CudaBackend


class SimulatedDeviceError(StreamerError):
    """An operation on the simulated device failed (sticky on its stream, like a CUDA error)."""


class _Stream:
    def __init__(self, backend: "SimulatedCudaBackend", index: int):
        self.backend = backend
        self.index = index
        self.cond = threading.Condition()
        self.queue: collections.deque[Callable[[], float | None]] = collections.deque()
        self.enqueued = 0
        self.done = 0
        self.ends: collections.deque[tuple[int, float]] = collections.deque()   # (seq, completion time)
        self.error: BaseException | None = None
        self.closed = False
        self.thread = threading.Thread(target=self._run, name=f"sim-cuda-stream-{index}", daemon=True)
        self.thread.start()

    def _run(self) -> None:
        while True:
            with self.cond:
                while not self.queue and not self.closed:
                    self.cond.wait()
                if not self.queue:
                    return
                op = self.queue.popleft()
            end = None
            if self.error is None:
                try:
                    end = op()
                except BaseException as exc:  # noqa: BLE001 - sticky, raised to whoever waits
                    self.error = exc
            with self.cond:
                self.done += 1
                if end is not None:
                    self.ends.append((self.done, end))
                    if len(self.ends) > 4096:      # far older than any event the ring still holds
                        self.ends.popleft()
                self.cond.notify_all()

    def end_of(self, seq: int) -> float:
        """When the operations up to ``seq`` (all run) complete: the latest link turn among them."""
        with self.cond:
            for s, end in reversed(self.ends):
                if s <= seq:
                    return end
        return 0.0

    def put(self, op: Callable[[], None]) -> None:
        with self.cond:
            if self.closed:
                raise SimulatedDeviceError("the simulated device was closed")
            self.queue.append(op)
            self.enqueued += 1
            self.cond.notify_all()

    def wait_for(self, seq: int) -> None:
        with self.cond:
            while self.done < seq:
                self.cond.wait()
        self.raise_error()
        late = self.end_of(seq) - time.perf_counter()
        if late > 0:
            time.sleep(late)

    def raise_error(self) -> None:
        if self.error is not None:
            raise SimulatedDeviceError(f"simulated stream {self.index}: an earlier operation failed: "
                                       f"{type(self.error).__name__}: {self.error}") from self.error

    def close(self) -> None:
        with self.cond:
            self.closed = True
            self.cond.notify_all()
        self.thread.join()


class _Event:
    __slots__ = ("stream", "seq")

    def __init__(self) -> None:
        self.stream: _Stream | None = None
        self.seq = 0


class SimulatedCudaBackend(CudaBackend):
    """See the module docstring. ``link_gbps``: host-to-device bandwidth in GB/s (1e9 bytes/s);
    ``owns``: which torch tensors are this device's (default: CPU tensors, which stand in for
    device memory)."""

    def __init__(self, link_gbps: float = 50.0, *, owns: Callable[[Any], bool] | None = None,
                 move_bytes: bool = True):
        if not link_gbps > 0:
            raise ValueError("link_gbps must be positive")
        self.link_gbps = float(link_gbps)
        self.move_bytes = move_bytes
        self._owns = owns or (lambda t: getattr(getattr(t, "device", None), "type", None) == "cpu")
        self._lock = threading.Lock()
        self._memory: dict[int, tuple[str, mmap.mmap, int]] = {}
        self._streams: list[_Stream] = []
        self._link_lock = threading.Lock()
        self._link_free_at = 0.0
        self.stats: collections.Counter = collections.Counter()

    def ring_key(self):
        return ("simulated", id(self))

    # ---- memory -----------------------------------------------------------------------------
    def owns(self, dest) -> bool:
        return bool(self._owns(dest))

    def address(self, dest) -> int:
        return int(dest.data_ptr())

    def _alloc(self, nbytes: int, kind: str) -> int:
        buf = mmap.mmap(-1, max(1, nbytes))
        buf.write(b"\xa5" * max(1, nbytes))          # garbage, as fresh device memory would be
        ptr = ctypes.addressof(ctypes.c_char.from_buffer(buf))
        with self._lock:
            self._memory[ptr] = (kind, buf, nbytes)
            self.stats[f"{kind}_bytes"] += nbytes
        return ptr

    def _free(self, ptr: int, kind: str) -> None:
        with self._lock:
            have = self._memory.pop(ptr, None)
        if have is None or have[0] != kind:
            raise SimulatedDeviceError(f"free of {kind} memory at {ptr:#x} that was not allocated as {kind}")
        # the mapping goes with the last reference to it (a ctypes view may still point into it)

    def alloc_pinned(self, nbytes: int) -> int:
        return self._alloc(nbytes, "pinned")

    def free_pinned(self, ptr: int) -> None:
        self._free(ptr, "pinned")

    def alloc_device(self, nbytes: int) -> int:
        return self._alloc(nbytes, "device")

    def free_device(self, ptr: int) -> None:
        self._free(ptr, "device")

    # ---- streams and events ---------------------------------------------------------------
    def new_stream(self) -> _Stream:
        with self._lock:
            stream = _Stream(self, len(self._streams))
            self._streams.append(stream)
        return stream

    def new_event(self) -> _Event:
        return _Event()

    def record(self, event: _Event, stream: _Stream) -> None:
        with stream.cond:
            event.stream, event.seq = stream, stream.enqueued

    def query(self, event: _Event) -> bool:
        stream = event.stream
        if stream is None:
            return True
        with stream.cond:
            done = stream.done >= event.seq
        if done:
            stream.raise_error()
            done = time.perf_counter() >= stream.end_of(event.seq)
        return done

    def wait_event(self, event: _Event) -> None:
        if event.stream is not None:
            event.stream.wait_for(event.seq)

    def synchronize(self, stream: _Stream) -> None:
        with stream.cond:
            seq = stream.enqueued
        stream.wait_for(seq)

    def device_synchronize(self) -> None:
        for stream in list(self._streams):
            self.synchronize(stream)

    # ---- operations -----------------------------------------------------------------------
    def _over_link(self, nbytes: int, move: Callable[[], None]) -> float:
        """Move ``nbytes`` in this copy's turn on the shared link; returns when the turn ends
        (the copy's completion time, see the module docstring)."""
        with self._link_lock:
            start = max(time.perf_counter(), self._link_free_at)
            end = start + nbytes / (self.link_gbps * 1e9)
            self._link_free_at = end
        if self.move_bytes:
            move()
        with self._lock:
            self.stats["link_bytes"] += nbytes
            self.stats["link_busy_ns"] += int((end - start) * 1e9)
            self.stats["copies"] += 1
        return end

    def memcpy(self, dst: int, src: int, nbytes: int, stream: _Stream) -> None:
        stream.put(lambda: self._over_link(nbytes, lambda: ctypes.memmove(dst, src, nbytes)))

    def memcpy2d(self, dst: int, dst_pitch: int, src: int, src_pitch: int, width: int, height: int,
                 stream: _Stream) -> None:
        def move() -> None:
            for row in range(height):
                ctypes.memmove(dst + row * dst_pitch, src + row * src_pitch, width)
        stream.put(lambda: self._over_link(width * height, move))

    def launch_convert(self, kernel: str, src: int, dst: int, count: int, stream: _Stream) -> None:
        import torch

        _, _, s, _, d = kernel.split("_")           # lp_convert_<src>_to_<dst>
        by_native = {native: name for name, native in NATIVE_DTYPES.items()}
        s_t, d_t = torch_dtype(by_native[s]), torch_dtype(by_native[d])

        def run() -> None:
            if not self.move_bytes:
                return
            t0 = time.perf_counter()
            out = _view(src, count * s_t.itemsize).view(s_t).to(d_t).view(torch.uint8)
            _view(dst, count * d_t.itemsize).copy_(out)
            with self._lock:
                self.stats["kernels"] += 1
                self.stats["kernel_ns"] += int((time.perf_counter() - t0) * 1e9)
        stream.put(run)

    def launch_strided(self, itemsize: int, src: int, dst: int, rows: int, cols: int, in_pitch: int,
                       out_pitch: int, stream: _Stream) -> None:
        def run() -> None:
            if not self.move_bytes:
                return
            t0 = time.perf_counter()
            for row in range(rows):
                ctypes.memmove(dst + row * out_pitch * itemsize, src + row * in_pitch * itemsize, cols * itemsize)
            with self._lock:
                self.stats["kernels"] += 1
                self.stats["kernel_ns"] += int((time.perf_counter() - t0) * 1e9)
        stream.put(run)

    def close(self) -> None:
        streams, self._streams = self._streams, []
        for stream in streams:
            stream.close()

    @property
    def link_busy_s(self) -> float:
        return self.stats["link_busy_ns"] / 1e9


def _view(ptr: int, nbytes: int):
    import torch

    if not nbytes:
        return torch.empty(0, dtype=torch.uint8)
    return torch.frombuffer((ctypes.c_char * nbytes).from_address(ptr), dtype=torch.uint8)
