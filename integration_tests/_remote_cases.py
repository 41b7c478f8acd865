"""The cases every object-store source passes against its real emulator (fsspec's abstract-test
pattern: one class of tests, a subclass per store). ``test_s3_source.py`` (SeaweedFS),
``test_gcs_source.py`` (fake-gcs-server) and ``test_azure_source.py`` (Azurite) subclass
:class:`RemoteSourceCases` and give a ``store``
fixture (:class:`Store`): how to make a bucket, put an object, name it, point a config at an
endpoint, and how the store answers throttling, refusals and failed preconditions (the
:class:`~s3_server.FaultProxy` in front of the emulator sends those answers, with the
store's own error bodies). The checkpoints are here too (:func:`make_tensors`).

Every wait is bounded (subprocess timeouts, thread joins): a hang fails instead of stalling.
"""

from __future__ import annotations

import errno
import json
import logging
import os
import random
import subprocess
import sys
import threading
import time
from contextlib import closing
from pathlib import Path

import pytest

torch = pytest.importorskip("torch")
safetensors_torch = pytest.importorskip("safetensors.torch")

from loader_plugins import SafetensorsStreamer, StreamerConfig, load_file  # noqa: E402
from loader_plugins.core.checkpoint import open_checkpoint  # noqa: E402
from loader_plugins.core.header import HEADER_LENGTH_BYTES, header_length, parse_header  # noqa: E402
from loader_plugins.core.sources import storage_for  # noqa: E402
from loader_plugins.core.sources.local import LocalSource  # noqa: E402
from loader_plugins.errors import CancelledError, SourceChangedError, SourceError  # noqa: E402

try:
    from .s3_server import FaultProxy
except ImportError:
    from s3_server import FaultProxy

REPO = Path(__file__).resolve().parents[1]
MiB = 1 << 20
CLI_TIMEOUT = 180


class Store:
    """What the shared cases need of one store; a test module subclasses it for its emulator."""

    scheme = ""                      # "s3", "gs", "az"
    kind = ""                        # the bench's name for it: "s3", "gcs", "azure"
    runai_reaches_emulator = True    # Run:ai's backend can be pointed at the emulator
    source_cls: type = object        # S3Source, GcsSource, AzureSource
    logger = ""                      # the source module's logger (retries are logged there)
    range_headers: tuple[bytes, ...] = (b"range",)
    throttle_reason = ""             # what a retry's log line names for a 503
    refused_connection = ""          # the client's exception for a connection refused
    nothing_under = ""               # what list_dir says of a prefix with nothing under it

    def __init__(self, server):
        self.server = server

    # objects
    def bucket(self) -> str: ...
    def put(self, bucket: str, key: str, data: bytes) -> None: ...
    def uri(self, bucket: str, key: str) -> str:
        return f"{self.scheme}://{bucket}/{key}"

    def put_dir(self, directory: Path, bucket: str, prefix: str, names=None) -> list[str]:
        uris = []
        for file in sorted(directory.iterdir()):
            if file.is_file() and (names is None or file.name in names):
                self.put(bucket, f"{prefix}/{file.name}", file.read_bytes())
                uris.append(self.uri(bucket, f"{prefix}/{file.name}"))
        return uris

    # configs: StreamerConfig keys that point at ``endpoint`` (default: the emulator itself)
    def options(self, endpoint: str | None = None, **extra) -> dict: ...
    def config(self, endpoint: str | None = None, **extra) -> StreamerConfig:
        values = dict(request_timeout=10.0, max_retries=3, concurrency=4)
        values.update(self.options(endpoint))
        values.update(extra)
        return StreamerConfig.from_dict(values)

    def proxy(self, server=None) -> FaultProxy:
        """A fault injector in front of ``server`` (default: the session's emulator)."""
        return FaultProxy("127.0.0.1", (server or self.server).port, range_headers=self.range_headers)

    def proxy_endpoint(self, proxy: FaultProxy) -> str: ...
    # the store's answers, sent by the proxy instead of the emulator's
    def throttle(self, proxy: FaultProxy, n: int, status: int) -> None: ...
    def refuse(self, proxy: FaultProxy, n: int) -> None: ...
    def precondition_failed(self, proxy: FaultProxy, n: int) -> None: ...
    # what messages say
    def missing_bucket(self, bucket: str) -> str: ...
    def missing_object(self, bucket: str, key: str) -> str: ...
    #: texts that must never reach a message or a log line
    secrets: tuple[str, ...] = ()

    def cli_env(self) -> dict[str, str]:
        """Environment of a CLI subprocess that reaches the emulator."""
        env = {k: v for k, v in os.environ.items() if not k.startswith(("AWS_", "AZURE_", "GOOGLE_"))
               and k != "STORAGE_EMULATOR_HOST"}
        env["PYTHONPATH"] = os.pathsep.join(p for p in (str(REPO), env.get("PYTHONPATH", "")) if p)
        return env

    def cli_flags(self) -> list[str]:
        return []

    def start_private(self, workdir: Path): ...


