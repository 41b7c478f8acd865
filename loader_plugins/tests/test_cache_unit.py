"""Cache tiers without a network: atomic entries, LRU budget, eviction that respects readers,
estimate math, and the tiered storage end to end over a fake (local) remote."""

from __future__ import annotations

import hashlib
import importlib
import json
import os
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest
import torch

from loader_plugins import StreamerConfig, load_file
from loader_plugins.cache import metrics, tiered, warm
from loader_plugins.cache.config import CacheConfig, cache_config
from loader_plugins.cache.cli import main as cache_main
from loader_plugins.cache.disk import DiskTier, entry_key, wait_for_commits
from loader_plugins.cache.dram import DramTier
from loader_plugins.cache.dram_server import serve
from loader_plugins.core.sources import base
from loader_plugins.core.sources.base import Storage
from loader_plugins.core.sources.local import LocalSource
from loader_plugins.errors import ConfigError

from .helpers import assert_bit_exact

safetensors_torch = pytest.importorskip("safetensors.torch")
est = importlib.import_module("loader_plugins.cache.estimate")

MiB = 1 << 20
REPO = Path(__file__).resolve().parents[2]


# ------------------------------------------------------------------------------------------
# helpers
# ------------------------------------------------------------------------------------------

def fill_entry(store, name: str, data: bytes, etag: str = "e1", bucket: str = "b"):
    fill = store.begin_fill(bucket, name, etag, len(data), f"s3://{bucket}/{name}")
    assert fill is not None
    fill.write(0, data)
    assert fill.commit()
    return fill


def files_in(root: Path) -> list[str]:
    return sorted(p.name for p in (root / "objects").glob("*/*"))


class FakeRemoteSource(LocalSource):
    """A local file posing as an S3 object: bucket, key, an ETag, and a count of bytes "downloaded"."""

    def __init__(self, storage: "FakeRemote", uri: str):
        self.bucket, _, self.key = uri[len("s3://"):].partition("/")
        super().__init__(str(storage.root / self.bucket / self.key), direct_io="off")
        self.uri = uri
        self._storage = storage
        self.etag = '"' + hashlib.md5(Path(self.path).read_bytes()).hexdigest() + '"'
        storage.heads += 1

    def read_into(self, offset, dest, *, pool=None, cancelled=None, slack=False, fresh=False):
        super().read_into(offset, dest, pool=pool, cancelled=cancelled, fresh=fresh)
        with self._storage.lock:
            self._storage.bytes_read += memoryview(dest).nbytes

    def check_unchanged(self):
        pass


class FakeRemote(Storage):
    """``s3://bucket/key`` served from ``root/bucket/key``."""

    def __init__(self, config, root: Path):
        super().__init__(config)
        self.root = Path(root)
        self.bytes_read = 0
        self.heads = 0
        self.lock = threading.Lock()

    def _path(self, uri: str) -> Path:
        return self.root / uri[len("s3://"):]

    def open(self, uri):
        return FakeRemoteSource(self, uri)

    def is_dir(self, uri):
        return self._path(uri).is_dir()

    def exists(self, uri):
        return self._path(uri).exists()

    def list_dir(self, uri):
        return sorted(p.name for p in self._path(uri).iterdir() if p.is_file())


@pytest.fixture
def fake_s3(tmp_path, monkeypatch):
    """``s3://`` goes through TieredStorage (the proposed registry hook) over a FakeRemote."""
    root = tmp_path / "remote"
    remotes: list[FakeRemote] = []

    def factory(config):
        remote = FakeRemote(config, root)
        remotes.append(remote)
        if tiered.caching_enabled(config):
            return tiered.TieredStorage(config, remote=remote)
        return remote

    monkeypatch.setitem(base._REGISTRY, "s3", (factory, ""))
    factory.root = root
    factory.remotes = remotes
    factory.remote_bytes = lambda: sum(r.bytes_read for r in remotes)
    return factory


