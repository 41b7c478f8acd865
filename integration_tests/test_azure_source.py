"""az:// (and https://ACCOUNT.blob.core.windows.net/...) against a real Azure Blob emulator
(Azurite on 127.0.0.1): the shared cases of :mod:`_remote_cases` (bit-exact reads over every
dtype, directories, sharded and mixed local + remote loads, the CLI, throttling / 5xx / cut and
reset connections through a fault injector, a blob replaced mid-load, the server killed
mid-load), then what is Azure's own: the blob-URL form, and the credential chain (account key,
SAS, connection string; a wrong key, a wrong or expired SAS, none at all). Azurite checks
Shared Key signatures and SAS tokens, so refusals come from the emulator itself.
"""

from __future__ import annotations

import errno
import json
import os
import subprocess
import sys
import uuid
from contextlib import closing

import pytest

pytest.importorskip("azure.storage.blob", reason="azure-storage-blob is not installed (pip install loader-plugins[azure])")

from loader_plugins import StreamerConfig, load_file  # noqa: E402
from loader_plugins.core.sources import storage_for  # noqa: E402
from loader_plugins.core.sources.azure import AzureSource  # noqa: E402
from loader_plugins.errors import SourceError  # noqa: E402

try:
    from . import _remote_cases as cases
    from ._remote_cases import RemoteSourceCases, checkpoint, sharded_checkpoint  # noqa: F401  (fixtures)
    from .azure_server import ACCOUNT, ACCOUNT_KEY, Azurite, azure_error_body, azurite_binary
except ImportError:
    import _remote_cases as cases
    from _remote_cases import RemoteSourceCases, checkpoint, sharded_checkpoint  # noqa: F401
    from azure_server import ACCOUNT, ACCOUNT_KEY, Azurite, azure_error_body, azurite_binary

pytestmark = pytest.mark.azure

WRONG_KEY = "V1JPTkcta2V5LW5vdC10aGUtYWNjb3VudHMtb3duLTAwMDAwMDAwMDAwMDAwMDAwMDAwMDA="


class AzureStore(cases.Store):
    scheme = "az"
    kind = "azure"
    runai_reaches_emulator = False   # its C++ backend builds https://ACCOUNT.SUFFIX (docs/benchmarks)
    source_cls = AzureSource
    logger = "loader_plugins.core.sources.azure"
    range_headers = (b"range", b"x-ms-range")
    throttle_reason = "ServerBusy"
    refused_connection = "ServiceRequestError"
    nothing_under = "no blobs under"
    secrets = (ACCOUNT_KEY,)

    def __init__(self, server: Azurite):
        super().__init__(server)
        self._client = server.client()

    def bucket(self) -> str:
        name = f"t-{uuid.uuid4().hex[:20]}"
        self._client.create_container(name)
        return name

    def put(self, bucket: str, key: str, data: bytes) -> None:
        self._client.get_container_client(bucket).upload_blob(key, data, overwrite=True)

    def options(self, endpoint: str | None = None, **extra) -> dict:
        return {"azure_connection_string": self.server.connection_string(endpoint), **extra}

    def proxy_endpoint(self, proxy) -> str:
        return f"{proxy.endpoint_url}/{ACCOUNT}"

    def _answer(self, proxy, n: int, status: int, text: str, code: str, message: str) -> None:
        proxy.answer(n, status=status, reason=text, body=azure_error_body(code, message),
                     content_type="application/xml", headers=(("x-ms-error-code", code),))

    def throttle(self, proxy, n: int, status: int) -> None:
        if status == 503:
            self._answer(proxy, n, 503, "Server Busy", "ServerBusy", "The server is currently unable to receive "
                         "requests. Please retry your request.")
        else:
            self._answer(proxy, n, status, "Too Many Requests", "TooManyRequests", "Too many requests.")

    def refuse(self, proxy, n: int) -> None:
        self._answer(proxy, n, 403, "Server failed to authenticate the request", "AuthenticationFailed",
                     "Server failed to authenticate the request. Make sure the value of Authorization header is "
                     "formed correctly including the signature.")

    def precondition_failed(self, proxy, n: int) -> None:
        self._answer(proxy, n, 412, "The condition specified using HTTP conditional header(s) is not met.",
                     "ConditionNotMet", "The condition specified using HTTP conditional header(s) is not met.")

    def missing_bucket(self, bucket: str) -> str:
        return "the container does not exist (ContainerNotFound)"

    def missing_object(self, bucket: str, key: str) -> str:
        return "found no such blob (BlobNotFound)"

    def cli_env(self) -> dict[str, str]:
        return {**super().cli_env(), **self.server.env()}   # AZURE_STORAGE_CONNECTION_STRING

    def start_private(self, workdir):
        server = Azurite(workdir).start()
        return server, AzureStore(server)


