"""Tensor-parallel shards as byte ranges (core/tp.py) and their use by the planner."""

from __future__ import annotations

import math

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from loader_plugins.core.header import TensorSpec
from loader_plugins.core.plan import plan_reads
from loader_plugins.core.tp import dim0_shard_range
from loader_plugins.core.tp import ColumnBlock, shard_block, shard_ranges, shard_shape

ITEMSIZE = {"F32": 4, "BF16": 2, "U8": 1, "F64": 8}


def _spec(name: str, shape, dtype="F32", offset=8) -> TensorSpec:
    return TensorSpec(name, dtype, tuple(shape), "f", offset, math.prod(shape) * ITEMSIZE[dtype])


def _tensor(spec: TensorSpec, seed: int) -> torch.Tensor:
    gen = torch.Generator().manual_seed(seed)
    raw = torch.randint(1, 256, (spec.nbytes,), dtype=torch.uint8, generator=gen)   # never zeros
    return raw.view(spec.torch_dtype()).reshape(spec.shape) if spec.nbytes else torch.empty(spec.shape,
                                                                                             dtype=spec.torch_dtype())


def _ceil_rows(t: torch.Tensor, dim: int, rank: int, world: int) -> torch.Tensor:
    size = t.shape[dim]
    block = -(-size // world)
    first = min(rank * block, size)
    return t.narrow(dim, first, min(first + block, size) - first)


shapes = st.lists(st.integers(0, 9), min_size=1, max_size=4).map(tuple)


@settings(max_examples=200, deadline=None)
@given(shapes, st.integers(1, 8), st.sampled_from(list(ITEMSIZE)))
def test_dim0_ranges_cover_each_tensor_once_and_hold_the_ranks_rows(shape, world, dtype):
    spec = _spec("w", shape, dtype)
    t = _tensor(spec, 1)
    flat = t.reshape(-1).view(torch.uint8) if t.numel() else torch.empty(0, dtype=torch.uint8)
    covered = torch.zeros(spec.nbytes, dtype=torch.int32)
    for rank in range(world):
        ranges = shard_ranges([spec], rank, world, lambda name: 0)
        start, end = ranges["w"]
        assert (start, end) == dim0_shard_range(spec, rank, world)
        covered[start:end] += 1
        rows = _ceil_rows(t, 0, rank, world).contiguous()
        assert flat[start:end].tolist() == rows.reshape(-1).view(torch.uint8).tolist() if rows.numel() else end == start
        assert tuple(rows.shape) == shard_shape(spec, rank, world, 0)
    assert bool((covered == 1).all())


@settings(max_examples=200, deadline=None)
@given(shapes, st.integers(1, 6), st.data())
def test_blocks_hold_exactly_the_shard_along_any_dim(shape, world, data):
    dim = data.draw(st.integers(0, len(shape) - 1))
    spec = _spec("w", shape, "BF16")
    t = _tensor(spec, 2)
    raw = t.reshape(-1).view(torch.uint8) if t.numel() else torch.empty(0, dtype=torch.uint8)
    total = 0
    for rank in range(world):
        block = shard_block(spec, rank, world, dim)
        want = _ceil_rows(t, dim, rank, world).contiguous()
        assert block.nbytes == want.numel() * 2
        total += block.nbytes
        got = [raw[r * block.row_bytes + block.start:r * block.row_bytes + block.start + block.width]
               for r in range(block.rows)]
        got_bytes = torch.cat(got).tolist() if got else []
        assert got_bytes == (want.reshape(-1).view(torch.uint8).tolist() if want.numel() else [])
        if block.contiguous:
            start, end = block.byte_range()
            assert raw[start:end].tolist() == got_bytes
    assert total == spec.nbytes


def test_ranges_skip_replicated_and_strided_tensors():
    specs = [_spec("col", (8, 6)), _spec("row", (8, 6)), _spec("norm", (6,)), _spec("lead1", (1, 8, 3)),
             _spec("scalar", ())]
    dims = {"col": 0, "row": 1, "norm": None, "lead1": 1, "scalar": 0}
    ranges = shard_ranges(specs, 1, 2, dims.get)
    assert ranges == {"col": (4 * 6 * 4, 8 * 6 * 4), "lead1": (4 * 3 * 4, 8 * 3 * 4)}
    assert shard_shape(specs[1], 1, 2, 1) == (8, 3)
    assert shard_block(specs[1], 1, 2, 1) == ColumnBlock(rows=8, row_bytes=24, start=12, width=12)
    assert not shard_block(specs[1], 1, 2, 1).contiguous
    with pytest.raises(ValueError, match="no dim 2"):
        shard_ranges(specs[:1], 0, 2, lambda n: 2)
    with pytest.raises(ValueError, match="not in a world"):
        shard_ranges(specs, 2, 2, dims.get)


@settings(max_examples=100, deadline=None)
@given(st.lists(st.tuples(st.integers(0, 40), st.integers(1, 7)), min_size=1, max_size=12), st.integers(1, 5),
       st.integers(1, 4), st.integers(1, 97))
def test_planner_reads_only_the_ranks_bytes(dims, world, workers, chunk):
    specs, pos = [], 8
    for i, (rows, cols) in enumerate(dims):
        spec = _spec(f"t{i}", (rows, cols), "U8", pos)
        specs.append(spec)
        pos += spec.nbytes
    split = {s.name: (0 if i % 3 else None) for i, s in enumerate(specs)}
    total_over_ranks = 0
    for rank in range(world):
        ranges = shard_ranges(specs, rank, world, split.get)
        plan = plan_reads(specs, workers, chunk, ranges)
        by_tensor: dict[str, list[tuple[int, int]]] = {}
        for item in plan.items():
            by_tensor.setdefault(item.tensor, []).append((item.dest_offset, item.dest_offset + item.length))
            assert item.file_offset == next(s for s in specs if s.name == item.tensor).offset + item.dest_offset
        for spec in specs:
            want = ranges.get(spec.name, (0, spec.nbytes))
            got = sorted(by_tensor.get(spec.name, []))
            assert sum(b - a for a, b in got) == want[1] - want[0]
            assert not got or (got[0][0], got[-1][1]) == want
            if split[spec.name] == 0:
                total_over_ranks += want[1] - want[0]
        assert plan.total_bytes == sum(e - s for s, e in ranges.values()) + sum(
            s.nbytes for s in specs if s.name not in ranges)
    assert total_over_ranks == sum(s.nbytes for s in specs if split[s.name] == 0)
