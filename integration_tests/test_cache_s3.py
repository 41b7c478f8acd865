"""The cache tiers against a real S3 server (SeaweedFS on 127.0.0.1): write-through, disk and
DRAM hits, a writer killed mid-load, two processes loading one checkpoint, eviction under a
budget, ``cache serve`` and load-time estimates.

Loads go through ``loader_plugins.load_file``: the registry's ``s3`` entry
(core/sources/base.py) is ``loader_plugins.cache.tiered:s3_storage``, which puts the tiers in
front of S3 when ``cache_dir`` / ``dram_cache_dir`` is set.
"""

from __future__ import annotations

import hashlib
import json
import os
import signal
import statistics
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import pytest

torch = pytest.importorskip("torch")
safetensors_torch = pytest.importorskip("safetensors.torch")

from loader_plugins import StreamerConfig, load_file  # noqa: E402
from loader_plugins.bench.peers import evict as drop_page_cache  # noqa: E402
from loader_plugins.cache import tiered, warm  # noqa: E402
from loader_plugins.cache.disk import DiskTier, wait_for_commits  # noqa: E402
from loader_plugins.cache.dram import DramTier  # noqa: E402
from loader_plugins.cache.estimate import DEFAULT_GBPS, HISTORY_NAME, RECENT, LoadHistory, estimate  # noqa: E402
from loader_plugins.core.sources import base  # noqa: E402

pytestmark = pytest.mark.s3

REPO = Path(__file__).resolve().parents[1]
MiB = 1 << 20
HOOK = ("loader_plugins.cache.tiered:s3_storage", "install loader-plugins[s3] (boto3) to read s3:// URIs")

# A load in a fresh process: prints the tensors' digest and the bytes each tier served.
_LOADER = r"""
import hashlib, json, sys
from loader_plugins import StreamerConfig, load_file
from loader_plugins.cache.tiered import TIER_BYTES
print("start", flush=True)
tensors = load_file(sys.argv[2], config=StreamerConfig.from_dict(json.loads(sys.argv[1])))
h = hashlib.sha256()
for name in sorted(tensors):
    t = tensors[name].contiguous()
    h.update(name.encode())
    if t.numel():
        h.update(t.reshape(-1).view(__import__("torch").uint8).numpy().tobytes())
print(json.dumps({"sha": h.hexdigest(), "tiers": dict(TIER_BYTES)}), flush=True)
"""


# ------------------------------------------------------------------------------------------
# helpers
# ------------------------------------------------------------------------------------------

def digest(tensors: dict) -> str:
    h = hashlib.sha256()
    for name in sorted(tensors):
        t = tensors[name].contiguous()
        h.update(name.encode())
        if t.numel():
            h.update(t.reshape(-1).view(torch.uint8).numpy().tobytes())
    return h.hexdigest()


def make_checkpoint(directory: Path, *, seed: int, shards: int, mib: float) -> dict:
    """``shards`` files of about ``mib`` MiB each plus an index."""
    g = torch.Generator().manual_seed(seed)
    directory.mkdir(parents=True, exist_ok=True)
    tensors: dict = {}
    weight_map = {}
    for i in range(shards):
        part = {
            f"l{i}.w": torch.randn(int(mib * MiB) // 2 - 1001, generator=g).to(torch.bfloat16),
            f"l{i}.b": torch.randn(1001, generator=g),
            f"l{i}.i8": torch.randint(-128, 128, (17, 3), generator=g, dtype=torch.int8),
        }
        name = f"model-{i + 1:05d}-of-{shards:05d}.safetensors"
        safetensors_torch.save_file(part, str(directory / name))
        tensors.update(part)
        weight_map.update({k: name for k in part})
    (directory / "model.safetensors.index.json").write_text(json.dumps({"metadata": {}, "weight_map": weight_map}))
    return tensors


def upload(server, bucket: str, directory: Path, prefix: str) -> tuple[str, int]:
    client = server.client()
    shard_bytes = 0
    for path in sorted(directory.iterdir()):
        client.upload_file(str(path), bucket, f"{prefix}/{path.name}")
        if path.suffix == ".safetensors":
            shard_bytes += path.stat().st_size
    return f"s3://{bucket}/{prefix}", shard_bytes


def config(endpoint_url: str, **overrides) -> StreamerConfig:
    values = dict(s3_endpoint_url=endpoint_url, s3_region="us-east-1", s3_addressing_style="path",
                  request_timeout=20.0, max_retries=3, concurrency=4, progress="off")
    values.update(overrides)
    return StreamerConfig.from_dict(values)


def spawn_load(cfg: StreamerConfig, uri: str) -> subprocess.Popen:
    return subprocess.Popen([sys.executable, "-c", _LOADER, json.dumps(cfg.to_dict()), uri], cwd=REPO,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=dict(os.environ))


def finish(proc: subprocess.Popen, timeout: float = 120) -> dict:
    out, err = proc.communicate(timeout=timeout)
    assert proc.returncode == 0, f"loader exited {proc.returncode}:\n{err[-3000:]}"
    return json.loads(out.strip().splitlines()[-1])


def cache_cli(*args: str, timeout: float = 120) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "loader_plugins.cache.cli", *args], cwd=REPO, capture_output=True,
                          text=True, timeout=timeout, env=dict(os.environ))


