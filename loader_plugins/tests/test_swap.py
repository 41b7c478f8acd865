"""Hot swapping on CPU: offload / restore of torch modules, the snapshot pool and its disk tier, metrics.

The vLLM pieces (worker extension, sleep backend) are tested in integration_tests/test_vllm_swap.py."""

from __future__ import annotations

import gc
import json
import logging

import pytest
import torch

from loader_plugins import load_file
from loader_plugins.swap import SnapshotPool, SwapError, SwapMetrics, named_tensors, offload, plan, restore
from loader_plugins.swap.snapshot import METADATA_KEY, resident_pages


class Tiny(torch.nn.Module):
    """Every kind of tensor a snapshot must cover: tied weights, a non-contiguous view parameter, a buffer
    that is a slice of a larger storage, a tensor captured in a closure (as vLLM CPU's packed weights), a
    plain tensor attribute, and a parameter smaller than a page."""

    def __init__(self, seed: int = 0, width: int = 256):
        super().__init__()
        g = torch.Generator().manual_seed(seed)
        self.emb = torch.nn.Embedding(1024, width)
        self.proj = torch.nn.Linear(width, 2 * width)
        self.head = torch.nn.Linear(width, 1024, bias=False)
        self.head.weight = self.emb.weight                                  # tied
        base = torch.randn(128, 256, generator=g)
        self.strided = torch.nn.Parameter(base[:, ::2], requires_grad=False)  # view, non-contiguous
        self.register_buffer("window", torch.randn(40000, generator=g)[1000:3000])  # slice of a bigger storage
        packed = torch.randn(300, 200, generator=g)
        self.cpu_linear = lambda x, weight=None, bias=None: x @ packed         # closure tensor
        self.table = torch.randn(5000, generator=g)                           # plain attribute
        self.norm = torch.nn.Parameter(torch.randn(7, generator=g))           # < one page
        with torch.no_grad():
            for p in (self.emb.weight, self.proj.weight, self.proj.bias):
                p.copy_(torch.randn(p.shape, generator=g))


def _clone_all(obj) -> dict[str, tuple[torch.Tensor, tuple, int]]:
    """name -> (copy of the values, stride, storage offset)."""
    return {name: (t.detach().clone(), t.stride(), t.storage_offset()) for name, t in named_tensors(obj)}


def _storage_bytes(t: torch.Tensor) -> bytes:
    s = t.untyped_storage()
    return bytes(torch.empty(0, dtype=torch.uint8).set_(s).numpy())


def _assert_same(obj, reference: dict[str, tuple[torch.Tensor, tuple, int]]) -> None:
    now = dict(named_tensors(obj))
    assert set(now) == set(reference)
    for name, (ref, stride, offset) in reference.items():
        t = now[name]
        assert torch.equal(t, ref), name
        assert (t.dtype, t.shape, t.stride(), t.storage_offset()) == (ref.dtype, ref.shape, stride, offset), name


def test_named_tensors_finds_every_kind():
    names = [n for n, _ in named_tensors(Tiny())]
    assert {"emb.weight", "head.weight", "strided", "window", "cpu_linear.<closure>.packed", "table",
            "norm", "proj.weight", "proj.bias"} == set(names)


def test_round_trip_pages_bit_exact_addresses_kept():
    model = Tiny()
    reference = _clone_all(model)
    storages = {n: _storage_bytes(t) for n, t in named_tensors(model)}
    addresses = {n: t.data_ptr() for n, t in named_tensors(model)}

    snap = offload(model, name="tiny", metrics=SwapMetrics(prometheus=False))
    assert snap.state == "offloaded" and snap.stats["release"].get("pages")
    # the snapshot holds what the model held, under every name, views included
    host = snap.host_tensors()
    for name, (ref, stride, offset) in reference.items():
        assert torch.equal(host[name], ref) and host[name].stride() == stride, name
    # memory given back: the whole pages inside each storage are no longer resident
    for name, t in named_tensors(model):
        whole, resident = resident_pages(t.untyped_storage().data_ptr(), t.untyped_storage().nbytes())
        assert resident == 0, (name, whole, resident)
    assert snap.stats["released_bytes"] > 0.9 * snap.nbytes
    assert float(model.emb.weight.detach()[100:200].abs().sum()) == 0.0  # reading while offloaded: zeros, no crash

    stats = restore(snap, metrics=SwapMetrics(prometheus=False))
    _assert_same(model, reference)
    assert {n: _storage_bytes(t) for n, t in named_tensors(model)} == storages   # whole storages, not views
    assert {n: t.data_ptr() for n, t in named_tensors(model)} == addresses
    assert stats["addresses_preserved"] == stats["storages"] == len(snap.entries)
    assert model.head.weight is model.emb.weight
    assert snap.state == "restored" and snap.arena is None


