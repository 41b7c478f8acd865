"""The CUDA sink and pinned ring against the simulated device (core/sinks/cuda_sim.py): real
stream threads, CUDA's ordering, a throttled link; every byte checked against safetensors."""

from __future__ import annotations

import threading

import pytest
import torch
from safetensors.torch import load_file as st_load_file
from safetensors.torch import save_file

from loader_plugins.config import StreamerConfig
from loader_plugins.core.checkpoint import open_checkpoint
from loader_plugins.core.reader import StreamReader
from loader_plugins.core.sinks.cpu import CpuSink
from loader_plugins.core.sinks.cuda import CudaSink, StageTimes, free_idle_rings
from loader_plugins.core.sinks.cuda_sim import SimulatedCudaBackend, SimulatedDeviceError
from loader_plugins.core.tp import shard_block
from loader_plugins.errors import StreamerError

from .helpers import assert_bit_exact

BOUNDS = {"reads", "device (copies behind: waits for pinned buffers, final sync)", "submitting copies",
          "fixed costs (ring allocation, first sync)"}


@pytest.fixture(autouse=True)
def _no_idle_rings():
    yield
    free_idle_rings()


def _config(**kw) -> StreamerConfig:
    base = {"chunk_bytes": 64 << 10, "memory_limit": 2 << 20, "concurrency": 3, "progress": "off"}
    return StreamerConfig.from_dict({**base, **kw})


def _every_dtype(seed: int = 0) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    out = {}
    for i, dtype in enumerate([torch.float64, torch.float32, torch.float16, torch.bfloat16, torch.int64, torch.int32,
                               torch.int16, torch.int8, torch.uint8, torch.bool, torch.float8_e4m3fn,
                               torch.float8_e5m2, torch.uint16, torch.uint32, torch.uint64]):
        shape = (37 + i, 129 + 3 * i)
        raw = torch.randint(0, 256, (torch.Size(shape).numel() * dtype.itemsize,), dtype=torch.uint8, generator=g)
        t = raw.view(dtype).reshape(shape) if dtype != torch.bool else (raw % 2).bool().reshape(shape)
        out[f"t{i}_{str(dtype).split('.')[-1]}"] = t
    out["scalar"] = torch.tensor(3.5, dtype=torch.float32)
    out["empty"] = torch.empty(0, 7, dtype=torch.bfloat16)
    out["big"] = torch.randn(700, 513, generator=g).to(torch.bfloat16)     # several chunks and pinned buffers
    return out


def _load(path, config, dests, sink, shards=None):
    sources: dict = {}
    specs = open_checkpoint(path, config, sources=sources).tensors
    try:
        reader = StreamReader(list(specs.values()), sources, config, destinations=dests, shards=shards,
                              sinks=[sink, CpuSink(config)])
        got = dict(reader)
    finally:
        for src in sources.values():
            src.close()
    return got, reader, specs


def _poisoned_like(t: torch.Tensor, dtype=None) -> torch.Tensor:
    d = torch.empty(t.shape, dtype=dtype or t.dtype)
    if d.numel():
        d.view(-1).view(torch.uint8).fill_(0x7B)
    return d


@pytest.mark.parametrize("direct_io", ["off", "on"])
def test_every_dtype_lands_bit_exact_through_the_simulated_device(tmp_path, direct_io):
    tensors = _every_dtype()
    path = tmp_path / "m.safetensors"
    save_file(tensors, str(path))
    expected = st_load_file(str(path))
    config = _config(direct_io=direct_io)
    backend = SimulatedCudaBackend(link_gbps=2.0)
    dests = {n: _poisoned_like(t) for n, t in expected.items()}
    got, reader, _ = _load(str(path), config, dests, CudaSink(config, backend=backend, workers=3))
    assert all(got[n] is dests[n] for n in expected)
    assert_bit_exact(got, expected)
    report = reader.sink_reports[0]
    assert report["bytes"] == sum(t.numel() * t.element_size() for t in expected.values())
    assert backend.stats["link_bytes"] == report["bytes"]        # every byte crossed the link once
    assert report["bound"] in BOUNDS and report["ring_reused"] is False