def leftovers(cache: Path) -> list[str]:
    return sorted(p.name for p in (cache / "objects").glob("*/*") if p.suffix in (".partial", ".fill", ".tmp"))


@pytest.fixture
def hooked(monkeypatch):
    """The registry hook (already the default): s3:// goes through the tiered storage when a tier is set."""
    monkeypatch.setitem(base._REGISTRY, "s3", HOOK)


def tier_delta(before: dict, tier: str) -> int:
    return tiered.TIER_BYTES[tier] - before.get(tier, 0)


# ------------------------------------------------------------------------------------------
# tests
# ------------------------------------------------------------------------------------------

def test_write_through_then_disk_hit(s3_server, s3_bucket, s3_env, fault_proxy, hooked, tmp_path):
    expected = make_checkpoint(tmp_path / "ckpt", seed=1, shards=2, mib=6)
    uri, shard_bytes = upload(s3_server, s3_bucket, tmp_path / "ckpt", "models/a")
    cache = tmp_path / "cache"
    cfg = config(fault_proxy.endpoint_url, cache_dir=str(cache), chunk_bytes=1 * MiB, s3_range_bytes=1 * MiB)

    before = dict(tiered.TIER_BYTES)
    got = load_file(uri, config=cfg)
    assert digest(got) == digest(expected)
    cold_gets = len(fault_proxy.ranged_gets)
    assert cold_gets >= shard_bytes // MiB               # the data came from S3, in 1 MiB ranges
    assert tier_delta(before, "s3") >= shard_bytes
    assert wait_for_commits(60)                       # entries are published in the background
    entries = DiskTier(cache).entries()
    assert sorted(e["key"] for e in entries) == ["models/a/model-00001-of-00002.safetensors",
                                                 "models/a/model-00002-of-00002.safetensors"]
    client = s3_server.client()
    for e in entries:   # keyed by the ETag S3 reports, sizes recorded
        head = client.head_object(Bucket=s3_bucket, Key=e["key"])
        assert (e["etag"], e["size"]) == (head["ETag"], head["ContentLength"])
        assert Path(e["path"]).read_bytes() == client.get_object(Bucket=s3_bucket, Key=e["key"])["Body"].read()
    assert leftovers(cache) == []

    before = dict(tiered.TIER_BYTES)
    start = len(fault_proxy.log)
    got = load_file(uri, config=cfg)
    assert digest(got) == digest(expected)
    # no byte of a shard from S3: one LIST, the index in one GET, each shard's ETag (HEAD)
    assert fault_proxy.kinds(start) == {"LIST": 1, "GET": 1, "HEAD": 2}
    assert len(fault_proxy.ranged_gets) == cold_gets
    assert tier_delta(before, "disk") >= shard_bytes     # (headers are read twice: prefetch, then data)
    assert tier_delta(before, "s3") == 0

    # a new version of one shard (new ETag) is a miss for that shard only
    client.upload_file(str(tmp_path / "ckpt" / "model-00001-of-00002.safetensors"), s3_bucket,
                       "models/a/model-00001-of-00002.safetensors")
    before = dict(tiered.TIER_BYTES)
    assert digest(load_file(uri, config=cfg)) == digest(expected)
    new_etag = client.head_object(Bucket=s3_bucket, Key="models/a/model-00001-of-00002.safetensors")["ETag"]
    if new_etag != entries[0]["etag"] and new_etag != entries[1]["etag"]:
        assert tier_delta(before, "s3") > 0
    else:   # SeaweedFS keeps an MD5 ETag for identical bytes: still the same object
        assert tier_delta(before, "s3") == 0


