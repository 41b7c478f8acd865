"""Tensor-parallel shards as byte ranges: which bytes of a checkpoint tensor one rank needs. Pure.

A shard along dim ``d`` of a row-major tensor is the column block of a matrix with
``prod(shape[:d])`` rows: contiguous in the file when that product is 1 (always for ``d == 0``),
a strided block otherwise. Contiguous shards become byte ranges for :func:`plan.plan_reads`, so a
rank reads only its own bytes; strided ones are read row by row (:func:`plan.gather_tensor`) when
the CPU sink lands them from a source where short reads are cheap (a local file), and whole, then
cut, elsewhere (S3; the CUDA sink, for which :class:`ColumnBlock` describes the cut). Shards follow the ceil-block rule of
:func:`plan.dim0_shard_range`: block = ceil(size / world), rank r holds ``[r*block, (r+1)*block)``
clipped to the size (the last ranks may hold fewer, or no, rows).
"""

from __future__ import annotations

import dataclasses
import math
from typing import Callable, Iterable

from .header import TensorSpec


@dataclasses.dataclass(frozen=True)
class ColumnBlock:
    """Bytes ``[start, start + width)`` of each of ``rows`` rows of ``row_bytes`` bytes.

    Describes one rank's shard of a tensor in the tensor's own (checkpoint) bytes; the shard,
    stored contiguously, is ``rows * width`` bytes.
    """

    rows: int
    row_bytes: int
    start: int
    width: int

    @property
    def nbytes(self) -> int:
        return self.rows * self.width

    @property
    def contiguous(self) -> bool:
        return self.rows <= 1 or self.width == self.row_bytes or self.width == 0

    def byte_range(self) -> tuple[int, int]:
        """The shard as one byte range of the tensor (only when :attr:`contiguous`)."""
        if not self.contiguous:
            raise ValueError("a strided column block is not one byte range")
        if self.width == 0 or self.rows == 0:
            return (0, 0)
        return (self.start, self.start + self.nbytes) if self.rows == 1 else (0, self.rows * self.row_bytes)


def _check(rank: int, world: int) -> None:
    if world < 1 or not 0 <= rank < world:
        raise ValueError(f"rank {rank} is not in a world of {world}")


def shard_shape(spec: TensorSpec, rank: int, world: int, dim: int | None) -> tuple[int, ...]:
    """Shape of rank ``rank``'s shard along ``dim`` (``None``: replicated, the whole shape)."""
    _check(rank, world)
    if dim is None or not spec.shape:
        return tuple(spec.shape)
    dim = _dim(spec, dim)
    first, last = ceil_block(spec.shape[dim], rank, world)
    return tuple(spec.shape[:dim]) + (last - first,) + tuple(spec.shape[dim + 1:])


def shard_block(spec: TensorSpec, rank: int, world: int, dim: int) -> ColumnBlock:
    """Rank ``rank``'s shard along ``dim`` as a column block of the tensor's bytes."""
    _check(rank, world)
    if not spec.shape:
        return ColumnBlock(1, spec.nbytes, 0, spec.nbytes)
    dim = _dim(spec, dim)
    rows = math.prod(spec.shape[:dim])
    inner = math.prod(spec.shape[dim + 1:]) * spec.itemsize
    first, last = ceil_block(spec.shape[dim], rank, world)
    return ColumnBlock(rows, spec.shape[dim] * inner, first * inner, (last - first) * inner)


def _dim(spec: TensorSpec, dim: int) -> int:
    ndim = len(spec.shape)
    if not -ndim <= dim < ndim:
        raise ValueError(f"tensor {spec.name!r} of shape {list(spec.shape)} has no dim {dim}")
    return dim % ndim


def shard_ranges(specs: Iterable[TensorSpec], rank: int, world: int,
                 dim_for_name: Callable[[str], int | None]) -> dict[str, tuple[int, int]]:
    """Byte ranges (relative to each tensor) of rank ``rank``'s contiguous shards.

    ``dim_for_name(name)`` gives the dim a tensor is split along, or ``None`` when every rank
    holds all of it. Tensors split along dim 0, or along a dim preceded only by dims of size 1,
    get their shard's byte range (from :func:`plan.dim0_shard_range` for dim 0); replicated and
    strided shards are absent, i.e. read whole. The result is ``plan_reads``' ``ranges``.
    """
    _check(rank, world)
    out: dict[str, tuple[int, int]] = {}
    for spec in specs:
        dim = dim_for_name(spec.name)
        if dim is None or not spec.shape:
            continue
        dim = _dim(spec, dim)
        if dim == 0:
            out[spec.name] = dim0_shard_range(spec, rank, world)
            continue
        block = shard_block(spec, rank, world, dim)
        if block.contiguous:
            out[spec.name] = block.byte_range()
    return out


def ceil_block(size: int, rank: int, world: int, *, clamp: bool = True) -> tuple[int, int]:
    """Rank ``rank``'s block of ``size`` units under the ceil-block rule of tensor parallelism:
    ``block = ceil(size / world)``, rank r holds ``[r*block, (r+1)*block)``, clamped to ``size``
    (``clamp=False``: as TGI computes it, the stop may run past ``size`` and slicing clamps it)."""
    block = -(-size // world)
    if not clamp:
        return rank * block, (rank + 1) * block
    first = min(rank * block, size)
    return first, min(first + block, size)


def dim0_shard_range(spec: TensorSpec, rank: int, world: int) -> tuple[int, int]:
    """Byte range of rank ``rank``'s ceil-block shard along dim 0 (contiguous in row-major order).

    Matches the common tensor-parallel split: block = ceil(rows / world); rank r holds rows
    ``[r*block, min((r+1)*block, rows))``.
    """
    if not spec.shape:
        return (0, spec.nbytes)
    rows = spec.shape[0]
    row_bytes = spec.nbytes // rows if rows else 0
    first, last = ceil_block(rows, rank, world)
    return (first * row_bytes, last * row_bytes)
