"""S3Source / S3Storage against a real S3-compatible server (SeaweedFS on 127.0.0.1).

Faults (503 SlowDown, cut connections, stalls) are injected by a proxy in front of the server;
the server itself is killed in one test (a private instance). Every wait is bounded.
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

from loader_plugins.config import StreamerConfig  # noqa: E402
from loader_plugins.core.header import HEADER_LENGTH_BYTES, header_length, parse_header  # noqa: E402
from loader_plugins.core.sources import storage_for  # noqa: E402
from loader_plugins.errors import CancelledError, SourceChangedError, SourceError  # noqa: E402

try:
    from .s3_server import FaultProxy
except ImportError:
    from s3_server import FaultProxy

pytestmark = pytest.mark.s3

REPO = Path(__file__).resolve().parents[1]
MiB = 1 << 20


# ------------------------------------------------------------------------------------------
# helpers
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


def s3_config(endpoint_url: str, **overrides) -> StreamerConfig:
    values = dict(s3_endpoint_url=endpoint_url, s3_region="us-east-1", s3_addressing_style="path",
                  request_timeout=10.0, max_retries=3, concurrency=4)
    values.update(overrides)
    return StreamerConfig(**values)


def fast_backoff(storage, base: float = 0.01) -> None:
    storage.backoff_base = base  # keep retry tests quick; the policy itself is unchanged
    storage.backoff_cap = 0.2


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


@pytest.fixture
def uploaded(s3_server, s3_bucket, checkpoint, request):
    """The checkpoint as one object; ``multipart`` uploads it in 5 MiB parts (a multipart ETag)."""
    path, data, tensors = checkpoint
    client = s3_server.client()
    key = "models/tiny/model.safetensors"
    if getattr(request, "param", "single") == "multipart":
        from boto3.s3.transfer import TransferConfig

        client.upload_file(str(path), s3_bucket, key,
                           Config=TransferConfig(multipart_threshold=5 * MiB, multipart_chunksize=5 * MiB))
    else:
        client.put_object(Bucket=s3_bucket, Key=key, Body=data)
    return f"s3://{s3_bucket}/{key}", data, tensors


# ------------------------------------------------------------------------------------------
# reads
# ------------------------------------------------------------------------------------------

@pytest.mark.parametrize("uploaded", ["single", "multipart"], indirect=True)
def test_random_ranges_bit_exact(uploaded, s3_server, s3_env):
    uri, data, _ = uploaded
    cfg = s3_config(s3_server.endpoint_url)
    storage = storage_for(uri, cfg)
    rng = random.Random(1234)
    size = len(data)
    ranges = [(0, size), (0, 1), (size - 1, 1), (MiB - 3, 7), (2 * MiB - 1, MiB + 2), (0, 8)]
    ranges += [(a, rng.randint(1, min(3 * MiB, size - a))) for a in (rng.randrange(size - 1) for _ in range(120))]
    with closing(storage), storage.open(uri) as src:
        assert src.size() == size
        assert src.etag
        for offset, length in ranges:
            buf = bytearray(length)
            src.read_into(offset, memoryview(buf))
            assert buf == data[offset:offset + length], (offset, length)
        src.read_into(5, memoryview(bytearray(0)))  # an empty range needs no request
        src.check_unchanged()
        with pytest.raises(SourceError, match=r"bytes \[\d+, \d+\) lie outside"):
            src.read_into(size - 2, memoryview(bytearray(3)))
    assert storage.stats.retries == 0
    assert storage.stats.bytes_read == sum(length for _, length in ranges)


def test_whole_tensors_via_header(uploaded, s3_server, s3_env, checkpoint):
    uri, data, tensors = uploaded
    cfg = s3_config(s3_server.endpoint_url)
    with closing(storage_for(uri, cfg)) as storage, storage.open(uri) as src:
        before = storage.stats.requests
        header = read_header(src, cfg)
        assert storage.stats.requests - before == 1, "the header should come in one ranged GET"
        assert src.header_prefetch == 256 << 10
        assert header.metadata == {"format": "pt"}
        specs = header.by_name()
        assert set(specs) == set(tensors)
        for name, spec in specs.items():
            out = torch.empty(spec.shape, dtype=spec.torch_dtype())
            src.read_into(spec.offset, memoryview(out.reshape(-1).view(torch.uint8).numpy()))
            expected = tensors[name]
            assert out.dtype == expected.dtype and out.shape == expected.shape, name
            assert raw_bytes(out) == raw_bytes(expected), name


def test_read_into_multidimensional_view(uploaded, s3_server, s3_env):
    uri, data, _ = uploaded
    with closing(storage_for(uri, s3_config(s3_server.endpoint_url))) as storage, storage.open(uri) as src:
        out = torch.empty(16, 64, dtype=torch.float32)
        src.read_into(1000, memoryview(out.numpy()))  # a 2-d float view is cast to bytes
        assert raw_bytes(out) == data[1000:1000 + out.numel() * 4]


# ------------------------------------------------------------------------------------------
# directories
# ------------------------------------------------------------------------------------------

def test_list_dir_and_is_dir(s3_server, s3_bucket, s3_env):
    client = s3_server.client()
    for key in ("ckpt/model-00001-of-00002.safetensors", "ckpt/model-00002-of-00002.safetensors",
                "ckpt/model.safetensors.index.json", "ckpt/sub/nested.bin", "ckpt2/other.bin", "top.bin"):
        client.put_object(Bucket=s3_bucket, Key=key, Body=b"x" * 10)
    storage = storage_for(f"s3://{s3_bucket}/ckpt", s3_config(s3_server.endpoint_url))
    with closing(storage):
        for uri in (f"s3://{s3_bucket}/ckpt", f"s3://{s3_bucket}/ckpt/"):
            assert storage.is_dir(uri)
            assert storage.exists(uri)
            assert storage.list_dir(uri) == ["model-00001-of-00002.safetensors", "model-00002-of-00002.safetensors",
                                             "model.safetensors.index.json"]
        assert storage.list_dir(f"s3://{s3_bucket}") == ["top.bin"]
        assert storage.is_dir(f"s3://{s3_bucket}/ckpt/sub")
        assert not storage.is_dir(f"s3://{s3_bucket}/ckpt/model.safetensors.index.json")
        assert not storage.is_dir(f"s3://{s3_bucket}/ck")  # a string prefix is not a directory
        assert not storage.is_dir("s3://no-such-bucket-here/ckpt")
        assert storage.exists(f"s3://{s3_bucket}/top.bin")
        assert not storage.exists(f"s3://{s3_bucket}/nothing")
        assert storage.join(f"s3://{s3_bucket}/ckpt/", "a.bin") == f"s3://{s3_bucket}/ckpt/a.bin"
        assert storage.read_small(f"s3://{s3_bucket}/top.bin") == b"x" * 10
        with pytest.raises(SourceError, match="no objects under") as info:
            storage.list_dir(f"s3://{s3_bucket}/nothing")
        assert info.value.errno == errno.ENOENT
        with pytest.raises(SourceError, match="not an object"):
            storage.open(f"s3://{s3_bucket}/ckpt/")


# ------------------------------------------------------------------------------------------
# errors that are not retried
# ------------------------------------------------------------------------------------------

def test_missing_bucket_and_object(s3_server, s3_bucket, s3_env):
    storage = storage_for(f"s3://{s3_bucket}/x", s3_config(s3_server.endpoint_url))
    with closing(storage):
        with pytest.raises(SourceError) as info:
            storage.open("s3://no-such-bucket-xyz/model.safetensors")
        assert info.value.errno == errno.ENOENT
        assert "bucket 'no-such-bucket-xyz' does not exist" in str(info.value)
        assert "s3://no-such-bucket-xyz/model.safetensors" in str(info.value)
        with pytest.raises(SourceError) as info:
            storage.open(f"s3://{s3_bucket}/missing/model.safetensors")
        assert info.value.errno == errno.ENOENT
        assert f"s3://{s3_bucket}/missing/model.safetensors: no such object in bucket '{s3_bucket}'" in str(info.value)
        with pytest.raises(SourceError, match="bucket 'no-such-bucket-xyz' does not exist"):
            storage.list_dir("s3://no-such-bucket-xyz/ckpt")
    assert storage.stats.retries == 0


_CREDENTIALS_PROBE = """
import json, sys
from loader_plugins.config import StreamerConfig
from loader_plugins.core.sources import storage_for
from loader_plugins.errors import SourceError
uri = sys.argv[1]
storage = storage_for(uri, StreamerConfig(max_retries=3, s3_addressing_style="path"))
out = {}
for name, op in (("open", storage.open), ("list_dir", storage.list_dir)):
    try:
        op(uri)
        out[name] = None
    except SourceError as exc:
        out[name] = [str(exc), exc.errno]