def make_checkpoint(directory: Path, seed: int = 0, shards: int = 2, mib: int = 2) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    directory.mkdir(parents=True, exist_ok=True)
    tensors: dict[str, torch.Tensor] = {}
    weight_map = {}
    for i in range(shards):
        part = {
            f"layer{i}.big": torch.randn(mib * MiB // 4 - 37, generator=g),
            f"layer{i}.bf16": torch.randn(7, 13, generator=g).to(torch.bfloat16),
            f"layer{i}.i8": torch.randint(-128, 128, (1001,), generator=g, dtype=torch.int8),
        }
        name = f"model-{i + 1:05d}-of-{shards:05d}.safetensors"
        safetensors_torch.save_file(part, str(directory / name))
        tensors.update(part)
        weight_map.update({k: name for k in part})
    (directory / "model.safetensors.index.json").write_text(json.dumps({"metadata": {}, "weight_map": weight_map}))
    return tensors


# ------------------------------------------------------------------------------------------
# config
# ------------------------------------------------------------------------------------------

def test_config_fields(tmp_path):
    cfg = StreamerConfig.from_dict({"cache_dir": str(tmp_path), "cache_max_bytes": "1.5GiB",
                                    "dram_cache_dir": "/dev/shm/x"})
    section = cache_config(cfg)
    assert section.cache_max_bytes == int(1.5 * (1 << 30)) and section.dram_cache_dir == "/dev/shm/x"
    assert {"cache_dir", "cache_max_bytes", "dram_cache_dir"} <= set(StreamerConfig.allowed_keys())
    assert not hasattr(StreamerConfig(), "cache_dir"), "the cache's options live in its own section"
    assert cache_config(StreamerConfig()) == CacheConfig()
    assert cfg.to_dict()["cache_dir"] == str(tmp_path)                       # flat again on the way out
    assert cache_config(cfg.replace(concurrency=3)) == section                # kept across replace
    with pytest.raises(ConfigError, match="cache_max_bytes"):
        StreamerConfig.from_dict({"cache_max_bytes": -5})
    with pytest.raises(ConfigError, match="cache_max_bytes"):
        StreamerConfig.from_dict({"cache_max_bytes": "lots"})
    with pytest.raises(ConfigError, match="budget"):
        DiskTier(tmp_path, -1)


# ------------------------------------------------------------------------------------------
# entries: atomicity
# ------------------------------------------------------------------------------------------

def test_key_depends_on_bucket_key_and_etag():
    assert entry_key("b", "k", "e") == entry_key("b", "k", "e")
    assert len({entry_key("b", "k", "e"), entry_key("b", "k", "f"), entry_key("c", "k", "e"),
                entry_key("b", "k2", "e")}) == 4


def test_entry_invisible_until_commit(tmp_path):
    store = DiskTier(tmp_path)
    data = os.urandom(300_000)
    fill = store.begin_fill("b", "m.safetensors", "e1", len(data))
    fill.write(100_000, data[100_000:])
    fill.write(0, data[:50_000])
    assert store.lookup("b", "m.safetensors", "e1", len(data)) is None
    assert fill.missing() == [(50_000, 100_000)]
    assert not any(n.endswith(".json") for n in files_in(tmp_path))
    fill.write(50_000, data[50_000:100_000])
    assert fill.complete
    assert fill.commit()
    with store.lookup("b", "m.safetensors", "e1", len(data)) as handle:
        assert Path(handle.data_path).read_bytes() == data
    assert sorted(n.split(".", 1)[1] for n in files_in(tmp_path)) == ["data", "json"]


def test_incomplete_commit_publishes_nothing(tmp_path):
    store = DiskTier(tmp_path)
    fill = store.begin_fill("b", "k", "e", 10_000)
    fill.write(0, b"x" * 9_999)
    assert not fill.commit()
    assert fill.state == "aborted"
    assert files_in(tmp_path) == []
    assert store.lookup("b", "k", "e", 10_000) is None


def test_one_writer_per_entry(tmp_path):
    store = DiskTier(tmp_path)
    first = store.begin_fill("b", "k", "e", 10)
    assert first is not None
    assert store.begin_fill("b", "k", "e", 10) is None   # same process, another descriptor: still excluded
    first.write(0, b"0123456789")
    assert first.commit()
    assert store.begin_fill("b", "k", "e", 10) is None   # already cached
    assert store.begin_fill("b", "k", "e2", 10) is not None   # another version


_CRASHER = r"""
import os, signal, sys
from loader_plugins.cache.disk import DiskTier
store = DiskTier(sys.argv[1])
fill = store.begin_fill("b", "k", "e", 1 << 20)
fill.write(0, b"a" * (1 << 19))
print("half", flush=True)
sys.stdin.readline()
"""


def test_writer_killed_midway_leaves_no_entry(tmp_path):
    proc = subprocess.Popen([sys.executable, "-c", _CRASHER, str(tmp_path)], stdin=subprocess.PIPE,
                            stdout=subprocess.PIPE, cwd=REPO, text=True)
    try:
        assert proc.stdout.readline().strip() == "half"
        store = DiskTier(tmp_path)
        assert store.begin_fill("b", "k", "e", 1 << 20) is None   # the live writer holds the entry
        assert store.sweep() == 0                                  # and its partial file is not stale
        os.kill(proc.pid, signal.SIGKILL)
    finally:
        proc.wait(10)
    assert any(n.endswith(".partial") for n in files_in(tmp_path))
    assert store.lookup("b", "k", "e", 1 << 20) is None
    assert store.entries() == []
    assert store.sweep() >= 1
    assert files_in(tmp_path) == []
    fill_entry(store, "k", b"z" * (1 << 20), etag="e")
    assert store.contains("b", "k", "e", 1 << 20)


def test_crash_between_renames_is_reclaimed(tmp_path):
    store = DiskTier(tmp_path)
    fill = store.begin_fill("b", "k", "e", 4)
    fill.write(0, b"abcd")
    os.fsync(fill.fd)
    os.close(fill.fd)
    fill.fd = -1
    os.replace(fill._paths["partial"], fill._paths["data"])   # then "crash" before the manifest
    fill._release()
    fill.state = "aborted"
    assert store.lookup("b", "k", "e", 4) is None
    assert store.sweep() == 1
    assert files_in(tmp_path) == []


def test_lookup_verifies_sizes_and_etag(tmp_path):
    store = DiskTier(tmp_path)
    fill_entry(store, "k", b"0123456789", etag="e")
    assert store.lookup("b", "k", "e", 11) is None             # the remote says another size: dropped
    assert store.entries() == []
    fill_entry(store, "k", b"0123456789", etag="e")
    with open(store._paths(entry_key("b", "k", "e"))["data"], "ab") as f:
        f.write(b"!")                                            # data no longer matches the manifest
    assert store.lookup("b", "k", "e", 10) is None
    assert store.entries() == []
    fill_entry(store, "k", b"0123456789", etag="e")
    manifest = store._paths(entry_key("b", "k", "e"))["manifest"]
    Path(manifest).write_text(json.dumps({**json.loads(Path(manifest).read_text()), "etag": "other"}))
    assert store.lookup("b", "k", "e", 10) is None


# ------------------------------------------------------------------------------------------
# budget and eviction
# ------------------------------------------------------------------------------------------

def test_lru_eviction_under_budget(tmp_path):
    store = DiskTier(tmp_path, max_bytes=250_000)
    fill_entry(store, "a", b"a" * 100_000)
    time.sleep(0.02)
    fill_entry(store, "b", b"b" * 100_000)
    time.sleep(0.02)
    store.lookup("b", "a", "e1", 100_000).close()   # "a" used last: "b" is now least recently used
    time.sleep(0.02)
    fill_entry(store, "c", b"c" * 100_000)
    keys = sorted(e["key"] for e in store.entries())
    assert keys == ["a", "c"]
    assert store.usage() <= 250_000
    assert store.begin_fill("b", "huge", "e", 250_001) is None   # larger than the whole budget


def test_eviction_skips_entries_being_read(tmp_path):
    store = DiskTier(tmp_path, max_bytes=150_000)
    fill_entry(store, "a", b"a" * 100_000)
    handle = store.lookup("b", "a", "e1", 100_000)
    assert store.entries()[0]["in_use"]
    assert store.begin_fill("b", "c", "e1", 100_000) is None      # the only candidate is being read
    assert not store.evict_key(entry_key("b", "a", "e1"))
    evicted, skipped = store.evict_matching("b")
    assert evicted == [] and [e["key"] for e in skipped] == ["a"]
    assert Path(handle.data_path).read_bytes() == b"a" * 100_000
    handle.close()
    fill_entry(store, "c", b"c" * 100_000)
    assert [e["key"] for e in store.entries()] == ["c"]


def test_evicted_entry_stays_readable_by_open_reader(tmp_path):
    """Unlinking never pulls bytes from under a reader that already opened the data."""
    store = DramTier(tmp_path)
    fill_entry(store, "a", b"q" * 5000)
    handle = store.lookup("b", "a", "e1", 5000)
    src = LocalSource(handle.data_path, direct_io="off")
    handle.close()                                   # lock released: eviction may proceed
    assert store.evict_key(entry_key("b", "a", "e1"))
    assert src.read_bytes(0, 5000) == b"q" * 5000
    src.close()


def test_dram_budget_file_and_enforce(tmp_path):
    store = DramTier(tmp_path)
    assert store.budget() == 0
    for name in "abc":
        fill_entry(store, name, name.encode() * 10_000)
        time.sleep(0.02)
    held = store.lookup("b", "a", "e1", 10_000)      # oldest, but in use
    store.set_budget(15_000)
    assert DramTier(tmp_path).budget() == 15_000
    store.enforce_budget()
    assert sorted(e["key"] for e in store.entries()) == ["a"]   # b and c evicted, a kept (in use)
    held.close()
    store.set_budget(5_000)
    store.enforce_budget()
    assert store.entries() == []


# ------------------------------------------------------------------------------------------
# estimates
# ------------------------------------------------------------------------------------------

def test_estimate_math(tmp_path):
    hist = est.LoadHistory(tmp_path / "h.json")
    gbps, basis, n = est.bandwidth("disk", 10**9, hist)
    assert (gbps, n) == (est.DEFAULT_GBPS["disk"], 0) and basis.startswith("default")
    for seconds in (1.0, 2.0, 0.5, 1.0, 1.0):
        hist.record("disk", 2 * 10**9, seconds, host="h1")
    hist.record("disk", 10**6, 1.0, host="h1")          # tiny load: not similar to 2 GB
    hist.record("disk", 2 * 10**9, 0.1, host="other")   # another host
    gbps, basis, n = est.bandwidth("disk", 2 * 10**9, hist, host="h1")
    assert n == 5 and gbps == pytest.approx(2.0) and "similar-size" in basis
    out = est.predict({"disk": 4 * 10**9}, hist, host="h1")
    assert out["tier"] == "disk" and out["seconds"] == pytest.approx(2.0) and out["bytes"] == 4 * 10**9
    assert est.predict({"disk": 4 * 10**9}, hist, host="h1", metadata_seconds=0.25)["seconds"] == pytest.approx(2.25)
    out = est.predict({"disk": 2 * 10**9, "s3": 10**9}, hist, host="h1")
    assert out["tier"] == "mixed"
    assert out["seconds"] == pytest.approx(1.0 + 1.0 / est.DEFAULT_GBPS["s3"])
    assert out["gbps"] == pytest.approx(3e9 / out["seconds"] / 1e9, rel=1e-3)


def test_history_keeps_recent(tmp_path):
    hist = est.LoadHistory(tmp_path / "h.json")
    for i in range(est.KEEP + 7):
        hist.record("s3", 1000, 1.0 + i, host="h")
    hist.record("dram", 1000, 1.0, host="h")
    samples = hist.samples("s3", host="h")
    assert len(samples) == est.KEEP and samples[-1]["seconds"] == pytest.approx(est.KEEP + 7.0)
    assert len(hist.samples("dram", host="h")) == 1
    with pytest.raises(ValueError):
        hist.record("s3", 0, 1.0)


def test_estimate_local_checkpoint_cli(tmp_path, capsys, monkeypatch):
    monkeypatch.setenv("LOADER_PLUGINS_HISTORY_DIR", str(tmp_path / "history"))   # no recorded loads
    make_checkpoint(tmp_path / "m", shards=1, mib=1)
    assert cache_main(["estimate", str(tmp_path / "m"), "--json"]) == 0
    out = json.loads(capsys.readouterr().out)
    assert out["tier"] == "local" and out["files"] == 1 and out["bytes"] > MiB
    transfer = out["bytes"] / (est.DEFAULT_GBPS["local"] * 1e9)
    assert out["seconds"] == pytest.approx(out["metadata_seconds"] + transfer, rel=1e-3, abs=1e-5)
    assert 0 <= out["metadata_seconds"] < 1
    LoadHistory = est.LoadHistory
    LoadHistory(tmp_path / "history" / est.HISTORY_NAME).record("local", 2 * MiB, 0.5)   # as an engine load does
    assert cache_main(["estimate", str(tmp_path / "m"), "--json"]) == 0
    learned = json.loads(capsys.readouterr().out)
    assert learned["tiers"]["local"]["gbps"] == pytest.approx(2 * MiB / 0.5 / 1e9, abs=1e-4)
    assert learned["basis"].startswith("history")


# ------------------------------------------------------------------------------------------
# tiered storage end to end (fake remote)
# ------------------------------------------------------------------------------------------

def test_write_through_then_disk_then_dram(fake_s3, tmp_path):
    expected = make_checkpoint(fake_s3.root / "bucket" / "m")
    cache, shm = tmp_path / "cache", tmp_path / "shm"
    uri = "s3://bucket/m"
    before = metrics.snapshot()

    got = load_file(uri, cache_dir=str(cache), concurrency=3, chunk_bytes=256 << 10)
    assert_bit_exact(got, expected)
    assert wait_for_commits(30)                      # entries are published in the background
    first = fake_s3.remote_bytes()
    shard_bytes = sum(p.stat().st_size for p in (fake_s3.root / "bucket" / "m").glob("*.safetensors"))
    assert first >= shard_bytes                       # everything came from the remote once
    disk = DiskTier(cache)
    assert sorted(e["key"] for e in disk.entries()) == ["m/model-00001-of-00002.safetensors",
                                                        "m/model-00002-of-00002.safetensors"]
    assert not [n for n in files_in(cache) if n.endswith((".partial", ".fill"))]
    index = (fake_s3.root / "bucket" / "m" / "model.safetensors.index.json").stat().st_size

    got = load_file(uri, cache_dir=str(cache), concurrency=3)
    assert_bit_exact(got, expected)
    first += index                                    # the index is always read from the remote
    assert fake_s3.remote_bytes() == first            # served by the disk tier: no shard byte downloaded

    rows = warm.warm(uri, StreamerConfig.from_dict({"cache_dir": str(cache), "dram_cache_dir": str(shm)}))
    assert [r["result"] for r in rows] == ["copied from disk"] * 2
    first = fake_s3.remote_bytes()   # warm lists the checkpoint (index) again
    got = load_file(uri, cache_dir=str(cache), dram_cache_dir=str(shm))
    assert_bit_exact(got, expected)
    assert fake_s3.remote_bytes() == first + index

    hist = est.LoadHistory(cache / est.HISTORY_NAME)
    assert [len(hist.samples(t)) for t in ("s3", "disk", "dram")] == [1, 1, 1]
    snap = metrics.snapshot()
    if snap:   # prometheus-client installed
        for tier in ("s3", "disk", "dram"):
            assert snap["hits"].get(tier, 0) >= before.get("hits", {}).get(tier, 0) + 2
        assert snap["writethrough"].get("disk", 0) >= before.get("writethrough", {}).get("disk", 0) + shard_bytes

    out = est.estimate(uri, StreamerConfig.from_dict({"cache_dir": str(cache), "dram_cache_dir": str(shm)}))
    assert out["tier"] == "dram" and out["files"] == 2 and out["bytes"] == shard_bytes
    assert "history" in out["basis"]


def test_changed_object_misses_the_cache(fake_s3, tmp_path):
    expected = make_checkpoint(fake_s3.root / "bucket" / "m", seed=1, shards=1)
    cache = tmp_path / "cache"
    assert_bit_exact(load_file("s3://bucket/m", cache_dir=str(cache)), expected)
    expected = make_checkpoint(fake_s3.root / "bucket" / "m", seed=2, shards=1)   # new ETag
    n = fake_s3.remote_bytes()
    assert_bit_exact(load_file("s3://bucket/m", cache_dir=str(cache)), expected)
    assert fake_s3.remote_bytes() > n
    wait_for_commits()
    assert len(DiskTier(cache).entries()) == 2


def test_subset_load_publishes_no_entry(fake_s3, tmp_path):
    make_checkpoint(fake_s3.root / "bucket" / "m", shards=1, mib=24)
    cache = tmp_path / "cache"
    from loader_plugins import SafetensorsStreamer

    with SafetensorsStreamer(cache_dir=str(cache)) as s:
        s.stream_files("s3://bucket/m", names=["layer0.i8"])
        assert [n for n, _ in s.get_tensors()] == ["layer0.i8"]
    wait_for_commits()
    assert DiskTier(cache).entries() == []
    assert not [n for n in files_in(cache) if n.endswith(".partial")]


def test_failed_cache_write_does_not_fail_the_load(fake_s3, tmp_path, monkeypatch):
    expected = make_checkpoint(fake_s3.root / "bucket" / "m", shards=1)
    real_pwrite = os.pwrite

    def broken(fd, data, offset):
        if offset > 0:
            raise OSError(28, "No space left on device")
        return real_pwrite(fd, data, offset)

    monkeypatch.setattr(os, "pwrite", broken)
    assert_bit_exact(load_file("s3://bucket/m", cache_dir=str(tmp_path / "c"), chunk_bytes=64 << 10), expected)
    monkeypatch.undo()
    wait_for_commits()
    assert DiskTier(tmp_path / "c").entries() == []
    assert not [n for n in files_in(tmp_path / "c") if n.endswith(".partial")]


def test_cache_status_and_evict_cli(fake_s3, tmp_path, capsys):
    make_checkpoint(fake_s3.root / "bucket" / "m", shards=2, mib=1)
    cache, shm = tmp_path / "cache", tmp_path / "shm"
    load_file("s3://bucket/m", cache_dir=str(cache))
    wait_for_commits()
    flags = ["--cache-dir", str(cache), "--dram-cache-dir", str(shm)]
    assert cache_main(["cache", "status", "--json", *flags]) == 0
    status = json.loads(capsys.readouterr().out)
    tiers = {t["tier"]: t for t in status["tiers"]}
    assert len(tiers["disk"]["entries"]) == 2 and tiers["dram"]["entries"] == []
    assert tiers["dram"]["server"] is None
    assert cache_main(["cache", "evict", "s3://bucket/m/model-00001-of-00002.safetensors", "--json", *flags]) == 0
    assert json.loads(capsys.readouterr().out)["disk"]["evicted"] == ["s3://bucket/m/model-00001-of-00002.safetensors"]
    assert cache_main(["cache", "evict", "s3://bucket/other", "--json", *flags]) == 0
    assert json.loads(capsys.readouterr().out)["disk"]["evicted"] == []
    assert cache_main(["cache", "evict", "--all", *flags]) == 0
    assert DiskTier(cache).entries() == []


def test_serve_promotes_and_keeps_budget(tmp_path):
    cache, shm = tmp_path / "cache", tmp_path / "shm"
    disk = DiskTier(cache)
    for name in "ab":
        fill_entry(disk, name, name.encode() * 50_000)
        time.sleep(0.02)
    time.sleep(0.3)   # older than the server: not promoted until used again
    cfg = StreamerConfig.from_dict({"cache_dir": str(cache), "dram_cache_dir": str(shm)})
    stop = threading.Event()
    ready = threading.Event()
    t = threading.Thread(target=serve, args=(cfg,), kwargs=dict(max_bytes=80_000, promote=True, interval=0.05,
                                                                stop=stop, on_ready=lambda info: ready.set()))
    t.start()
    try:
        assert ready.wait(10)
        assert DramTier(shm).server_info()["pid"] == os.getpid()
        disk.lookup("b", "b", "e1", 50_000).close()          # a use since the server started: promote it
        deadline = time.monotonic() + 10
        while time.monotonic() < deadline and not DramTier(shm).entries():
            time.sleep(0.05)
        entries = DramTier(shm).entries()
        assert [e["key"] for e in entries] == ["b"]
        with DramTier(shm).lookup("b", "b", "e1", 50_000) as h:
            assert Path(h.data_path).read_bytes() == b"b" * 50_000
        disk.lookup("b", "a", "e1", 50_000).close()           # a and b exceed the 80 kB budget: b goes
        deadline = time.monotonic() + 10
        while time.monotonic() < deadline and [e["key"] for e in DramTier(shm).entries()] != ["a"]:
            time.sleep(0.05)
        assert [e["key"] for e in DramTier(shm).entries()] == ["a"]
        assert DramTier(shm).usage() <= 80_000
    finally:
        stop.set()
        t.join(10)
    assert DramTier(shm).server_info() is None


def test_unusable_cache_dir_never_fails_a_load(fake_s3, tmp_path, caplog):
    expected = make_checkpoint(fake_s3.root / "bucket" / "m", shards=1)
    not_a_dir = tmp_path / "file"
    not_a_dir.write_text("x")
    assert_bit_exact(load_file("s3://bucket/m", cache_dir=str(not_a_dir / "cache")), expected)
    assert "cache tier disabled" in caplog.text


def test_small_gaps_are_fetched_to_complete_the_entry(fake_s3, tmp_path):
    make_checkpoint(fake_s3.root / "bucket" / "m", shards=1, mib=2)
    cache = tmp_path / "cache"
    from loader_plugins import SafetensorsStreamer

    with SafetensorsStreamer(cache_dir=str(cache)) as s:
        s.stream_files("s3://bucket/m", names=["layer0.i8"])   # leaves ~2 MiB unread: under GAP_FILL_BYTES
        assert [n for n, _ in s.get_tensors()] == ["layer0.i8"]
    wait_for_commits()
    (entry,) = DiskTier(cache).entries()
    remote = fake_s3.root / "bucket" / "m" / "model-00001-of-00001.safetensors"
    assert Path(entry["path"]).read_bytes() == remote.read_bytes()


def test_publish_is_off_the_load_path_and_awaited_by_the_next_lookup(fake_s3, tmp_path, monkeypatch):
    from loader_plugins.cache.disk import Fill

    expected = make_checkpoint(fake_s3.root / "bucket" / "m", shards=1)
    real_commit = Fill.commit
    started = threading.Event()

    def slow_commit(self):
        started.set()
        time.sleep(1.0)          # a slow fsync
        return real_commit(self)

    monkeypatch.setattr(Fill, "commit", slow_commit)
    cache = str(tmp_path / "cache")
    t0 = time.perf_counter()
    assert_bit_exact(load_file("s3://bucket/m", cache_dir=cache), expected)
    assert time.perf_counter() - t0 < 1.0 or not started.is_set()   # the load did not wait for it
    first = fake_s3.remote_bytes()
    assert_bit_exact(load_file("s3://bucket/m", cache_dir=cache), expected)   # waits, then hits the disk tier
    index = (fake_s3.root / "bucket" / "m" / "model.safetensors.index.json").stat().st_size
    assert fake_s3.remote_bytes() == first + index


def test_aligned_writes_go_straight_to_disk(tmp_path, monkeypatch):
    """Write-through from the reader's tensors (same alignment in memory and file) uses O_DIRECT
    for whole blocks, buffered writes for the edges; the bytes are the same either way."""
    import mmap

    from loader_plugins.cache.disk import Fill

    store = DiskTier(tmp_path)
    size = (1 << 20) + 12345
    data = os.urandom(size)
    buf = mmap.mmap(-1, size)          # page aligned: buffer index i <-> file offset i
    buf[:] = data
    fds = []
    real = Fill._pwrite
    monkeypatch.setattr(Fill, "_pwrite", staticmethod(lambda fd, view, off: (fds.append(fd), real(fd, view, off))))
    fill = store.begin_fill("b", "k", "e", size)
    view = memoryview(buf)
    for a, b in ((0, 10_000), (10_000, 700_001), (700_001, size)):
        fill.write(a, view[a:b])
    fill.write(5, data[5:9000])        # read-only bytes: buffered
    del view
    direct_used = fill._dfd >= 0 and fill._dfd in fds
    assert fill.commit()
    with store.lookup("b", "k", "e", size) as h:
        assert Path(h.data_path).read_bytes() == data
    if direct_used is False and getattr(os, "O_DIRECT", 0):
        pytest.skip("this file system refuses O_DIRECT; only buffered writes were checked")


def test_small_loads_do_not_make_a_large_one_look_slow(tmp_path):
    """Tiny loads (tests, small models) take mostly per-load overhead: extrapolated to 1 GB their
    "GB/s" once estimated 47,000 s for a cold start that took 40 s."""
    hist = est.LoadHistory(tmp_path / "h.json")
    for _ in range(5):
        hist.record("local", 2 * 10**6, 0.05, host="h")            # 0.04 GB/s, overhead-bound
    gbps, basis, n = est.bandwidth("local", 10**9, hist, host="h")
    assert (gbps, n) == (est.DEFAULT_GBPS["local"], 0)
    assert basis.startswith("default") and "2.0 MB" in basis
    # small loads that beat the default are still evidence of a fast tier
    hist.record("local", 10**8, 0.02, host="h")                   # 5 GB/s
    hist.record("local", 10**8, 0.02, host="h")
    hist.record("local", 10**8, 0.02, host="h")
    gbps, basis, n = est.bandwidth("local", 10**9, hist, host="h")
    assert n == 5 and gbps == pytest.approx(5.0) and "smaller" in basis
    # larger loads come before smaller ones when none is of a similar size
    hist.record("local", 10**11, 100.0, host="h")                 # 1 GB/s
    gbps, basis, n = est.bandwidth("local", 10**9, hist, host="h")
    assert n == 1 and gbps == pytest.approx(1.0) and "larger" in basis
    # and similar sizes before both
    hist.record("local", 2 * 10**9, 4.0, host="h")                # 0.5 GB/s
    gbps, basis, n = est.bandwidth("local", 10**9, hist, host="h")
    assert n == 1 and gbps == pytest.approx(0.5) and "similar-size" in basis
