"""Pure read planning: tensor specs in, read items per worker out. No I/O, no threads.

Items are balanced by bytes, largest first (longest-processing-time scheduling): every
tensor is cut into chunks of at most ``chunk_bytes``, the chunks are sorted by size and each
goes to the worker that carries the least so far. The heaviest worker therefore carries at
most ``total / workers + chunk_bytes``. Each worker then reads its items in file order.
"""

from __future__ import annotations

import dataclasses
import heapq
from typing import Any, Callable, Iterable, Mapping, Sequence, TypeVar

from .header import TensorSpec

from .tp import ColumnBlock

T = TypeVar("T")


@dataclasses.dataclass(frozen=True)
class ReadItem:
    """Read ``length`` bytes at ``file_offset`` of ``file`` into byte ``dest_offset`` of ``tensor``.

    A gather item (``row_stride`` > 0) reads ``length // row_width`` rows of ``row_width`` bytes,
    row ``r`` from ``file_offset + r * row_stride``, landing one after the other from
    ``dest_offset``: a band of a strided tensor-parallel shard (:func:`gather_tensor`)."""

    tensor: str
    file: str
    file_offset: int
    length: int
    dest_offset: int
    row_stride: int = 0
    row_width: int = 0

    @property
    def rows(self) -> int:
        return self.length // self.row_width if self.row_stride else 1

    @property
    def file_end(self) -> int:
        if self.row_stride:
            return self.file_offset + (self.rows - 1) * self.row_stride + self.row_width
        return self.file_offset + self.length


@dataclasses.dataclass(frozen=True)
class ReadPlan:
    workers: tuple[tuple[ReadItem, ...], ...]

    @property
    def worker_bytes(self) -> list[int]:
        return [sum(i.length for i in items) for items in self.workers]

    @property
    def total_bytes(self) -> int:
        return sum(self.worker_bytes)

    def items(self) -> Iterable[ReadItem]:
        for items in self.workers:
            yield from items


#: Tensors of at most this many bytes are read together with their neighbours in the file
#: (:func:`batch_neighbours`): one read and one allocation for many, as safetensors' one mmap
#: serves every tensor of a file. Per-expert MoE checkpoints hold tens of thousands of them.
BATCH_TENSOR_BYTES = 1 << 20

#: Names of batch specs start with this (a NUL: never the start of a tensor name in a header).
BATCH_PREFIX = "\0batch:"


@dataclasses.dataclass(frozen=True)
class Batch:
    """Neighbouring tensors of one file read as one: ``spec`` is their bytes as one flat U8
    tensor (read, allocated and completed as one), ``members`` the tensors inside it, in file
    order, back to back."""

    spec: TensorSpec
    members: tuple[TensorSpec, ...]


def batch_neighbours(specs: Sequence[TensorSpec], eligible: Callable[[TensorSpec], bool], *,
                     max_bytes: int | Callable[[str], int], max_tensor: int = BATCH_TENSOR_BYTES
                     ) -> tuple[list[TensorSpec], list[Batch]]:
    """Group runs of adjacent small tensors (``specs`` in file order; each at most
    ``max_tensor`` bytes, ``eligible``, the next starting where the last ends) into batches of at
    most ``max_bytes`` (per file when a callable). Returns the specs left alone and the batches
    (of two members or more)."""
    singles: list[TensorSpec] = []
    batches: list[Batch] = []
    run: list[TensorSpec] = []

    def close() -> None:
        if len(run) > 1:
            first = run[0]
            nbytes = run[-1].end - first.offset
            spec = TensorSpec(f"{BATCH_PREFIX}{first.file}:{first.offset}", "U8", (nbytes,), first.file,
                              first.offset, nbytes)
            batches.append(Batch(spec, tuple(run)))
        else:
            singles.extend(run)
        run.clear()

    limit = max_bytes if callable(max_bytes) else (lambda _f: max_bytes)
    for spec in specs:
        if spec.nbytes == 0:          # holds no bytes: complete at once, and it breaks no run
            singles.append(spec)
            continue
        if spec.nbytes > max_tensor or not eligible(spec):
            close()
            singles.append(spec)
            continue
        if run and (run[-1].file != spec.file or run[-1].end != spec.offset
                    or spec.end - run[0].offset > limit(spec.file)):
            close()
        run.append(spec)
    close()
    return singles, batches


