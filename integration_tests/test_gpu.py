"""GPU checks of the CUDA sink, its kernels and the distributed mode (marker ``gpu``).

Skipped with a reason when ``torch.cuda.is_available()`` is False; the CuPy parts also need
CuPy (``pip install loader-plugins[cuda]`` or the cupy wheel matching the CUDA version). Run on
a GPU machine from a source checkout with ``PYTHONPATH=. pytest -m gpu integration_tests/test_gpu.py -s``
(``-s`` shows the measured bandwidths).
"""

from __future__ import annotations

import datetime
import importlib.util
import json
import math
import os
import socket
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest
import torch

from loader_plugins.config import StreamerConfig
from loader_plugins.core.checkpoint import open_checkpoint
from loader_plugins.core.header import torch_dtype
from loader_plugins.core.tp import shard_block
from loader_plugins.tests.helpers import SHAPES, as_bytes, tensor_set

pytestmark = [
    pytest.mark.gpu,
    pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU (torch.cuda.is_available() is False)"),
]

REPO = Path(__file__).resolve().parents[1]
NATIVE_TORCH = {"bf16": torch.bfloat16, "f16": torch.float16, "f32": torch.float32,
                "e4m3fn": getattr(torch, "float8_e4m3fn", None), "e5m2": getattr(torch, "float8_e5m2", None),
                "e4m3fnuz": getattr(torch, "float8_e4m3fnuz", None),
                "e5m2fnuz": getattr(torch, "float8_e5m2fnuz", None)}
BITS = {1: torch.uint8, 2: torch.int16, 4: torch.int32, 8: torch.int64}


@pytest.fixture(scope="module")
def cuda_mod():
    """The CUDA sink module with a working CuPy."""
    pytest.importorskip("cupy", reason="needs CuPy (pip install loader-plugins[cuda], or cupy-cuda13x for CUDA 13)")
    from loader_plugins.core.sinks import cuda

    return cuda


@pytest.fixture(scope="module")
def backend(cuda_mod):
    return cuda_mod.CupyBackend(torch.cuda.current_device())


def _config(**kw) -> StreamerConfig:
    return StreamerConfig.from_dict({"chunk_bytes": 1 << 20, "memory_limit": 16 << 20, "concurrency": 4,
                                     "progress": "off", **kw})


def _poisoned(shape, dtype) -> torch.Tensor:
    t = torch.empty(shape, dtype=dtype, device="cuda")
    if t.numel():
        t.reshape(-1).view(torch.uint8).fill_(0x7B)
    return t


def _load_into(sink, source, spec, dest, *, chunk: int, block=None) -> None:
    for off in range(0, spec.nbytes, chunk):
        n = min(chunk, spec.nbytes - off)
        sink.read_into(source, spec.offset + off, n, dest, off, src_dtype=spec.dtype, block=block)


def _same_bits_or_both_nan(got: torch.Tensor, want: torch.Tensor, what: str) -> None:
    got, want = got.cpu(), want.cpu()
    nan_g, nan_w = torch.isnan(got.float()), torch.isnan(want.float())
    assert torch.equal(nan_g, nan_w), f"{what}: NaN-ness differs at {int((nan_g != nan_w).sum())} elements"
    g = got.view(BITS[got.element_size()])[~nan_w]
    w = want.view(BITS[want.element_size()])[~nan_w]
    bad = (g != w).nonzero()
    assert bad.numel() == 0, (f"{what}: {bad.numel()} elements differ, e.g. got {hex(int(g[bad[0]]))} "
                              f"want {hex(int(w[bad[0]]))}")


# ---- bit-exact loads into CUDA tensors -------------------------------------------------------

@pytest.fixture(scope="module")
def checkpoint_file(tmp_path_factory):
    st = pytest.importorskip("safetensors.torch")
    tensors = tensor_set(seed=11, shapes=SHAPES + [(1031, 517)])
    path = tmp_path_factory.mktemp("gpu") / "model.safetensors"
    st.save_file(tensors, str(path))
    return path, tensors