out["requests"] = storage.stats.requests
out["retries"] = storage.stats.retries
print(json.dumps(out))
"""


@pytest.mark.parametrize("wrong", ["secret", "key"])
def test_wrong_credentials_fail_clearly(s3_server, s3_bucket, wrong, tmp_path):
    """In a fresh process: boto3 resolves credentials once per session (see FACTS)."""
    key = "ckpt/model.safetensors"
    s3_server.client().put_object(Bucket=s3_bucket, Key=key, Body=b"x" * 100)
    env = {k: v for k, v in os.environ.items() if not k.startswith("AWS_")}
    env.update(s3_server.env())
    bad = "WRONGsecret000000000000000000" if wrong == "secret" else "WRONGKEYID00000"
    env["AWS_SECRET_ACCESS_KEY" if wrong == "secret" else "AWS_ACCESS_KEY_ID"] = bad
    env["PYTHONPATH"] = os.pathsep.join([str(REPO), env.get("PYTHONPATH", "")])
    proc = subprocess.run([sys.executable, "-c", _CREDENTIALS_PROBE, f"s3://{s3_bucket}/{key}"], env=env,
                          cwd=tmp_path, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr
    out = json.loads(proc.stdout.strip().splitlines()[-1])
    for op in ("open", "list_dir"):
        message, code = out[op]
        assert code == errno.EACCES, message
        assert "check the S3 credentials" in message
        assert f"s3://{s3_bucket}/{key}" in message
        assert bad not in message and s3_server.secret_key not in message
    # LIST errors carry an S3 error code in their XML body (a HEAD's 403 has no body)
    assert ("SignatureDoesNotMatch" if wrong == "secret" else "InvalidAccessKeyId") in out["list_dir"][0]
    assert out["retries"] == 0 and out["requests"] == 2, "credential errors must not be retried"


def test_profile_and_missing_credentials(s3_server, s3_bucket, s3_env, monkeypatch, tmp_path):
    key = "p/model.safetensors"
    s3_server.client().put_object(Bucket=s3_bucket, Key=key, Body=b"y" * 64)
    uri = f"s3://{s3_bucket}/{key}"
    monkeypatch.delenv("AWS_ACCESS_KEY_ID")
    monkeypatch.delenv("AWS_SECRET_ACCESS_KEY")
    credentials = tmp_path / "credentials"
    credentials.write_text(f"[streamer-test]\naws_access_key_id = {s3_server.access_key}\n"
                           f"aws_secret_access_key = {s3_server.secret_key}\n")
    monkeypatch.setenv("AWS_SHARED_CREDENTIALS_FILE", str(credentials))
    cfg = s3_config(s3_server.endpoint_url, s3_profile="streamer-test")
    with closing(storage_for(uri, cfg)) as storage, storage.open(uri) as src:
        assert src.read_bytes(0, 64) == b"y" * 64
    with pytest.raises(SourceError, match="S3 profile 'nope' is not in the shared AWS config files"):
        storage_for(uri, s3_config(s3_server.endpoint_url, s3_profile="nope"))
    with closing(storage_for(uri, s3_config(s3_server.endpoint_url))) as storage:  # no keys, no profile
        with pytest.raises(SourceError, match="no usable S3 credentials") as info:
            storage.open(uri)
        assert info.value.errno == errno.EACCES


def test_runai_s3_credentials_are_used_without_any_in_the_environment(s3_server, s3_bucket, s3_env, monkeypatch,
                                                                         tmp_path):
    """Run:ai's ``stream_file(path, s3_credentials=S3Credentials(...))`` against a real server, with
    neither keys nor a profile for boto3's chain to find; a wrong secret is refused clearly."""
    from runai_model_streamer.s3_utils.s3_utils import S3Credentials

    from loader_plugins import SafetensorsStreamer

    tensors = {"w": torch.arange(6, dtype=torch.float32).reshape(2, 3), "b": torch.ones(5, dtype=torch.int8)}
    local = tmp_path / "m.safetensors"
    safetensors_torch.save_file(tensors, local)
    key = "creds/model.safetensors"
    s3_server.client().put_object(Bucket=s3_bucket, Key=key, Body=local.read_bytes())
    for name in ("AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY", "AWS_ENDPOINT_URL", "AWS_ENDPOINT_URL_S3"):
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setenv("AWS_SHARED_CREDENTIALS_FILE", str(tmp_path / "none"))
    monkeypatch.setenv("AWS_CONFIG_FILE", str(tmp_path / "none"))
    uri = f"s3://{s3_bucket}/{key}"
    good = S3Credentials(access_key_id=s3_server.access_key, secret_access_key=s3_server.secret_key,
                         region_name="us-east-1", endpoint=s3_server.endpoint_url)
    with SafetensorsStreamer(s3_addressing_style="path") as streamer:
        streamer.stream_file(uri, good, "cpu")
        got = dict(streamer.get_tensors())
    assert sorted(got) == ["b", "w"] and all(torch.equal(got[n], tensors[n]) for n in tensors)
    bad = S3Credentials(access_key_id=s3_server.access_key, secret_access_key="WRONGsecret0000000000",
                        region_name="us-east-1", endpoint=s3_server.endpoint_url)
    with SafetensorsStreamer(s3_addressing_style="path") as streamer:
        with pytest.raises(SourceError, match="check the S3 credentials") as info:
            streamer.stream_file(uri, bad)
    assert info.value.errno == errno.EACCES and "WRONGsecret" not in str(info.value)


