"""Hot swapping on a real vLLM (CPU build): the worker extension offloads and restores the weights.

The sleep-mode backend (CUDA-only in vLLM: cumem allocator) is checked for registration and, over a
stand-in allocator with the cumem allocator's memory semantics, for its suspend / resume logic.
Each engine runs in its own subprocess (vLLM keeps global state per process) with a bounded
timeout. The offline jobs run the engine in-process (``_vllm_swap_job.py``); the HTTP test runs
``vllm serve`` in vLLM's production layout (spawned engine core and worker) and drives the swap
through the dev-mode endpoints the docs describe (docs/swap.md).
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
import urllib.error
from pathlib import Path

import pytest
import torch

pytestmark = [pytest.mark.vllm, pytest.mark.slow]

if pytest.importorskip("importlib.util").find_spec("vllm") is None:
    pytest.skip("vLLM is not installed (bash .ci/install_vllm.sh .venv/bin/python)", allow_module_level=True)

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))

from _smoke_vllm_default import (  # noqa: E402
    CPU_ENGINE_ENV,
    CPU_ENGINE_KWARGS,
    INPROCESS_ENV,
    MAX_TOKENS,
    PROMPT,
    _cli_flags,
    _free_port,
    _http,
)
from _tiny_models import make_tiny_llama  # noqa: E402

from loader_plugins.swap import SwapError, SwapMetrics  # noqa: E402

JOB_TIMEOUT = 300
EXTENSION = "loader_plugins.swap.vllm_ext.StreamerSwapExtension"


def run_job(spec: dict) -> dict:
    env = {**os.environ, **CPU_ENGINE_ENV, **INPROCESS_ENV}
    proc = subprocess.run([sys.executable, str(HERE / "_vllm_swap_job.py"), json.dumps(spec)], env=env,
                          capture_output=True, text=True, timeout=JOB_TIMEOUT)
    output = proc.stdout + proc.stderr
    assert proc.returncode == 0, output[-5000:]
    line = [x for x in proc.stdout.splitlines() if x.startswith("RESULT ")][-1]
    result = json.loads(line[len("RESULT "):])
    result["output"] = output
    return result


@pytest.fixture(scope="module")
def models(tmp_path_factory):
    root = tmp_path_factory.mktemp("vllm-swap-models")
    return {
        "f32": make_tiny_llama(root / "f32", dtype="float32", seed=0),
        "bf16": make_tiny_llama(root / "bf16", dtype="bfloat16", shards=2, seed=1),
    }


def _resident(report: dict) -> tuple[int, int]:
    weights = report["weights"].values()
    return sum(w["whole_page_bytes"] for w in weights), sum(w["resident_bytes"] for w in weights)


def test_offload_restore_round_trip(models):
    """generate -> offload -> (weights released; generating now gives other tokens) -> restore -> same tokens;
    the snapshot (taken after vLLM's CPU repacking) and the restored weights are bit-exact."""
    got = run_job({"model": str(models["f32"]), "steps": [
        {"generate": True}, {"digest": "before"}, {"resident": "before"},
        {"offload": {}}, {"resident": "offloaded"}, {"snapshot_digest": "offloaded"},
        {"generate": True},                               # reads the released pages: zeros
        {"restore": True}, {"digest": "after"}, {"resident": "after"}, {"generate": True},
        {"offload": {"discard_kv_cache": "true"}}, {"resident": "kv_discarded"}, {"restore": True},
        {"generate": True}, {"digest": "after_second"}, {"stats": True},
    ]})
    first, while_offloaded, restored, restored_again = got["outputs"]
    assert len(first) == MAX_TOKENS and len(set(first)) > 2
    assert restored == first and restored_again == first
    assert while_offloaded != first  # the swapped tensors are the ones the model computes with

    before = got["digests"]["before"]
    assert "model.embed_tokens.weight" in before and "model.norm.weight" in before
    assert got["snapshot_digests"]["offloaded"] == before
    assert got["digests"]["after"] == before and got["digests"]["after_second"] == before

    whole, resident = _resident(got["resident"]["before"])
    assert whole > 0 and resident == whole
    whole, resident = _resident(got["resident"]["offloaded"])
    assert resident == 0, got["resident"]["offloaded"]
    assert _resident(got["resident"]["after"])[1] == whole
    kv = got["resident"]["kv_discarded"]["kv_cache"]
    assert kv and all(k["resident_bytes"] == 0 for k in kv)

    off = got["offload"][0]
    assert off["mechanism"] == "tensors" and off["release"].get("pages", 0) > 0
    assert off["bytes"] > 0 and off["released_bytes"] == whole
    # vLLM CPU keeps its repacked linear weights inside native oneDNN handlers: reported, not swapped
    assert off["opaque"]["modules"] > 0 and off["opaque"]["bytes"] > 0
    assert got["offload"][1]["kv_cache_released_bytes"] > 0
    back = got["restore"][0]
    assert back["addresses_preserved"] == back["storages"] and back["bytes"] == off["bytes"]

    stats = got["stats"][0]
    assert stats["state"] == "resident" and stats["totals"]["offload/host"]["operations"] == 2
    assert 'streamer_swap_bytes_total{op="offload",tier="host"}' in stats["prometheus"]
    assert "swap offload vllm-weights (host)" in got["output"] and "GB/s" in got["output"]


def test_streamer_load_format_bf16(models):
    """The same round trip on weights loaded by this project's loader (bf16, two shards)."""
    got = run_job({"model": str(models["bf16"]), "load_format": "streamer", "dtype": "bfloat16", "steps": [
        {"generate": True}, {"digest": "before"}, {"offload": {}}, {"snapshot_digest": "offloaded"},
        {"restore": True}, {"digest": "after"}, {"generate": True},
    ]})
    assert "Streamer loaded" in got["output"]
    assert got["outputs"][0] == got["outputs"][1]
    assert got["digests"]["before"] == got["digests"]["after"] == got["snapshot_digests"]["offloaded"]
    assert any(d.endswith(":torch.bfloat16:(512, 128)") for d in got["digests"]["before"].values())


def _serve(model_dir: Path, log_path: Path, timeout_s: float = 240):
    port = _free_port()
    cmd = [sys.executable, str(HERE / "_vllm_launcher.py"), "serve", str(model_dir), "--host", "127.0.0.1",
           "--port", str(port), "--dtype", "float32", "--seed", "0", "--worker-extension-cls", EXTENSION,
           *_cli_flags(CPU_ENGINE_KWARGS)]
    env = {**os.environ, **CPU_ENGINE_ENV, "VLLM_SERVER_DEV_MODE": "1"}
    with open(log_path, "wb") as log:
        proc = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, start_new_session=True, env=env)
    base = f"http://127.0.0.1:{port}"
    t0 = time.monotonic()
    while True:
        if proc.poll() is not None:
            raise RuntimeError(f"vllm serve exited with {proc.returncode}: {log_path.read_text()[-3000:]}")
        if time.monotonic() - t0 > timeout_s:
            os.killpg(proc.pid, signal.SIGKILL)
            raise TimeoutError(f"vllm serve not healthy after {timeout_s}s; log: {log_path}")
        try:
            _http(base + "/health", timeout=2)
            return proc, base
        except (urllib.error.URLError, ConnectionError, TimeoutError):
            time.sleep(0.5)


