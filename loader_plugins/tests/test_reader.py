import json
import os
import threading
import time

import pytest
import torch
from safetensors.torch import load_file as st_load_file
from safetensors.torch import save_file

from loader_plugins import (ConfigError, DestinationError, HeaderError, IndexFileError, SafetensorsStreamer,
                            SourceError, StreamerConfig, StreamerError, load_file)

from .helpers import assert_bit_exact, tensor_set


def _fds():
    return len(os.listdir("/proc/self/fd"))


def _streamer_threads():
    return [t for t in threading.enumerate() if t.name.startswith("streamer-")]


@pytest.fixture(scope="module")
def all_dtypes_file(tmp_path_factory):
    path = tmp_path_factory.mktemp("ckpt") / "all.safetensors"
    save_file(tensor_set(seed=3), path)
    return path


@pytest.mark.parametrize("direct_io", ["off", "on", "auto"])
@pytest.mark.parametrize("concurrency", [1, 5])
def test_bit_exact_every_dtype(all_dtypes_file, direct_io, concurrency):
    got = load_file(all_dtypes_file, direct_io=direct_io, concurrency=concurrency, chunk_bytes=4096)
    assert_bit_exact(got, st_load_file(all_dtypes_file))


def test_result_owns_its_memory(tmp_path):
    path = tmp_path / "m.safetensors"
    save_file({"w": torch.arange(100000, dtype=torch.float32)}, path)
    got = load_file(path)
    expected = got["w"].clone()
    save_file({"w": torch.zeros(100000, dtype=torch.float32)}, path)   # rewrite the file in place
    path.write_bytes(b"\0" * path.stat().st_size)
    assert torch.equal(got["w"], expected)


def _sharded(tmp_path, tensors, shards=3, index=True):
    names = sorted(tensors)
    groups = [names[i::shards] for i in range(shards)]
    weight_map = {}
    for i, group in enumerate(groups):
        fname = f"model-{i + 1:05d}-of-{shards:05d}.safetensors"
        save_file({n: tensors[n] for n in group}, tmp_path / fname)
        weight_map.update({n: fname for n in group})
    if index:
        (tmp_path / "model.safetensors.index.json").write_text(
            json.dumps({"metadata": {"total_size": 0}, "weight_map": weight_map}))
    return tmp_path


def test_sharded_directory_with_index(tmp_path):
    tensors = tensor_set(seed=4)
    d = _sharded(tmp_path, tensors)
    assert_bit_exact(load_file(d, chunk_bytes=8192), tensors)


def test_directory_without_index_and_list_of_files(tmp_path):
    tensors = tensor_set(seed=5)
    d = _sharded(tmp_path, tensors, index=False)
    assert_bit_exact(load_file(d), tensors)
    assert_bit_exact(load_file(sorted(d.glob("*.safetensors"))), tensors)


def test_streamer_yields_each_tensor_once(tmp_path):
    tensors = tensor_set(seed=6)
    d = _sharded(tmp_path, tensors)
    seen = {}
    with SafetensorsStreamer(concurrency=3, chunk_bytes=4096) as streamer:
        streamer.stream_files(sorted(d.glob("*.safetensors")))
        for name, tensor in streamer.get_tensors():
            assert name not in seen
            seen[name] = tensor
    assert_bit_exact(seen, tensors)


def test_stream_subset_of_names(all_dtypes_file):
    ref = st_load_file(all_dtypes_file)
    wanted = sorted(ref)[:7]
    with SafetensorsStreamer() as streamer:
        streamer.stream_file(all_dtypes_file, names=wanted)
        got = dict(streamer.get_tensors())
    assert_bit_exact(got, {n: ref[n] for n in wanted})
    with SafetensorsStreamer() as streamer:   # as Run:ai's: unknown names fail at stream_file, as ValueError
        with pytest.raises(ValueError, match="nope") as err:
            streamer.stream_file(all_dtypes_file, names=["nope"])
        assert isinstance(err.value, StreamerError)
        with pytest.raises(ValueError, match="not a single str"):   # "AB" once loaded tensors "A" and "B"
            streamer.stream_file(all_dtypes_file, tensor_names=wanted[0])
        with pytest.raises(ValueError, match="must not be empty"):
            streamer.stream_file(all_dtypes_file, tensor_names=[])


def test_fill_caller_allocated_tensors_in_place(all_dtypes_file):
    ref = st_load_file(all_dtypes_file)
    dests = {}
    for name, t in ref.items():
        d = torch.empty_like(t)
        if d.numel():
            d.view(torch.uint8).fill_(0xA5) if d.dim() else None
        dests[name] = d
    ptrs = {n: t.data_ptr() for n, t in dests.items()}
    with SafetensorsStreamer(chunk_bytes=4096) as streamer:
        streamer.stream_file(all_dtypes_file, destinations=dests)
        got = dict(streamer.get_tensors())
    assert all(got[n] is dests[n] and got[n].data_ptr() == ptrs[n] for n in dests)
    assert_bit_exact(got, ref)