# ------------------------------------------------------------------------------------------
# retries through the fault proxy
# ------------------------------------------------------------------------------------------

def test_slowdown_is_retried(uploaded, fault_proxy, s3_env, caplog):
    uri, data, _ = uploaded
    cfg = s3_config(fault_proxy.endpoint_url, max_retries=4)
    with closing(storage_for(uri, cfg)) as storage, storage.open(uri) as src:
        fast_backoff(storage)
        fault_proxy.slow_down(3)
        buf = bytearray(3 * MiB + 5)
        with caplog.at_level(logging.INFO, logger="loader_plugins.core.sources.s3"):
            src.read_into(12345, memoryview(buf))
    assert buf == data[12345:12345 + len(buf)]
    assert fault_proxy.injected["503"] == 3
    assert storage.stats.retries == 3
    retries = [r.getMessage() for r in caplog.records if "retry in" in r.getMessage()]
    assert len(retries) == 3 and all("SlowDown" in m and uri in m for m in retries), retries
    assert all(s3_env["AWS_SECRET_ACCESS_KEY"] not in r.getMessage() for r in caplog.records)


def test_cut_connection_resumes_from_last_byte(uploaded, fault_proxy, s3_env):
    uri, data, _ = uploaded
    offset, length, cut_at = 1000, 3 * MiB, 300_000
    with closing(storage_for(uri, s3_config(fault_proxy.endpoint_url))) as storage, storage.open(uri) as src:
        fast_backoff(storage)
        fault_proxy.cut(2, after_bytes=cut_at, abortive=False)  # FIN: a short body
        buf = bytearray(length)
        src.read_into(offset, memoryview(buf))
    assert buf == data[offset:offset + length]
    last = offset + length - 1
    assert fault_proxy.ranged_gets == [f"bytes={offset}-{last}", f"bytes={offset + cut_at}-{last}",
                                       f"bytes={offset + 2 * cut_at}-{last}"]
    assert storage.stats.retries == 2
    assert storage.stats.bytes_read == length  # nothing read twice