@pytest.fixture(scope="session")
def azurite(tmp_path_factory):
    if azurite_binary() is None:
        pytest.skip("Azurite is not installed (run .ci/setup: npm install azurite into .cache/azurite)")
    with Azurite(tmp_path_factory.mktemp("azurite")) as server:
        yield server


@pytest.fixture
def store(azurite, monkeypatch):
    for name in list(os.environ):
        if name.startswith("AZURE_"):
            monkeypatch.delenv(name)
    return AzureStore(azurite)


class TestAzureSource(RemoteSourceCases):
    """Every shared case against Azurite."""


# ------------------------------------------------------------------------------------------
# Azure's own: the blob-URL form, the credential chain
# ------------------------------------------------------------------------------------------

def test_blob_url_form(store, checkpoint):
    """https://ACCOUNT.blob.core.windows.net/container/blob of the configured account is read
    through its endpoint (here the emulator); other https:// URLs are refused clearly."""
    _, data, tensors = checkpoint
    bucket = store.bucket()
    store.put(bucket, "url/model.safetensors", data)
    url = f"https://{ACCOUNT}.blob.core.windows.net/{bucket}/url/model.safetensors"
    cases._assert_same(load_file(url, config=store.config()), tensors)
    cases._assert_same(load_file(f"https://{ACCOUNT}.blob.core.windows.net/{bucket}/url", config=store.config()),
                       tensors)
    with closing(storage_for(url, store.config())) as storage:
        assert storage.listing(f"https://{ACCOUNT}.blob.core.windows.net/{bucket}/url") == ["model.safetensors"]
        for bad, text in (("https://example.com/models/model.safetensors", "not an Azure Blob URL"),
                          (url + "?sv=2024&sig=SECRET", "carries a query"),
                          ("az:///x", "no container name")):
            with pytest.raises(SourceError, match=text) as info:
                storage.open(bad)
            assert "SECRET" not in str(info.value)


def test_account_key_and_sas(store, checkpoint):
    """The emulator's account URL with its key, then with a container SAS (both checked by Azurite)."""
    _, data, tensors = checkpoint
    bucket = store.bucket()
    store.put(bucket, "creds/model.safetensors", data)
    uri = f"az://{bucket}/creds/model.safetensors"
    by_key = StreamerConfig(azure_account_url=store.server.account_url, azure_account_key=ACCOUNT_KEY)
    cases._assert_same(load_file(uri, config=by_key), tensors)
    sas = store.server.sas_token(bucket)
    by_sas = StreamerConfig(azure_account_url=store.server.account_url, azure_sas_token=sas)
    cases._assert_same(load_file(f"az://{bucket}/creds", config=by_sas), tensors)


def test_environment_chain(store, checkpoint, monkeypatch):
    """AZURE_STORAGE_ACCOUNT_NAME + AZURE_STORAGE_SAS_TOKEN, then AZURE_STORAGE_ACCOUNT_KEY, with
    the endpoint from azure_account_url (the emulator)."""
    _, data, tensors = checkpoint
    bucket = store.bucket()
    store.put(bucket, "env/model.safetensors", data)
    monkeypatch.setenv("AZURE_STORAGE_ACCOUNT_NAME", ACCOUNT)
    monkeypatch.setenv("AZURE_STORAGE_SAS_TOKEN", "?" + store.server.sas_token(bucket))
    cfg = StreamerConfig(azure_account_url=store.server.account_url)
    cases._assert_same(load_file(f"az://{bucket}/env", config=cfg), tensors)
    monkeypatch.delenv("AZURE_STORAGE_SAS_TOKEN")
    monkeypatch.setenv("AZURE_STORAGE_ACCOUNT_KEY", ACCOUNT_KEY)
    cases._assert_same(load_file(f"az://{bucket}/env", config=cfg), tensors)


