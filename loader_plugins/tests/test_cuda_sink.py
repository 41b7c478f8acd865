"""The CUDA sink's logic on the CPU (core/sinks/cuda.py).

:class:`FakeCudaBackend` is a fake: "device" memory is host memory and each stream is a queue
that runs only when the host waits (or, in ``eager`` mode, whenever the sink polls an event), so
a pinned buffer reused before its copies ran shows up as wrong bytes. Kernels are emulated with
torch's CPU casts; the real kernels are checked in test_native.py (CPU) and
integration_tests/test_gpu.py (GPU).
"""

from __future__ import annotations

import collections
import ctypes
import math
import mmap
import subprocess
import sys
import threading

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from loader_plugins.config import StreamerConfig
from loader_plugins.core.header import TensorSpec, safetensors_dtype, torch_dtype
from loader_plugins.core.sinks import cuda as cs
from loader_plugins.core.sinks.cpu import CpuSink
from loader_plugins.core.sinks.cuda import CudaBackend, CudaSink, PinnedRing, column_rects, plan_chunk, ring_geometry
from loader_plugins.core.sources.local import LocalSource
from loader_plugins.core.tp import ColumnBlock, shard_block
from loader_plugins.errors import DestinationError, SourceError, StreamerError

_NATIVE_TO_TORCH = {v: torch_dtype(k) for k, v in cs.NATIVE_DTYPES.items() if getattr(torch, {
    "F8_E4M3": "float8_e4m3fn", "F8_E5M2": "float8_e5m2", "F8_E4M3FNUZ": "float8_e4m3fnuz",
    "F8_E5M2FNUZ": "float8_e5m2fnuz"}.get(k, "float32"), None) is not None}


def _view(ptr: int, nbytes: int) -> torch.Tensor:
    return torch.frombuffer((ctypes.c_char * nbytes).from_address(ptr), dtype=torch.uint8) if nbytes else \
        torch.empty(0, dtype=torch.uint8)


class _FakeStream:
    def __init__(self, backend):
        self.backend = backend
        self.queue: collections.deque = collections.deque()
        self.enqueued = 0
        self.done = 0

    def run(self, upto: int) -> None:
        while self.done < upto:
            op = self.queue.popleft()
            op()
            self.done += 1


class _FakeEvent:
    def __init__(self):
        self.stream = None
        self.seq = 0