def test_connection_reset_is_retried(uploaded, fault_proxy, s3_env):
    uri, data, _ = uploaded
    offset, length = 777, 4 * MiB
    with closing(storage_for(uri, s3_config(fault_proxy.endpoint_url))) as storage, storage.open(uri) as src:
        fast_backoff(storage)
        fault_proxy.cut(3, after_bytes=1_500_000, abortive=True)  # RST after 1.5 MB
        buf = bytearray(length)
        src.read_into(offset, memoryview(buf))
    assert buf == data[offset:offset + length]
    assert fault_proxy.injected["reset"] == 3
    assert storage.stats.retries == 3
    starts = [int(r.split("=")[1].split("-")[0]) for r in fault_proxy.ranged_gets]
    assert starts == sorted(starts) and len(starts) == 4
    assert storage.stats.bytes_read == length


def test_retries_exhausted_names_object_and_range(uploaded, fault_proxy, s3_env):
    uri, _, _ = uploaded
    cfg = s3_config(fault_proxy.endpoint_url, max_retries=2)
    with closing(storage_for(uri, cfg)) as storage, storage.open(uri) as src:
        fast_backoff(storage)
        fault_proxy.slow_down(10)
        with pytest.raises(SourceError) as info:
            src.read_into(4096, memoryview(bytearray(MiB)))
    message = str(info.value)
    assert f"{uri}: GET of bytes [4096, {4096 + MiB}) failed after 3 attempts" in message
    assert "SlowDown" in message and "max_retries" in message
    assert fault_proxy.injected["503"] == 3