@pytest.mark.parametrize("direct_io", ["off", "on"])
def test_every_dtype_lands_bit_exact_in_poisoned_cuda_tensors(cuda_mod, checkpoint_file, direct_io):
    path, tensors = checkpoint_file
    config = _config(direct_io=direct_io, chunk_bytes=64 << 10)
    sources: dict = {}
    ckpt = open_checkpoint(str(path), config, sources=sources)
    dests = {name: _poisoned(tuple(spec.shape), spec.torch_dtype()) for name, spec in ckpt.tensors.items()}
    sink = cuda_mod.CudaSink(config)
    try:
        for name, spec in ckpt.tensors.items():
            sink.check_destination(spec, dests[name])
            _load_into(sink, sources[spec.file], spec, dests[name], chunk=40_000)   # not slot-aligned
        sink.finish()
    finally:
        sink.close()
        for src in sources.values():
            src.close()
    for name, ref in tensors.items():
        assert dests[name].dtype == ref.dtype and dests[name].shape == ref.shape
        assert as_bytes(dests[name]) == as_bytes(ref), f"{name}: bytes differ (or not fully written)"


@pytest.mark.parametrize("src,dst", [("BF16", "F16"), ("F16", "BF16"), ("F32", "BF16"), ("F32", "F16"),
                                     ("BF16", "F32"), ("F8_E4M3", "BF16"), ("F8_E5M2", "BF16"), ("F8_E4M3", "F16")])
def test_checkpoint_dtype_converted_on_load(cuda_mod, tmp_path, src, dst):
    st = pytest.importorskip("safetensors.torch")
    gen = torch.Generator().manual_seed(7)
    shape = (777, 1029)
    src_t, dst_t = torch_dtype(src), torch_dtype(dst)
    base = torch.randn(shape, generator=gen) * 4
    t = base.to(src_t)
    path = tmp_path / "m.safetensors"
    st.save_file({"w": t}, str(path))
    config = _config()
    sources: dict = {}
    spec = open_checkpoint(str(path), config, sources=sources).tensors["w"]
    dest = _poisoned(shape, dst_t)
    with cuda_mod.CudaSink(config) as sink:
        _load_into(sink, sources[spec.file], spec, dest, chunk=300_000)
        sink.finish()
    sources[spec.file].close()
    _same_bits_or_both_nan(dest, t.to(dst_t), f"{src}->{dst}")