class FakeCudaBackend(CudaBackend):
    """A fake CUDA device on the CPU (see the module docstring); counts host waits."""

    def __init__(self, eager: bool = False):
        self.eager = eager
        self.lock = threading.RLock()
        self.memory: dict[int, object] = {}
        self.streams: list[_FakeStream] = []
        self.calls: collections.Counter = collections.Counter()

    def owns(self, dest) -> bool:
        return dest.device.type == "cpu"

    def address(self, dest) -> int:
        return dest.data_ptr()

    def _alloc(self, nbytes: int, kind: str) -> int:
        buf = mmap.mmap(-1, nbytes)            # page-aligned, like cudaHostAlloc
        buf.write(b"\xa5" * nbytes)            # garbage, never zeros
        ptr = ctypes.addressof(ctypes.c_char.from_buffer(buf))
        with self.lock:
            self.memory[ptr] = (kind, buf)
            self.calls[f"alloc_{kind}"] += 1
        return ptr

    def _free(self, ptr: int, kind: str) -> None:
        with self.lock:
            assert self.memory.pop(ptr)[0] == kind
            self.calls[f"free_{kind}"] += 1

    def alloc_pinned(self, nbytes):
        return self._alloc(nbytes, "pinned")

    def free_pinned(self, ptr):
        self._free(ptr, "pinned")

    def alloc_device(self, nbytes):
        return self._alloc(nbytes, "device")

    def free_device(self, ptr):
        self._free(ptr, "device")

    def new_stream(self):
        stream = _FakeStream(self)
        self.streams.append(stream)
        return stream

    def new_event(self):
        return _FakeEvent()

    def record(self, event, stream):
        with self.lock:
            event.stream, event.seq = stream, stream.enqueued

    def query(self, event) -> bool:
        with self.lock:
            if event.stream is None:
                return True
            if self.eager:                     # the device keeps up: the work is done by now
                event.stream.run(event.seq)
            return event.stream.done >= event.seq

    def wait_event(self, event):
        with self.lock:
            self.calls["wait_event"] += 1
            if event.stream is not None:
                event.stream.run(event.seq)

    def synchronize(self, stream):
        with self.lock:
            self.calls["synchronize"] += 1
            stream.run(stream.enqueued)

    def device_synchronize(self):
        with self.lock:
            self.calls["device_synchronize"] += 1
            for s in self.streams:
                s.run(s.enqueued)

    def _enqueue(self, stream, fn, name):
        with self.lock:
            self.calls[name] += 1
            stream.queue.append(fn)
            stream.enqueued += 1

    def memcpy(self, dst, src, nbytes, stream):
        self._enqueue(stream, lambda: ctypes.memmove(dst, src, nbytes), "memcpy")

    def memcpy2d(self, dst, dst_pitch, src, src_pitch, width, height, stream):
        def run():
            for r in range(height):
                ctypes.memmove(dst + r * dst_pitch, src + r * src_pitch, width)
        self._enqueue(stream, run, "memcpy2d")

    def launch_convert(self, kernel, src, dst, count, stream):
        _, _, s, _, d = kernel.split("_")
        s_t, d_t = _NATIVE_TO_TORCH[s], _NATIVE_TO_TORCH[d]

        def run():
            out = _view(src, count * s_t.itemsize).view(s_t).to(d_t).view(torch.uint8)
            _view(dst, count * d_t.itemsize).copy_(out)
        self._enqueue(stream, run, "convert")

    def launch_strided(self, itemsize, src, dst, rows, cols, in_pitch, out_pitch, stream):
        def run():
            for r in range(rows):
                ctypes.memmove(dst + r * out_pitch * itemsize, src + r * in_pitch * itemsize, cols * itemsize)
        self._enqueue(stream, run, "strided")


def _config(**kw) -> StreamerConfig:
    base = {"chunk_bytes": 4096, "memory_limit": 4 * (4096 + 2 * 4096), "concurrency": 2, "progress": "off"}
    return StreamerConfig.from_dict({**base, **kw})


def _random(shape, dtype, seed=0) -> torch.Tensor:
    gen = torch.Generator().manual_seed(seed)
    if dtype.is_floating_point and dtype.itemsize >= 2:
        return (torch.randn(shape, generator=gen) * 3).to(dtype)
    n = math.prod(shape) * dtype.itemsize
    return torch.randint(1, 255, (n,), dtype=torch.uint8, generator=gen).view(dtype).reshape(shape)


def _poisoned(shape, dtype) -> torch.Tensor:
    t = torch.empty(shape, dtype=dtype)
    t.view(torch.uint8).fill_(0x7B) if t.numel() else None
    return t


def _chunks(nbytes: int, step: int):
    for offset in range(0, nbytes, step):
        yield offset, min(step, nbytes - offset)


# ---- pure planning -------------------------------------------------------------------------

@settings(max_examples=300, deadline=None)
@given(st.integers(1, 9), st.integers(1, 12), st.integers(1, 4), st.data())
def test_column_rects_select_exactly_the_block(rows, cols, world, data):
    rank = data.draw(st.integers(0, world - 1))
    spec = TensorSpec("w", "U8", (rows, cols), "f", 0, rows * cols)
    block = shard_block(spec, rank, world, 1)
    src = torch.arange(1, rows * cols + 1, dtype=torch.int32)       # element ids, never zero
    want = src.reshape(rows, cols)[:, block.start:block.start + block.width].reshape(-1)
    got = torch.zeros(block.nbytes, dtype=torch.int32)
    offset = 0
    step = data.draw(st.integers(1, rows * cols))
    while offset < rows * cols:
        n = min(step, rows * cols - offset)
        rects = column_rects(offset, n, block)
        assert len(rects) <= 3
        out = [r.dst_offset + k for r in rects for k in range(r.width * r.height)]
        if out:                                  # the rectangles fill one contiguous range, in order
            assert out == list(range(out[0], out[0] + len(out)))
        for r in rects:
            for h in range(r.height):
                s = offset + r.src_offset + h * block.row_bytes
                assert offset <= s and s + r.width <= offset + n
                got[r.dst_offset + h * block.width:r.dst_offset + h * block.width + r.width] = src[s:s + r.width]
        offset += n
    assert torch.equal(got, want)


