"""Aligned staging buffers for O_DIRECT reads: :class:`StagingBuffer` (huge-page backed),
:class:`BufferPool` (a bounded pool lent to the reader's workers, spares kept between loads) and
:class:`CopyBehind` (copies staged bytes out on a thread of their own)."""

from __future__ import annotations

import ctypes
import mmap
import os
import queue
import threading
from typing import TYPE_CHECKING

from ...errors import CancelledError
from .._libc import HUGE_PAGE, MADV_HUGEPAGE, MADV_POPULATE_WRITE, madvise_range

if TYPE_CHECKING:
    pass


class StagingBuffer:
    """``nbytes`` of private anonymous memory starting on a 2 MiB boundary, backed by
    transparent huge pages where the kernel allows it, every page faulted in when made.

    Why huge pages: a device read is split into requests of at most ``max_segments``
    physically contiguous pieces, so the physical layout of the buffer decides the request
    size. Memory freed and mapped again is scattered in 4 KiB pages: O_DIRECT into such buffers
    goes out as short requests, into huge-page buffers as full-size ones, measurably faster
    (docs/measurements.md, "Staging buffers"). Faulting the pages in here, on a guest CPU and in
    parallel across workers, keeps the device's I/O thread from taking the faults.
    """

    __slots__ = ("_map", "addr", "nbytes", "view")

    def __init__(self, nbytes: int):
        span = -(-nbytes // HUGE_PAGE) * HUGE_PAGE
        self._map = mmap.mmap(-1, span + HUGE_PAGE, flags=mmap.MAP_PRIVATE | mmap.MAP_ANONYMOUS)
        base = ctypes.addressof(ctypes.c_char.from_buffer(self._map))
        skip = -base % HUGE_PAGE
        self.addr = base + skip
        self.nbytes = nbytes
        self.view = memoryview(self._map)[skip:skip + nbytes]
        madvise_range(self.addr, span, MADV_HUGEPAGE, HUGE_PAGE)   # refused where THP is off: small pages
        if not madvise_range(self.addr, nbytes, MADV_POPULATE_WRITE, mmap.PAGESIZE):   # before Linux 5.14
            self.view[::mmap.PAGESIZE] = bytes(len(range(0, nbytes, mmap.PAGESIZE)))

    def __len__(self) -> int:
        return self.nbytes

    @property
    def closed(self) -> bool:
        return self._map.closed

    def close(self) -> None:
        if not self._map.closed:
            self.view.release()
            self._map.close()


#: Largest staging buffer. One device request is at most a few MiB (virtio-blk here: 4 MiB;
#: NVMe: its MDTS), so a larger buffer does not make requests larger; it only costs more to
#: fault in when a load starts, before the first byte moves (docs/measurements.md).
STAGING_MAX_BYTES = 4 << 20


def staging_bytes_for(chunk_bytes: int, alignment: int) -> int:
    """Size of one O_DIRECT staging buffer for reads of up to ``chunk_bytes``: reads longer than
    the buffer go through it in pieces. A multiple of ``alignment``."""
    size = min(chunk_bytes + alignment, STAGING_MAX_BYTES)
    return max(alignment, size // alignment * alignment)


class _Spares:
    """Staging buffers kept between loads in this process (weight reloads, hot swaps, benchmark
    rounds), so that each load does not map and fault in its buffers again; unmapped after
    ``keep_seconds`` without a load. At most ``max_bytes`` are kept.
    """

    keep_seconds = 30.0
    max_bytes = 512 << 20

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._bufs: dict[int, list[StagingBuffer]] = {}
        self._timer: threading.Timer | None = None

    def take(self, nbytes: int) -> StagingBuffer | None:
        with self._lock:
            bufs = self._bufs.get(nbytes)
            return bufs.pop() if bufs else None

    def give(self, nbytes: int, bufs: list[StagingBuffer]) -> None:
        extra: list[StagingBuffer] = []
        with self._lock:
            kept = self._bufs.setdefault(nbytes, [])
            held = self._held()
            for buf in bufs:
                if held + nbytes <= self.max_bytes and self.keep_seconds > 0:
                    kept.append(buf)
                    held += nbytes
                else:
                    extra.append(buf)
            if self._timer is not None:
                self._timer.cancel()
            self._timer = None
            if held:
                self._timer = threading.Timer(self.keep_seconds, self.clear)
                self._timer.name = "staging-spares"
                self._timer.daemon = True
                self._timer.start()
        for buf in extra:
            buf.close()

    def _held(self) -> int:
        return sum(len(b) * size for size, b in self._bufs.items())

    def held_bytes(self) -> int:
        with self._lock:
            return self._held()

    def clear(self) -> None:
        with self._lock:
            bufs = [buf for b in self._bufs.values() for buf in b]
            self._bufs.clear()
            if self._timer is not None and self._timer is not threading.current_thread():
                self._timer.cancel()
            self._timer = None
        for buf in bufs:
            buf.close()

    def _after_fork(self) -> None:
        self._lock = threading.Lock()   # the parent's timer thread does not exist here
        self._timer = None
        self.clear()


_spares = _Spares()
if hasattr(os, "register_at_fork"):
    os.register_at_fork(after_in_child=_spares._after_fork)


class CopyBehind:
    """One thread that copies staged bytes to their destination while the worker that read them
    is already reading the next piece into another buffer.

    Copied inline, each worker leaves the device idle for as long as it copies; copied behind,
    loads into destinations whose alignment differs from the file's (the engine case) and into
    fresh tensors were faster (docs/measurements.md, "Copy behind"). Two copy threads were
    slower than one (they take the CPU the readers' completions need). Copies run in the order they were submitted, so a
    worker waits for its oldest.
    """

    def __init__(self, name: str = "streamer-copy"):
        self._queue: queue.SimpleQueue = queue.SimpleQueue()
        self._thread = threading.Thread(target=self._run, name=name, daemon=True)
        self._start = threading.Lock()   # the thread starts with the first copy: a load that
        self._closed = False             # never stages one (warm, all aligned) runs no extra thread

    def _run(self) -> None:
        while True:
            work = self._queue.get()
            if work is None:
                return
            dst, src, nbytes, done = work
            try:
                ctypes.memmove(dst, src, nbytes)   # releases the GIL
            except BaseException as exc:  # noqa: BLE001 - handed to the worker that waits for it
                done.put(exc)
            else:
                done.put(None)

    def submit(self, dst: int, src: int, nbytes: int, done: queue.SimpleQueue) -> None:
        """Copy ``nbytes`` from address ``src`` to ``dst``; put None (or the error) on ``done`` after."""
        if not self._thread.is_alive():
            with self._start:
                if self._closed:
                    raise CancelledError("copy thread closed: the load was cancelled")
                if self._thread.ident is None:
                    self._thread.start()
        self._queue.put((dst, src, nbytes, done))

    def close(self) -> None:
        """Finish the copies submitted so far, then stop the thread."""
        with self._start:
            self._closed = True
            started = self._thread.ident is not None
        if started:
            self._queue.put(None)
            self._thread.join()


class BufferPool:
    """A bounded pool of aligned staging buffers (:class:`StagingBuffer`), made lazily and kept
    for the next load when the pool closes (see :class:`_Spares`).

    ``acquire`` blocks while all buffers are lent out; ``cancelled`` (an Event) aborts the
    wait. Used for O_DIRECT reads, whose buffers must be aligned. With ``copy_behind`` the
    pool also has a :class:`CopyBehind` thread (``copier``), stopped when the pool closes.
    """

    def __init__(self, buffer_bytes: int, count: int, cancelled: threading.Event | None = None,
                 copy_behind: bool = False):
        if count < 1:
            raise ValueError("a buffer pool needs at least one buffer")
        self.buffer_bytes = buffer_bytes
        self.count = count
        self.copier: CopyBehind | None = CopyBehind() if copy_behind else None
        self._free: list[StagingBuffer] = []
        self._made = 0
        self._cond = threading.Condition()
        self._cancelled = cancelled or threading.Event()
        self._closed = False

    @property
    def capacity_bytes(self) -> int:
        return self.buffer_bytes * self.count

    @property
    def allocated_bytes(self) -> int:
        return self.buffer_bytes * self._made

    def acquire(self, wait: bool = True) -> StagingBuffer | None:
        """A free buffer; while all are lent out, wait for one (``wait``) or return None."""
        with self._cond:
            while True:
                if self._cancelled.is_set() or self._closed:
                    raise CancelledError("buffer pool closed: the load was cancelled")
                if self._free:
                    return self._free.pop()
                if self._made < self.count:
                    self._made += 1
                    break
                if not wait:
                    return None
                self._cond.wait(0.1)
        try:   # outside the lock: workers fault their buffers in parallel
            return _spares.take(self.buffer_bytes) or StagingBuffer(self.buffer_bytes)
        except BaseException:
            with self._cond:
                self._made -= 1
                self._cond.notify()
            raise

    def release(self, buf: StagingBuffer) -> None:
        with self._cond:
            if not self._closed:
                self._free.append(buf)
                self._cond.notify()
                return
        _spares.give(self.buffer_bytes, [buf])

    def close(self) -> None:
        if self.copier is not None:
            self.copier.close()
        with self._cond:
            self._closed = True
            free, self._free = self._free, []
            self._cond.notify_all()
        _spares.give(self.buffer_bytes, free)

