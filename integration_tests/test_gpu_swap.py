"""Hot swapping on CUDA: round trips, device memory really freed, addresses, and restore speed next to
the pinned host->device ceiling measured in the same run.

    PYTHONPATH=. python -m pytest integration_tests/test_gpu_swap.py -q -s     # -s prints the GB/s lines

Skipped without CUDA. The cumem test (addresses preserved while the memory is unmapped, vLLM's
sleep-mode mechanism) also needs a CUDA build of vLLM.
"""

from __future__ import annotations

import time

import pytest

torch = pytest.importorskip("torch")

pytestmark = [pytest.mark.gpu]

if not torch.cuda.is_available():
    pytest.skip("needs a CUDA GPU (torch.cuda.is_available() is False)", allow_module_level=True)

from loader_plugins.swap import SnapshotPool, SwapMetrics, named_tensors, offload, restore  # noqa: E402

GIB = 1 << 30


def _free() -> int:
    torch.cuda.synchronize()
    return torch.cuda.mem_get_info()[0]


def pinned_h2d_gbps(nbytes: int = GIB, repeats: int = 3) -> float:
    """The best of ``repeats`` single copies of ``nbytes`` from page-locked host memory to the device."""
    host = torch.empty(nbytes, dtype=torch.uint8, pin_memory=True)
    dev = torch.empty(nbytes, dtype=torch.uint8, device="cuda")
    best = 0.0
    for _ in range(repeats):
        torch.cuda.synchronize()
        t0 = time.perf_counter()
        dev.copy_(host, non_blocking=True)
        torch.cuda.synchronize()
        best = max(best, nbytes / (time.perf_counter() - t0) / 1e9)
    del host, dev
    torch.cuda.empty_cache()
    return best


class Model(torch.nn.Module):
    """~1 GiB on the device: 16 bf16 matrices of 4096 x 8192, a tied pair, a strided view parameter."""

    def __init__(self, layers: int = 16):
        super().__init__()
        self.layers = torch.nn.ModuleList(torch.nn.Linear(4096, 8192, bias=False, device="cuda",
                                                          dtype=torch.bfloat16) for _ in range(layers))
        self.emb = torch.nn.Embedding(32000, 512, device="cuda", dtype=torch.bfloat16)
        self.head = torch.nn.Linear(512, 32000, bias=False, device="cuda", dtype=torch.bfloat16)
        self.head.weight = self.emb.weight
        base = torch.randn(1024, 2048, device="cuda")
        self.strided = torch.nn.Parameter(base[:, ::2], requires_grad=False)
        with torch.no_grad():
            for p in self.parameters():
                p.normal_()


def _reference(model) -> dict[str, torch.Tensor]:
    return {n: t.detach().cpu().clone() for n, t in named_tensors(model)}


def _check(model, reference) -> None:
    for name, t in named_tensors(model):
        assert torch.equal(t.detach().cpu(), reference[name]), name


def test_cuda_round_trip_frees_device_memory():
    model = Model()
    reference = _reference(model)
    ceiling = pinned_h2d_gbps()
    metrics = SwapMetrics(prometheus=False)

    warm = offload(model, release="none", metrics=metrics)        # allocates and pins the arena once
    restore(warm, keep_arena=True, metrics=metrics)

    free_before = _free()
    snap = offload(model, reuse=warm, metrics=metrics)             # auto = resize + empty_cache on CUDA
    free_offloaded = _free()
    freed = free_offloaded - free_before
    assert snap.stats["pinned"] and snap.stats["arena_reused"]
    assert freed >= 0.95 * snap.nbytes, (freed, snap.nbytes)
    assert all(t.untyped_storage().nbytes() == 0 for _, t in named_tensors(model))

    stats = restore(snap, keep_arena=True, metrics=metrics)
    assert _free() <= free_offloaded - 0.95 * snap.nbytes
    _check(model, reference)
    assert model.head.weight.data_ptr() == model.emb.weight.data_ptr()
    print(f"\nCUDA offload: {snap.nbytes / 1e9:.2f} GB in {snap.stats['seconds']:.3f} s "
          f"({snap.stats['gbps']:.1f} GB/s, copy {snap.stats['copy_seconds']:.3f} s), device memory freed "
          f"{freed / 1e9:.2f} GB")
    print(f"CUDA restore (resize): {stats['bytes'] / 1e9:.2f} GB in {stats['seconds']:.3f} s ({stats['gbps']:.1f} "
          f"GB/s); pinned H2D ceiling {ceiling:.1f} GB/s; addresses kept {stats['addresses_preserved']}/"
          f"{stats['storages']}")
    # throughput is reported, never asserted (benchmarks are not tests)