# ------------------------------------------------------------------------------------------
# checkpoints and helpers (the S3 tests' too)
# ------------------------------------------------------------------------------------------

def make_tensors(seed: int = 0, big_mib: int = 6) -> dict[str, "torch.Tensor"]:
    """Several dtypes, odd shapes, a 0-d scalar, empty tensors and one multi-MiB tensor."""
    g = torch.Generator().manual_seed(seed)
    tensors = {
        "big.f32": torch.randn(big_mib * MiB // 4 // 3 + 1, 3, generator=g),
        "odd.bf16": torch.randn(7, 13, 5, generator=g).to(torch.bfloat16),
        "odd.f16": torch.randn(3, 1, 17, generator=g).to(torch.float16),
        "f64": torch.randn(33, generator=g, dtype=torch.float64),
        "i64": torch.randint(-2**62, 2**62, (9, 11), generator=g, dtype=torch.int64),
        "i8": torch.randint(-128, 128, (1001,), generator=g, dtype=torch.int8),
        "u8": torch.randint(0, 256, (5, 3, 3), generator=g, dtype=torch.uint8),
        "bool": torch.randint(0, 2, (19,), generator=g).bool(),
        "scalar.f32": torch.tensor(3.25),
        "scalar.i32": torch.tensor(-7, dtype=torch.int32),
        "empty.f32": torch.empty(0),
        "empty.2d.bf16": torch.empty(0, 4, dtype=torch.bfloat16),
        "nan.f32": torch.tensor([float("nan"), float("inf"), -0.0, 1e-45]),
    }
    f8 = getattr(torch, "float8_e4m3fn", None)  # torch 2.1+
    if f8 is not None:
        tensors["f8"] = torch.randn(37, generator=g).to(f8)
    return tensors


def raw_bytes(t: "torch.Tensor") -> bytes:
    return t.contiguous().reshape(-1).view(torch.uint8).numpy().tobytes()


def read_header(src, cfg: StreamerConfig):
    """What the reader does: one prefetch of min(size, header_prefetch) bytes, more only if needed."""
    size = src.size()
    prefix = src.read_bytes(0, min(size, src.header_prefetch))
    n = header_length(prefix, file=src.uri, file_size=size, max_header_bytes=cfg.max_header_bytes)
    end = HEADER_LENGTH_BYTES + n
    body = prefix[HEADER_LENGTH_BYTES:end] if end <= len(prefix) else src.read_bytes(HEADER_LENGTH_BYTES, n)
    return parse_header(body, file=src.uri, file_size=size)


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory) -> tuple[Path, bytes, dict]:
    path = tmp_path_factory.mktemp("ckpt") / "model.safetensors"
    tensors = make_tensors()
    safetensors_torch.save_file(tensors, str(path), metadata={"format": "pt"})
    return path, path.read_bytes(), tensors


@pytest.fixture(scope="module")
def sharded_checkpoint(tmp_path_factory) -> tuple[Path, dict]:
    """Three shards and model.safetensors.index.json, as ``save_pretrained`` writes them."""
    directory = tmp_path_factory.mktemp("sharded")
    tensors = make_tensors(seed=1, big_mib=5)
    g = torch.Generator().manual_seed(2)
    tensors.update({f"layers.{i}.w.bf16": torch.randn(257, 129, generator=g).to(torch.bfloat16) for i in range(6)})
    names = sorted(tensors)
    shards = [names[0::3], names[1::3], names[2::3]]
    weight_map = {}
    for i, shard_names in enumerate(shards, 1):
        file = f"model-{i:05d}-of-{len(shards):05d}.safetensors"
        safetensors_torch.save_file({n: tensors[n] for n in shard_names}, str(directory / file),
                                    metadata={"format": "pt"})
        weight_map.update({n: file for n in shard_names})
    total = sum(t.numel() * t.element_size() for t in tensors.values())
    (directory / "model.safetensors.index.json").write_text(
        json.dumps({"metadata": {"total_size": total}, "weight_map": weight_map}))
    (directory / "config.json").write_text("{}")
    return directory, weight_map


