from collections import defaultdict

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from loader_plugins.core.header import TensorSpec
from loader_plugins.core.plan import chunk_tensor, plan_reads, split_windows
from loader_plugins.core.tp import dim0_shard_range


def _specs(sizes, files=2):
    specs, offsets = [], defaultdict(lambda: 8)
    for i, n in enumerate(sizes):
        f = f"f{i % files}"
        specs.append(TensorSpec(f"t{i}", "U8", (n,), f, offsets[f], n))
        offsets[f] += n
    return specs


@settings(max_examples=300, deadline=None)
@given(st.lists(st.integers(0, 5000), max_size=40), st.integers(1, 17), st.integers(1, 1500))
def test_every_byte_read_once_and_balanced(sizes, workers, chunk):
    specs = _specs(sizes)
    plan = plan_reads(specs, workers, chunk)
    assert len(plan.workers) == workers
    covered = defaultdict(list)
    for item in plan.items():
        assert 0 < item.length <= chunk
        covered[item.tensor].append((item.dest_offset, item.dest_offset + item.length, item.file_offset))
    by_name = {s.name: s for s in specs}
    for spec in specs:
        ranges = sorted(covered.get(spec.name, []))
        pos = 0
        for start, end, file_offset in ranges:
            assert start == pos, "gap or overlap"
            assert file_offset == spec.offset + start
            pos = end
        assert pos == spec.nbytes
    assert set(covered) <= set(by_name)
    total = sum(sizes)
    assert plan.total_bytes == total
    assert max(plan.worker_bytes) <= total / workers + chunk


@settings(max_examples=200, deadline=None)
@given(st.lists(st.integers(0, 5000), max_size=40), st.integers(1, 17), st.integers(1, 700), st.integers(1, 1500))
def test_per_file_chunks(sizes, workers, chunk, remote_chunk):
    """One file read in larger pieces (an S3 object, ``s3_range_bytes``), the other in ``chunk``."""
    specs = _specs(sizes)
    plan = plan_reads(specs, workers, chunk, file_chunks={"f1": remote_chunk})
    seen = defaultdict(int)
    for item in plan.items():
        assert 0 < item.length <= (remote_chunk if item.file == "f1" else chunk)
        seen[item.tensor] += item.length
    assert seen == {s.name: s.nbytes for s in specs if s.nbytes}
    assert max(plan.worker_bytes) <= sum(sizes) / workers + max(chunk, remote_chunk)


@settings(max_examples=100, deadline=None)
@given(st.lists(st.integers(1, 5000), min_size=1, max_size=40), st.integers(1, 8))
def test_items_in_file_order_per_worker(sizes, workers):
    plan = plan_reads(_specs(sizes), workers, 700)
    for items in plan.workers:
        keys = [(i.file, i.file_offset) for i in items]
        assert keys == sorted(keys)


def test_large_tensor_split_across_workers():
    plan = plan_reads(_specs([1000]), 4, 100)   # the tensor starts at file offset 8
    assert sum(plan.worker_bytes) == 1000 and max(plan.worker_bytes) <= 1000 / 4 + 100
    assert all((i.file_offset + i.length) % 100 == 0 or i.file_end == 1008 for i in plan.items())


def test_ranges_restrict_reads():
    spec = _specs([1000])[0]
    plan = plan_reads([spec], 3, 64, ranges={spec.name: (200, 500)})
    items = sorted(plan.items(), key=lambda i: i.dest_offset)
    assert items[0].dest_offset == 200 and items[-1].dest_offset + items[-1].length == 500
    assert plan.total_bytes == 300


def test_chunk_tensor_rejects_bad_range():
    with pytest.raises(ValueError):
        chunk_tensor(_specs([10])[0], 4, start=5, end=20)


def test_windows():
    specs = _specs([5, 5, 5, 20, 1])
    assert [[s.name for s in w] for w in split_windows(specs, 10)] == [["t0", "t1"], ["t2"], ["t3"], ["t4"]]
    assert len(split_windows(specs, None)) == 1
    assert split_windows([], None) == []


@given(st.integers(0, 50), st.integers(1, 8), st.integers(1, 9))
def test_dim0_shards_cover_rows(rows, world, cols):
    spec = TensorSpec("w", "F32", (rows, cols), "f", 8, rows * cols * 4)
    pos = 0
    for rank in range(world):
        start, end = dim0_shard_range(spec, rank, world)
        assert start == min(pos, spec.nbytes)
        pos = end
        assert (end - start) % (cols * 4) == 0
    assert pos == spec.nbytes