def test_casts_and_tensor_parallel_cuts_run_as_device_kernels(tmp_path):
    g = torch.Generator().manual_seed(1)
    tensors = {"w": torch.randn(64, 96, generator=g).to(torch.bfloat16),
               "col": torch.randn(40, 130, generator=g).to(torch.float16),
               "f8": (torch.randn(33, 65, generator=g) * 4).to(torch.float8_e4m3fn)}
    path = tmp_path / "m.safetensors"
    save_file(tensors, str(path))
    config = _config()
    sources: dict = {}
    specs = open_checkpoint(str(path), config, sources=sources).tensors
    for src in sources.values():
        src.close()
    backend = SimulatedCudaBackend(link_gbps=5.0)
    block = shard_block(specs["col"], 1, 3, 1)                          # columns 44..87 of each row
    dests = {"w": _poisoned_like(tensors["w"], torch.float32), "f8": _poisoned_like(tensors["f8"], torch.bfloat16),
             "col": torch.empty(40, 44, dtype=torch.float16)}
    got, reader, _ = _load(str(path), config, dests, CudaSink(config, backend=backend, min_2d_width=1 << 30),
                           shards={"col": block})
    assert torch.equal(got["w"], tensors["w"].float())
    assert torch.equal(got["f8"], tensors["f8"].to(torch.bfloat16))
    assert torch.equal(got["col"], tensors["col"][:, 44:88])
    assert backend.stats["kernels"] > 0                                 # casts and cuts ran on the device


def test_events_complete_in_stream_order_and_the_host_waits_only_when_asked():
    backend = SimulatedCudaBackend(link_gbps=10.0)
    stream = backend.new_stream()
    gate = threading.Event()
    src = backend.alloc_pinned(1 << 16)
    dst = backend.alloc_device(1 << 16)
    import ctypes

    ctypes.memset(src, 0x11, 1 << 16)
    stream.put(lambda: gate.wait() and None)       # the stream is busy until the gate opens
    backend.memcpy(dst, src, 1 << 16, stream)
    event = backend.new_event()
    backend.record(event, stream)
    assert backend.query(event) is False           # queued behind the busy operation: not done, not blocking
    assert ctypes.string_at(dst, 4) == b"\xa5" * 4  # fresh device memory is garbage, untouched so far
    waited = threading.Event()
    waiter = threading.Thread(target=lambda: (backend.wait_event(event), waited.set()))
    waiter.start()
    assert not waited.wait(0.2)                    # wait_event blocks while the copy has not run
    gate.set()
    waiter.join(10)
    assert waited.is_set() and backend.query(event) is True
    assert ctypes.string_at(dst, 1 << 16) == b"\x11" * (1 << 16)
    assert backend.stats["link_bytes"] == 1 << 16
    assert backend.stats["link_busy_ns"] == pytest.approx((1 << 16) / 10e9 * 1e9, abs=1)   # its turn on the link
    backend.free_pinned(src)
    backend.free_device(dst)
    with pytest.raises(SimulatedDeviceError, match="was not allocated as pinned"):
        backend.free_pinned(dst)
    backend.close()


def test_a_failed_device_operation_is_sticky_and_reaches_the_host():
    backend = SimulatedCudaBackend()
    stream = backend.new_stream()
    stream.put(lambda: 1 / 0)
    event = backend.new_event()
    backend.record(event, stream)
    with pytest.raises(SimulatedDeviceError, match="ZeroDivisionError"):
        backend.synchronize(stream)
    with pytest.raises(SimulatedDeviceError):
        backend.query(event)
    assert isinstance(SimulatedDeviceError("x"), StreamerError)
    backend.close()


def test_a_device_failure_mid_load_fails_the_load_and_nothing_hangs(tmp_path):
    tensors = {"a": torch.randn(300, 300).to(torch.bfloat16), "b": torch.randn(200, 100)}
    path = tmp_path / "m.safetensors"
    save_file(tensors, str(path))

    class Failing(SimulatedCudaBackend):
        calls = 0

        def memcpy(self, dst, src, nbytes, stream):
            Failing.calls += 1
            if Failing.calls == 3:                 # a fault the CPU cannot cause for real: a mock, named so
                stream.put(lambda: (_ for _ in ()).throw(RuntimeError("simulated DMA fault")))
            super().memcpy(dst, src, nbytes, stream)

    config = _config(chunk_bytes=16 << 10, memory_limit=256 << 10)
    dests = {n: _poisoned_like(t) for n, t in tensors.items()}
    with pytest.raises(StreamerError, match="simulated DMA fault"):
        _load(str(path), config, dests, CudaSink(config, backend=Failing(), workers=3))