@pytest.mark.parametrize("dst_dtype", [torch.bfloat16, torch.float32])
@pytest.mark.parametrize("rank", [0, 1, 2])
def test_shards_into_cpu_destinations(tmp_path, rank, dst_dtype):
    """Tensor-parallel shards without a device sink: a dim-0 shard of the checkpoint's dtype is
    read straight into its destination (only its bytes), a cast one through staging; a dim-1
    (strided) shard is read whole and cut once complete. Same values as torch's narrow + copy_."""
    from loader_plugins.core.header import TensorSpec
    from loader_plugins.core.tp import shard_block

    path = tmp_path / "tp.safetensors"
    w = torch.randn(7, 10).to(torch.bfloat16)
    save_file({"rows": w, "cols": w.clone()}, path)
    specs = {n: TensorSpec(n, "BF16", (7, 10), str(path), 0, 140) for n in ("rows", "cols")}
    blocks = {"rows": shard_block(specs["rows"], rank, 3, 0), "cols": shard_block(specs["cols"], rank, 3, 1)}
    want = {"rows": w.narrow(0, 3 * rank, min(3, 7 - 3 * rank)), "cols": w.narrow(1, 4 * rank, min(4, 10 - 4 * rank))}
    dests = {n: torch.full(t.shape, -1.0, dtype=dst_dtype) for n, t in want.items()}
    with SafetensorsStreamer(chunk_bytes=4096) as streamer:
        streamer.stream_file(path, destinations=dests, shards=blocks)
        got = dict(streamer.get_tensors())
    for name, expected in want.items():
        assert got[name] is dests[name]
        assert torch.equal(dests[name], expected.to(dst_dtype)), name


GATHER_CASES = [   # (dtype, shape, dim, world): strided shards (dim >= 1 of a tensor with more than one row)
    (torch.float32, (7, 10), 1, 3),
    (torch.bfloat16, (5, 33), 1, 4),
    (torch.float16, (3, 6, 5), 2, 2),
    (torch.float64, (4, 9, 6), 1, 4),
    (torch.int8, (129, 257), 1, 8),
    (torch.uint8, (2, 3, 4, 5), 3, 3),
    (torch.bool, (6, 7), 1, 2),
    (torch.float8_e4m3fn, (16, 100), 1, 3),
    (torch.int64, (3, 2), 1, 4),        # world larger than the dim: the last ranks hold nothing
]


@pytest.mark.parametrize("direct_io", ["auto", "on"])
@pytest.mark.parametrize("case", range(len(GATHER_CASES)))
def test_strided_shards_read_only_their_rows(tmp_path, case, direct_io):
    """A strided shard (split along dim >= 1) from a local file, for the CPU sink: only its rows
    are read (one short pread each, in bands of about chunk_bytes), straight into a contiguous
    destination of the checkpoint's dtype, through a shard-sized staging tensor otherwise
    (a cast, a strided destination). Every rank's shard equals torch's narrow, bit for bit;
    ``bytes_read`` is the shard's bytes. direct_io="on" reads the tensor whole and cuts it."""
    from loader_plugins.core.tp import shard_block, shard_shape

    dtype, shape, dim, world = GATHER_CASES[case]
    g = torch.Generator().manual_seed(case)
    w = (torch.randn(shape, generator=g) * 50).to(dtype) if dtype.is_floating_point or dtype == torch.bool else \
        torch.randint(0, 100, shape, generator=g).to(dtype)
    path = tmp_path / "w.safetensors"
    save_file({"w": w, "pad": torch.arange(3, dtype=torch.int16)}, path)
    with SafetensorsStreamer(chunk_bytes=4096, direct_io=direct_io, gather_min_row_bytes=0) as streamer:
        spec = streamer.open(path).tensors["w"]
        for rank in range(world):
            block = shard_block(spec, rank, world, dim)
            want = w.narrow(dim, *_narrow_args(shape[dim], rank, world))
            assert tuple(want.shape) == shard_shape(spec, rank, world, dim)
            dests = {"straight": torch.empty(want.shape, dtype=dtype),
                     "strided": torch.empty(tuple(reversed(want.shape)), dtype=dtype).permute(
                         *reversed(range(len(shape))))}
            if dtype.is_floating_point and dtype != torch.float8_e4m3fn:
                dests["cast"] = torch.empty(want.shape, dtype=torch.float32)
            for kind, dest in dests.items():
                streamer.stream_file(path, destinations={"w": dest}, shards={"w": block})
                got = dict(streamer.get_tensors())
                assert got["w"] is dest
                expected = want.to(dest.dtype)
                assert torch.equal(dest.contiguous().reshape(-1).view(torch.uint8), expected.contiguous().reshape(-1).view(torch.uint8)), \
                    (kind, rank)
                read = streamer.stats["bytes_read"] - 6          # the "pad" tensor is read too
                whole = direct_io == "on" and not block.contiguous    # (an empty shard reads nothing)
                assert read == (spec.nbytes if whole else block.nbytes), (kind, rank, read)