def _stop(proc) -> None:
    if proc.poll() is None:
        os.killpg(proc.pid, signal.SIGTERM)
        try:
            proc.wait(timeout=20)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()


def test_vllm_serve_dev_endpoints(models, tmp_path):
    """The documented HTTP sequence: pause, offload (+KV), reset prefix cache, restore, resume."""
    proc, base = _serve(models["f32"], tmp_path / "serve.log")
    try:
        def complete():
            body = {"model": str(models["f32"]), "prompt": PROMPT, "max_tokens": MAX_TOKENS, "temperature": 0,
                    "return_token_ids": True}
            return _http(base + "/v1/completions", body)["choices"][0]["token_ids"]

        def rpc(method, **kwargs):
            return _http(base + "/collective_rpc", {"method": method, "kwargs": kwargs})["results"]

        first = complete()
        _http(base + "/sleep?level=0", {})
        offloaded = rpc("streamer_offload", discard_kv_cache="true")
        _http(base + "/reset_prefix_cache", {})
        during = rpc("streamer_swap_stats")
        restored = rpc("streamer_restore")
        _http(base + "/wake_up?tags=scheduling", {})
        again = complete()
        backend = rpc("streamer_use_sleep_backend")
        stats = rpc("streamer_swap_stats")
    finally:
        _stop(proc)
    assert again == first and len(first) == MAX_TOKENS
    assert len(offloaded) == 1 and offloaded[0]["released_bytes"] > 0 and offloaded[0]["kv_cache_released_bytes"] > 0
    assert during[0]["state"] == "offloaded"
    assert restored[0]["bytes"] == offloaded[0]["bytes"]
    assert restored[0]["addresses_preserved"] == restored[0]["storages"]
    assert backend[0]["installed"] is False and "CPU" in backend[0]["reason"]
    assert 'streamer_swap_bytes_total{op="restore",tier="host"}' in stats[0]["prometheus"]
    log = (tmp_path / "serve.log").read_text()
    assert "Injected" in log and "StreamerSwapExtension" in log


# ------------------------------------------------------------------------------------------------
# vLLM sleep backend: its logic over a stand-in for the cumem allocator (CUDA-only in vLLM)
# ------------------------------------------------------------------------------------------------

