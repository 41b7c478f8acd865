"""End to end against a real S3-compatible server (SeaweedFS on 127.0.0.1).

- one ``load_file`` call mixing a local shard and S3 shards (one bucket, then two buckets),
  bit-exact against safetensors on the local copies;
- the CLI (``inspect``, ``load --json``, ``pull-config``) in subprocesses with the server's env;
- vLLM with its weights on S3 (``weights_uri``) and only config/tokenizer on local disk;
- the server killed in the middle of a ``load_file``: a clean SourceError, no hang, no threads left.

Every wait is bounded (subprocess timeouts, thread joins) so that a hang fails instead of stalling.
"""

from __future__ import annotations

import errno
import importlib.util
import json
import os
import subprocess
import sys
import threading
import uuid
from pathlib import Path

import pytest

torch = pytest.importorskip("torch")
safetensors_torch = pytest.importorskip("safetensors.torch")

from loader_plugins import load_file  # noqa: E402
from loader_plugins.core import reader as reader_module  # noqa: E402
from loader_plugins.core.sources.local import LocalSource  # noqa: E402
from loader_plugins.core.sources.s3 import S3Source  # noqa: E402
from loader_plugins.errors import SourceError  # noqa: E402

HERE = Path(__file__).resolve().parent
if str(HERE) not in sys.path:
    sys.path.insert(0, str(HERE))

from s3_server import FaultProxy  # noqa: E402

pytestmark = pytest.mark.s3

REPO = HERE.parent
MiB = 1 << 20
CLI_TIMEOUT = 180
JOB_TIMEOUT = 300


# ------------------------------------------------------------------------------------------
# helpers
# ------------------------------------------------------------------------------------------