def test_cancel_while_backing_off(uploaded, fault_proxy, s3_env):
    uri, _, _ = uploaded
    cancelled = threading.Event()
    cfg = s3_config(fault_proxy.endpoint_url, max_retries=50)
    with closing(storage_for(uri, cfg)) as storage, storage.open(uri) as src:
        storage.backoff_base = storage.backoff_cap = 30.0  # would wait long without the cancel
        fault_proxy.slow_down(50)
        with pytest.raises(CancelledError):
            src.read_into(0, memoryview(bytearray(10)), cancelled=_set_after_first_request(fault_proxy, cancelled))
        with pytest.raises(CancelledError):
            src.read_into(0, memoryview(bytearray(10)), cancelled=cancelled)  # already cancelled: no request


def _set_after_first_request(proxy: FaultProxy, event: threading.Event) -> threading.Event:
    def watch():
        for _ in range(3000):
            if proxy.injected["503"]:
                break
            time.sleep(0.01)
        event.set()
    threading.Thread(target=watch, daemon=True).start()
    return event


def test_deadline_stops_retries(uploaded, fault_proxy, s3_env):
    uri, _, _ = uploaded
    cfg = s3_config(fault_proxy.endpoint_url, max_retries=50)
    with closing(storage_for(uri, cfg)) as storage, storage.open(uri) as src:
        src.deadline_at = time.monotonic() - 1.0  # already past: the first failure is final
        fault_proxy.slow_down(50)
        with pytest.raises(SourceError, match="deadline has passed") as info:
            src.read_into(0, memoryview(bytearray(10)))
    assert info.value.errno == errno.ETIMEDOUT
    assert fault_proxy.injected["503"] == 1


# ------------------------------------------------------------------------------------------
# the object changes, the server dies
# ------------------------------------------------------------------------------------------

def test_object_overwritten_between_open_and_read(uploaded, s3_server, s3_env):
    uri, data, _ = uploaded
    bucket, key = uri[5:].split("/", 1)
    with closing(storage_for(uri, s3_config(s3_server.endpoint_url))) as storage, storage.open(uri) as src:
        src.read_into(0, memoryview(bytearray(100)))
        s3_server.client().put_object(Bucket=bucket, Key=key, Body=bytes(reversed(data)))  # same size
        with pytest.raises(SourceChangedError) as info:
            src.read_into(100, memoryview(bytearray(MiB)))
        assert uri in str(info.value) and "changed while it was being loaded" in str(info.value)
        assert info.value.errno == errno.ESTALE
        with pytest.raises(SourceChangedError):
            src.check_unchanged()
    assert storage.stats.retries == 0