def test_plan_chunk_shapes():
    block = ColumnBlock(rows=4, row_bytes=64, start=16, width=32)
    assert plan_chunk(0, 64, 2, 2, None) == [cs.Copy("host", 0, "dest", 0, 64)]
    ops = plan_chunk(8, 64, 2, 4, "lp_convert_bf16_to_f32")
    assert ops == [cs.Copy("host", 0, "stage", 0, 64), cs.Convert("lp_convert_bf16_to_f32", "stage", 0, "dest", 16, 32)]
    wide = plan_chunk(0, 256, 2, 2, None, block, min_2d_width=32)
    assert wide == [cs.Copy2D("host", 16, 64, "dest", 0, 32, 32, 4)]
    narrow = plan_chunk(0, 256, 2, 2, None, block, min_2d_width=64)
    assert [type(op).__name__ for op in narrow] == ["Copy", "StridedCopy"]
    converted = plan_chunk(40, 190, 2, 4, "lp_convert_bf16_to_f32", block)
    assert [type(op).__name__ for op in converted] == ["Copy", "StridedCopy", "StridedCopy", "StridedCopy", "Convert"]
    rows0 = ColumnBlock(rows=1, row_bytes=640, start=128, width=256)     # a dim-0 shard: linear copies
    assert plan_chunk(100, 200, 2, 2, None, rows0) == [cs.Copy("host", 28, "dest", 0, 172)]
    assert plan_chunk(300, 200, 2, 4, "k", rows0) == [cs.Copy("host", 0, "stage", 0, 84),
                                                       cs.Convert("k", "stage", 0, "dest", 344, 42)]
    assert plan_chunk(384, 64, 2, 2, None, rows0) == []
    with pytest.raises(ValueError, match="aligned"):
        plan_chunk(1, 4, 2, 2, None)
    with pytest.raises(ValueError, match="kernel"):
        plan_chunk(0, 4, 2, 4, None)


def test_ring_geometry_stays_within_the_memory_limit():
    for limit, chunk, conc in [(2 << 30, 16 << 20, 8), (64 << 20, 16 << 20, 32), (16 << 20, 16 << 20, 8),
                               (40960, 4096, 1), (8192, 4096, 4)]:
        count, capacity = ring_geometry(limit, chunk, 4096, conc)
        assert count >= 2 and 4096 <= capacity <= chunk
        assert count <= 2 * conc + 4
        if limit >= 2 * (4096 + 2 * 4096):
            assert count * (capacity + 2 * 4096) <= limit


# ---- the ring ------------------------------------------------------------------------------

def test_ring_recycles_buffers_by_event_and_waits_only_when_all_are_in_flight():
    backend = FakeCudaBackend()
    ring = PinnedRing(backend, 2, 4096)
    stream = backend.new_stream()
    a, b = ring.acquire(), ring.acquire()
    assert backend.calls["alloc_pinned"] == 2 and ring.allocated_bytes == 2 * (4096 + 2 * 4096)
    for slot in (a, b):
        backend.memcpy(slot.ptr, slot.ptr, 1, stream)
        backend.record(slot.event, stream)
        ring.release(slot, recorded=True)
    assert ring.in_flight == 2
    c = ring.acquire()                          # both in flight: wait for the oldest
    assert c is a and ring.event_waits == 1 and stream.done == 1
    ring.release(c, recorded=False)
    assert ring.acquire() is c                  # a free one is lent without waiting
    assert backend.calls["alloc_pinned"] == 2   # never more than count
    ring.close()
    assert backend.calls["free_pinned"] == 2 and not backend.memory
    with pytest.raises(StreamerError, match="cancelled"):
        ring.acquire()


