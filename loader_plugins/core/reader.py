"""The concurrent reader: worker threads move bytes from sources into destinations.

* Work comes from :func:`plan.plan_reads`, one balanced plan per *window* of tensors. When the
  reader allocates the tensors it hands out, a window is admitted only while the bytes the
  reader holds (allocated, not yet taken by the consumer, plus staging buffers) stay within
  ``memory_limit``; caller-owned destinations cost nothing and form one window.
* Each worker reads its share of the plan in file order; one that runs out early takes
  unstarted items from the worker with the most bytes left (:class:`WorkQueues`).
* A tensor is handed out as soon as its last byte lands, in whatever order that happens.
* The first error in any worker cancels the others and is raised to the consumer, with the
  file, tensor and byte range in the message. Closing the reader (or leaving the consumer's
  loop early) stops the workers, joins them and closes every source and buffer.
"""

from __future__ import annotations

import collections
import ctypes
import dataclasses
import logging
import queue
import sys
import threading
import time
from typing import TYPE_CHECKING, Callable, Iterator, Mapping, Sequence

from ..errors import CancelledError, DestinationError, InternalError, SourceError, StreamerError
from .header import TensorSpec
from .budget import MemoryBudget
from .pagecache import keep as keep_in_page_cache
from .plan import BATCH_TENSOR_BYTES, Batch, ReadItem, ReadPlan, batch_neighbours, plan_reads, split_windows
from .sinks.base import Sink
from .sinks.cpu import Allocation, CpuSink, reads_straight_into
from .sources.base import BufferPool, Source, staging_bytes_for
from .tp import ColumnBlock

if TYPE_CHECKING:
    import torch

    from ..config import StreamerConfig

log = logging.getLogger(__name__)

_DONE = object()

#: Copy staged bytes out on a thread of their own while the workers go on reading (see
#: :class:`~.sources.base.CopyBehind`); False copies on the worker that read them.
COPY_BEHIND = True


class _Job:
    __slots__ = ("spec", "target", "dest", "buffer", "remaining", "budget", "lock", "alloc", "slack", "block",
                 "base", "sink", "members")

    def __init__(self, spec: TensorSpec, target, dest, budget: int, alloc: Allocation | None, sink: Sink, *,
                 block: ColumnBlock | None = None, gather: bool = False):
        self.spec = spec
        self.sink = sink              # where its bytes land
        self.alloc = alloc            # memory the sink allocated or wrapped
        self.target = alloc.tensor if alloc is not None else target   # tensor the bytes are read into
        self.dest = dest              # final destination when it differs from target (cast/copy)
        self.buffer = sink.buffer_for(self.target)   # None: the sink addresses the tensor itself
        self.slack = bool(alloc and alloc.slack)
        self.block = block            # the destination holds only this tensor-parallel shard
        if gather:                    # its rows are read one after the other: the shard, already cut
            start, end = 0, block.nbytes
            self.block = None
        else:
            start, end = block.byte_range() if block is not None and block.contiguous else (0, spec.nbytes)
        self.base = start             # tensor byte at buffer[0] (a dim-0 shard starts later)
        self.remaining = end - start
        self.budget = budget          # bytes counted against memory_limit until handed out
        self.lock = threading.Lock()
        self.members: list | None = None   # a batch: its tensors' specs, then (name, tensor) once complete


class WorkQueues:
    """The plan's items per worker, taken in order; a worker whose own list has run dry takes
    the last item of the worker with the most bytes left (work stealing). The plan balances
    bytes; this balances time, when one connection, server or disk region is slower than the
    others (a shard on S3 next to shards on local disk). Every item is handed out once."""

    def __init__(self, plan: ReadPlan):
        self._lock = threading.Lock()
        self._items = [collections.deque(items) for items in plan.workers]
        self._left = plan.worker_bytes
        self.stolen = 0

    def next(self, index: int) -> ReadItem | None:
        with self._lock:
            own = self._items[index]
            if own:
                item = own.popleft()
                self._left[index] -= item.length
                return item
            victim = max(range(len(self._items)), key=self._left.__getitem__)
            if not self._items[victim]:
                return None
            item = self._items[victim].pop()
            self._left[victim] -= item.length
            self.stolen += 1
            return item


