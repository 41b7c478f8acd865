"""The ring of pinned host buffers the CUDA sink reads into (:class:`PinnedRing`), over the
small :class:`CudaBackend` interface (events, streams, memory) that :class:`~.cuda_cupy.CupyBackend`
implements with CUDA and the tests with host memory."""

from __future__ import annotations

import collections
import ctypes
import logging
import threading
import time
from typing import TYPE_CHECKING, Any

from ...errors import CancelledError

if TYPE_CHECKING:
    import torch


log = logging.getLogger(__name__)

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

    def ring_key(self) -> Any:
        """A key naming this device for process-wide reuse of pinned rings (:func:`take_ring`),
        or None: every ring of this backend is freed after its load."""
        return None


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
        self.reused = False      # taken from the idle rings of an earlier load (take_ring)
        self.event_waits = 0     # times acquire blocked on an event (the device was behind)
        self.wait_seconds = 0.0  # summed over threads: acquire blocked (device behind, or every buffer lent)
        self.alloc_seconds = 0.0  # summed over threads: allocating (pinning) buffers

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
        waited = 0.0
        while True:
            with self._cond:
                if self._closed or self.cancelled.is_set():
                    self.wait_seconds += waited
                    raise CancelledError("pinned ring closed: the load was cancelled")
                self._reclaim_done()
                if self._free:
                    self.wait_seconds += waited
                    return self._free.pop()
                if self._made < self.count:
                    index = self._made
                    self._made += 1
                    self.wait_seconds += waited
                    break
                if self._in_flight:
                    slot = self._in_flight.popleft()
                    self.event_waits += 1
                else:
                    t = time.perf_counter()
                    self._cond.wait(0.1)   # every buffer is being filled by another reader
                    waited += time.perf_counter() - t
                    continue
            t = time.perf_counter()
            self._backend.wait_event(slot.event)
            waited += time.perf_counter() - t
            with self._cond:
                self.wait_seconds += waited
            return slot
        t = time.perf_counter()
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
            self.alloc_seconds += time.perf_counter() - t
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


    def park(self) -> None:
        """Keep the buffers for another load: wait for the copies in flight, free the device
        staging buffers (device memory belongs to the engine between loads), lend nothing."""
        with self._cond:
            in_flight, self._in_flight = list(self._in_flight), collections.deque()
        for slot in in_flight:
            self._backend.wait_event(slot.event)
        with self._cond:
            for slot in self._slots:
                for ptr in (slot.stage, slot.compact):
                    if ptr is not None:
                        self._backend.free_device(ptr)
                slot.stage = slot.compact = None
                slot.data_offset = 0
            self._free = list(self._slots)

    def reopen(self, cancelled: threading.Event | None) -> None:
        """Start a new load on a parked ring (its counters start again)."""
        with self._cond:
            self.cancelled = cancelled or threading.Event()
            self.reused = True
            self.event_waits = 0
            self.wait_seconds = self.alloc_seconds = 0.0


# ------------------------------------------------------------------------------------------
# pinned rings kept between loads
# ------------------------------------------------------------------------------------------
# Allocating and page-locking the ring costs more than copying a small checkpoint through it,
# and an engine loads (and reloads, and restores) many times in one process: one idle ring per
# device stays allocated for the next load with the same geometry (StreamerConfig.pinned_ring).

_IDLE: dict[Any, PinnedRing] = {}
_IDLE_LOCK = threading.Lock()


def take_ring(backend: CudaBackend, count: int, capacity: int, alignment: int,
              cancelled: threading.Event | None) -> PinnedRing:
    """The idle ring of ``backend``'s device when it has this geometry, else a new ring."""
    key = backend.ring_key()
    ring = None
    if key is not None:
        with _IDLE_LOCK:
            ring = _IDLE.pop(key, None)
    if ring is not None:
        if (ring.count, ring.capacity, ring.alignment) == (count, capacity, alignment):
            ring.reopen(cancelled)
            return ring
        ring.close()            # another geometry (another memory_limit): free it, make this one
    return PinnedRing(backend, count, capacity, alignment, cancelled)


def give_back_ring(ring: PinnedRing, keep: bool) -> None:
    """After a load: park ``ring`` as its device's idle ring (``keep``), else free it."""
    key = ring._backend.ring_key() if keep else None
    if key is None:
        ring.close()
        return
    try:
        ring.park()
    except BaseException:
        ring.close()
        raise
    with _IDLE_LOCK:
        old = _IDLE.get(key)
        _IDLE[key] = ring
    if old is not None and old is not ring:
        old.close()


def free_idle_rings() -> int:
    """Free every idle ring (e.g. before handing the host memory to something else); returns
    the bytes of pinned memory released."""
    with _IDLE_LOCK:
        rings = list(_IDLE.values())
        _IDLE.clear()
    freed = sum(r.allocated_bytes for r in rings)
    for ring in rings:
        ring.close()
    return freed