def chunk_tensor(spec: TensorSpec, chunk_bytes: int, *, start: int = 0, end: int | None = None) -> list[ReadItem]:
    """Cut bytes ``[start, end)`` of one tensor (relative to the tensor) into chunks.

    Cuts fall on file offsets that are multiples of ``chunk_bytes``, so chunks line up with the
    storage's own blocks (O_DIRECT alignment, object-store chunking) whatever the tensor's offset.
    """
    if chunk_bytes <= 0:
        raise ValueError("chunk_bytes must be positive")
    end = spec.nbytes if end is None else end
    if not 0 <= start <= end <= spec.nbytes:
        raise ValueError(f"range [{start}, {end}) outside tensor {spec.name!r} of {spec.nbytes} bytes")
    items = []
    pos = start
    while pos < end:
        at = spec.offset + pos
        n = min(chunk_bytes - at % chunk_bytes, end - pos)
        items.append(ReadItem(spec.name, spec.file, at, n, pos))
        pos += n
    return items


def gather_tensor(spec: TensorSpec, block: "ColumnBlock", chunk_bytes: int) -> list[ReadItem]:
    """The rows of a strided shard (``block``: bytes ``[start, start + width)`` of each row) as
    gather items of about ``chunk_bytes`` each (at least one row): the shard lands contiguous,
    row after row, which is its own row-major layout; the bytes between rows are not read."""
    if chunk_bytes <= 0:
        raise ValueError("chunk_bytes must be positive")
    if block.rows * block.row_bytes != spec.nbytes or not 0 <= block.start <= block.start + block.width <= block.row_bytes:
        raise ValueError(f"column block {block} does not fit tensor {spec.name!r} of {spec.nbytes} bytes")
    if block.width == 0:
        return []
    band = max(1, chunk_bytes // block.width)
    items = []
    for first in range(0, block.rows, band):
        n = min(band, block.rows - first)
        items.append(ReadItem(spec.name, spec.file, spec.offset + first * block.row_bytes + block.start,
                              n * block.width, first * block.width, block.row_bytes, block.width))
    return items


def plan_reads(specs: Sequence[TensorSpec], workers: int, chunk_bytes: int,
               ranges: dict[str, tuple[int, int]] | None = None,
               file_chunks: Mapping[str, int] | None = None,
               gathers: Mapping[str, "ColumnBlock"] | None = None) -> ReadPlan:
    """Balance the bytes of ``specs`` across ``workers``.

    ``ranges`` optionally restricts a tensor to bytes ``[start, end)`` of itself (a
    tensor-parallel rank reading only its contiguous shard); ``gathers`` to the rows of a
    strided shard (:func:`gather_tensor`). ``file_chunks`` gives some files another chunk size
    than ``chunk_bytes`` (S3 objects: larger ranged GETs); the heaviest worker then carries at
    most ``total / workers`` plus the largest chunk size.
    """
    if workers < 1:
        raise ValueError("workers must be at least 1")
    items: list[ReadItem] = []
    for spec in specs:
        chunk = file_chunks.get(spec.file, chunk_bytes) if file_chunks else chunk_bytes
        if gathers and spec.name in gathers:
            items.extend(gather_tensor(spec, gathers[spec.name], chunk))
            continue
        start, end = (ranges or {}).get(spec.name, (0, spec.nbytes))
        items.extend(chunk_tensor(spec, chunk, start=start, end=end))
    assigned = balance(items, workers, size=lambda i: i.length, order=lambda i: (i.file, i.file_offset))
    return ReadPlan(tuple(tuple(lst) for lst in assigned))


def balance(items: Sequence[T], workers: int, *, size: Callable[[T], int], order: Callable[[T], Any]) -> list[list[T]]:
    """Longest-processing-time scheduling: ``items`` largest first (ties by ``order``, so the
    result is deterministic), each to the worker with the fewest bytes so far; each worker's
    list then sorted by ``order``. The heaviest worker carries at most the mean plus the largest
    item. Used for reads (:func:`plan_reads`) and for swap copies."""
    if workers < 1:
        raise ValueError("workers must be at least 1")
    heap = [(0, w) for w in range(workers)]
    assigned: list[list[T]] = [[] for _ in range(workers)]
    for item in sorted(items, key=lambda i: (-size(i), order(i))):
        load, w = heapq.heappop(heap)
        assigned[w].append(item)
        heapq.heappush(heap, (load + size(item), w))
    for lst in assigned:
        lst.sort(key=order)
    return assigned


def split_windows(specs: Sequence[TensorSpec], window_bytes: int | None) -> list[list[TensorSpec]]:
    """Group consecutive specs into windows of at most ``window_bytes`` (a larger tensor alone).

    ``None`` puts everything in one window.
    """
    if window_bytes is None:
        return [list(specs)] if specs else []
    windows: list[list[TensorSpec]] = []
    current: list[TensorSpec] = []
    size = 0
    for spec in specs:
        if current and size + spec.nbytes > window_bytes:
            windows.append(current)
            current, size = [], 0
        current.append(spec)
        size += spec.nbytes
    if current:
        windows.append(current)
    return windows