def _tensors(seed: int) -> dict[str, "torch.Tensor"]:
    g = torch.Generator().manual_seed(seed)
    tensors = {
        "embed.f32": torch.randn(3 * MiB // 4 // 64 + 1, 64, generator=g),
        "odd.bf16": torch.randn(7, 13, 5, generator=g).to(torch.bfloat16),
        "odd.f16": torch.randn(3, 1, 17, generator=g).to(torch.float16),
        "i64": torch.randint(-2**62, 2**62, (9, 11), generator=g, dtype=torch.int64),
        "u8": torch.randint(0, 256, (5, 3, 3), generator=g, dtype=torch.uint8),
        "bool": torch.randint(0, 2, (19,), generator=g).bool(),
        "scalar.f32": torch.tensor(3.25),
        "empty.f32": torch.empty(0),
        "nan.f32": torch.tensor([float("nan"), float("inf"), -0.0, 1e-45]),
    }
    tensors.update({f"layers.{i}.w.bf16": torch.randn(257, 129, generator=g).to(torch.bfloat16) for i in range(6)})
    return tensors


@pytest.fixture(scope="module")
def sharded(tmp_path_factory) -> Path:
    """Three shards, ``model.safetensors.index.json``, config and tokenizer files (as save_pretrained writes)."""
    directory = tmp_path_factory.mktemp("sharded")
    tensors = _tensors(seed=3)
    names = sorted(tensors)
    groups = [names[0::3], names[1::3], names[2::3]]
    weight_map = {}
    for i, group in enumerate(groups, 1):
        file = f"model-{i:05d}-of-{len(groups):05d}.safetensors"
        safetensors_torch.save_file({n: tensors[n] for n in group}, str(directory / file), metadata={"format": "pt"})
        weight_map.update({n: file for n in group})
    total = sum(t.numel() * t.element_size() for t in tensors.values())
    (directory / "model.safetensors.index.json").write_text(
        json.dumps({"metadata": {"total_size": total}, "weight_map": weight_map}))
    (directory / "config.json").write_text(json.dumps({"architectures": ["Test"], "hidden_size": 64}))
    (directory / "tokenizer.json").write_text(json.dumps({"version": "1.0", "model": {"type": "BPE"}}))
    (directory / "tokenizer_config.json").write_text("{}")
    return directory


def _shards(directory: Path) -> list[Path]:
    return sorted(directory.glob("*.safetensors"))


def _reference(files) -> dict:
    out = {}
    for file in files:
        out.update(safetensors_torch.load_file(str(file)))
    return out


def _raw(t: "torch.Tensor") -> bytes:
    return t.contiguous().reshape(-1).view(torch.uint8).numpy().tobytes()


def _assert_same(loaded: dict, expected: dict) -> None:
    assert sorted(loaded) == sorted(expected)
    for name, tensor in expected.items():
        got = loaded[name]
        assert got.dtype == tensor.dtype and got.shape == tensor.shape, name
        assert _raw(got) == _raw(tensor), name


def _upload(client, files, bucket: str, prefix: str) -> list[str]:
    uris = []
    for file in files:
        client.upload_file(str(file), bucket, f"{prefix}/{Path(file).name}")
        uris.append(f"s3://{bucket}/{prefix}/{Path(file).name}")
    return uris


def _options(endpoint_url: str, **extra) -> dict:
    values = dict(s3_endpoint_url=endpoint_url, s3_addressing_style="path", concurrency=4, chunk_bytes=MiB,
                  s3_range_bytes=MiB, memory_limit=8 * MiB, request_timeout=10.0)
    values.update(extra)
    return values


def _empty_bucket(client, name: str) -> None:
    try:
        for page in client.get_paginator("list_objects_v2").paginate(Bucket=name):
            for obj in page.get("Contents", ()):
                client.delete_object(Bucket=name, Key=obj["Key"])
        client.delete_bucket(Bucket=name)
    except Exception:  # noqa: BLE001 - cleanup only
        pass


@pytest.fixture
def second_bucket(s3_server):
    client = s3_server.client()
    name = f"t2-{uuid.uuid4().hex[:20]}"
    client.create_bucket(Bucket=name)
    yield name
    if s3_server.alive:
        _empty_bucket(client, name)


class _ReadLog:
    """Which sources the reader was given, and the bytes each source class delivered."""

    def __init__(self, monkeypatch):
        self.readers: list[set[str]] = []
        self.bytes: dict[str, int] = {"local": 0, "s3": 0}
        self.uris: set[str] = set()
        self.largest: dict[str, int] = {"local": 0, "s3": 0}
        self._lock = threading.Lock()
        init = reader_module.StreamReader.__init__

        def reader_init(reader, specs, sources, *args, **kwargs):
            self.readers.append({s.file for s in specs})
            return init(reader, specs, sources, *args, **kwargs)

        monkeypatch.setattr(reader_module.StreamReader, "__init__", reader_init)
        for kind, cls in (("local", LocalSource), ("s3", S3Source)):
            monkeypatch.setattr(cls, "read_into", self._counting(kind, cls.read_into))

    def _counting(self, kind, original):
        log = self

        def read_into(source, offset, dest, *args, **kwargs):
            original(source, offset, dest, *args, **kwargs)
            with log._lock:
                log.bytes[kind] += memoryview(dest).nbytes
                if offset:   # not the header, which is read from byte 0 with one prefetch
                    log.largest[kind] = max(log.largest[kind], memoryview(dest).nbytes)
                log.uris.add(source.uri)
        return read_into


# ------------------------------------------------------------------------------------------
# (a) local and S3 shards in one load
# ------------------------------------------------------------------------------------------

def test_mixed_local_and_s3_shards_in_one_call(s3_server, s3_bucket, s3_env, sharded, monkeypatch):
    shards = _shards(sharded)
    local, remote = shards[0], shards[1:]
    uris = _upload(s3_server.client(), remote, s3_bucket, "org/model")
    log = _ReadLog(monkeypatch)
    loaded = load_file([str(local), *uris], **_options(s3_server.endpoint_url))
    _assert_same(loaded, _reference(shards))
    # one reader planned the tensors of every shard, local and remote alike
    assert len(log.readers) == 1, log.readers
    assert log.readers[0] == {str(local), *uris}
    assert log.uris >= {str(local), *uris}
    tensor_bytes = {f: sum(t.numel() * t.element_size() for t in _reference([f]).values()) for f in shards}
    assert log.bytes["local"] >= tensor_bytes[local]
    assert log.bytes["s3"] >= sum(tensor_bytes[f] for f in remote)


def test_s3_objects_are_read_in_s3_ranges_and_files_in_chunks(s3_server, s3_bucket, s3_env, sharded,
                                                               monkeypatch):
    """One plan, two read sizes: ranged GETs of up to ``s3_range_bytes`` (fewer round trips),
    local reads of up to ``chunk_bytes``."""
    shards = _shards(sharded)
    big = next(f for f in shards if "embed.f32" in _reference([f]))     # the 3 MiB tensor
    uris = _upload(s3_server.client(), shards, s3_bucket, "ranges/model")
    sizes = dict(chunk_bytes=64 << 10, s3_range_bytes=4 * MiB, memory_limit=16 * MiB)
    log = _ReadLog(monkeypatch)
    _assert_same(load_file(uris, **_options(s3_server.endpoint_url, **sizes)), _reference(shards))
    embed_bytes = _reference([big])["embed.f32"].numel() * 4
    assert log.largest["s3"] == embed_bytes > 64 << 10      # one GET for the whole tensor
    remote = [u for f, u in zip(shards, uris) if f != big]
    log = _ReadLog(monkeypatch)
    _assert_same(load_file([str(big), *remote], **_options(s3_server.endpoint_url, **sizes)), _reference(shards))
    assert 0 < log.largest["local"] <= 64 << 10 and log.bytes["local"] >= embed_bytes


def test_two_buckets_and_a_local_shard_in_one_call(s3_server, s3_bucket, second_bucket, s3_env, sharded,
                                                   monkeypatch):
    shards = _shards(sharded)
    client = s3_server.client()
    first = _upload(client, shards[:1], s3_bucket, "a")
    second = _upload(client, shards[1:2], second_bucket, "deep/prefix/b")
    log = _ReadLog(monkeypatch)
    loaded = load_file([*first, *second, str(shards[2])], **_options(s3_server.endpoint_url, concurrency=3))
    _assert_same(loaded, _reference(shards))
    assert log.readers == [{*first, *second, str(shards[2])}]
    # two buckets alone, one of them named by its prefix (a directory of shards, no index)
    _upload(client, shards[1:], second_bucket, "rest")
    log.readers.clear()
    loaded = load_file([f"s3://{second_bucket}/rest", *first], **_options(s3_server.endpoint_url))
    _assert_same(loaded, _reference(shards))
    assert log.readers == [{*first, *(f"s3://{second_bucket}/rest/{p.name}" for p in shards[1:])}]


def test_storages_share_parsed_models_not_credentials(s3_server, s3_bucket, s3_env, monkeypatch):
    """Clients share botocore's parsed service data (cheap to create), never credentials."""
    from contextlib import closing

    from loader_plugins.config import StreamerConfig
    from loader_plugins.core.sources import storage_for

    key = "cred/model.bin"
    s3_server.client().put_object(Bucket=s3_bucket, Key=key, Body=b"z" * 32)
    uri = f"s3://{s3_bucket}/{key}"
    cfg = StreamerConfig(**{k: v for k, v in _options(s3_server.endpoint_url).items()
                            if k not in ("chunk_bytes", "memory_limit")}, max_retries=1)
    with closing(storage_for(uri, cfg)) as good, good.open(uri) as src:
        assert src.read_bytes(0, 32) == b"z" * 32
        monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", "WRONGsecret000000000000000000")
        with closing(storage_for(uri, cfg)) as bad:
            assert bad.client._loader is good.client._loader
            with pytest.raises(SourceError, match="check the S3 credentials") as info:
                bad.open(uri)
            assert info.value.errno == errno.EACCES
        assert src.read_bytes(0, 8) == b"z" * 8  # the first storage keeps its own credentials


# ------------------------------------------------------------------------------------------
# (b) the CLI against the server
# ------------------------------------------------------------------------------------------

def _cli_env(server) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("AWS_")}
    env.update(server.env())
    env["PYTHONPATH"] = os.pathsep.join(p for p in (str(REPO), env.get("PYTHONPATH", "")) if p)
    return env