def test_writer_killed_midway_leaves_no_entry(s3_server, s3_bucket, s3_env, fault_proxy, hooked, tmp_path):
    expected = make_checkpoint(tmp_path / "ckpt", seed=2, shards=1, mib=8)
    uri, shard_bytes = upload(s3_server, s3_bucket, tmp_path / "ckpt", "models/k")
    cache = tmp_path / "cache"
    slow = config(fault_proxy.endpoint_url, cache_dir=str(cache), chunk_bytes=64 << 10, s3_range_bytes=64 << 10,
                  concurrency=2)
    # the index and the header pass, then a few ranges, then one stalls until released
    fault_proxy.stall(10, after_bytes=1 << 40)   # never reached: these GETs pass untouched
    fault_proxy.stall(1, after_bytes=1000)
    proc = spawn_load(slow, uri)
    try:
        assert fault_proxy.stalled.wait(60), "the load never reached the stalled range"
        partial = list((cache / "objects").glob("*/*.partial"))
        assert len(partial) == 1
        time.sleep(0.3)   # the other worker keeps writing ranges meanwhile
        os.kill(proc.pid, signal.SIGKILL)
        proc.wait(30)
    finally:
        fault_proxy.release()
        if proc.poll() is None:
            proc.kill()
            proc.wait(30)
    store = DiskTier(cache)
    assert store.entries() == []                                 # nothing looks complete
    assert not list((cache / "objects").glob("*/*.json"))
    assert not list((cache / "objects").glob("*/*.data"))

    before = dict(tiered.TIER_BYTES)
    cfg = config(s3_server.endpoint_url, cache_dir=str(cache))
    assert digest(load_file(uri, config=cfg)) == digest(expected)   # the next load is fine and caches it
    assert tier_delta(before, "s3") >= shard_bytes
    wait_for_commits()
    assert len(store.entries()) == 1 and leftovers(cache) == []
    before = dict(tiered.TIER_BYTES)
    assert digest(load_file(uri, config=cfg)) == digest(expected)
    assert tier_delta(before, "disk") >= shard_bytes and tier_delta(before, "s3") == 0


def test_two_processes_load_one_checkpoint(s3_server, s3_bucket, s3_env, fault_proxy, tmp_path):
    expected = make_checkpoint(tmp_path / "ckpt", seed=3, shards=2, mib=6)
    uri, shard_bytes = upload(s3_server, s3_bucket, tmp_path / "ckpt", "models/c")
    cache = tmp_path / "cache"
    cfg = config(fault_proxy.endpoint_url, cache_dir=str(cache), chunk_bytes=1 * MiB, s3_range_bytes=1 * MiB)
    fault_proxy.stall(1, after_bytes=1 << 40)   # index.json passes
    fault_proxy.stall(1, after_bytes=100)       # a shard's header stalls: the first process holds both entries...
    first = spawn_load(cfg, uri)
    try:
        assert fault_proxy.stalled.wait(60)
        second = spawn_load(cfg, uri)           # ...while the second loads the same checkpoint
        out2 = finish(second)
        assert first.poll() is None, "the first load should still be stalled"
    finally:
        fault_proxy.release()
    out1 = finish(first)
    assert out1["sha"] == out2["sha"] == digest(expected)
    assert out2["tiers"].get("s3", 0) >= shard_bytes        # the second read S3 without writing the entries twice
    entries = DiskTier(cache).entries()
    assert len(entries) == 2 and leftovers(cache) == []
    for e in entries:
        assert Path(e["path"]).stat().st_size == e["size"]
    # both running at once, no stall: still consistent, and both bit-exact
    DiskTier(cache).clear()
    cfg = config(s3_server.endpoint_url, cache_dir=str(cache), chunk_bytes=1 * MiB, s3_range_bytes=1 * MiB)
    procs = [spawn_load(cfg, uri) for _ in range(2)]
    outs = [finish(p) for p in procs]
    assert {o["sha"] for o in outs} == {digest(expected)}
    assert len(DiskTier(cache).entries()) == 2 and leftovers(cache) == []
    third = finish(spawn_load(cfg, uri))
    assert third["sha"] == digest(expected)
    assert set(third["tiers"]) == {"disk"} and third["tiers"]["disk"] >= shard_bytes