def test_the_pinned_ring_is_kept_for_the_next_load_on_the_same_device(tmp_path):
    tensors = {"a": torch.randn(256, 512).to(torch.bfloat16), "b": torch.randn(100, 33)}
    path = tmp_path / "m.safetensors"
    save_file(tensors, str(path))
    expected = st_load_file(str(path))
    config = _config()
    backend = SimulatedCudaBackend(link_gbps=5.0)
    reports = []
    for _ in range(2):
        dests = {n: _poisoned_like(t) for n, t in expected.items()}
        got, reader, _ = _load(str(path), config, dests, CudaSink(config, backend=backend, workers=3))
        assert_bit_exact(got, expected)
        reports.append(reader.sink_reports[0])
    pinned_after_two = backend.stats["pinned_bytes"]
    assert reports[0]["ring_reused"] is False and reports[0]["ring_bytes"] > 0
    assert reports[1]["ring_reused"] is True
    # the buffers the first load pinned were not pinned again (the ring makes buffers on first need,
    # so the second load may add ones the first did not use)
    assert pinned_after_two == reports[1]["ring_bytes"] >= reports[0]["ring_bytes"]
    assert free_idle_rings() == reports[1]["ring_bytes"]


def test_pinned_ring_free_releases_everything_after_the_load(tmp_path):
    path = tmp_path / "m.safetensors"
    save_file({"a": torch.randn(64, 64)}, str(path))
    config = _config(pinned_ring="free")
    backend = SimulatedCudaBackend()
    _load(str(path), config, {"a": torch.empty(64, 64)}, CudaSink(config, backend=backend))
    assert not backend._memory                                    # every pinned and device buffer freed
    assert free_idle_rings() == 0


def test_stage_report_adds_up_and_names_the_link_when_it_is_slow(tmp_path):
    path = tmp_path / "m.safetensors"
    save_file({f"w{i}": torch.randn(256, 256) for i in range(8)}, str(path))     # 2 MiB
    config = _config(chunk_bytes=64 << 10, memory_limit=1 << 20)
    backend = SimulatedCudaBackend(link_gbps=0.02)                 # 2 MiB over 20 MB/s: ~0.1 s of link time
    dests = {f"w{i}": torch.empty(256, 256) for i in range(8)}
    _, reader, _ = _load(str(path), config, dests, CudaSink(config, backend=backend, workers=3))
    r = reader.sink_reports[0]
    assert sum(r["workers"].values()) == pytest.approx(r["read_s"], abs=1e-3)
    assert r["device"]["link_bytes"] == 8 * 256 * 256 * 4
    assert r["first_byte_s"] is not None and r["first_byte_s"] <= r["wall_s"]
    assert r["bound"] == "device (copies behind: waits for pinned buffers, final sync)"


def test_stage_times_pick_the_largest_per_worker_share():
    times = StageTimes()
    t0 = times.begin()
    times.read(t0, t0 + 2.0)
    times.end(t0 + 2.0)
    report = times.report(ring_alloc_s=0.1, slot_wait_s=0.5)
    assert report["bound"] == "reads" and report["read_s"] == 2.0


def test_bench_cuda_runs_the_simulated_device_and_checks_every_byte(tmp_path, capsys):
    from loader_plugins.cli import main
    from loader_plugins.bench.demo import make_demo

    make_demo(tmp_path / "demo", 8 << 20, shards=2, seed=0)
    assert main(["bench-cuda", str(tmp_path / "demo"), "--device", "sim", "--repeat", "1", "--json",
                 "--memory-limit", "8MiB", "--chunk-bytes", "256KiB"]) == 0
    import json

    out = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert out["device"] == "sim" and out["bytes"] > 0 and set(out["gbps"]) == {"read", "streamer", "streamer-dma"}
    assert out["stages"]["bytes"] == out["bytes"] and out["stages"]["ring_reused"] is True
    assert out["first_load"]["stages"]["ring_reused"] is False and 0 < out["efficiency"]