class _Allocation:
    def __init__(self, tensor: torch.Tensor, tag: str):
        self.tensor, self.tag, self.is_asleep = tensor, tag, False
        self.handle = (0, tensor.numel(), tensor.data_ptr(), 0)
        self.backup = None


class FakeCuMem:
    """Behaves like vLLM's CuMemAllocator for memory: sleep() backs up the offload tags and *loses* the rest
    (here: overwritten with garbage, as unmapped-and-remapped memory would be); wake_up() maps back at the
    same address."""

    def __init__(self, **tagged):
        self.pointer_to_data = {}
        for tag, tensors in tagged.items():
            for t in tensors:
                self.pointer_to_data[t.data_ptr()] = _Allocation(t, tag)
        self.calls = []

    def sleep(self, offload_tags=()):
        self.calls.append(("sleep", tuple(offload_tags)))
        for d in self.pointer_to_data.values():
            if d.is_asleep:
                continue
            d.backup = d.tensor.clone() if d.tag in offload_tags else None
            d.tensor.fill_(0xA5)
            d.is_asleep = True

    def wake_up(self, tags=None):
        self.calls.append(("wake_up", tags))
        for d in self.pointer_to_data.values():
            if d.is_asleep and (tags is None or d.tag in tags or d.tag not in ("weights", "kv_cache")):
                if d.backup is not None:
                    d.tensor.copy_(d.backup)
                d.is_asleep = False

    def discard(self, tags):
        self.calls.append(("discard", tuple(tags)))
        for d in self.pointer_to_data.values():
            if d.tag in tags and not d.is_asleep:
                d.tensor.fill_(0x5A)
                d.is_asleep = True


def test_sleep_backend_logic_with_stand_in_allocator():
    from loader_plugins.swap.vllm_backend import StreamerSleepBackend, host_memory_tensor

    g = torch.Generator().manual_seed(0)
    weights = [torch.randint(0, 256, (n,), dtype=torch.uint8, generator=g) for n in (3 << 20, 4096, 777)]
    runtime = [torch.randint(0, 256, (8192,), dtype=torch.uint8, generator=g)]
    kv = [torch.ones(1 << 16, dtype=torch.uint8)]
    ref_w, ref_rt = [w.clone() for w in weights], [r.clone() for r in runtime]
    allocator = FakeCuMem(weights=weights, runtime=runtime, kv_cache=kv)
    metrics = SwapMetrics(prometheus=False)
    backend = StreamerSleepBackend(allocator, wrap=host_memory_tensor, metrics=metrics)

    for cycle in range(2):
        addresses = [w.data_ptr() for w in weights]
        backend.suspend(1)
        assert backend.state() == "SUSPENDED" and backend.swap.pending
        assert allocator.calls[-1] == ("sleep", ("runtime", "cudagraph"))  # weights are not backed up twice
        assert all(not torch.equal(w, r) for w, r in zip(weights, ref_w))     # the allocator lost them
        backend.resume(["kv_cache"])                                          # partial wake: weights stay out
        assert backend.swap.pending
        backend.resume(None)
        assert backend.state() == "RUNNING" and not backend.swap.pending
        assert all(torch.equal(w, r) for w, r in zip(weights, ref_w))
        assert all(torch.equal(r, x) for r, x in zip(runtime, ref_rt))
        assert [w.data_ptr() for w in weights] == addresses
        assert backend.swap.last["addresses_preserved"] == 3
    assert metrics.summary()["offload/host"]["operations"] == 2
    assert metrics.summary()["offload/host"]["last"]["bytes"] == sum(w.numel() for w in weights)

    backend.suspend(2)                                 # level 2: weights are discarded, vLLM reloads them
    assert not backend.swap.pending
    backend.resume(None)
    assert all(not torch.equal(w, r) for w, r in zip(weights, ref_w))


def test_sleep_backend_registration_is_idempotent():
    from vllm.device_allocator.sleep_mode_backend import SleepModeBackendFactory

    from loader_plugins.swap import vllm_backend

    assert vllm_backend.register() is True
    assert vllm_backend.register() is True
    assert SleepModeBackendFactory.get_backend_class("streamer") is vllm_backend.StreamerSleepBackend
    assert vllm_backend.StreamerSleepBackend.is_supported() is torch.cuda.is_available()


def test_worker_extension_names_do_not_clash_with_vllm_worker():
    from vllm.v1.worker.gpu_worker import Worker

    from loader_plugins.swap.vllm_ext import StreamerSwapExtension, _flag

    own = [a for a in dir(StreamerSwapExtension) if not a.startswith("__")]
    assert own == ["streamer_offload", "streamer_restore", "streamer_swap_stats", "streamer_use_sleep_backend"]
    assert not any(hasattr(Worker, a) for a in own)
    assert _flag("true") is True and _flag("0") is False and _flag(True) is True
    with pytest.raises(SwapError, match="expected a boolean"):
        _flag("perhaps")