@pytest.mark.slow
def test_server_killed_mid_read(s3_server_factory, s3_env):
    server = s3_server_factory()
    client = server.client()
    client.create_bucket(Bucket="dying")
    data = random.Random(7).randbytes(48 * MiB)  # far more than socket buffers hold
    client.put_object(Bucket="dying", Key="big.bin", Body=data)
    uri = "s3://dying/big.bin"
    with FaultProxy("127.0.0.1", server.s3_port) as proxy:
        cfg = s3_config(proxy.endpoint_url, request_timeout=2.0, max_retries=2)
        with closing(storage_for(uri, cfg)) as storage, storage.open(uri) as src:
            fast_backoff(storage)
            proxy.stall(1, after_bytes=MiB)
            errors: list[BaseException] = []

            def read():
                try:
                    src.read_into(0, memoryview(bytearray(len(data))))
                except BaseException as exc:  # noqa: BLE001
                    errors.append(exc)

            reader = threading.Thread(target=read, daemon=True)
            reader.start()
            assert proxy.stalled.wait(60), "the read never started"
            server.kill()
            proxy.release()
            reader.join(120)
            assert not reader.is_alive(), "the read hung after the server died"
        assert len(errors) == 1 and isinstance(errors[0], SourceError), errors
        message = str(errors[0])
        assert f"{uri}: GET of bytes [0, {len(data)}) failed after 3 attempts" in message
        assert storage.stats.retries == 2

    # straight to the dead endpoint: connection refused, retried, then a clear error
    cfg = s3_config(server.endpoint_url, request_timeout=2.0, max_retries=1)
    with closing(storage_for(uri, cfg)) as storage:
        fast_backoff(storage)
        with pytest.raises(SourceError, match=r"HEAD failed after 2 attempts.*EndpointConnectionError"):
            storage.open(uri)


# ------------------------------------------------------------------------------------------
# end to end: load_file("s3://...") against safetensors on the local copy
# ------------------------------------------------------------------------------------------

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


def _upload_dir(client, directory: Path, bucket: str, prefix: str) -> None:
    for file in sorted(directory.iterdir()):
        client.upload_file(str(file), bucket, f"{prefix}/{file.name}")


def test_load_file_sharded_s3_prefix(s3_server, s3_bucket, s3_env, sharded_checkpoint):
    load_file = pytest.importorskip("loader_plugins").load_file
    directory, _ = sharded_checkpoint
    _upload_dir(s3_server.client(), directory, s3_bucket, "org/model")
    expected = _reference(directory)
    options = dict(s3_endpoint_url=s3_server.endpoint_url, s3_addressing_style="path", concurrency=4,
                   chunk_bytes=MiB, s3_range_bytes=MiB, memory_limit=8 * MiB,
                   request_timeout=10.0)
    for uri in (f"s3://{s3_bucket}/org/model", f"s3://{s3_bucket}/org/model/",
                f"s3://{s3_bucket}/org/model/model.safetensors.index.json"):
        _assert_same(load_file(uri, **options), expected)
    one = f"s3://{s3_bucket}/org/model/model-00002-of-00003.safetensors"
    _assert_same(load_file(one, **options),
                 safetensors_torch.load_file(str(directory / "model-00002-of-00003.safetensors")))


def test_load_file_through_faults(s3_server, s3_bucket, s3_env, sharded_checkpoint, fault_proxy):
    load_file = pytest.importorskip("loader_plugins").load_file
    directory, _ = sharded_checkpoint
    _upload_dir(s3_server.client(), directory, s3_bucket, "model")
    fault_proxy.slow_down(2)
    fault_proxy.cut(2, after_bytes=100_000, abortive=False)
    fault_proxy.cut(2, after_bytes=200_000, abortive=True)
    loaded = load_file(f"s3://{s3_bucket}/model", s3_endpoint_url=fault_proxy.endpoint_url,
                       s3_addressing_style="path", concurrency=4, chunk_bytes=MiB, s3_range_bytes=MiB,
                       max_retries=6)
    _assert_same(loaded, _reference(directory))
    assert fault_proxy.pending_faults == 0
    assert fault_proxy.injected == {"503": 2, "close": 2, "reset": 2}


def test_load_file_missing_prefix_is_clear(s3_server, s3_bucket, s3_env):
    load_file = pytest.importorskip("loader_plugins").load_file
    with pytest.raises(SourceError, match=f"s3://{s3_bucket}/nothing/here"):
        load_file(f"s3://{s3_bucket}/nothing/here", s3_endpoint_url=s3_server.endpoint_url,
                  s3_addressing_style="path")