def _reference(directory: Path) -> dict:
    out = {}
    for file in sorted(directory.glob("*.safetensors")):
        out.update(safetensors_torch.load_file(str(file)))
    return out


def _assert_same(loaded: dict, expected: dict) -> None:
    assert sorted(loaded) == sorted(expected)
    for name, tensor in expected.items():
        got = loaded[name]
        assert got.dtype == tensor.dtype and got.shape == tensor.shape, name
        assert raw_bytes(got) == raw_bytes(tensor), name


def fast_backoff(storage, base: float = 0.01) -> None:
    storage.backoff_base = base  # keep retry tests quick; the policy itself is unchanged
    storage.backoff_cap = 0.2


def _bytes_of(files) -> int:
    return sum(t.numel() * t.element_size() for f in files for t in safetensors_torch.load_file(str(f)).values())


def _streamer_threads() -> list[str]:
    return [t.name for t in threading.enumerate() if t.name.startswith("streamer-")]


class _Collecting:
    """An engine model's ``load_weights`` (clones every tensor it is given)."""

    def __init__(self):
        self.got: dict[str, torch.Tensor] = {}

    def __call__(self, weights):
        for name, tensor in weights:
            self.got[name] = tensor.clone()
        return set(self.got)


class RemoteSourceCases:
    """The shared cases; a subclass per store (its module defines the ``store`` fixture)."""

    # --------------------------------------------------------------------------------------
    # reads
    # --------------------------------------------------------------------------------------

    def test_random_ranges_bit_exact(self, store, checkpoint):
        _, data, _ = checkpoint
        bucket = store.bucket()
        store.put(bucket, "models/tiny/model.safetensors", data)
        uri = store.uri(bucket, "models/tiny/model.safetensors")
        storage = storage_for(uri, store.config())
        rng = random.Random(1234)
        size = len(data)
        ranges = [(0, size), (0, 1), (size - 1, 1), (MiB - 3, 7), (2 * MiB - 1, MiB + 2), (0, 8)]
        ranges += [(a, rng.randint(1, min(3 * MiB, size - a))) for a in (rng.randrange(size - 1) for _ in range(60))]
        with closing(storage), storage.open(uri) as src:
            assert isinstance(src, store.source_cls)
            assert src.size() == size and src.remote and not src.wants_staging and src.reads_pinned
            for offset, length in ranges:
                buf = bytearray(length)
                src.read_into(offset, memoryview(buf))
                assert buf == data[offset:offset + length], (offset, length)
            src.read_into(5, memoryview(bytearray(0)))  # an empty range needs no request
            src.check_unchanged()
            with pytest.raises(SourceError, match=rf"{uri}: bytes \[{size - 2}, {size + 1}\) lie outside"):
                src.read_into(size - 2, memoryview(bytearray(3)))
        assert storage.stats.retries == 0
        assert storage.stats.bytes_read == sum(length for _, length in ranges)

    def test_whole_tensors_via_header_all_dtypes(self, store, checkpoint):
        _, data, tensors = checkpoint
        bucket = store.bucket()
        store.put(bucket, "m.safetensors", data)
        uri = store.uri(bucket, "m.safetensors")
        cfg = store.config()
        with closing(storage_for(uri, cfg)) as storage, storage.open(uri) as src:
            before = storage.stats.requests
            header = read_header(src, cfg)
            assert storage.stats.requests - before == 1, "the header should come in one ranged GET"
            assert src.header_prefetch == 256 << 10 and header.metadata == {"format": "pt"}
            specs = header.by_name()
            assert set(specs) == set(tensors) and {"scalar.f32", "empty.f32", "empty.2d.bf16"} <= set(specs)
            for name, spec in specs.items():
                out = torch.empty(spec.shape, dtype=spec.torch_dtype())
                src.read_into(spec.offset, memoryview(out.reshape(-1).view(torch.uint8).numpy()))
                expected = tensors[name]
                assert out.dtype == expected.dtype and out.shape == expected.shape, name
                assert raw_bytes(out) == raw_bytes(expected), name
            out = torch.empty(16, 64, dtype=torch.float32)
            src.read_into(1000, memoryview(out.numpy()))  # a 2-d float view is cast to bytes
            assert raw_bytes(out) == data[1000:1000 + out.numel() * 4]

    def test_directories(self, store):
        bucket = store.bucket()
        for key in ("ckpt/model-00001-of-00002.safetensors", "ckpt/model-00002-of-00002.safetensors",
                    "ckpt/model.safetensors.index.json", "ckpt/sub/nested.bin", "ckpt2/other.bin", "top.bin"):
            store.put(bucket, key, b"x" * 10)
        base = store.uri(bucket, "ckpt")
        with closing(storage_for(base, store.config())) as storage:
            for uri in (base, base + "/"):
                assert storage.is_dir(uri) and storage.exists(uri)
                assert storage.listing(uri) == storage.list_dir(uri) == [
                    "model-00001-of-00002.safetensors", "model-00002-of-00002.safetensors",
                    "model.safetensors.index.json"]
            assert storage.list_dir(store.uri(bucket, "")) == ["top.bin"]
            assert storage.is_dir(store.uri(bucket, "ckpt/sub"))
            assert not storage.is_dir(store.uri(bucket, "ckpt/model.safetensors.index.json"))
            assert not storage.is_dir(store.uri(bucket, "ck"))      # a string prefix is not a directory
            assert storage.listing(store.uri(bucket, "nothing")) is None
            assert storage.exists(store.uri(bucket, "top.bin")) and not storage.exists(store.uri(bucket, "nothing"))
            assert storage.join(base + "/", "a.bin") == store.uri(bucket, "ckpt/a.bin")
            assert storage.read_small(store.uri(bucket, "top.bin")) == b"x" * 10
            with pytest.raises(SourceError, match="larger than the 5-byte limit"):
                storage.read_small(store.uri(bucket, "top.bin"), limit=5)
            with pytest.raises(SourceError) as info:
                storage.list_dir(store.uri(bucket, "nothing"))
            assert info.value.errno == errno.ENOENT and store.uri(bucket, "nothing") in str(info.value)
            assert store.nothing_under in str(info.value)
            with pytest.raises(SourceError, match="not a"):
                storage.open(base + "/")
        assert storage.stats.retries == 0

    def test_missing_bucket_and_object(self, store):
        bucket = store.bucket()
        uri = store.uri("no-such-bucket-xyz", "model.safetensors")
        with closing(storage_for(uri, store.config())) as storage:
            with pytest.raises(SourceError) as info:
                storage.open(uri)
            assert info.value.errno == errno.ENOENT
            assert uri in str(info.value) and store.missing_bucket("no-such-bucket-xyz") in str(info.value)
            missing = store.uri(bucket, "missing/model.safetensors")
            with pytest.raises(SourceError) as info:
                storage.open(missing)
            assert info.value.errno == errno.ENOENT
            assert missing in str(info.value) and store.missing_object(bucket, "missing/model.safetensors") in \
                str(info.value)
            with pytest.raises(SourceError) as info:
                storage.list_dir(store.uri("no-such-bucket-xyz", "ckpt"))
            assert store.missing_bucket("no-such-bucket-xyz") in str(info.value)
            assert not storage.is_dir(store.uri("no-such-bucket-xyz", "ckpt"))
            with pytest.raises(SourceError, match=store.uri(bucket, "nothing/here")):
                load_file(store.uri(bucket, "nothing/here"), config=store.config())
        assert storage.stats.retries == 0

    # --------------------------------------------------------------------------------------
    # whole checkpoints
    # --------------------------------------------------------------------------------------

    def test_load_file_sharded_bit_exact(self, store, sharded_checkpoint):
        directory, _ = sharded_checkpoint
        bucket = store.bucket()
        store.put_dir(directory, bucket, "org/model")
        expected = _reference(directory)
        cfg = store.config(chunk_bytes=MiB, s3_range_bytes=MiB, memory_limit=8 * MiB)
        prefix = store.uri(bucket, "org/model")
        for uri in (prefix, prefix + "/", prefix + "/model.safetensors.index.json"):
            _assert_same(load_file(uri, config=cfg), expected)
        one = prefix + "/model-00002-of-00003.safetensors"
        _assert_same(load_file(one, config=cfg),
                     safetensors_torch.load_file(str(directory / "model-00002-of-00003.safetensors")))

    def test_mixed_local_and_remote_shards(self, store, sharded_checkpoint, monkeypatch):
        """One load of a local shard and remote shards: load_file, SafetensorsStreamer, and the
        engines' entry (``load_into_model``, what the vLLM and SGLang loaders call with
        ``weights_uri``), bit-exact against safetensors."""
        from loader_plugins.engine_options import parse_extra_config
        from loader_plugins.inplace import load_into_model

        directory, _ = sharded_checkpoint
        shards = sorted(directory.glob("*.safetensors"))
        bucket = store.bucket()
        remote = store.put_dir(directory, bucket, "mixed", names={p.name for p in shards[1:]})
        files = [str(shards[0]), *remote]
        expected = _reference(directory)
        counted = {"local": 0, "remote": 0}
        lock = threading.Lock()
        for kind, cls in (("local", LocalSource), ("remote", store.source_cls)):
            original = cls.read_into

            def read_into(src, offset, dest, *args, _kind=kind, _original=original, **kwargs):
                _original(src, offset, dest, *args, **kwargs)
                with lock:
                    counted[_kind] += memoryview(dest).nbytes
            monkeypatch.setattr(cls, "read_into", read_into)
        cfg = store.config(chunk_bytes=MiB, s3_range_bytes=MiB, memory_limit=8 * MiB)
        _assert_same(load_file(files, config=cfg), expected)
        assert counted["local"] >= _bytes_of(shards[:1]) and counted["remote"] >= _bytes_of(shards[1:]), counted
        with SafetensorsStreamer(cfg) as streamer:
            streamer.stream_files(files)
            _assert_same(dict(streamer.get_tensors()), expected)
        # the engines' entry with the weights elsewhere: weights_uri in the extra config
        options = parse_extra_config({"weights_uri": store.uri(bucket, "mixed"), **store.options(),
                                      "concurrency": 3})
        assert options.location("/models/config-only") == store.uri(bucket, "mixed")
        collect = _Collecting()
        load_into_model(collect, torch.nn.Module(), [str(shards[0]), options.location("/models/config-only")],
                        options.config, in_place=False)
        _assert_same(collect.got, expected)

    def test_cli_inspect_load_and_pull_config(self, store, sharded_checkpoint, tmp_path):
        directory, _ = sharded_checkpoint
        bucket = store.bucket()
        store.put_dir(directory, bucket, "models/tiny")
        prefix = store.uri(bucket, "models/tiny")
        expected = _reference(directory)
        total = sum(t.numel() * t.element_size() for t in expected.values())

        def cli(*args: str) -> subprocess.CompletedProcess:
            script = Path(sys.executable).parent / "model-streamer"
            command = [str(script)] if script.exists() else [sys.executable, "-m", "loader_plugins.cli"]
            proc = subprocess.run([*command, *args], env=store.cli_env(), cwd=tmp_path, capture_output=True,
                                  text=True, timeout=CLI_TIMEOUT)
            assert proc.returncode == 0, f"{args}: exit {proc.returncode}\n{proc.stdout[-2000:]}\n{proc.stderr[-3000:]}"
            return proc

        out = json.loads(cli("inspect", prefix, "--json", *store.cli_flags()).stdout)
        assert sorted(t["name"] for t in out["tensors"]) == sorted(expected) and out["total_bytes"] == total
        assert sorted(f["file"] for f in out["files"]) == [f"{prefix}/{p.name}"
                                                           for p in sorted(directory.glob("*.safetensors"))]
        proc = cli("load", prefix, "--json", "--chunk-bytes", "1MiB", *store.cli_flags())
        result = json.loads(proc.stdout.strip().splitlines()[-1])
        assert result["tensors"] == len(expected) and result["bytes"] == total and result["files"] == 3
        target = tmp_path / "config-only"
        proc = cli("pull-config", prefix, str(target), *store.cli_flags())
        fetched = sorted(p.name for p in target.iterdir())
        assert fetched == ["config.json", "model.safetensors.index.json"], fetched     # no weights
        for name in fetched:
            assert (target / name).read_bytes() == (directory / name).read_bytes(), name
        assert "fetched 2 file(s)" in proc.stdout
        for secret in store.secrets:
            assert secret not in proc.stdout + proc.stderr

    def test_cli_bench_smoke(self, store, sharded_checkpoint, tmp_path):
        """``model-streamer bench gs://... / az://...`` runs ours, the official client and Run:ai
        (or says why Run:ai cannot reach this endpoint) and writes its table and JSON."""
        directory, _ = sharded_checkpoint
        bucket = store.bucket()
        store.put_dir(directory, bucket, "bench")
        out = tmp_path / "bench.json"
        methods = f"streamer,streamer-into,{store.kind}-client-16t,runai-{store.kind}-c4"
        script = Path(sys.executable).parent / "model-streamer"
        command = [str(script)] if script.exists() else [sys.executable, "-m", "loader_plugins.cli"]
        proc = subprocess.run([*command, "bench", store.uri(bucket, "bench"), "--repeat", "1", "--methods", methods,
                               "--json", str(out), *store.cli_flags()], env=store.cli_env(), cwd=tmp_path,
                              capture_output=True, text=True, timeout=CLI_TIMEOUT)
        assert proc.returncode == 0, f"exit {proc.returncode}\n{proc.stdout[-2000:]}\n{proc.stderr[-3000:]}"
        results = json.loads(out.read_text())["results"]
        assert set(results) == set(methods.split(","))
        for name in ("streamer", "streamer-into", f"{store.kind}-client-16t"):
            assert results[name]["remote"]["gbps"] > 0, results[name]
        runai = results[f"runai-{store.kind}-c4"]
        if store.runai_reaches_emulator:
            assert runai.get("remote", {}).get("gbps", 0) > 0, runai
        else:
            assert "cannot reach" in runai["error"] and "remote" not in runai, runai
        assert "ours ÷ it" in proc.stdout and "the official client" in proc.stdout

    # --------------------------------------------------------------------------------------
    # faults, injected by the proxy in front of the emulator
    # --------------------------------------------------------------------------------------

    def _proxied(self, store, data: bytes, proxy: FaultProxy, **overrides):
        bucket = store.bucket()
        store.put(bucket, "faults/model.safetensors", data)
        uri = store.uri(bucket, "faults/model.safetensors")
        return uri, store.config(store.proxy_endpoint(proxy), **overrides)

    def test_throttling_and_5xx_are_retried(self, store, checkpoint, caplog):
        _, data, _ = checkpoint
        with store.proxy() as proxy:
            uri, cfg = self._proxied(store, data, proxy, max_retries=5)
            with closing(storage_for(uri, cfg)) as storage, storage.open(uri) as src:
                fast_backoff(storage)
                store.throttle(proxy, 2, 503)
                store.throttle(proxy, 2, 429)
                buf = bytearray(3 * MiB + 5)
                with caplog.at_level(logging.INFO, logger=store.logger):
                    src.read_into(12345, memoryview(buf))
        assert buf == data[12345:12345 + len(buf)]
        assert proxy.injected["503"] == 2 and proxy.injected["429"] == 2
        assert storage.stats.retries == 4
        retries = [r.getMessage() for r in caplog.records if "retry in" in r.getMessage()]
        assert len(retries) == 4, retries
        assert all(f"{uri}: GET bytes [12345, {12345 + len(buf)})" in m for m in retries), retries
        assert sum("HTTP 503" in m for m in retries) == 2 and sum("HTTP 429" in m for m in retries) == 2, retries
        assert all(store.throttle_reason in m for m in retries if "HTTP 503" in m), retries
        for secret in store.secrets:
            assert all(secret not in r.getMessage() for r in caplog.records)

    def test_cut_connection_resumes_from_last_byte(self, store, checkpoint):
        _, data, _ = checkpoint
        offset, length, cut_at = 1000, 3 * MiB, 300_000
        with store.proxy() as proxy:
            uri, cfg = self._proxied(store, data, proxy)
            with closing(storage_for(uri, cfg)) as storage, storage.open(uri) as src:
                fast_backoff(storage)
                proxy.cut(2, after_bytes=cut_at, abortive=False)  # FIN: a short body
                buf = bytearray(length)
                src.read_into(offset, memoryview(buf))
        assert buf == data[offset:offset + length]
        last = offset + length - 1
        assert proxy.ranged_gets == [f"bytes={offset}-{last}", f"bytes={offset + cut_at}-{last}",
                                     f"bytes={offset + 2 * cut_at}-{last}"]
        assert storage.stats.retries == 2
        assert storage.stats.bytes_read == length  # nothing read twice

    def test_connection_reset_is_retried(self, store, checkpoint):
        _, data, _ = checkpoint
        offset, length = 777, 4 * MiB
        with store.proxy() as proxy:
            uri, cfg = self._proxied(store, data, proxy)
            with closing(storage_for(uri, cfg)) as storage, storage.open(uri) as src:
                fast_backoff(storage)
                proxy.cut(3, after_bytes=1_500_000, abortive=True)  # RST after 1.5 MB
                buf = bytearray(length)
                src.read_into(offset, memoryview(buf))
        assert buf == data[offset:offset + length]
        assert proxy.injected["reset"] == 3 and storage.stats.retries == 3
        starts = [int(r.split("=")[1].split("-")[0]) for r in proxy.ranged_gets]
        assert starts == sorted(starts) and len(starts) == 4
        assert storage.stats.bytes_read == length

    def test_retries_exhausted_name_object_and_range(self, store, checkpoint):
        _, data, _ = checkpoint
        with store.proxy() as proxy:
            uri, cfg = self._proxied(store, data, proxy, max_retries=2)
            with closing(storage_for(uri, cfg)) as storage, storage.open(uri) as src:
                fast_backoff(storage)
                store.throttle(proxy, 10, 503)
                with pytest.raises(SourceError) as info:
                    src.read_into(4096, memoryview(bytearray(MiB)))
        message = str(info.value)
        assert f"{uri}: GET of bytes [4096, {4096 + MiB}) failed after 3 attempts" in message, message
        assert "HTTP 503" in message and "max_retries" in message and store.proxy_endpoint(proxy) in message
        assert proxy.injected["503"] == 3

    def test_refusal_mid_load_is_final(self, store, checkpoint):
        """A 403 on a ranged read (a token revoked mid-load) is not retried and says what to check."""
        _, data, _ = checkpoint
        with store.proxy() as proxy:
            uri, cfg = self._proxied(store, data, proxy)
            with closing(storage_for(uri, cfg)) as storage, storage.open(uri) as src:
                fast_backoff(storage)
                store.refuse(proxy, 1)
                with pytest.raises(SourceError) as info:
                    src.read_into(2048, memoryview(bytearray(1000)))
        assert info.value.errno == errno.EACCES
        assert f"{uri}: GET bytes [2048, 3048) was refused with" in str(info.value), str(info.value)
        assert "credentials" in str(info.value)
        assert storage.stats.retries == 0 and proxy.injected["403"] == 1

    def test_failed_precondition_is_a_changed_object(self, store, checkpoint):
        """What the real service answers a read pinned to a replaced object's version (412)."""
        _, data, _ = checkpoint
        with store.proxy() as proxy:
            uri, cfg = self._proxied(store, data, proxy)
            with closing(storage_for(uri, cfg)) as storage, storage.open(uri) as src:
                store.precondition_failed(proxy, 1)
                with pytest.raises(SourceChangedError) as info:
                    src.read_into(10, memoryview(bytearray(100)))
        assert info.value.errno == errno.ESTALE
        assert f"{uri}: the object changed while it was being loaded" in str(info.value)
        assert "GET bytes [10, 110)" in str(info.value)
        assert storage.stats.retries == 0

    def test_cancel_while_backing_off(self, store, checkpoint):
        _, data, _ = checkpoint
        cancelled = threading.Event()
        with store.proxy() as proxy:
            uri, cfg = self._proxied(store, data, proxy, max_retries=50)
            with closing(storage_for(uri, cfg)) as storage, storage.open(uri) as src:
                storage.backoff_base = storage.backoff_cap = 30.0  # would wait long without the cancel
                store.throttle(proxy, 50, 503)

                def watch():
                    for _ in range(3000):
                        if proxy.injected["503"]:
                            break
                        time.sleep(0.01)
                    cancelled.set()
                threading.Thread(target=watch, daemon=True).start()
                t0 = time.monotonic()
                with pytest.raises(CancelledError):
                    src.read_into(0, memoryview(bytearray(10)), cancelled=cancelled)
                assert time.monotonic() - t0 < 20
                with pytest.raises(CancelledError):
                    src.read_into(0, memoryview(bytearray(10)), cancelled=cancelled)  # no request

    def test_deadline_stops_retries(self, store, checkpoint):
        _, data, _ = checkpoint
        with store.proxy() as proxy:
            uri, cfg = self._proxied(store, data, proxy, max_retries=50)
            with closing(storage_for(uri, cfg)) as storage, storage.open(uri) as src:
                src.deadline_at = time.monotonic() - 1.0  # already past: the first failure is final
                store.throttle(proxy, 50, 503)
                with pytest.raises(SourceError, match="deadline has passed") as info:
                    src.read_into(0, memoryview(bytearray(10)))
        assert info.value.errno == errno.ETIMEDOUT and uri in str(info.value)
        assert proxy.injected["503"] == 1

    def test_load_file_through_faults(self, store, sharded_checkpoint):
        directory, _ = sharded_checkpoint
        with store.proxy() as proxy:
            bucket = store.bucket()
            store.put_dir(directory, bucket, "model")
            store.throttle(proxy, 1, 503)
            store.throttle(proxy, 1, 429)
            proxy.cut(2, after_bytes=100_000, abortive=False)
            proxy.cut(2, after_bytes=200_000, abortive=True)
            cfg = store.config(store.proxy_endpoint(proxy), chunk_bytes=MiB, s3_range_bytes=MiB, max_retries=6)
            loaded = load_file(store.uri(bucket, "model"), config=cfg)
        _assert_same(loaded, _reference(directory))
        assert proxy.pending_faults == 0
        assert proxy.injected == {"503": 1, "429": 1, "close": 2, "reset": 2}

    # --------------------------------------------------------------------------------------
    # the object changes, the server dies
    # --------------------------------------------------------------------------------------

    def test_object_replaced_mid_load(self, store, checkpoint):
        _, data, _ = checkpoint
        bucket = store.bucket()
        store.put(bucket, "replaced/model.safetensors", data)
        uri = store.uri(bucket, "replaced/model.safetensors")
        with closing(storage_for(uri, store.config())) as storage, storage.open(uri) as src:
            src.read_into(0, memoryview(bytearray(100)))
            store.put(bucket, "replaced/model.safetensors", bytes(reversed(data)))  # same size
            with pytest.raises(SourceChangedError) as info:
                src.read_into(100, memoryview(bytearray(MiB)))
            assert info.value.errno == errno.ESTALE
            message = str(info.value)
            assert f"{uri}: the object changed while it was being loaded" in message, message
            assert f"GET bytes [100, {100 + MiB})" in message, message
            with pytest.raises(SourceChangedError, match=uri):
                src.check_unchanged()
        assert storage.stats.retries == 0
        # a whole load whose checkpoint was opened before the object was replaced
        store.put(bucket, "replaced/model.safetensors", data)
        with open_checkpoint(uri, store.config(), keep_open=True) as ckpt:
            store.put(bucket, "replaced/model.safetensors", bytes(reversed(data)))
            with pytest.raises(SourceChangedError) as info:
                load_file(ckpt)
        assert f"{uri}: the object changed while it was being loaded" in str(info.value)
        assert "GET bytes [" in str(info.value)

    @pytest.mark.slow
    def test_server_killed_mid_load(self, store, tmp_path):
        server, private = store.start_private(tmp_path / "private")
        try:
            bucket = private.bucket()
            g = torch.Generator().manual_seed(11)
            tensors = {f"w{i}": torch.randn(8 * MiB, generator=g) for i in range(2)}  # 2 x 32 MiB
            path = tmp_path / "model.safetensors"
            safetensors_torch.save_file(tensors, str(path))
            private.put(bucket, "ckpt/model.safetensors", path.read_bytes())
            uri = private.uri(bucket, "ckpt/model.safetensors")
            assert not _streamer_threads()
            with private.proxy(server) as proxy:
                # the first ranged GET is the header's: let it through (a cut that never comes), then
                # hold the first data range after 1 MiB, so the load cannot finish before the kill
                proxy.cut(1, after_bytes=1 << 40, abortive=False)
                proxy.stall(1, after_bytes=MiB)
                outcome: dict = {}
                cfg = private.config(private.proxy_endpoint(proxy), chunk_bytes=32 * MiB, s3_range_bytes=32 * MiB,
                                     memory_limit=128 * MiB, request_timeout=2.0, max_retries=2)

                def load():
                    try:
                        outcome["result"] = load_file(uri, config=cfg)
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
            assert f"{uri}: GET of bytes [" in message and "failed after 3 attempts" in message, message
            assert _streamer_threads() == [], "reader threads outlived the failed load"
            # straight to the dead endpoint: connection refused, retried, then a clear error
            with closing(storage_for(uri, private.config(request_timeout=2.0, max_retries=1))) as storage:
                fast_backoff(storage)
                with pytest.raises(SourceError, match=rf"{uri}: HEAD failed after 2 attempts.*"
                                                      rf"{private.refused_connection}"):
                    storage.open(uri)
        finally:
            server.kill()