def _cli(server, *args: str, cwd: Path) -> subprocess.CompletedProcess:
    script = Path(sys.executable).parent / "model-streamer"
    command = [str(script)] if script.exists() else [sys.executable, "-m", "loader_plugins.cli"]
    proc = subprocess.run([*command, *args], env=_cli_env(server), cwd=cwd, capture_output=True, text=True,
                          timeout=CLI_TIMEOUT)
    assert proc.returncode == 0, f"{args}: exit {proc.returncode}\n{proc.stdout[-2000:]}\n{proc.stderr[-3000:]}"
    return proc


def test_cli_inspect_load_and_pull_config(s3_server, s3_bucket, sharded, tmp_path):
    files = sorted(p for p in sharded.iterdir() if p.is_file())
    _upload(s3_server.client(), files, s3_bucket, "models/tiny")
    prefix = f"s3://{s3_bucket}/models/tiny"
    expected = _reference(_shards(sharded))
    total = sum(t.numel() * t.element_size() for t in expected.values())

    out = json.loads(_cli(s3_server, "inspect", prefix, "--json", cwd=tmp_path).stdout)
    assert sorted(t["name"] for t in out["tensors"]) == sorted(expected)
    assert out["total_bytes"] == total
    assert sorted(f["file"] for f in out["files"]) == [f"{prefix}/{p.name}" for p in _shards(sharded)]
    text = _cli(s3_server, "inspect", f"{prefix}/model-00002-of-00003.safetensors", cwd=tmp_path).stdout
    assert "model-00002-of-00003.safetensors" in text and "total:" in text

    # the endpoint as a flag as well as from AWS_ENDPOINT_URL
    proc = _cli(s3_server, "load", prefix, "--json", "--s3-endpoint-url", s3_server.endpoint_url,
                "--s3-addressing-style", "path", "--chunk-bytes", "1MiB", cwd=tmp_path)
    result = json.loads(proc.stdout.strip().splitlines()[-1])
    assert result["tensors"] == len(expected) and result["bytes"] == total and result["files"] == 3
    assert result["path"] == prefix

    target = tmp_path / "config-only"
    proc = _cli(s3_server, "pull-config", prefix, str(target), cwd=tmp_path)
    fetched = sorted(p.name for p in target.iterdir())
    assert not [n for n in fetched if n.endswith(".safetensors")], fetched
    assert {"config.json", "tokenizer.json", "tokenizer_config.json"} <= set(fetched)
    for name in fetched:
        assert (target / name).read_bytes() == (sharded / name).read_bytes(), name
    assert "fetched" in proc.stdout