def test_ring_acquire_aborts_when_cancelled():
    cancelled = threading.Event()
    ring = PinnedRing(FakeCudaBackend(), 1, 4096, cancelled=cancelled)
    ring.acquire()                               # the only buffer, never released
    threading.Timer(0.05, cancelled.set).start()
    with pytest.raises(StreamerError, match="cancelled"):
        ring.acquire()
    ring.close()


# ---- the sink ------------------------------------------------------------------------------

PAIRS = [("BF16", "BF16"), ("F32", "F32"), ("U8", "U8"), ("I64", "I64"), ("BF16", "F16"), ("F16", "BF16"),
         ("F32", "BF16"), ("F32", "F16"), ("BF16", "F32"), ("F8_E4M3", "BF16"), ("F8_E5M2", "F16"),
         ("F8_E4M3", "F32")]


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(st.sampled_from(PAIRS), st.integers(1, 40), st.integers(1, 70), st.integers(1, 4), st.booleans(),
       st.integers(1, 12), st.booleans(), st.data())
def test_sink_fills_whole_tensors_and_shards_exactly(pair, rows, cols, world, eager, step_elems, wide, data):
    src_name, dst_name = pair
    src_t, dst_t = torch_dtype(src_name), torch_dtype(dst_name)
    backend = FakeCudaBackend(eager=eager)
    sink = CudaSink(_config(), backend=backend, min_2d_width=0 if wide else 1 << 30)
    t = _random((rows, cols), src_t, seed=rows * 100 + cols)
    raw = t.reshape(-1).view(torch.uint8)
    spec = TensorSpec("w", src_name, (rows, cols), "f", 0, raw.numel())
    rank = data.draw(st.integers(0, world - 1))
    dim = data.draw(st.sampled_from([None, 0, 1]))
    if dim is None:
        block, want = None, t
    else:
        block = shard_block(spec, rank, world, dim)
        size = t.shape[dim]
        per = -(-size // world)
        first = min(rank * per, size)
        want = t.narrow(dim, first, min(first + per, size) - first)
    dest = _poisoned(tuple(want.shape), dst_t)
    if dest.numel():
        sink.check_destination(spec, dest, block)
    step = step_elems * src_t.itemsize * 37
    for offset, n in _chunks(raw.numel(), step):
        sink.write(dest, offset, raw[offset:offset + n].numpy(), src_dtype=src_name, block=block)
    sink.finish()
    expected = want.contiguous().to(dst_t)
    if dest.numel():
        assert dest.reshape(-1).view(torch.uint8).tolist() == expected.reshape(-1).view(torch.uint8).tolist()
    assert sink.ring.in_flight == 0
    sink.close()
    assert not backend.memory                   # every pinned and device buffer freed


def test_no_host_wait_per_tensor_when_the_device_keeps_up():
    backend = FakeCudaBackend(eager=True)
    sink = CudaSink(_config(), backend=backend)
    tensors = [_random((33, 17), torch.bfloat16, seed=i) for i in range(40)]
    dests = [_poisoned((33, 17), torch.float16) for _ in tensors]
    for t, d in zip(tensors, dests):
        sink.write(d, 0, t.reshape(-1).view(torch.uint8).numpy(), src_dtype="BF16")
    sink.finish()
    assert backend.calls["wait_event"] == 0 and sink.ring.event_waits == 0
    assert backend.calls["synchronize"] == 2 and backend.calls["device_synchronize"] == 1   # once per load
    assert backend.calls["alloc_pinned"] <= sink.ring.count
    used = {id(s) for s in backend.streams if s.enqueued}
    assert len(used) == 2                         # both streams carry copies
    for t, d in zip(tensors, dests):
        assert torch.equal(d, t.to(torch.float16))
    sink.close()


def test_buffers_are_not_reused_before_their_copies_ran_many_threads():
    backend = FakeCudaBackend(eager=False)       # copies run only when the host waits
    sink = CudaSink(_config(memory_limit=2 * (4096 + 2 * 4096)), backend=backend)
    assert sink.ring.count == 2
    tensors = [_random((64, 48), torch.float32, seed=i) for i in range(12)]
    dests = [_poisoned((64, 48), torch.float32) for _ in tensors]

    def work(i):
        raw = tensors[i].reshape(-1).view(torch.uint8)
        for offset, n in _chunks(raw.numel(), 4096):
            sink.write(dests[i], offset, raw[offset:offset + n].numpy())

    threads = [threading.Thread(target=work, args=(i,)) for i in range(len(tensors))]
    for th in threads:
        th.start()
    for th in threads:
        th.join()
    sink.finish()
    assert sink.ring.event_waits > 0
    for t, d in zip(tensors, dests):
        assert torch.equal(d, t)
    sink.close()


def test_read_into_from_a_file_with_odirect_slack(tmp_path):
    t = _random((300, 77), torch.bfloat16, seed=3)
    payload = t.reshape(-1).view(torch.uint8).numpy().tobytes()
    path = tmp_path / "blob"
    path.write_bytes(b"\x01" * 1000 + payload + b"\x02" * 5000)
    sink = CudaSink(_config(), backend=FakeCudaBackend())
    dest = _poisoned((300, 77), torch.float32)
    src = LocalSource(str(path), direct_io="on")
    try:
        for offset, n in _chunks(len(payload), 3 * 4096 + 2):     # chunk larger than a slot: split
            sink.read_into(src, 1000 + offset, n, dest, offset, src_dtype="BF16")
        sink.finish()
    finally:
        src.close()
    assert torch.equal(dest, t.float())
    sink.close()


def test_failed_read_gives_the_buffer_back(tmp_path):
    path = tmp_path / "short"
    path.write_bytes(b"x" * 100)
    sink = CudaSink(_config(), backend=FakeCudaBackend())
    src = LocalSource(str(path), direct_io="off")
    dest = torch.empty(1000, dtype=torch.uint8)
    with pytest.raises(SourceError, match="past the end"):
        sink.read_into(src, 0, 1000, dest, 0)
    src.close()
    slots = [sink.ring.acquire() for _ in range(sink.ring.count)]   # none leaked
    assert len({id(s) for s in slots}) == sink.ring.count
    sink.close()


def test_destination_checks():
    sink = CudaSink(_config(), backend=FakeCudaBackend())
    spec = TensorSpec("w", "BF16", (4, 6), "f", 0, 48)
    sink.check_destination(spec, torch.empty(4, 6, dtype=torch.float16))
    assert sink.can_write("BF16", torch.empty(4, 6, dtype=torch.float32))
    assert not sink.can_write("I32", torch.empty(4, 6, dtype=torch.float32))
    assert not sink.can_write("F64", torch.empty(4, 6, dtype=torch.float32))   # no kernel: the CPU path casts
    with pytest.raises(DestinationError, match="converts only"):
        sink.check_destination(spec, torch.empty(4, 6, dtype=torch.int16))
    with pytest.raises(DestinationError, match="contiguous"):
        sink.check_destination(spec, torch.empty(6, 4, dtype=torch.bfloat16).t())
    with pytest.raises(DestinationError, match="elements"):
        sink.check_destination(spec, torch.empty(4, 5, dtype=torch.bfloat16))
    block = shard_block(spec, 1, 2, 1)
    sink.check_destination(spec, torch.empty(4, 3, dtype=torch.bfloat16), block)
    with pytest.raises(DestinationError, match="past the end"):
        sink.write(torch.empty(4, dtype=torch.bfloat16), 0, bytes(48))
    sink.close()


def test_kernel_sources_are_found_and_pasted():
    text = cs.kernel_source(cs.CONVERT_FILE)
    assert "lp_f32_to_bf16" in text and "lp_convert_" in text
    assert (cs.native_dir() / cs.STRIDED_FILE).is_file()


def test_importing_the_sink_touches_no_gpu_library():
    code = ("import sys, torch; import loader_plugins.core.sinks.cuda as m; "
            "assert 'cupy' not in sys.modules, 'cupy imported'; "
            "assert not torch.cuda.is_initialized(), 'CUDA initialised'; print('ok')")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60)
    assert out.returncode == 0 and out.stdout.strip() == "ok", out.stderr