def test_round_trip_resize_frees_storage():
    model = Tiny(seed=1)
    reference = _clone_all(model)
    view_offset = model.strided.data_ptr() - model.strided.untyped_storage().data_ptr()
    window_offset = model.window.storage_offset()

    snap = offload(model, release="resize", metrics=SwapMetrics(prometheus=False))
    assert snap.stats["release"] == {"resize": len(snap.entries)}
    for name, t in named_tensors(model):
        assert t.untyped_storage().nbytes() == 0, name
    assert snap.stats["released_bytes"] == snap.nbytes

    restore(snap, metrics=SwapMetrics(prometheus=False))
    _assert_same(model, reference)
    assert model.head.weight.data_ptr() == model.emb.weight.data_ptr()   # one storage, restored once
    assert model.strided.data_ptr() - model.strided.untyped_storage().data_ptr() == view_offset
    assert model.window.storage_offset() == window_offset


def test_shared_storage_is_snapshotted_once():
    model = Tiny()
    snap = plan(model)
    by_name = {v.name: e for e in snap.entries for v in e.views}
    assert by_name["emb.weight"] is by_name["head.weight"]
    assert by_name["window"].nbytes == 40000 * 4                    # the whole storage, not the 2000-element view
    assert by_name["strided"].nbytes == 128 * 256 * 4
    assert len(snap.entries) == len({t.untyped_storage().data_ptr() for _, t in named_tensors(model)})
    assert snap.nbytes == sum({t.untyped_storage().data_ptr(): t.untyped_storage().nbytes()
                               for _, t in named_tensors(model)}.values())


def test_release_none_keep_arena_and_reuse():
    model = Tiny(seed=2)
    reference = _clone_all(model)
    metrics = SwapMetrics(prometheus=False)
    snap = offload(model, release="none", metrics=metrics)
    _assert_same(model, reference)                                  # nothing released
    assert snap.stats["released_bytes"] == 0
    restore(snap, keep_arena=True, metrics=metrics)
    arena_address = snap.arena.address

    again = offload(model, reuse=snap, metrics=metrics)
    assert again.arena.address == arena_address and again.stats["arena_reused"]
    assert snap.arena is None
    with torch.no_grad():
        model.proj.weight.add_(0)  # touching it while offloaded reads zeros; nothing breaks
    restore(again, metrics=metrics)
    _assert_same(model, reference)


def test_contents_false_gives_back_zeroed_memory():
    cache = [torch.ones(1 << 18), torch.ones(4096)]
    snap = offload(cache, contents=False)
    assert snap.state == "discarded" and snap.arena is None
    restore(snap)
    assert all(float(t.abs().sum()) == 0.0 for t in cache)


def test_mapping_and_sequence_inputs_hold_tensors_strongly():
    tensors = {"a": torch.arange(10000.0), "b": torch.arange(3000, dtype=torch.int64)}
    snap = offload(dict(tensors), release="resize")
    gc.collect()
    stats = restore(snap)
    assert stats["gone"] == 0 and stats["storages"] == 2
    assert torch.equal(snap.entries[0].tensor(), torch.arange(10000.0))


def test_dropped_model_entries_are_skipped():
    model = Tiny()
    snap = offload(model, release="resize")
    del model
    gc.collect()
    stats = restore(snap)
    assert stats["gone"] == len(snap.entries) and stats["storages"] == 0


def test_errors_name_the_problem():
    model = Tiny()
    with pytest.raises(SwapError, match="release must be one of auto, pages, resize, none"):
        offload(model, release="bogus")
    with pytest.raises(SwapError, match="cannot snapshot a int"):
        offload(3)
    snap = offload(model, release="resize")
    with pytest.raises(SwapError, match="still holds offloaded weights"):
        offload(Tiny(), reuse=snap)
    model.proj.weight.untyped_storage().resize_(12)  # the model changed behind the snapshot's back
    with pytest.raises(SwapError, match="'proj.weight' on cpu is now 12 bytes"):
        restore(snap)
    shared = torch.nn.Linear(512, 512)
    first = offload([shared.weight])
    with pytest.raises(SwapError, match=r"storage of 'weight' \(cpu\) is already offloaded by Snapshot.* \(as '0'\)"):
        offload(shared)                                   # same storage, other snapshot: refused
    restore(first)
    restore(offload(shared))                              # fine once the first is back
    snap2 = offload(Tiny())
    restore(snap2)
    with pytest.raises(SwapError, match="it is restored, not offloaded"):
        restore(snap2)


# ------------------------------------------------------------------------------------------------
# Pool and disk tier
# ------------------------------------------------------------------------------------------------

def _mib_model(seed: int) -> torch.nn.Module:
    torch.manual_seed(seed)
    return torch.nn.Sequential(torch.nn.Linear(512, 512), torch.nn.Linear(512, 4))  # ~1.01 MiB