def test_cli_bench_s3_smoke(s3_server, s3_bucket, sharded, tmp_path):
    """``model-streamer bench s3://...`` runs every kind of method once and writes its JSON."""
    _upload(s3_server.client(), sorted(p for p in sharded.iterdir() if p.is_file()), s3_bucket, "bench")
    out = tmp_path / "bench.json"
    methods = "streamer,streamer-into,boto3-16t,boto3-into-8t,runai-s3-c4"
    proc = _cli(s3_server, "bench", f"s3://{s3_bucket}/bench", "--repeat", "1", "--methods", methods,
                "--json", str(out), cwd=tmp_path)
    data = json.loads(out.read_text())
    results = data["results"]
    assert set(results) == set(methods.split(","))
    for name in ("streamer", "streamer-into", "boto3-16t", "boto3-into-8t"):
        assert results[name]["s3"]["gbps"] > 0, results[name]
    runai = results["runai-s3-c4"]
    if importlib.util.find_spec("runai_model_streamer_s3") is not None:
        assert runai.get("s3", {}).get("gbps", 0) > 0, runai
    else:
        assert "runai-model-streamer" in runai["error"]
    assert data["rss"]["peak_rss"] > 0 and data["endpoint"] == s3_server.endpoint_url
    assert "ours ÷ it" in proc.stdout and "Run:ai at its default concurrency" in proc.stdout


# ------------------------------------------------------------------------------------------
# (c) vLLM with its weights on S3
# ------------------------------------------------------------------------------------------

def _run_vllm_job(spec: dict, extra_env: dict[str, str]) -> dict:
    from _smoke_vllm_default import CPU_ENGINE_ENV, INPROCESS_ENV

    env = {k: v for k, v in os.environ.items() if not k.startswith("AWS_")}
    env.update(CPU_ENGINE_ENV)
    env.update(INPROCESS_ENV)
    env.update(extra_env)
    env["PYTHONPATH"] = os.pathsep.join(p for p in (str(REPO), env.get("PYTHONPATH", "")) if p)
    proc = subprocess.run([sys.executable, str(HERE / "_vllm_job.py"), json.dumps(spec)], env=env,
                          capture_output=True, text=True, timeout=JOB_TIMEOUT)
    output = proc.stdout + proc.stderr
    assert proc.returncode == 0, output[-5000:]
    line = [x for x in proc.stdout.splitlines() if x.startswith("RESULT ")][-1]
    result = json.loads(line[len("RESULT "):])
    result["output"] = output
    return result