def test_cuda_copy_only_keeps_addresses():
    model = Model()
    reference = _reference(model)
    addresses = {n: t.data_ptr() for n, t in named_tensors(model)}
    ceiling = pinned_h2d_gbps()
    snap = offload(model, release="none", metrics=SwapMetrics(prometheus=False))
    with torch.no_grad():
        for p in model.parameters():
            p.zero_()                                              # clobber: restore must bring the bytes back
    restore(snap, keep_arena=True)
    again = offload(model, release="none", reuse=snap)
    stats = restore(again)
    _check(model, reference)
    assert {n: t.data_ptr() for n, t in named_tensors(model)} == addresses
    assert stats["addresses_preserved"] == stats["storages"]
    print(f"\nCUDA restore (same addresses): {stats['gbps']:.1f} GB/s vs pinned H2D {ceiling:.1f} GB/s")


def test_a_dropped_kept_arena_leaves_cuda_usable():
    """A snapshot restored with ``keep_arena=True`` and then dropped unregisters its page-locked
    arena before the memory is unmapped; left registered, the next pinned allocation or CUDA
    call failed with "resource already mapped" (seen on an H100)."""
    import gc
    import weakref

    for _ in range(3):
        model = Model()
        snap = offload(model, release="none")
        restore(snap, keep_arena=True)
        arena = weakref.ref(snap.arena)
        assert arena().pinned
        del snap
        gc.collect()
        assert arena() is None
        host = torch.full((64 << 20,), 7, dtype=torch.uint8, pin_memory=True)
        dev = torch.empty_like(host, device="cuda")
        dev.copy_(host, non_blocking=True)
        torch.cuda.synchronize()
        assert int(dev[-1]) == 7
        del host, dev, model


def test_cuda_pool_spill_and_restore_from_disk(tmp_path):
    model = Model(layers=4)
    reference = _reference(model)
    free_before = _free()
    with SnapshotPool(0, tmp_path) as pool:                       # no host budget: straight to disk
        snap = pool.offload("m", model)
        assert pool.tier("m") == "disk" and snap.host_bytes == 0
        assert _free() - free_before >= 0.95 * snap.nbytes
        stats = pool.restore("m")
    _check(model, reference)
    print(f"\nCUDA restore from disk: {stats['bytes'] / 1e9:.2f} GB in {stats['seconds']:.3f} s "
          f"({stats['gbps']:.2f} GB/s)")


def test_vllm_cumem_sleep_backend_keeps_addresses():
    """vLLM's cumem pool unmaps the weights; the streamer backend copies them out and back at the same addresses."""
    pytest.importorskip("vllm.cumem_allocator", reason="needs a CUDA build of vLLM (cumem allocator)")
    from vllm.device_allocator.cumem import CuMemAllocator

    from loader_plugins.swap.vllm_backend import StreamerSleepBackend

    allocator = CuMemAllocator.get_instance()
    with allocator.use_memory_pool(tag="weights"):
        model = Model(layers=8)
    reference = _reference(model)
    addresses = {n: t.data_ptr() for n, t in named_tensors(model)}
    backend = StreamerSleepBackend(allocator)
    ceiling = pinned_h2d_gbps()
    for _ in range(2):
        free_before = _free()
        backend.suspend(1)
        assert _free() - free_before >= 0.9 * backend.swap.last["bytes"]
        backend.resume(None)
        _check(model, reference)
        assert {n: t.data_ptr() for n, t in named_tensors(model)} == addresses
    last = backend.swap.last
    print(f"\nvLLM cumem + streamer backend: resume {last['gbps']:.1f} GB/s vs pinned H2D {ceiling:.1f} GB/s")
