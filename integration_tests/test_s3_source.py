"""s3:// against a real S3-compatible server (SeaweedFS on 127.0.0.1): the shared cases of
:mod:`_remote_cases` (bit-exact reads over every dtype, of single and multipart objects,
directories, sharded and mixed local + remote loads, the CLI, throttling / 5xx / cut and reset
connections through a fault injector, refusals, an object replaced mid-load, the server killed
mid-load), then what is S3's own: its credential chain (wrong keys, profiles, none at all,
Run:ai's credentials) and the server killed under one large read. Every wait is bounded.
"""

from __future__ import annotations

import contextlib
import errno
import json
import os
import random
import subprocess
import sys
import threading
import uuid
from contextlib import closing
from pathlib import Path

import pytest

torch = pytest.importorskip("torch")
safetensors_torch = pytest.importorskip("safetensors.torch")

from loader_plugins.config import StreamerConfig  # noqa: E402
from loader_plugins.core.sources import storage_for  # noqa: E402
from loader_plugins.core.sources.s3 import S3Source  # noqa: E402
from loader_plugins.errors import SourceError  # noqa: E402

try:
    from . import _remote_cases as cases
    from ._remote_cases import RemoteSourceCases, checkpoint, fast_backoff, sharded_checkpoint  # noqa: F401
    from .s3_server import FaultProxy, SeaweedS3
except ImportError:
    import _remote_cases as cases
    from _remote_cases import RemoteSourceCases, checkpoint, fast_backoff, sharded_checkpoint  # noqa: F401
    from s3_server import FaultProxy, SeaweedS3

pytestmark = pytest.mark.s3

REPO = Path(__file__).resolve().parents[1]
MiB = 1 << 20


def s3_config(endpoint_url: str, **overrides) -> StreamerConfig:
    values = dict(s3_endpoint_url=endpoint_url, s3_region="us-east-1", s3_addressing_style="path",
                  request_timeout=10.0, max_retries=3, concurrency=4)
    values.update(overrides)
    return StreamerConfig(**values)


def _s3_error_body(code: str, message: str) -> bytes:
    """An S3 XML error body, as S3 sends it."""
    return (f'<?xml version="1.0" encoding="UTF-8"?>\n<Error><Code>{code}</Code><Message>{message}</Message>'
            f'<RequestId>fault-proxy</RequestId></Error>').encode()


class S3Store(cases.Store):
    """SeaweedFS for the shared cases; ``multipart=True`` uploads objects in 5 MiB parts (a
    multipart ETag)."""

    scheme = "s3"
    kind = "s3"
    source_cls = S3Source
    logger = "loader_plugins.core.sources.s3"
    throttle_reason = "SlowDown"
    refused_connection = "EndpointConnectionError"
    nothing_under = "no objects under"

    def __init__(self, server: SeaweedS3, *, multipart: bool = False):
        super().__init__(server)
        self._client = server.client()
        self.multipart = multipart
        self.secrets = (server.secret_key,)
        self.buckets: list[str] = []

    def bucket(self) -> str:
        name = f"t-{uuid.uuid4().hex[:20]}"
        self._client.create_bucket(Bucket=name)
        self.buckets.append(name)
        return name

    def remove_buckets(self) -> None:
        """Empty and delete the buckets made (SeaweedFS gives each bucket volumes of its own)."""
        for name in self.buckets if self.server.alive else ():
            with contextlib.suppress(Exception):  # cleanup only
                for page in self._client.get_paginator("list_objects_v2").paginate(Bucket=name):
                    for obj in page.get("Contents", ()):
                        self._client.delete_object(Bucket=name, Key=obj["Key"])
                self._client.delete_bucket(Bucket=name)
        self.buckets.clear()

    def put(self, bucket: str, key: str, data: bytes) -> None:
        if self.multipart:
            import io

            from boto3.s3.transfer import TransferConfig

            self._client.upload_fileobj(io.BytesIO(data), bucket, key, Config=TransferConfig(
                multipart_threshold=5 * MiB, multipart_chunksize=5 * MiB))
        else:
            self._client.put_object(Bucket=bucket, Key=key, Body=data)

    def options(self, endpoint: str | None = None, **extra) -> dict:
        return {"s3_endpoint_url": endpoint or self.server.endpoint_url, "s3_region": "us-east-1",
                "s3_addressing_style": "path", **extra}

    def proxy(self, server=None) -> FaultProxy:
        return FaultProxy("127.0.0.1", (server or self.server).s3_port, range_headers=self.range_headers)

    def proxy_endpoint(self, proxy) -> str:
        return proxy.endpoint_url

    def throttle(self, proxy, n: int, status: int) -> None:
        if status == 503:
            proxy.slow_down(n)
        else:
            proxy.answer(n, status=status, reason="Too Many Requests", content_type="application/xml",
                         body=_s3_error_body("TooManyRequests", "Please reduce your request rate."))

    def refuse(self, proxy, n: int) -> None:
        proxy.answer(n, status=403, reason="Forbidden", content_type="application/xml",
                     body=_s3_error_body("AccessDenied", "Access Denied"))

    def precondition_failed(self, proxy, n: int) -> None:
        proxy.answer(n, status=412, reason="Precondition Failed", content_type="application/xml",
                     body=_s3_error_body("PreconditionFailed", "At least one of the pre-conditions you specified "
                                         "did not hold"))

    def missing_bucket(self, bucket: str) -> str:
        return f"bucket {bucket!r} does not exist"

    def missing_object(self, bucket: str, key: str) -> str:
        return f"{key}: no such object in bucket {bucket!r}"

    def cli_env(self) -> dict[str, str]:
        return {**super().cli_env(), **self.server.env()}

    def start_private(self, workdir):
        server = SeaweedS3(workdir).start()
        return server, S3Store(server)


@pytest.fixture
def store(s3_server, s3_env):
    store = S3Store(s3_server)
    yield store
    store.remove_buckets()


class TestS3Source(RemoteSourceCases):
    """Every shared case against SeaweedFS."""

    def test_random_ranges_bit_exact_multipart(self, store, checkpoint):
        """The same reads of an object uploaded in parts (its ETag is a multipart one)."""
        multipart = S3Store(store.server, multipart=True)
        try:
            self.test_random_ranges_bit_exact(multipart, checkpoint)
        finally:
            multipart.remove_buckets()

    @pytest.mark.skip(reason="S3's bench has its own methods (boto3-16t, runai-s3-c*): test_s3_e2e.py runs it")
    def test_cli_bench_smoke(self, store, sharded_checkpoint, tmp_path):
        pass


# ------------------------------------------------------------------------------------------
# S3's own: the credential chain
# ------------------------------------------------------------------------------------------

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
# the server dies under one large read (the shared cases kill it under a whole load)
# ------------------------------------------------------------------------------------------

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