@pytest.mark.vllm
@pytest.mark.slow
def test_vllm_weights_on_s3(s3_server, s3_bucket, tmp_path):
    if importlib.util.find_spec("vllm") is None:
        pytest.skip("vLLM is not installed (bash .ci/install_vllm.sh .venv/bin/python)")
    from _tiny_models import make_tiny_llama

    local = make_tiny_llama(tmp_path / "tiny", dtype="float32", shards=3, seed=5)
    _upload(s3_server.client(), sorted(p for p in local.iterdir() if p.is_file()), s3_bucket, "llama")
    prefix = f"s3://{s3_bucket}/llama"
    config_only = tmp_path / "config-only"
    _cli(s3_server, "pull-config", prefix, str(config_only), cwd=tmp_path)
    assert not list(config_only.glob("*.safetensors"))

    reference = _run_vllm_job({"model": str(local), "load_format": "safetensors"}, {})
    got = _run_vllm_job({"model": str(config_only), "load_format": "streamer",
                         "extra": {"weights_uri": prefix, "s3_endpoint_url": s3_server.endpoint_url,
                                   "s3_addressing_style": "path", "concurrency": 3}},
                        {k: v for k, v in s3_server.env().items() if k != "AWS_ENDPOINT_URL"})
    assert got["outputs"][0] == reference["outputs"][0]
    assert len(got["outputs"][0]) > 0
    assert "Streamer loaded" in got["output"]


# ------------------------------------------------------------------------------------------
# (d) the server dies mid-load
# ------------------------------------------------------------------------------------------

def _streamer_threads() -> list[str]:
    return [t.name for t in threading.enumerate() if t.name.startswith("streamer-")]


@pytest.mark.slow
def test_server_killed_mid_load(s3_server_factory, s3_env, tmp_path):
    server = s3_server_factory()
    client = server.client()
    client.create_bucket(Bucket="dying")
    g = torch.Generator().manual_seed(11)
    tensors = {f"w{i}": torch.randn(16 * MiB, generator=g) for i in range(2)}  # 2 x 64 MiB
    path = tmp_path / "model.safetensors"
    safetensors_torch.save_file(tensors, str(path))
    client.upload_file(str(path), "dying", "ckpt/model.safetensors")
    uri = "s3://dying/ckpt/model.safetensors"
    assert not _streamer_threads()

    with FaultProxy("127.0.0.1", server.s3_port) as proxy:
        # The first ranged GET is the header's (256 KiB): let it through (a cut that never comes),
        # then hold the first data range after 1 MiB, so the load cannot finish before the kill:
        # ranges are 64 MiB, more than the socket buffers between server and proxy can hold.
        proxy.cut(1, after_bytes=1 << 40, abortive=False)
        proxy.stall(1, after_bytes=MiB)
        outcome: dict = {}

        def load():
            try:
                outcome["result"] = load_file(uri, **_options(proxy.endpoint_url, chunk_bytes=64 * MiB, s3_range_bytes=64 * MiB,
                                                               memory_limit=256 * MiB, request_timeout=2.0,
                                                               max_retries=2))
            except BaseException as exc:  # noqa: BLE001
                outcome["error"] = exc

        thread = threading.Thread(target=load, name="load-under-test", daemon=True)
        thread.start()
        assert proxy.stalled.wait(60), f"no data range was stalled; ranged GETs: {proxy.ranged_gets}"
        server.kill()
        proxy.release()
        thread.join(120)
        assert not thread.is_alive(), "load_file hung after the server died"

    assert "result" not in outcome, "a load from a dead server returned tensors"
    error = outcome.get("error")
    assert isinstance(error, SourceError), repr(error)
    message = str(error)
    assert uri in message and "failed after" in message, message
    assert _streamer_threads() == [], "reader threads outlived the failed load"