def test_eviction_under_budget(s3_server, s3_bucket, s3_env, hooked, tmp_path):
    a = make_checkpoint(tmp_path / "a", seed=4, shards=2, mib=3)
    b = make_checkpoint(tmp_path / "b", seed=5, shards=2, mib=3)
    uri_a, bytes_a = upload(s3_server, s3_bucket, tmp_path / "a", "models/a")
    uri_b, bytes_b = upload(s3_server, s3_bucket, tmp_path / "b", "models/b")
    cache = tmp_path / "cache"
    budget = bytes_a + bytes_b // 2 + 4096      # A and half of B fit
    cfg = config(s3_server.endpoint_url, cache_dir=str(cache), cache_max_bytes=budget)
    assert digest(load_file(uri_a, config=cfg)) == digest(a)
    wait_for_commits()
    assert len(DiskTier(cache, budget).entries()) == 2
    assert digest(load_file(uri_b, config=cfg)) == digest(b)
    wait_for_commits()
    store = DiskTier(cache, budget)
    keys = sorted(e["key"] for e in store.entries())
    assert store.usage() <= budget
    assert [k for k in keys if k.startswith("models/b/")] == ["models/b/model-00001-of-00002.safetensors",
                                                              "models/b/model-00002-of-00002.safetensors"]
    assert len(keys) == 3                        # one shard of A (the least recently used) made room
    before = dict(tiered.TIER_BYTES)
    assert digest(load_file(uri_b, config=cfg)) == digest(b)
    assert tier_delta(before, "disk") >= bytes_b and tier_delta(before, "s3") == 0
    # an entry being read is never evicted, even over budget
    entry = store.entries()[0]
    handle = store.lookup(entry["bucket"], entry["key"], entry["etag"], entry["size"])
    try:
        result = warm.evict(None, cfg, tiers=("disk",))
        assert result["disk"]["in_use"] == [entry["uri"]]
        assert Path(handle.data_path).stat().st_size == entry["size"]
    finally:
        handle.close()
    assert warm.evict(None, cfg, tiers=("disk",))["disk"]["evicted"] == [entry["uri"]]


def test_dram_tier_from_another_process(s3_server, s3_bucket, s3_env, tmp_path, shm_dir):
    expected = make_checkpoint(tmp_path / "ckpt", seed=6, shards=2, mib=4)
    uri, shard_bytes = upload(s3_server, s3_bucket, tmp_path / "ckpt", "models/d")
    flags = ["--s3-endpoint-url", s3_server.endpoint_url, "--s3-region", "us-east-1", "--s3-addressing-style",
             "path", "--dram-cache-dir", str(shm_dir)]
    warm = cache_cli("cache", "warm", uri, "--json", *flags)
    assert warm.returncode == 0, warm.stderr
    assert [f["result"] for f in json.loads(warm.stdout)["files"]] == ["copied from s3"] * 2
    cfg = config(s3_server.endpoint_url, dram_cache_dir=str(shm_dir))
    out = finish(spawn_load(cfg, uri))
    assert out["sha"] == digest(expected)
    assert set(out["tiers"]) == {"dram"} and out["tiers"]["dram"] >= shard_bytes
    again = cache_cli("cache", "warm", uri, "--json", *flags)
    assert [f["result"] for f in json.loads(again.stdout)["files"]] == ["already there"] * 2
    status = json.loads(cache_cli("cache", "status", "--json", *flags).stdout)
    dram = next(t for t in status["tiers"] if t["tier"] == "dram")
    assert len(dram["entries"]) == 2 and dram["used_bytes"] == shard_bytes
    evicted = cache_cli("cache", "evict", uri, "--tier", "dram", "--json", *flags)
    assert len(json.loads(evicted.stdout)["dram"]["evicted"]) == 2
    assert DramTier(shm_dir).entries() == []