class _Window:
    __slots__ = ("specs", "plan", "queues", "bytes", "admitted", "jobs")

    def __init__(self, specs: list[TensorSpec], budget_bytes: int):
        self.specs = specs
        self.plan = None
        self.queues: WorkQueues | None = None
        self.bytes = budget_bytes
        self.admitted = False
        self.jobs: dict[str, _Job] = {}


class StreamReader:
    """Streams ``specs`` from ``sources`` (uri -> open Source) with ``config``'s threads and limits.

    ``destinations`` (name -> tensor) are filled in place; tensors without one are allocated by
    the sink. ``ranges`` (name -> (start, end)) restricts a tensor to a byte range of itself; the
    handed-out tensor is then the flat uint8 view of those bytes. Iterate to receive
    ``(name, tensor)`` pairs as they complete.
    """

    def __init__(self, specs: Sequence[TensorSpec], sources: Mapping[str, Source], config: "StreamerConfig", *,
                 destinations: Mapping[str, "torch.Tensor"] | None = None,
                 consumer_keeps_all: bool = False,
                 on_bytes: Callable[[int], None] | None = None,
                 sinks: Sequence[Sink] | None = None,
                 shards: Mapping[str, ColumnBlock] | None = None):
        self._config = config
        self._sources = dict(sources)
        for spec in specs:
            if spec.file not in self._sources:
                raise InternalError(f"no open source for {spec.file}")
        remote = {f for f, src in self._sources.items() if src.remote}
        self._file_chunks = {f: config.read_bytes(f in remote) for f in self._sources}
        chunks = sum(-(-s.nbytes // self._file_chunks[s.file]) for s in specs)
        self.workers = max(1, min(config.workers(bool(remote)), max(1, chunks)))
        self._destinations = dict(destinations or {})
        self._shards = dict(shards or {})
        self._cancelled = threading.Event()
        self.budget = MemoryBudget(config.memory_limit, config.chunk_bytes)
        if sinks is None:
            sinks = default_sinks(config, self._destinations, ring_bytes=self.budget.ring_bytes, workers=self.workers)
        self._sinks = list(sinks)
        self._host = next((s for s in self._sinks if s.allocates), None)
        import torch

        self._torch = torch
        if self._host is None:
            raise InternalError("the reader needs a sink that allocates tensors (a CpuSink)")
        for sink in self._sinks:
            sink.attach(self._cancelled)   # this load's cancel aborts waits inside every sink
        self._on_bytes = on_bytes
        names = {s.name for s in specs}
        unknown = [n for n in self._destinations if n not in names]
        if unknown:
            raise DestinationError(f"destinations given for tensors not in the checkpoint: {unknown[:5]}")
        if set(self._shards) - set(self._destinations):
            raise DestinationError(f"shards given for tensors without a destination: "
                                f"{sorted(set(self._shards) - set(self._destinations))[:5]}")
        # Validate every destination before any byte moves: a bad one is an error, never a partial model.
        self._direct: dict[str, bool] = {}
        self._sink_of: dict[str, Sink] = {}
        by_name = {s.name: s for s in specs}
        for name, dest in self._destinations.items():
            spec, block = by_name[name], self._shards.get(name)
            sink = next(s for s in self._sinks if s.takes(spec, dest))
            self._direct[name] = sink.check(spec, dest, block)
            self._sink_of[name] = sink if self._direct[name] else self._host
        self._ranges = {n: b.byte_range() for n, b in self._shards.items() if b.contiguous}
        # Strided shards (split along a later dim) the CPU sink lands, from a source where short
        # reads are cheap, with rows of at least gather_min_row_bytes: only their rows are read,
        # straight into the destination when it is a contiguous CPU tensor of the checkpoint's
        # dtype (else into a shard-sized staging tensor). Elsewhere (S3, a device sink, short
        # rows) the tensor is read whole and cut.
        self._gather: dict[str, ColumnBlock] = {}
        for name, block in self._shards.items():
            spec = by_name[name]
            if (block.contiguous or self._sink_of[name] is not self._host or not self._sources[spec.file].gathers
                    or block.row_bytes < config.gather_min_row_bytes):
                continue
            self._gather[name] = block
            self._direct[name] = reads_straight_into(spec, self._destinations[name])
        fresh = sum(s.nbytes for s in specs if s.name not in self._destinations or not self._direct[s.name])
        self.hugepages = self._host.choose_pages(fresh)   # "on", "off" or "auto" for the tensors it allocates

        needs_staging = config.direct_io != "off" and any(src.wants_staging for src in self._sources.values())
        if needs_staging:
            buf = staging_bytes_for(config.chunk_bytes, config.alignment)
            count = self.budget.staging_buffers(buf, self.workers)
            self._pool: BufferPool | None = BufferPool(buf, count, self._cancelled, copy_behind=COPY_BEHIND)
        else:
            self._pool = None
        staging_bytes = self._pool.capacity_bytes if self._pool else 0
        ring_bytes = sum(s.reserved_bytes() for s in self._sinks)
        self._limit = self.budget.held_bytes(staging_bytes + ring_bytes)

        ordered = sorted(specs, key=lambda s: (s.file, s.offset))
        budgeted = not consumer_keeps_all or any(not self._direct.get(s.name, True) for s in specs)
        self._budgeted = budgeted and not consumer_keeps_all
        window_bytes = self.budget.window_bytes(self._limit) if self._budgeted else None
        self.sink_reports: list[dict] = []   # each sink's report() after the load (CUDA: its stages)
        self.memory = self.budget.report(ring=ring_bytes, staging=staging_bytes, held=self._limit, window=window_bytes)
        self._windows = [_Window(w, sum(self._budget_for(s) for s in w)) for w in split_windows(ordered, window_bytes)]
        self._total_bytes = sum(self._gather[s.name].nbytes if s.name in self._gather else
                                s.nbytes if s.name not in self._ranges else
                                self._ranges[s.name][1] - self._ranges[s.name][0] for s in specs)
        self._count = len(specs)

        self._cond = threading.Condition()
        self._unbatching = threading.Lock()   # Python work: threads taking turns at it only fight for the GIL
        self._error: BaseException | None = None
        self._held = 0
        self._admitted = 0
        self._out: queue.Queue = queue.Queue()
        self._threads: list[threading.Thread] = []
        self._started = False
        self._closed = False
        self._close_lock = threading.Lock()
        self._deadline = time.monotonic() + config.deadline if config.deadline else None
        for src in self._sources.values():
            src.deadline_at = self._deadline
        self.bytes_read = 0
        self.seconds = 0.0
        self.peak_held = 0
        self.limit = self._limit if self._budgeted else None
        self.page_sizes: dict[str, float] | None = None   # hugepages="auto": what was measured and chosen
        self.page_cache: str | None = None   # what the load left in the page cache, and why (page_cache)
        self.page_cache_refill: threading.Thread | None = None   # reading bypassed files back in, if any

    # ---- accounting -----------------------------------------------------------------------
    def _budget_for(self, spec: TensorSpec) -> int:
        if spec.name in self._destinations and self._direct[spec.name] and not self._batches(spec):
            return 0
        return spec.nbytes

    def _batches(self, spec: TensorSpec) -> bool:
        """Whether ``spec`` may be read in a batch with its neighbours (:func:`plan.batch_neighbours`):
        a small whole tensor the CPU sink lands (allocated, or copied into its destination)."""
        return (0 < spec.nbytes <= BATCH_TENSOR_BYTES and spec.name not in self._shards
                and self._sink_of.get(spec.name, self._host) is self._host)

    def _admit(self) -> None:
        """Admit windows in order while they fit in the memory limit (called under no lock)."""
        while True:
            with self._cond:
                if self._admitted >= len(self._windows) or self._cancelled.is_set():
                    return
                window = self._windows[self._admitted]
                if self._budgeted and self._held > 0 and self._held + window.bytes > self._limit:
                    return
                self._held += window.bytes
                self.peak_held = max(self.peak_held, self._held)
                self._admitted += 1
            self._prepare(window)
            with self._cond:
                window.admitted = True
                self._cond.notify_all()

    def _prepare(self, window: _Window) -> None:
        host = self._host
        singles, batches = batch_neighbours(window.specs, self._batches, max_bytes=self._file_chunks.__getitem__)
        for batch in batches:
            job = _Job(batch.spec, None, None, sum(self._budget_for(m) for m in batch.members),
                       host.allocate(batch.spec), host)
            job.members = list(batch.members)
            window.jobs[batch.spec.name] = job
        for spec in singles:
            dest = self._destinations.get(spec.name)
            block = self._shards.get(spec.name)
            gather = spec.name in self._gather
            if dest is not None and self._direct[spec.name]:     # straight into the caller's tensor
                sink = self._sink_of[spec.name]
                job = _Job(spec, dest, None, 0, sink.wrap(dest), sink, block=block, gather=gather)
            elif dest is not None:                               # staged, then one copy (cast, cut) into it
                part = _staged_part(spec, block, gather)
                job = _Job(spec, None, dest, spec.nbytes, host.allocate(part), host, block=block, gather=gather)
            else:                                                # a tensor the reader allocates
                job = _Job(spec, None, None, spec.nbytes, host.allocate(spec), host)
            window.jobs[spec.name] = job
            if job.remaining == 0:
                self._finish(job)
        window.plan = plan_reads(singles + [b.spec for b in batches], self.workers, self._config.chunk_bytes, self._ranges,
                                 self._file_chunks, gathers=self._gather)
        window.queues = WorkQueues(window.plan)

    # ---- workers --------------------------------------------------------------------------
    def _worker(self, index: int) -> None:
        try:
            for window in self._windows:
                with self._cond:
                    while not window.admitted and not self._cancelled.is_set():
                        self._cond.wait(0.1)
                if self._cancelled.is_set():
                    return
                while not self._cancelled.is_set():
                    item = window.queues.next(index)
                    if item is None:
                        break
                    self._read(window.jobs[item.tensor], item)
        except BaseException as exc:  # noqa: BLE001 - every failure must reach the consumer
            self._fail(exc)
        finally:
            self._out.put(_DONE)

    def _read(self, job: _Job, item: ReadItem) -> None:
        source = self._sources[item.file]
        try:
            job.sink.land(job, item, source, pool=self._pool, cancelled=self._cancelled)
        except StreamerError as exc:
            if self._cancelled.is_set() and isinstance(exc, CancelledError):
                return
            wrapped = type(exc)(self._describe(job, item, exc))
            if isinstance(exc, OSError):
                wrapped.errno = exc.errno  # keep ENOENT / EACCES / ESTALE for callers
            raise wrapped from exc
        except OSError as exc:
            wrapped = SourceError(self._describe(job, item, exc))
            wrapped.errno = exc.errno
            raise wrapped from exc
        if self._cancelled.is_set():
            return
        if self._on_bytes is not None:
            self._on_bytes(item.length)
        with job.lock:
            job.remaining -= item.length
            done = job.remaining == 0
        if done:
            self._finish(job)

    @staticmethod
    def _describe(job: _Job, item: ReadItem, exc: BaseException) -> str:
        if job.members is not None:   # a batch: the tensors whose bytes the read covers
            inside = [m for m in job.members if m.offset < item.file_end and item.file_offset < m.end]
            what = (f"tensor {inside[0].name!r}" if len(inside) == 1 else
                    f"{len(inside)} tensors {inside[0].name!r} .. {inside[-1].name!r} (read together)")
        else:
            what = f"tensor {job.spec.name!r} ({job.spec.dtype} {list(job.spec.shape)})"
        return f"reading {what}: bytes [{item.file_offset}, {item.file_end}) of {item.file} failed: {exc}"

    def _finish(self, job: _Job) -> None:
        if job.members is not None:
            with self._unbatching:   # on a worker (the consumer may run under a dispatch mode), one at a time
                job.members = self._unbatch(job)
        elif job.dest is not None:
            _deliver(job.spec, job.target, job.dest, job.block)   # the one copy (cast, cut) into it
        self._out.put(job)

    def _unbatch(self, job: _Job) -> list[tuple[str, "torch.Tensor"]]:
        """A complete batch's tensors: views of its memory (one ``as_strided`` each, on a view of
        the whole storage per dtype), or copied into their destinations."""
        block, start = job.target, job.spec.offset
        base = block.data_ptr()
        first = block.storage_offset()   # bytes: the batch's storage is uint8
        storage = block.untyped_storage()
        typed: dict = {}
        out = []
        for spec in job.members:
            at = spec.offset - start
            dest = self._destinations.get(spec.name)
            if dest is not None and self._direct[spec.name]:
                ctypes.memmove(dest.data_ptr(), base + at, spec.nbytes)
                out.append((spec.name, dest))
                continue
            dtype = spec.torch_dtype()
            isz = spec.itemsize
            whole = typed.get(dtype)
            if whole is None:
                whole = typed[dtype] = self._torch.empty(0, dtype=dtype).set_(storage, 0, (storage.nbytes() // isz,))
            if (first + at) % isz == 0:
                value = whole.as_strided(spec.shape, _strides(spec.shape), (first + at) // isz)
            else:                     # its offset in the batch is not a multiple of its item size
                value = block[at:at + spec.nbytes].clone().view(dtype).reshape(spec.shape)
            if dest is not None:
                _deliver(spec, value, dest, None)
                value = dest
            out.append((spec.name, value))
        return out

    def _fail(self, exc: BaseException) -> None:
        with self._cond:
            if self._error is None and not (isinstance(exc, CancelledError) and self._cancelled.is_set()):
                self._error = exc
            self._cancelled.set()
            self._cond.notify_all()

    # ---- consumer -------------------------------------------------------------------------
    def start(self) -> "StreamReader":
        if self._started:
            return self
        self._started = True
        self._t0 = time.perf_counter()
        self._admit()
        for i in range(self.workers):
            t = threading.Thread(target=self._worker, args=(i,), name=f"streamer-{i}", daemon=True)
            self._threads.append(t)
            t.start()
        return self

    def __iter__(self) -> Iterator[tuple[str, "torch.Tensor"]]:
        self.start()
        finished = 0
        handed = 0
        deferred: list[_Job] = []   # complete only once their sink has finished: handed out last
        try:
            while handed < self._count or finished < len(self._threads):
                try:
                    got = self._out.get(timeout=0.1)
                except queue.Empty:
                    got = None
                if self._error is not None:
                    raise self._error
                if self._closed:
                    raise CancelledError("the load was closed before it finished")
                if self._deadline is not None and time.monotonic() > self._deadline:
                    raise SourceError(f"the load did not finish within its deadline of {self._config.deadline} s "
                                      f"({self.bytes_done_hint()} read); raise 'deadline' or check the storage")
                if got is None:
                    if finished == len(self._threads) and handed < self._count:
                        raise InternalError(f"internal error: workers finished with {self._count - handed} "
                                            f"tensor(s) incomplete")
                    continue
                if got is _DONE:
                    finished += 1
                    continue
                job: _Job = got
                if job.members is not None:
                    handed += len(job.members)
                    members, job.members = job.members, None
                    job.target = job.buffer = job.alloc = None
                    if job.budget:
                        with self._cond:
                            self._held -= job.budget
                        self._admit()
                    yield from members
                    continue
                handed += 1
                if job.sink.deferred:
                    deferred.append(job)
                    continue
                tensor = job.dest if job.dest is not None else job.target
                job.target = job.buffer = job.alloc = None  # the reader keeps no reference to handed-out memory
                if job.budget:
                    with self._cond:
                        self._held -= job.budget
                    self._admit()
                yield job.spec.name, tensor
            for sink in self._sinks:
                sink.finish()            # CUDA: the one host synchronisation of the device copies
            self.sink_reports = [r for r in (sink.report() for sink in self._sinks) if r is not None]
            for job in deferred:
                yield job.spec.name, job.target
            for src in self._sources.values():
                if not src.reads_pinned:   # pinned reads would have failed on a change already
                    src.check_unchanged()
            self.seconds = time.perf_counter() - self._t0
            self.bytes_read = self._total_bytes
            # the files read past the page cache go back into it, after the last byte (page_cache)
            bypassed = [p for p in (src.bypassed_page_cache() for src in self._sources.values()) if p]
            self.page_cache_refill, self.page_cache = keep_in_page_cache(bypassed, self._config.page_cache)
            if self._host.chooser is not None:
                self.page_sizes = self._host.chooser.summary()
                log.debug("page sizes chosen while loading: %s", self.page_sizes)
        finally:
            self.close()

    def bytes_done_hint(self) -> str:
        return f"{self._total_bytes} bytes planned"

    def close(self) -> None:
        """Stop the workers and wait for them; safe from any thread, any number of times."""
        with self._close_lock:
            if self._closed:
                return
            with self._cond:
                self._cancelled.set()
                self._cond.notify_all()
            for t in self._threads:
                if t is not threading.current_thread():
                    t.join()
            if self._pool is not None:
                self._pool.close()
            for sink in self._sinks:
                sink.close()               # CUDA: waits for copies in flight, frees the pinned ring
            for window in self._windows:   # drop references to tensors not handed out
                window.jobs.clear()
            self._closed = True
            self._out.put(_DONE)           # wake a consumer blocked in another thread

    def __enter__(self) -> "StreamReader":
        return self

    def __exit__(self, *exc) -> None:
        self.close()


_STRIDES: dict[tuple[int, ...], tuple[int, ...]] = {}


def _strides(shape: tuple[int, ...]) -> tuple[int, ...]:
    """Row-major strides of ``shape`` (cached: a checkpoint repeats a few shapes many times)."""
    strides = _STRIDES.get(shape)
    if strides is None:
        acc, out = 1, []
        for d in reversed(shape):
            out.append(acc)
            acc *= max(d, 1)
        strides = _STRIDES[shape] = tuple(reversed(out))
    return strides


def _staged_part(spec: TensorSpec, block: ColumnBlock | None, gather: bool = False) -> TensorSpec:
    """The bytes a staged destination's read lands in: the shard's byte range when it is one,
    the shard's rows when they are gathered, else the whole tensor (a strided shard is cut out
    of it once complete)."""
    if block is not None and gather:
        return dataclasses.replace(spec, shape=(block.nbytes // spec.itemsize,), nbytes=block.nbytes)
    if block is None or not block.contiguous:
        return spec
    start, end = block.byte_range()
    return dataclasses.replace(spec, shape=((end - start) // spec.itemsize,), offset=spec.offset + start,
                               nbytes=end - start)


def _deliver(spec: TensorSpec, staged, dest, block: ColumnBlock | None) -> None:
    """Copy a complete staged read into ``dest`` (torch's ``copy_``: the same cast as the
    model's loader would make), cutting a strided shard's columns out of the whole tensor."""
    if block is None or block.contiguous:
        dest.copy_(staged.reshape(dest.shape))
        return
    isz = spec.itemsize
    rows = staged.reshape(block.rows, block.row_bytes // isz)
    part = rows[:, block.start // isz:(block.start + block.width) // isz]
    if dest.is_contiguous():
        dest.view(block.rows, block.width // isz).copy_(part)
    else:
        dest.copy_(part.reshape(dest.shape))


def default_sinks(config: "StreamerConfig", destinations: Mapping[str, object], *, ring_bytes: int,
                  workers: int) -> list[Sink]:
    """The sinks a load needs: a :class:`~.sinks.cuda.CudaSink` when a destination is a CUDA
    tensor (and CuPy is installed), then the CPU sink, which takes the rest and allocates."""
    from .sinks.cuda import sink_for_destinations   # imports no GPU library; CuPy only with CUDA dests

    cuda = sink_for_destinations(config, destinations, memory_limit=ring_bytes, workers=workers)
    return ([cuda] if cuda is not None else []) + [CpuSink(config)]


def progress_bar(total: int, desc: str, mode: str):
    """A tqdm bar on stderr (bytes), or None when off / not a TTY / tqdm missing."""
    if mode == "off" or (mode == "auto" and not sys.stderr.isatty()):
        return None
    try:
        from tqdm import tqdm
    except ImportError:
        return None
    return tqdm(total=total, desc=desc, unit="B", unit_scale=True, unit_divisor=1024, file=sys.stderr,
                leave=False, dynamic_ncols=True)