def test_pool_budget_and_lru_spill(tmp_path):
    models = {k: _mib_model(i) for i, k in enumerate("abcd")}
    refs = {k: _clone_all(m) for k, m in models.items()}
    metrics = SwapMetrics(prometheus=False)
    pool = SnapshotPool("2.5MiB", tmp_path / "spill", metrics=metrics)
    pool.offload("a", models["a"])
    pool.offload("b", models["b"])
    assert [pool.tier(k) for k in "ab"] == ["host", "host"]
    pool.offload("c", models["c"])                    # over budget: a (least recently used) goes to disk
    assert [pool.tier(k) for k in "abc"] == ["disk", "host", "host"]
    assert pool.host_bytes <= pool.host_budget
    pool.get("b")                                     # b used: c is now the least recently used host snapshot
    pool.offload("d", models["d"])
    assert [pool.tier(k) for k in "abcd"] == ["disk", "host", "disk", "host"]
    assert pool.host_bytes <= pool.host_budget
    assert pool.keys() == ["a", "c", "b", "d"]

    # the spill file is a plain safetensors checkpoint: names and bytes exact
    from safetensors import safe_open

    path = pool.get("a").path
    with safe_open(str(path), "pt") as f:
        assert set(f.keys()) == set(refs["a"])
        for name in f.keys():
            assert torch.equal(f.get_tensor(name), refs["a"][name][0]), name
        meta = json.loads(f.metadata()[METADATA_KEY])
        assert meta["name"] == "a" and len(meta["storages"]) == 4

    for key in "abcd":                                 # from disk (a, c) and from host memory (b, d)
        tier = pool.tier(key)
        stats = pool.restore(key)
        assert stats["tier"] == tier
        _assert_same(models[key], refs[key])
    assert len(pool) == 0 and not list((tmp_path / "spill").iterdir())  # files removed after restore
    summary = metrics.summary()
    assert summary["spill/disk"]["operations"] == 2 and summary["restore/disk"]["operations"] == 2


def test_spill_file_round_trips_views_and_ties(tmp_path):
    model = Tiny(seed=3)
    reference = _clone_all(model)
    raw = {n: _storage_bytes(t) for n, t in named_tensors(model)}
    pool = SnapshotPool(0, tmp_path, release="resize", keep_files=True)
    snap = pool.offload("tiny", model)                # larger than a zero budget: spilled at once
    assert pool.tier("tiny") == "disk" and snap.host_bytes == 0

    loaded = load_file(snap.path)                     # the streamer reads the file like any checkpoint
    assert torch.equal(loaded["emb.weight"], reference["emb.weight"][0])
    assert "head.weight" not in loaded                # tied: stored once, the alias is in the metadata
    assert bytes(loaded["strided@storage"].numpy()) == raw["strided"]
    assert bytes(loaded["window@storage"].numpy()) == raw["window"]

    stats = pool.restore("tiny")
    assert stats["tier"] == "disk" and stats["bytes"] == snap.nbytes
    _assert_same(model, reference)
    assert model.head.weight is model.emb.weight
    assert snap.path.exists()                          # keep_files


def test_pool_rejects_double_offload_and_unknown_keys(tmp_path):
    pool = SnapshotPool("1GiB", tmp_path)
    model = _mib_model(0)
    pool.offload("m", model)
    with pytest.raises(SwapError, match="'m' is already offloaded"):
        pool.offload("m", model)
    with pytest.raises(SwapError, match="no snapshot 'x' in the pool"):
        pool.restore("x")
    with pytest.raises(SwapError, match="host_budget"):
        SnapshotPool("lots", tmp_path)
    pool.close()
    assert len(pool) == 0


# ------------------------------------------------------------------------------------------------
# Metrics
# ------------------------------------------------------------------------------------------------

def test_metrics_log_and_prometheus_text(caplog):
    pytest.importorskip("prometheus_client")
    metrics = SwapMetrics()
    assert metrics.uses_prometheus_client
    model = _mib_model(1)
    with caplog.at_level(logging.INFO, logger="loader_plugins.swap"):
        snap = offload(model, name="m1", metrics=metrics)
        restore(snap, metrics=metrics)
    lines = [r.getMessage() for r in caplog.records]
    assert any(line.startswith("swap offload m1 (host): 0.001 GB in") and "GB/s" in line for line in lines)
    from prometheus_client.parser import text_string_to_metric_families

    text = metrics.render()
    samples = {(s.name, s.labels.get("op"), s.labels.get("tier")): s.value
               for family in text_string_to_metric_families(text) for s in family.samples}
    assert samples[("streamer_swap_bytes_total", "offload", "host")] == snap.nbytes
    assert samples[("streamer_swap_bytes_total", "restore", "host")] == snap.nbytes
    assert samples[("streamer_swap_operations_total", "restore", "host")] == 1
    assert samples[("streamer_swap_duration_seconds_count", "offload", "host")] == 1
    assert samples[("streamer_swap_last_gbps", "offload", "host")] > 0


def test_metrics_without_prometheus_client():
    metrics = SwapMetrics(prometheus=False)
    metrics.record("offload", 2_000_000_000, 0.5, name="x")
    metrics.record("restore", 2_000_000_000, 0.25, tier="disk")
    assert not metrics.uses_prometheus_client and metrics.render() == ""   # one path: prometheus_client
    summary = metrics.summary()
    assert summary["offload/host"]["gbps"] == 4.0 and summary["restore/disk"]["bytes"] == 2_000_000_000
    assert summary["restore/disk"]["last"]["gbps"] == 8.0