def _free_port() -> int:
    import socket
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_serve(s3_server, s3_bucket, s3_env, tmp_path, shm_dir):
    make_checkpoint(tmp_path / "ckpt", seed=7, shards=2, mib=1)
    uri, shard_bytes = upload(s3_server, s3_bucket, tmp_path / "ckpt", "models/s")
    port = _free_port()
    proc = subprocess.Popen([sys.executable, "-m", "loader_plugins.cache.cli", "cache", "serve", "--warm", uri,
                             "--metrics-port", str(port), "--interval", "0.2", "--max-bytes", "1GiB",
                             "--s3-endpoint-url", s3_server.endpoint_url, "--s3-region", "us-east-1",
                             "--s3-addressing-style", "path", "--dram-cache-dir", str(shm_dir)],
                            cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=dict(os.environ))
    try:
        line = proc.stdout.readline()
        assert line, proc.stderr.read()[-3000:] if proc.poll() is not None else "no ready line"
        info = json.loads(line)
        assert info["ready"] and info["pid"] == proc.pid and info["max_bytes"] == 1 << 30
        assert DramTier(shm_dir).server_info()["pid"] == proc.pid
        assert len(DramTier(shm_dir).entries()) == 2
        parser = pytest.importorskip("prometheus_client.parser")
        deadline = time.monotonic() + 10
        values: dict = {}
        while time.monotonic() < deadline:
            text = urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=5).read().decode()
            values = {(sample.name, sample.labels.get("tier")): sample.value
                      for family in parser.text_string_to_metric_families(text) for sample in family.samples}
            if values.get(("loader_plugins_cache_entries", "dram")) == 2:
                break
            time.sleep(0.2)
        assert values.get(("loader_plugins_cache_entries", "dram")) == 2
        assert values.get(("loader_plugins_cache_used_bytes", "dram")) == shard_bytes
        assert values.get(("loader_plugins_cache_stored_total", "dram")) == 2
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(30) == 0
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait(30)
    assert DramTier(shm_dir).server_info() is None
    assert len(DramTier(shm_dir).entries()) == 2      # entries outlive the server (no --clear-on-exit)


def test_estimate_predicts_from_recorded_loads(s3_server, s3_bucket, s3_env, hooked, tmp_path):
    """Each whole load records one sample inside its own wall time; the estimate is the tier's default
    before any load and the median of the recorded similar-size samples after. How close the estimate comes
    to a measured load is a timing figure, so it is reported by ``model-streamer bench-cache``
    (its "estimate (s)" column), not asserted here."""
    make_checkpoint(tmp_path / "ckpt", seed=8, shards=2, mib=48)
    uri, shard_bytes = upload(s3_server, s3_bucket, tmp_path / "ckpt", "models/e")
    cache = tmp_path / "cache"
    cfg = config(s3_server.endpoint_url, cache_dir=str(cache))
    history = LoadHistory(cache / HISTORY_NAME)
    first = estimate(uri, cfg)
    assert first["tier"] == "s3" and first["bytes"] == shard_bytes and first["basis"].startswith("default")
    assert first["transfer_seconds"] == pytest.approx(shard_bytes / (DEFAULT_GBPS["s3"] * 1e9), rel=1e-5)
    assert first["seconds"] == pytest.approx(first["metadata_seconds"] + first["transfer_seconds"], abs=2e-6)

    def timed_load(tier: str) -> None:
        before = len(history.samples(tier))
        t0 = time.perf_counter()
        load_file(uri, config=cfg)
        wall = time.perf_counter() - t0
        samples = history.samples(tier)
        assert len(samples) == before + 1, samples
        assert samples[-1]["bytes"] == shard_bytes and 0 < samples[-1]["seconds"] <= wall

    timed_load("s3")                                  # S3, writes the disk tier through
    wait_for_commits()
    for _ in range(3):
        drop_page_cache([e["path"] for e in DiskTier(cache).entries()])
        timed_load("disk")
    assert history.samples("s3") and len(history.samples("disk")) == 3

    predicted = estimate(uri, cfg)
    disk = history.samples("disk")[-RECENT:]
    median_gbps = statistics.median(s["bytes"] / s["seconds"] / 1e9 for s in disk)
    assert predicted["tier"] == "disk" and predicted["bytes"] == shard_bytes and predicted["files"] == 2
    assert predicted["basis"] == f"history: median of the last {len(disk)} similar-size disk load(s) on this host"
    assert predicted["transfer_seconds"] == pytest.approx(shard_bytes / (median_gbps * 1e9), rel=1e-5)
    assert predicted["gbps"] == pytest.approx(median_gbps, abs=1e-4)
    assert predicted["seconds"] == pytest.approx(predicted["metadata_seconds"] + predicted["transfer_seconds"],
                                                 abs=2e-6)
    cli = cache_cli("estimate", uri, "--json", "--cache-dir", str(cache), "--s3-endpoint-url", s3_server.endpoint_url,
                    "--s3-region", "us-east-1", "--s3-addressing-style", "path")
    assert cli.returncode == 0, cli.stderr
    out = json.loads(cli.stdout)
    assert out["tier"] == "disk" and out["bytes"] == shard_bytes and out["seconds"] > 0 and out["gbps"] > 0