@pytest.mark.parametrize("row_bytes", [1024, 4096])
def test_rows_shorter_than_gather_min_row_bytes_are_read_whole(tmp_path, row_bytes):
    """The default (4 KiB): a tensor whose rows are shorter is read whole and cut (a pread per
    row would cost more than the bytes it skips); from 4 KiB on, row by row."""
    from loader_plugins.core.tp import shard_block

    w = torch.randn(64, row_bytes // 4)
    path = tmp_path / "w.safetensors"
    save_file({"w": w}, path)
    with SafetensorsStreamer() as streamer:
        spec = streamer.open(path).tensors["w"]
        block = shard_block(spec, 1, 2, 1)
        dest = torch.empty(64, row_bytes // 8)
        streamer.stream_file(path, destinations={"w": dest}, shards={"w": block})
        list(streamer.get_tensors())
        assert torch.equal(dest, w[:, row_bytes // 8:])
        assert streamer.stats["bytes_read"] == (spec.nbytes if row_bytes < 4096 else block.nbytes)


def _narrow_args(size: int, rank: int, world: int) -> tuple[int, int]:
    block = -(-size // world)
    start = min(rank * block, size)
    return start, min(block, size - start)


def test_a_strided_shard_reads_a_fraction_of_the_file(tmp_path):
    """Counted by the kernel (``/proc/self/io`` rchar: the bytes of every read call of this
    process): a rank's dim-1 shard of a 16 MB tensor at TP 8 reads about an eighth of it."""
    from loader_plugins.core.tp import shard_block

    path = tmp_path / "big.safetensors"
    save_file({"down_proj": torch.randn(1024, 4096)}, path)

    def rchar() -> int:
        with open("/proc/self/io") as f:
            return next(int(line.split()[1]) for line in f if line.startswith("rchar:"))

    with SafetensorsStreamer() as streamer:
        spec = streamer.open(path).tensors["down_proj"]
        block = shard_block(spec, 5, 8, 1)
        dest = torch.empty(1024, 512)
        before = rchar()
        streamer.stream_file(path, destinations={"down_proj": dest}, shards={"down_proj": block})
        list(streamer.get_tensors())
        read = rchar() - before
    assert torch.equal(dest, st_load_file(path)["down_proj"][:, 5 * 512:6 * 512])
    assert block.nbytes <= read < block.nbytes + (1 << 20), (read, block.nbytes, spec.nbytes)


def test_a_truncated_file_under_a_strided_shard_is_named(tmp_path):
    from loader_plugins.core.tp import shard_block

    path = tmp_path / "cut.safetensors"
    save_file({"w": torch.randn(64, 256)}, path)
    with SafetensorsStreamer() as streamer:
        spec = streamer.open(path).tensors["w"]
        os.truncate(path, os.path.getsize(path) - 5000)     # after the header was read: the rows' reads find it
        with pytest.raises(StreamerError) as info:
            streamer.stream_file(path, destinations={"w": torch.empty(64, 128)},
                                 shards={"w": shard_block(spec, 1, 2, 1)})
            list(streamer.get_tensors())
    assert "cut.safetensors" in str(info.value) and "truncated" in str(info.value)


def test_shard_destination_of_the_wrong_size_is_an_error(tmp_path):
    from loader_plugins.core.header import TensorSpec
    from loader_plugins.core.tp import shard_block

    path = tmp_path / "tp.safetensors"
    save_file({"w": torch.randn(6, 4)}, path)
    block = shard_block(TensorSpec("w", "F32", (6, 4), str(path), 0, 96), 0, 2, 0)
    with SafetensorsStreamer() as streamer:
        streamer.stream_file(path, destinations={"w": torch.empty(2, 4)}, shards={"w": block})
        with pytest.raises(DestinationError, match="must be a tensor holding the 12 elements"):
            list(streamer.get_tensors())


def test_cast_into_destination_of_other_dtype(tmp_path):
    path = tmp_path / "bf16.safetensors"
    src = torch.randn(64, 48).to(torch.bfloat16)
    save_file({"w": src, "b": torch.randn(5).half()}, path)
    dests = {"w": torch.zeros(64, 48, dtype=torch.float32), "b": torch.zeros(5, dtype=torch.bfloat16)}
    with SafetensorsStreamer() as streamer:
        streamer.stream_file(path, destinations=dests)
        got = dict(streamer.get_tensors())
    assert got["w"] is dests["w"] and torch.equal(dests["w"], src.float())
    assert torch.equal(dests["b"], st_load_file(path)["b"].to(torch.bfloat16))


def test_non_contiguous_destination(tmp_path):
    path = tmp_path / "t.safetensors"
    src = torch.randn(8, 6)
    save_file({"w": src}, path)
    base = torch.zeros(6, 8)
    dest = base.t()
    with SafetensorsStreamer() as streamer:
        streamer.stream_file(path, destinations={"w": dest})
        list(streamer.get_tensors())
    assert torch.equal(base.t(), src)


@pytest.mark.parametrize("dest, message", [
    (torch.zeros(4, 4), r"has shape \(4, 4\)"),
    (torch.zeros(8, 6, dtype=torch.int32), "only casts between floating-point"),
    ("not a tensor", "not a tensor"),
])
def test_bad_destination_rejected_before_any_read(tmp_path, dest, message):
    path = tmp_path / "t.safetensors"
    save_file({"w": torch.randn(8, 6), "v": torch.randn(3)}, path)
    other = torch.zeros(3)
    with SafetensorsStreamer() as streamer:
        streamer.stream_file(path, destinations={"w": dest, "v": other})
        with pytest.raises(DestinationError, match=message) as err:
            list(streamer.get_tensors())
    assert "'w'" in str(err.value) and str(path) in str(err.value)
    assert torch.equal(other, torch.zeros(3)), "nothing may be written when a destination is bad"


def test_unknown_option_lists_allowed_keys(tmp_path):
    with pytest.raises(ConfigError, match="allowed keys are: concurrency, chunk_bytes"):
        load_file(tmp_path, concurrancy=4)
    with pytest.raises(ConfigError, match="direct_io"):
        StreamerConfig.from_dict({"direct_io": "sometimes"})
    with pytest.raises(ConfigError, match="memory_limit"):
        StreamerConfig.from_dict({"memory_limit": 10, "chunk_bytes": 4096})


def test_concurrency_is_chosen_per_load_unless_given(monkeypatch):
    from loader_plugins import config as config_module

    monkeypatch.setattr(config_module.os, "cpu_count", lambda: 2)
    auto = StreamerConfig()
    assert auto.concurrency is None and auto.workers() == 8 and auto.workers(remote=True) == 16
    monkeypatch.setattr(config_module.os, "cpu_count", lambda: 64)
    assert auto.workers() == 32 and auto.workers(remote=True) == 32
    given = StreamerConfig.from_dict({"concurrency": "4"})
    assert given.workers() == 4 and given.workers(remote=True) == 4
    assert StreamerConfig.from_dict({"concurrency": "auto"}).concurrency is None
    assert StreamerConfig.from_dict({"concurrency": None}).concurrency is None
    for bad in (0, 2000, True, "many"):
        with pytest.raises(ConfigError, match="concurrency"):
            StreamerConfig.from_dict({"concurrency": bad})


def test_s3_reads_are_planned_in_s3_range_bytes():
    cfg = StreamerConfig.from_dict({"s3_range_bytes": "8MiB"})
    assert cfg.read_bytes(remote=True) == 8 << 20 and cfg.read_bytes() == cfg.chunk_bytes
    assert StreamerConfig().s3_range_bytes == 32 << 20
    with pytest.raises(ConfigError, match="s3_range_bytes"):
        StreamerConfig.from_dict({"s3_range_bytes": 100})


def test_truncated_file_is_a_header_error(tmp_path):
    path = tmp_path / "t.safetensors"
    save_file({"a": torch.randn(100), "b": torch.randn(1000)}, path)
    data = path.read_bytes()
    path.write_bytes(data[:-10])
    with pytest.raises(HeaderError) as err:
        load_file(path)
    assert "'b'" in str(err.value) and str(path) in str(err.value) and "truncated" in str(err.value)


def _many_files(tmp_path, n=6, size=300_000):
    gen = torch.Generator().manual_seed(0)
    for i in range(n):
        save_file({f"t{i}.{j}": torch.randn(size // 4 // 3, generator=gen) for j in range(3)},
                  tmp_path / f"s{i}.safetensors")
    return sorted(tmp_path.glob("*.safetensors"))


@pytest.mark.parametrize("direct_io", ["off", "on"])
def test_file_truncated_during_load_fails_cleanly(tmp_path, direct_io):
    files = _many_files(tmp_path)
    fds, threads = _fds(), len(_streamer_threads())
    victim = files[-1]
    # a small memory limit holds the reader to the first files until the consumer takes tensors,
    # so the last file is certainly read after it was truncated
    with SafetensorsStreamer(concurrency=4, chunk_bytes=8192, direct_io=direct_io,
                             memory_limit=400_000) as streamer:
        streamer.stream_files(files)
        it = streamer.get_tensors()
        first = next(it)[0]
        assert not first.startswith("t5.")
        os.truncate(victim, 4096)   # headers were parsed; the data is gone now
        with pytest.raises(SourceError) as err:
            for _ in it:
                pass
    text = str(err.value)
    assert str(victim) in text and "bytes [" in text and "tensor 't5." in text
    assert isinstance(err.value, OSError)
    assert len(_streamer_threads()) == threads
    assert _fds() == fds


def test_consumer_stopping_early_cleans_up(tmp_path):
    files = _many_files(tmp_path)
    fds, threads = _fds(), len(_streamer_threads())
    with SafetensorsStreamer(concurrency=4, chunk_bytes=8192, memory_limit=65536) as streamer:
        streamer.stream_files(files)
        for _name, _tensor in streamer.get_tensors():
            break
    assert len(_streamer_threads()) == threads
    assert _fds() == fds
    # a generator abandoned without the context manager is cleaned up when closed
    streamer = SafetensorsStreamer(concurrency=4, chunk_bytes=8192)
    streamer.stream_files(files)
    gen = streamer.get_tensors()
    next(gen)
    gen.close()
    assert len(_streamer_threads()) == threads
    assert _fds() == fds


def test_memory_limit_bounds_bytes_held(tmp_path):
    files = _many_files(tmp_path, n=4, size=600_000)
    limit = 256 * 1024
    peaks = []
    with SafetensorsStreamer(concurrency=3, chunk_bytes=16384, memory_limit=limit, direct_io="off") as streamer:
        streamer.stream_files(files)
        got = {}
        for name, tensor in streamer.get_tensors():
            got[name] = tensor
            peaks.append((streamer._reader.peak_held, streamer._reader.limit))
    assert_bit_exact(got, {k: v for f in files for k, v in st_load_file(f).items()})
    peak, effective = peaks[-1]
    assert effective is not None and effective <= limit
    assert 0 < peak <= effective


def test_index_errors(tmp_path):
    tensors = {"a": torch.randn(3), "b": torch.randn(4)}
    save_file({"a": tensors["a"]}, tmp_path / "s1.safetensors")
    save_file({"b": tensors["b"]}, tmp_path / "s2.safetensors")
    index = tmp_path / "model.safetensors.index.json"

    def with_map(weight_map):
        index.write_text(json.dumps({"weight_map": weight_map}))
        return tmp_path

    with pytest.raises(IndexFileError, match="'missing.safetensors'.*does not exist"):
        load_file(with_map({"a": "s1.safetensors", "b": "missing.safetensors"}))
    for bad in ("../x.safetensors", "/etc/passwd", "sub/../../x", "a\\b", "C:x"):
        with pytest.raises(IndexFileError, match="outside the checkpoint"):
            load_file(with_map({"a": "s1.safetensors", "b": bad}))
    with pytest.raises(IndexFileError, match="'b'.*not in"):
        load_file(with_map({"a": "s1.safetensors", "b": "s1.safetensors"}))
    index.write_text("{not json")
    with pytest.raises(IndexFileError, match="not valid JSON"):
        load_file(tmp_path)
    index.write_text(json.dumps({"weights": {}}))
    with pytest.raises(IndexFileError, match="weight_map"):
        load_file(tmp_path)
    outside = tmp_path.parent / "outside.safetensors"
    save_file({"b": tensors["b"]}, outside)
    (tmp_path / "link.safetensors").symlink_to(outside)
    with pytest.raises(IndexFileError, match="outside the checkpoint directory"):
        load_file(with_map({"a": "s1.safetensors", "b": "link.safetensors"}))
    assert_bit_exact(load_file(with_map({"a": "s1.safetensors", "b": "s2.safetensors"})), tensors)


def test_duplicate_tensor_across_shards(tmp_path):
    save_file({"a": torch.randn(3)}, tmp_path / "s1.safetensors")
    save_file({"a": torch.randn(3)}, tmp_path / "s2.safetensors")
    with pytest.raises(HeaderError, match="'a' appears in both") as err:
        load_file(tmp_path)
    assert isinstance(err.value, ValueError)


def test_missing_path(tmp_path):
    with pytest.raises(SourceError, match="no such file"):
        load_file(tmp_path / "nope.safetensors")
    with pytest.raises(SourceError, match="no \\*.safetensors"):
        load_file(tmp_path)


def test_close_from_another_thread_stops_the_consumer(tmp_path):
    files = _many_files(tmp_path, n=6, size=2_000_000)
    threads = len(_streamer_threads())
    streamer = SafetensorsStreamer(concurrency=2, chunk_bytes=4096, memory_limit=65536)
    streamer.stream_files(files)
    outcome = {}
    first = threading.Event()

    def consume():
        try:
            for _ in streamer.get_tensors():
                first.set()
            outcome["finished"] = True
        except StreamerError as exc:
            outcome["error"] = exc
        finally:
            first.set()

    consumer = threading.Thread(target=consume)
    consumer.start()
    assert first.wait(60)
    streamer.close()
    consumer.join(60)
    assert not consumer.is_alive()
    assert "finished" in outcome or "closed" in str(outcome.get("error"))
    assert len(_streamer_threads()) == threads


def test_prefault_keeps_contents_of_caller_memory():
    """The sink pre-faults destination pages before each read; the caller's bytes must survive it."""
    import torch

    from loader_plugins import StreamerConfig
    from loader_plugins.core.sinks.cpu import CpuSink, tensor_buffer

    sink = CpuSink(StreamerConfig(pin_memory="off"))
    data = torch.arange(3 << 20, dtype=torch.int32)
    expected = data.clone()
    view = tensor_buffer(data)
    sink.prefault(view[123:len(view) - 4567])   # unaligned edges: only whole pages inside are touched
    sink.prefault(view[:10])                    # too small: nothing to do
    assert torch.equal(data, expected)


def test_prefault_says_whether_the_pages_were_fresh():
    import mmap

    from loader_plugins.core.sinks.cpu import CpuSink

    sink = CpuSink(StreamerConfig(pin_memory="off"))
    region = mmap.mmap(-1, 4 << 20)              # a new anonymous mapping: no page mapped yet
    view = memoryview(region)
    assert sink.prefault(view[:2 << 20]) is True
    assert sink.prefault(view[:2 << 20]) is False     # mapped now
    view[3 << 20] = 7                                 # touched by its owner
    assert sink.prefault(view[3 << 20:]) is False
    del view
    region.close()


class _CountingPool:
    """A real BufferPool that counts the staging buffers it lends."""

    def __init__(self, *args):
        from loader_plugins.core.sources.base import BufferPool

        self.pool, self.lent = BufferPool(*args), 0
        self.copier = self.pool.copier

    def acquire(self, wait=True):
        buf = self.pool.acquire(wait)
        self.lent += buf is not None
        return buf

    def release(self, buf):
        self.pool.release(buf)


def _direct_blob(tmp_path, nbytes: int):
    """``nbytes`` of random data in a file, and a LocalSource reading it with O_DIRECT (skips the
    test where the file system refuses O_DIRECT)."""
    from loader_plugins.core.sources.local import LocalSource

    data = os.urandom(nbytes)
    path = tmp_path / "blob"
    path.write_bytes(data)
    source = LocalSource(str(path), direct_io="on")
    if source._direct_fd() is None:
        source.close()
        pytest.skip(f"{tmp_path} does not take O_DIRECT")
    return data, source


@pytest.mark.parametrize("fresh", [False, True])
def test_direct_reads_into_fresh_memory_go_through_staging(tmp_path, fresh):
    """Memory faulted in just before the read is scattered 4 KiB pages: O_DIRECT reads it through a
    huge-page staging buffer (long device requests) and copies. Memory mapped before is read in place."""
    import mmap

    data, source = _direct_blob(tmp_path, (5 << 20) + 777)
    pool = _CountingPool(1 << 20, 2)
    region = mmap.mmap(-1, 4 << 20)
    region[:] = b"\xff" * len(region)           # mapped before the read, same alignment as the file
    view = memoryview(region)
    try:
        source.read_into(8192, view[8192:8192 + (3 << 20) + 5], pool=pool, fresh=fresh)
        assert bytes(view[8192:8192 + (3 << 20) + 5]) == data[8192:8192 + (3 << 20) + 5]
        assert view[8191] == 0xff and view[8192 + (3 << 20) + 5] == 0xff
        assert (pool.lent > 0) == fresh
    finally:
        del view
        region.close()
        source.close()
        pool.pool.close()


def test_fresh_tensors_read_with_odirect_are_bit_exact(tmp_path, monkeypatch):
    """The reader's own tensors are fresh memory: O_DIRECT fills them through staging buffers."""
    from loader_plugins.core.sources.base import BufferPool

    lent = []
    acquire = BufferPool.acquire
    monkeypatch.setattr(BufferPool, "acquire", lambda self, wait=True: lent.append(1) or acquire(self, wait))
    g = torch.Generator().manual_seed(11)
    tensors = {"a": torch.randn(1 << 20, generator=g), "b": torch.randn(333, 4099, generator=g).to(torch.bfloat16),
               "c": torch.randint(0, 255, (3 << 20,), dtype=torch.uint8, generator=g),
               "d": torch.randn(3, generator=g)}
    path = tmp_path / "m.safetensors"
    save_file(tensors, str(path))
    got = load_file(path, direct_io="on", concurrency=3, chunk_bytes=1 << 20)
    assert_bit_exact(got, st_load_file(str(path)))
    if _takes_direct(path):
        assert lent


def _takes_direct(path) -> bool:
    from loader_plugins.core.sources.local import LocalSource

    source = LocalSource(str(path), direct_io="on")
    try:
        return source._direct_fd() is not None
    finally:
        source.close()


@pytest.mark.parametrize("count", [1, 2, 4])
def test_staged_reads_copy_behind_the_next_read(tmp_path, spares, count):
    """Bytes read through staging buffers are copied to the destination on the copy-behind
    thread while the worker reads on; with one buffer it waits for each copy, with two it reads
    the next piece meanwhile. The destination is unaligned (never read in place), spans many
    buffers, and ends bit-exact with its neighbouring bytes untouched; every buffer goes back."""
    import mmap

    from loader_plugins.core.sources.base import BufferPool

    data, source = _direct_blob(tmp_path, (9 << 20) + 4321)
    pool = BufferPool(1 << 20, count, copy_behind=True)
    copier_thread = pool.copier._thread
    assert copier_thread.ident is None        # started by the first copy, not by the pool
    region = mmap.mmap(-1, 10 << 20)
    region[:] = b"\xee" * len(region)
    view = memoryview(region)
    at, offset, length = 1000 + 3, 4096 + 17, (7 << 20) + 999     # memory and file alignment differ
    copies = []
    try:
        source.read_into(offset, view[at:at + length], pool=pool)
        assert bytes(view[at:at + length]) == data[offset:offset + length]
        assert view[at - 1] == 0xee and view[at + length] == 0xee
        assert pool._made <= count and len(pool._free) == pool._made    # all returned
        assert copier_thread.is_alive()
        # a load cancelled part way returns with no copy in flight and every buffer back
        cancelled = threading.Event()
        orig = pool.copier.submit

        def submit_then_cancel(*args):
            copies.append(args[2])
            orig(*args)
            cancelled.set()
        pool.copier.submit = submit_then_cancel
        region[:] = b"\xee" * len(region)
        source.read_into(offset, view[at:at + length], pool=pool, cancelled=cancelled)
        assert len(copies) == 1 and bytes(view[at:at + copies[0]]) == data[offset:offset + copies[0]]
        assert view[at + copies[0]] == 0xee                      # nothing after the cancel was copied
        assert len(pool._free) == pool._made
    finally:
        del view
        pool.close()
        region.close()
        source.close()
    assert not copier_thread.is_alive()       # the pool stops its copy thread


def test_staged_copies_run_on_the_copy_thread(tmp_path, spares, monkeypatch):
    """The copies of a load through staging buffers happen on the pool's copy-behind thread, not
    on the workers (with ``COPY_BEHIND = False``, on the workers); the result is bit-exact."""
    from loader_plugins.core import reader
    from loader_plugins.core.sources import local, staging

    g = torch.Generator().manual_seed(5)
    tensors = {"w": torch.randn(777, 1031, generator=g).to(torch.bfloat16),
               "b": torch.randint(-99, 99, (3 << 18,), dtype=torch.int32, generator=g), "s": torch.tensor(2.5)}
    path = tmp_path / "m.safetensors"
    save_file(tensors, str(path))
    if not _takes_direct(path):
        pytest.skip(f"{tmp_path} does not take O_DIRECT")
    expected = st_load_file(str(path))
    import ctypes

    threads_copying: list[str] = []

    class _Recording:   # the real ctypes, with memmove noting the thread it runs on
        @staticmethod
        def memmove(dst, src, n):
            threads_copying.append(threading.current_thread().name)
            return ctypes.memmove(dst, src, n)

        def __getattr__(self, name):
            return getattr(ctypes, name)
    for copy_behind in (True, False):
        threads_copying.clear()
        monkeypatch.setattr(reader, "COPY_BEHIND", copy_behind)
        monkeypatch.setattr(staging, "ctypes", _Recording())
        monkeypatch.setattr(local, "ctypes", _Recording())
        dests = {n: torch.zeros_like(t) for n, t in tensors.items()}
        with SafetensorsStreamer(StreamerConfig(direct_io="on", chunk_bytes=1 << 20, concurrency=3)) as s:
            s.stream_file(str(path), destinations=dests)
            names = [n for n, _ in s.get_tensors()]
        assert sorted(names) == sorted(tensors)
        assert_bit_exact(dests, expected)
        assert threads_copying
        on_copier = {t for t in threads_copying if t == "streamer-copy"}
        assert bool(on_copier) == copy_behind
        assert all(t == "streamer-copy" for t in threads_copying) == copy_behind


@pytest.fixture
def spares(monkeypatch):
    from loader_plugins.core.sources import staging

    staging._spares.clear()
    yield staging._spares
    staging._spares.clear()


def test_staging_buffers_are_kept_for_the_next_load_then_freed(spares, monkeypatch):
    from loader_plugins.core.sources.base import BufferPool

    monkeypatch.setattr(spares, "keep_seconds", 0.2)
    pool = BufferPool(1 << 20, 2)
    first, second = pool.acquire(), pool.acquire()
    pool.release(first)
    pool.close()                  # the free buffer goes to the spares ...
    assert spares.held_bytes() == 1 << 20
    pool.release(second)          # ... and one released after close too
    assert spares.held_bytes() == 2 << 20
    again = BufferPool(1 << 20, 2)
    reused = again.acquire()
    assert reused in (first, second)     # the next load reuses them
    assert spares.held_bytes() == 1 << 20
    assert BufferPool(2 << 20, 1).acquire() not in (first, second)   # only buffers of the same size
    again.release(reused)
    again.close()
    assert spares.held_bytes() == 2 << 20
    deadline = time.monotonic() + 30
    while spares.held_bytes() and time.monotonic() < deadline:
        time.sleep(0.05)
    assert spares.held_bytes() == 0 and first.closed and second.closed   # unmapped once idle


def test_spare_staging_buffers_are_bounded(spares, monkeypatch):
    from loader_plugins.core.sources.base import BufferPool

    monkeypatch.setattr(spares, "max_bytes", 3 << 20)
    pool = BufferPool(1 << 20, 5)
    bufs = [pool.acquire() for _ in range(5)]
    for buf in bufs:
        pool.release(buf)
    pool.close()
    assert spares.held_bytes() == 3 << 20
    assert sum(buf.closed for buf in bufs) == 2


def test_a_forked_child_does_not_inherit_spare_buffers(spares):
    from loader_plugins.core.sources.base import BufferPool

    pool = BufferPool(1 << 20, 1)
    pool.release(pool.acquire())
    pool.close()
    assert spares.held_bytes() == 1 << 20
    pid = os.fork()
    if pid == 0:
        os._exit(0 if spares.held_bytes() == 0 else 1)
    _, status = os.waitpid(pid, 0)
    assert os.waitstatus_to_exitcode(status) == 0
    assert spares.held_bytes() == 1 << 20


def test_loads_reusing_staging_buffers_stay_bit_exact(tmp_path, spares):
    """Unaligned tensors read with O_DIRECT through staging buffers, twice in one process."""
    tensors = {f"t{i}": torch.randint(0, 255, (4096 * 3 + i * 7,), dtype=torch.uint8) for i in range(1, 6)}
    path = tmp_path / "m.safetensors"
    save_file(tensors, str(path))
    expected = st_load_file(str(path))
    for _ in range(2):
        dests = {n: torch.zeros_like(t) for n, t in tensors.items()}
        with SafetensorsStreamer(StreamerConfig(direct_io="on", chunk_bytes=8192, concurrency=3)) as s:
            s.stream_file(str(path), destinations=dests)
            for _ in s.get_tensors():
                pass
        assert_bit_exact(dests, expected)
    assert spares.held_bytes() > 0


class _HeldSource:
    """Wraps a real local source; the read of byte ``hold_at`` waits until every other read is
    done (a fault we cannot cause for real: one connection or disk region stalling)."""

    def __init__(self, inner, hold_at: int, others: int):
        self.inner, self.hold_at, self.others = inner, hold_at, others
        self.uri = inner.uri
        self.readers: dict[int, str] = {}
        self.done = 0
        self.lock = threading.Lock()
        self.others_done = threading.Event()

    def read_into(self, offset, dest, *, pool=None, cancelled=None, slack=False, fresh=False):
        if offset == self.hold_at and not self.others_done.wait(60):
            raise SourceError(f"held read at {offset}: the other workers never took the held worker's items")
        self.inner.read_into(offset, dest, pool=pool, cancelled=cancelled, slack=slack, fresh=fresh)
        with self.lock:
            self.readers[offset] = threading.current_thread().name
            if offset != self.hold_at:
                self.done += 1
                if self.done == self.others:
                    self.others_done.set()

    def __getattr__(self, name):
        return getattr(self.inner, name)


def test_idle_workers_take_items_of_a_stalled_worker(tmp_path):
    """Worker 0's first read stalls until all other reads are done: only if the other workers
    take worker 0's remaining items can the load finish; the result stays bit-exact."""
    from loader_plugins.core.checkpoint import open_checkpoint
    from loader_plugins.core.plan import plan_reads
    from loader_plugins.core.reader import StreamReader

    tensors = {f"w{i}": torch.randint(-1000, 1000, (1024 + 17 * i,), dtype=torch.int32) for i in range(12)}
    path = tmp_path / "m.safetensors"
    save_file(tensors, str(path))
    config = StreamerConfig(concurrency=3, chunk_bytes=4096, direct_io="off", pin_memory="off")
    sources: dict = {}
    specs = list(open_checkpoint(str(path), config, sources=sources).tensors.values())
    (uri, inner), = sources.items()
    plan = plan_reads(sorted(specs, key=lambda s: s.offset), 3, config.chunk_bytes)
    held = plan.workers[0]
    assert len(held) >= 3
    source = _HeldSource(inner, held[0].file_offset, sum(len(w) for w in plan.workers) - 1)
    try:
        reader = StreamReader(specs, {uri: source}, config)
        got = dict(reader)
    finally:
        inner.close()
    assert_bit_exact(got, st_load_file(str(path)))
    assert source.readers[held[0].file_offset] == "streamer-0"
    assert all(source.readers[item.file_offset] != "streamer-0" for item in held[1:])
    assert reader._windows[0].queues.stolen >= len(held) - 1


def test_the_c_library_is_loaded_once_for_all_workers(monkeypatch):
    """The first load's workers all ask for libc at once; it is loaded once, without running
    ``ldconfig`` (``ctypes.util.find_library``) in a subprocess per worker."""
    import ctypes.util

    from loader_plugins.core import _libc

    calls = []
    monkeypatch.setattr(ctypes.util, "find_library", lambda name: calls.append(name) or "libc.so.6")
    monkeypatch.setattr(_libc, "_libc", None)
    start = threading.Barrier(16)
    got = []

    def ask():
        start.wait()
        got.append(_libc.libc())

    threads = [threading.Thread(target=ask) for _ in range(16)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(30)
    assert len(got) == 16 and got[0] and all(lib is got[0] for lib in got)
    assert calls == []


def test_page_cache_residency_is_asked_per_range_and_both_kernel_calls_agree(tmp_path, monkeypatch):
    """direct_io="auto" asks which ranges are cached: cachestat (Linux 6.5+), else mincore. A file
    with a hole evicted from the page cache in the middle gets the same answers either way."""
    from loader_plugins.core import _libc
    from loader_plugins.core.sources.local import LocalSource

    page, mib = 4096, 1 << 20
    path = tmp_path / "blob"
    path.write_bytes(os.urandom(8 * mib))
    with open(path, "rb") as f:
        os.fsync(f.fileno())
        f.read()                                                  # every page cached
        # evicted: [2 MiB, 4 MiB), whole 2 MiB-aligned blocks (the page cache keeps large folios whole)
        os.posix_fadvise(f.fileno(), 2 * mib, 2 * mib, os.POSIX_FADV_DONTNEED)
    ranges = [(0, 8 * mib), (0, 2 * mib), (100, 5000), (2 * mib - 1, 2), (4 * mib - 3, 3), (4 * mib, 4 * mib),
              (5 * mib + 5, page), (2 * mib - page, page + 1), (3 * mib, 1)]
    expected = [False, True, True, False, False, True, True, False, False]
    source = LocalSource(str(path), direct_io="auto")
    try:
        if _libc.cached_pages(source._fd, 0, page) is None:
            pytest.skip("this kernel has no cachestat (before Linux 6.5); the mincore path is the only one")
        if _libc.cached_pages(source._fd, 3 * mib, page):
            pytest.skip(f"{tmp_path} keeps evicted pages (tmpfs?): nothing to tell apart")
        assert [source._cached(o, n) for o, n in ranges] == expected
        monkeypatch.setattr(_libc, "_cachestat_missing", True)   # the fallback, as on an older kernel
        assert _libc.cached_pages(source._fd, 0, page) is None
        assert [source._cached(o, n) for o, n in ranges] == expected
    finally:
        source.close()