@pytest.mark.parametrize("dim", [0, 1])
@pytest.mark.parametrize("dst", ["BF16", "F32"])
def test_tensor_parallel_shard_in_place(cuda_mod, tmp_path, dim, dst):
    st = pytest.importorskip("safetensors.torch")
    t = (torch.randn(1000, 1536, generator=torch.Generator().manual_seed(3)) * 2).to(torch.bfloat16)
    path = tmp_path / "m.safetensors"
    st.save_file({"w": t}, str(path))
    config = _config()
    sources: dict = {}
    spec = open_checkpoint(str(path), config, sources=sources).tensors["w"]
    world = 3
    for rank in range(world):
        block = shard_block(spec, rank, world, dim)
        per = -(-t.shape[dim] // world)
        want = t.narrow(dim, rank * per, min(per, t.shape[dim] - rank * per)).contiguous().to(torch_dtype(dst))
        dest = _poisoned(tuple(want.shape), torch_dtype(dst))
        with cuda_mod.CudaSink(config) as sink:
            sink.check_destination(spec, dest, block)
            _load_into(sink, sources[spec.file], spec, dest, chunk=123_456 // 2 * 2, block=block)
            sink.finish()
        assert torch.equal(dest.cpu(), want), f"rank {rank} dim {dim}"
    sources[spec.file].close()


def test_load_file_to_cuda_bit_exact(checkpoint_file):
    from loader_plugins import load_file

    path, tensors = checkpoint_file
    got = load_file(str(path), device="cuda", progress="off")
    for name, ref in tensors.items():
        assert got[name].is_cuda and as_bytes(got[name]) == as_bytes(ref), name


def test_cuda_loads_report_stages_and_reuse_the_pinned_ring(cuda_mod, checkpoint_file):
    from loader_plugins import SafetensorsStreamer
    from loader_plugins.core.sinks.cuda import free_idle_rings

    path, tensors = checkpoint_file
    reports = []
    for _ in range(2):
        with SafetensorsStreamer(progress="off") as streamer:
            streamer.stream_file(str(path), device="cuda")
            got = dict(streamer.get_tensors())
            reports.append(streamer.stats["sinks"][0])
        for name, ref in tensors.items():
            assert as_bytes(got[name]) == as_bytes(ref), name
    first, second = reports
    assert first["ring_reused"] is False and second["ring_reused"] is True
    assert second["bytes"] == first["bytes"] > 0 and second["bound"] is not None
    assert sum(second["workers"].values()) == pytest.approx(second["read_s"], abs=1e-3)
    assert free_idle_rings() == second["ring_bytes"]


# ---- kernels against torch ------------------------------------------------------------------

def _kernel_inputs(src: str, n_random: int = 1 << 20) -> torch.Tensor:
    gen = torch.Generator().manual_seed(sum(map(ord, src)))
    t = NATIVE_TORCH[src]
    size = t.itemsize
    if size == 4:
        scales = torch.logspace(-30, 30, 61)
        normal = (torch.randn(n_random, generator=gen) * scales[torch.randint(0, 61, (n_random,), generator=gen)])
        bits = torch.randint(-(1 << 31), 1 << 31, (n_random,), dtype=torch.int64, generator=gen).to(torch.int32)
        return torch.cat([normal.view(torch.int32), bits]).view(torch.float32)
    every = torch.arange(0, 1 << (8 * size), dtype=torch.int64)
    every = (every.to(torch.int16) if size == 2 else every.to(torch.uint8))
    rand = torch.randint(0, 1 << (8 * size), (n_random,), dtype=torch.int64, generator=gen)
    rand = rand.to(torch.int16) if size == 2 else rand.to(torch.uint8)
    return torch.cat([every, rand]).view(t)


def test_every_conversion_kernel_matches_torch(cuda_mod, backend):
    stream = backend.new_stream()
    checked = 0
    for kernel in cuda_mod.convert_kernels():
        _, _, s, _, d = kernel.split("_")
        if NATIVE_TORCH[s] is None or NATIVE_TORCH[d] is None:
            continue
        x = _kernel_inputs(s).cuda()
        assert int((x.view(BITS[x.element_size()]) != 0).sum()) > x.numel() // 2   # random data, not zeros
        out = torch.empty(x.shape, dtype=NATIVE_TORCH[d], device="cuda")
        out.view(BITS[out.element_size()]).fill_(0x5A)
        torch.cuda.synchronize()
        backend.launch_convert(kernel, x.data_ptr(), out.data_ptr(), x.numel(), stream)
        backend.synchronize(stream)
        _same_bits_or_both_nan(out, x.to(NATIVE_TORCH[d]), f"{kernel} vs torch CUDA")
        _same_bits_or_both_nan(out, x.cpu().to(NATIVE_TORCH[d]), f"{kernel} vs torch CPU")
        checked += 1
    assert checked >= 12


@pytest.mark.parametrize("itemsize", [1, 2, 4, 8])
def test_strided_kernel_matches_narrow(backend, itemsize):
    gen = torch.Generator().manual_seed(itemsize)
    rows, cols, c0, width = 333, 1000, 137, 301
    x = torch.randint(1, 1 << 7, (rows, cols * itemsize), dtype=torch.uint8, generator=gen).view(BITS[itemsize]).cuda()
    out = torch.full((rows, width), 77, dtype=BITS[itemsize], device="cuda")
    torch.cuda.synchronize()
    stream = backend.new_stream()
    backend.launch_strided(itemsize, x.data_ptr() + c0 * itemsize, out.data_ptr(), rows, width, cols, width, stream)
    backend.synchronize(stream)
    assert torch.equal(out, x[:, c0:c0 + width])


# ---- bandwidth --------------------------------------------------------------------------------

def test_pinned_host_to_device_bandwidth(cuda_mod, backend, tmp_path):
    """The pinned H2D ceiling and the sink's own rate from a page-cached file, in one run."""
    nbytes, reps = 256 << 20, 8
    host = backend.alloc_pinned(nbytes)
    dev = torch.empty(nbytes, dtype=torch.uint8, device="cuda")
    stream = backend.new_stream()
    try:
        backend.memcpy(dev.data_ptr(), host, nbytes, stream)
        backend.synchronize(stream)
        t0 = time.perf_counter()
        for _ in range(reps):
            backend.memcpy(dev.data_ptr(), host, nbytes, stream)
        backend.synchronize(stream)
        ceiling = nbytes * reps / (time.perf_counter() - t0) / 1e9
    finally:
        backend.free_pinned(host)

    path = tmp_path / "blob"
    payload = torch.randint(0, 256, (1 << 30,), dtype=torch.uint8)
    path.write_bytes(payload.numpy().tobytes())
    from loader_plugins.core.sources.local import LocalSource

    config = _config(chunk_bytes=16 << 20, memory_limit=512 << 20, concurrency=8, direct_io="off")
    dest = torch.empty(1 << 30, dtype=torch.uint8, device="cuda")
    src = LocalSource(str(path), direct_io="off")
    from concurrent.futures import ThreadPoolExecutor

    with cuda_mod.CudaSink(config) as sink, ThreadPoolExecutor(8) as pool:
        sink.start()
        t0 = time.perf_counter()
        step = config.chunk_bytes
        list(pool.map(lambda off: sink.read_into(src, off, min(step, dest.numel() - off), dest, off),
                      range(0, dest.numel(), step)))
        sink.finish()
        sink_gbps = dest.numel() / (time.perf_counter() - t0) / 1e9
    src.close()
    assert torch.equal(dest[:: 1 << 20].cpu(), payload[:: 1 << 20])
    print(f"\npinned H2D ceiling {ceiling:.1f} GB/s; CudaSink from page cache {sink_gbps:.1f} GB/s "
          f"({torch.cuda.get_device_name()})")
    assert ceiling > 1.0


# ---- distributed mode with NCCL (one process: the device path of the exchange) ----------------

def test_distributed_nccl_single_rank(checkpoint_file):
    import torch.distributed as dist

    from loader_plugins.core.distributed import load_distributed

    if not dist.is_nccl_available():
        pytest.skip("this torch has no NCCL")
    path, tensors = checkpoint_file
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    dist.init_process_group("nccl", init_method=f"tcp://127.0.0.1:{port}", rank=0, world_size=1,
                            timeout=datetime.timedelta(seconds=60))
    try:
        stats: dict = {}
        got = load_distributed(str(path), config={"progress": "off"}, window_bytes=1 << 20, stats=stats)
    finally:
        dist.destroy_process_group()
    assert stats["bytes_read"] == stats["bytes_total"]
    for name, ref in tensors.items():
        assert got[name].is_cuda and as_bytes(got[name]) == as_bytes(ref), name


# ---- vLLM end to end on the GPU ------------------------------------------------------------------

_VLLM_JOB = textwrap.dedent("""
    import json, os, sys
    sys.path.insert(0, sys.argv[2])
    from vllm.platforms import current_platform
    if not current_platform.is_cuda():
        print("RESULT " + json.dumps({"skip": "vLLM is not a CUDA build"})); sys.exit(0)
    from loader_plugins.vllm_adapter import register
    register()
    from vllm import LLM, SamplingParams
    spec = json.loads(sys.argv[1])
    llm = LLM(spec["model"], load_format=spec["load_format"], dtype=spec["dtype"], seed=0, enforce_eager=True,
              max_model_len=256, gpu_memory_utilization=0.3)
    out = llm.generate(["Hello world, my name is"], SamplingParams(temperature=0.0, max_tokens=16), use_tqdm=False)
    print("RESULT " + json.dumps({"tokens": list(out[0].outputs[0].token_ids)}))
""")


@pytest.mark.vllm
@pytest.mark.parametrize("checkpoint_dtype,model_dtype", [("bfloat16", "bfloat16"), ("float32", "bfloat16")])
def test_vllm_generates_like_the_default_loader_on_gpu(tmp_path, checkpoint_dtype, model_dtype):
    if importlib.util.find_spec("vllm") is None:
        pytest.skip("vLLM is not installed")
    sys.path.insert(0, str(Path(__file__).parent))
    from _tiny_models import make_tiny_llama

    model = make_tiny_llama(tmp_path / "tiny", dtype=checkpoint_dtype, shards=2)
    env = {**os.environ, "VLLM_ENABLE_V1_MULTIPROCESSING": "0", "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1",
           "PYTHONPATH": str(REPO)}
    results = {}
    for fmt in ("safetensors", "streamer"):
        spec = {"model": str(model), "load_format": fmt, "dtype": model_dtype}
        proc = subprocess.run([sys.executable, "-c", _VLLM_JOB, json.dumps(spec), str(REPO)], env=env,
                              capture_output=True, text=True, timeout=600)
        lines = [ln for ln in proc.stdout.splitlines() if ln.startswith("RESULT ")]
        assert proc.returncode == 0 and lines, f"{fmt}: vLLM failed\n{proc.stdout[-3000:]}\n{proc.stderr[-3000:]}"
        result = json.loads(lines[-1][len("RESULT "):])
        if "skip" in result:
            pytest.skip(result["skip"])
        results[fmt] = result["tokens"]
    assert results["streamer"] == results["safetensors"] and len(results["streamer"]) == 16


def test_poison_check_is_meaningful():
    """A poisoned tensor is not the reference: a skipped write would be caught."""
    ref = torch.arange(1, 1 + math.prod((3, 5)), dtype=torch.float32).reshape(3, 5)
    assert as_bytes(_poisoned((3, 5), torch.float32)) != as_bytes(ref)