# ------------------------------------------------------------------------------------------
# the store down: a cached checkpoint still loads (cache_revalidate)
# ------------------------------------------------------------------------------------------

@pytest.fixture
def offline_reset():
    from loader_plugins.cache import offline

    offline.clear_offline()
    yield offline
    offline.clear_offline()


def _fill_then_stop(s3_server_factory, tmp_path, **overrides):
    server = s3_server_factory()
    client = server.client()
    client.create_bucket(Bucket="going-away")
    expected = make_checkpoint(tmp_path / "ckpt", seed=21, shards=2, mib=3)
    uri, _ = upload(server, "going-away", tmp_path / "ckpt", "models/off")
    cfg = config(server.endpoint_url, cache_dir=str(tmp_path / "cache"), request_timeout=3.0, max_retries=2,
                 **overrides)
    assert digest(load_file(uri, config=cfg)) == digest(expected)     # fills the disk tier, records the directory
    assert wait_for_commits(60)
    server.kill()
    return uri, cfg, expected


def test_cached_checkpoint_loads_with_the_store_down(s3_server_factory, s3_env, hooked, offline_reset, tmp_path,
                                                     caplog):
    uri, cfg, expected = _fill_then_stop(s3_server_factory, tmp_path)
    before = dict(tiered.TIER_BYTES)
    with caplog.at_level("WARNING", logger="loader_plugins.cache.tiered"):
        got = load_file(uri, config=cfg)
    assert digest(got) == digest(expected)
    assert tier_delta(before, "disk") > 0 and tier_delta(before, "s3") == 0
    warnings = [r.getMessage() for r in caplog.records if "NOT revalidated" in r.getMessage()]
    assert len(warnings) == 1 and uri in warnings[0] and "cache_revalidate" in warnings[0]
    # and in a fresh process, where nothing is remembered but the disk tier
    offline_reset.clear_offline()
    result = finish(spawn_load(cfg, uri))
    assert result["sha"] == digest(expected)
    assert result["tiers"].get("disk", 0) > 0 and result["tiers"].get("s3", 0) == 0


def test_cache_revalidate_required_fails_with_the_store_down(s3_server_factory, s3_env, hooked, offline_reset,
                                                             tmp_path):
    uri, cfg, _ = _fill_then_stop(s3_server_factory, tmp_path, cache_revalidate="required")
    with pytest.raises(OSError) as info:
        load_file(uri, config=cfg)
    assert uri in str(info.value) and "attempts" in str(info.value)


def test_store_down_without_a_complete_copy_is_an_error_naming_the_object(s3_server_factory, s3_env, hooked,
                                                                         offline_reset, tmp_path):
    uri, cfg, _ = _fill_then_stop(s3_server_factory, tmp_path)
    victim = next(p for p in (tmp_path / "cache" / "objects").glob("*/*") if p.name.endswith(".json"))
    victim.unlink()   # one shard's entry loses its manifest: no longer complete
    with pytest.raises(OSError) as info:
        load_file(uri, config=cfg)
    text = str(info.value)
    assert "cannot be reached" in text and ".safetensors" in text and "load the checkpoint once" in text