def test_cupy_backend_without_cupy_or_driver_says_what_to_install():
    try:
        import cupy  # noqa: F401
    except ImportError:
        with pytest.raises(StreamerError, match=r"loader-plugins\[cuda\]"):
            cs.CupyBackend()
        return
    if torch.cuda.is_available():
        pytest.skip("a GPU is present: integration_tests/test_gpu.py covers the CuPy backend")
    with pytest.raises(Exception, match="cudaError|CUDA"):   # CuPy installed, no driver: CUDA's own error
        cs.CupyBackend().new_stream()


def test_safetensors_dtype_names_round_trip():
    for name in cs.NATIVE_DTYPES:
        try:
            assert safetensors_dtype(torch_dtype(name)) == name
        except Exception:  # noqa: BLE001 - a float8 missing from this torch
            continue


# ---- through the reader: the sinks the caller built (core/sinks/base.py) ------------------------

def _write_checkpoint(tmp_path, tensors):
    st = pytest.importorskip("safetensors.torch")
    path = tmp_path / "model.safetensors"
    st.save_file(tensors, str(path))
    return str(path)


@pytest.mark.parametrize("direct_io", ["off", "on"])
def test_reader_fills_destinations_through_the_sink(tmp_path, direct_io):
    from loader_plugins.core.checkpoint import open_checkpoint
    from loader_plugins.core.reader import StreamReader

    tensors = {"a": _random((300, 129), torch.bfloat16, 1), "b": _random((64, 1000), torch.float32, 2),
               "c": _random((7,), torch.float16, 3), "d": _random((33, 65), torch.int64, 4),
               "e": torch.empty(0, 3, dtype=torch.bfloat16), "f": _random((513, 96), torch.bfloat16, 5)}
    path = _write_checkpoint(tmp_path, tensors)
    config = _config(chunk_bytes=16384, memory_limit=1 << 20, concurrency=3, direct_io=direct_io)
    sources: dict = {}
    specs = open_checkpoint(path, config, sources=sources).tensors
    dests = {"a": _poisoned((300, 129), torch.float16), "b": _poisoned((64, 1000), torch.bfloat16),
             "c": _poisoned((7,), torch.float16), "d": _poisoned((33, 65), torch.int64),
             "e": torch.empty(0, 3, dtype=torch.bfloat16), "f": _poisoned((257, 96), torch.float32)}
    shards = {"f": shard_block(specs["f"], 0, 2, 0)}
    backend = FakeCudaBackend()
    sink = CudaSink(config, backend=backend)
    try:
        got = dict(StreamReader(list(specs.values()), sources, config, destinations=dests,
                                sinks=[sink, CpuSink(config)], shards=shards))
    finally:
        for src in sources.values():
            src.close()
    assert set(got) == set(tensors) and all(got[n] is dests[n] for n in got)
    assert torch.equal(dests["a"], tensors["a"].to(torch.float16))
    assert torch.equal(dests["b"], tensors["b"].to(torch.bfloat16))
    assert torch.equal(dests["c"], tensors["c"]) and torch.equal(dests["d"], tensors["d"])
    assert torch.equal(dests["f"], tensors["f"][:257].float())
    assert not backend.memory                   # the reader closed the sink


def test_cpu_dim0_shard_reads_only_its_bytes(tmp_path):
    from loader_plugins.core.checkpoint import open_checkpoint
    from loader_plugins.core.reader import StreamReader

    t = _random((101, 37), torch.float32, 9)
    path = _write_checkpoint(tmp_path, {"w": t, "x": _random((5,), torch.float32, 1)})
    config = _config(direct_io="off")
    per = -(-101 // 3)
    for rank in range(3):
        sources: dict = {}
        spec = open_checkpoint(path, config, sources=sources).tensors["w"]
        block = shard_block(spec, rank, 3, 0)
        dest = _poisoned((block.nbytes // (4 * 37), 37), torch.float32)
        read: list[int] = []
        try:
            got = dict(StreamReader([spec], sources, config, destinations={"w": dest}, shards={"w": block},
                                    on_bytes=read.append))
        finally:
            for src in sources.values():
                src.close()
        assert got["w"] is dest and torch.equal(dest, t[rank * per:(rank + 1) * per]), rank
        assert sum(read) == block.nbytes < spec.nbytes