@pytest.mark.parametrize("wrong", ["key", "sas", "expired-sas"])
def test_wrong_credentials_fail_clearly(store, wrong):
    bucket = store.bucket()
    store.put(bucket, "ckpt/model.safetensors", b"x" * 100)
    uri = f"az://{bucket}/ckpt/model.safetensors"
    if wrong == "key":
        secret = WRONG_KEY
        cfg = StreamerConfig(azure_connection_string=store.server.connection_string(key=WRONG_KEY), max_retries=3)
    else:
        secret = store.server.sas_token(bucket, hours=-1.0) if wrong == "expired-sas" else \
            store.server.sas_token(bucket).replace("sig=", "sig=AAAA")
        cfg = StreamerConfig(azure_account_url=store.server.account_url, azure_sas_token=secret, max_retries=3)
    with closing(storage_for(uri, cfg)) as storage:
        for op in (storage.open, storage.list_dir):
            with pytest.raises(SourceError) as info:
                op(uri)
            message = str(info.value)
            assert info.value.errno == errno.EACCES, message
            assert f"{uri}: " in message and "was refused with" in message and "(HTTP 403)" in message, message
            assert "check the Azure credentials" in message
            for text in filter(None, (secret, ACCOUNT_KEY, secret.partition("sig=")[2][:12])):
                assert text not in message, message
    assert storage.stats.retries == 0, "credential errors must not be retried"


_NO_CREDENTIALS_PROBE = """
import json, sys
from loader_plugins.config import StreamerConfig
from loader_plugins.core.sources import storage_for
from loader_plugins.errors import SourceError
uri = sys.argv[1]
out = []
for account_url in sys.argv[2:]:
    try:
        storage_for(uri, StreamerConfig(azure_account_url=account_url, max_retries=0)).open(uri)
        out.append(None)
    except SourceError as exc:
        out.append([str(exc), exc.errno])
print(json.dumps(out))
"""


def test_no_credentials_fail_clearly(store, tmp_path):
    """No key, SAS or connection string: DefaultAzureCredential finds no identity either (a
    fresh process: no AZURE_* variables, no Azure CLI login, no managed identity)."""
    bucket = store.bucket()
    store.put(bucket, "ckpt/model.safetensors", b"x" * 100)
    uri = f"az://{bucket}/ckpt/model.safetensors"
    env = {k: v for k, v in os.environ.items() if not k.startswith(("AZURE_", "MSI_", "IDENTITY_"))}
    env.update(HOME=str(tmp_path), PYTHONPATH=os.pathsep.join([str(cases.REPO), env.get("PYTHONPATH", "")]))
    # the account's real URL (the token is asked for before any request), then the emulator's
    # (http: the SDK sends tokens over https only)
    proc = subprocess.run([sys.executable, "-c", _NO_CREDENTIALS_PROBE, uri,
                           f"https://{ACCOUNT}.blob.core.windows.net", store.server.account_url], env=env,
                          cwd=tmp_path, capture_output=True, text=True, timeout=180)
    assert proc.returncode == 0, proc.stderr[-3000:]
    (identity, identity_code), (plain_http, http_code) = json.loads(proc.stdout.strip().splitlines()[-1])
    assert identity_code == errno.EACCES, identity
    assert f"{uri}: no usable Azure credentials" in identity and "AZURE_STORAGE_CONNECTION_STRING" in identity
    assert http_code == errno.EINVAL and "Token credential is only supported with HTTPS" in plain_http, plain_http
    assert store.server.account_url in plain_http and "DefaultAzureCredential" in plain_http
