"""A real Azure Blob emulator on 127.0.0.1 for integration tests.

:class:`Azurite` starts Azurite's blob service (``.ci/setup`` installs it with npm into
``.cache/azurite``; an ``azurite-blob`` on PATH works too) in its own process group and always
SIGKILLs that group on exit (:class:`loader_plugins.bench.emulator.EmulatorProcess`). It checks
Shared Key signatures and SAS tokens of the well-known development account, honours ``If-Match``
and ranges. Faults are injected by
:class:`~s3_server.FaultProxy` in front of it (503 ServerBusy / 429 answers with Azure's XML
error bodies and ``x-ms-error-code``, cut and reset connections, stalls).

Run an emulator by hand (prints the endpoint and the variable to export)::

    .venv/bin/python integration_tests/azure_server.py /tmp/azuritedata [--in-memory]
"""

from __future__ import annotations

import os
import shutil
import sys
import urllib.error
import urllib.request
from pathlib import Path

from loader_plugins.bench.emulator import EmulatorProcess, run_by_hand
from loader_plugins.serve.process import free_port

REPO = Path(__file__).resolve().parents[1]
#: Azurite's development account and its published key (not a secret: it is in Azure's docs)
ACCOUNT = "devstoreaccount1"
ACCOUNT_KEY = "Eby8vdM02xNOcqFlqUwJPLlmEtlCDXJ1OUzFT50uSRZ6IFsuFq2UVErCz4I6tq/K1SZFPTOtr/KBHBeksoGMGw=="


def azurite_binary() -> str | None:
    """``azurite-blob`` from ``.cache/azurite`` (``.ci/setup``), else on PATH; None without node."""
    if shutil.which("node") is None:
        return None
    local = REPO / ".cache" / "azurite" / "node_modules" / ".bin" / "azurite-blob"
    if local.exists() and os.access(local, os.X_OK):
        return str(local)
    return shutil.which("azurite-blob")


def connection_string(account_url: str, key: str = ACCOUNT_KEY) -> str:
    return (f"DefaultEndpointsProtocol=http;AccountName={ACCOUNT};AccountKey={key};"
            f"BlobEndpoint={account_url};")


class Azurite(EmulatorProcess):
    """Azurite's blob service over HTTP on 127.0.0.1, as a context manager.

    ``workdir`` holds its data (or nothing, ``in_memory=True``) and ``azurite.log``. Once started:
    ``account_url`` (``http://127.0.0.1:P/devstoreaccount1``), ``port``; :meth:`client` is a
    ``BlobServiceClient`` with the account key, :meth:`env` the connection string variable."""

    _program = "azurite-blob"
    _title = "Azurite"

    def __init__(self, workdir: str | os.PathLike, *, in_memory: bool = False, ready_timeout: float = 60.0):
        super().__init__(workdir, "azurite.log", ready_timeout=ready_timeout)
        self.in_memory = in_memory
        self.account = ACCOUNT
        self.account_key = ACCOUNT_KEY
        self.port = 0
        self.account_url = ""
        self._binary = ""

    def _prepare(self) -> None:
        binary = azurite_binary()
        if binary is None:
            raise FileNotFoundError("azurite-blob was not found; run .ci/setup (npm install azurite into .cache/azurite)")
        self._binary = binary
        self.workdir.mkdir(parents=True, exist_ok=True)

    def _launch(self, attempt: int) -> None:
        self.port = free_port()
        self.account_url = f"http://127.0.0.1:{self.port}/{ACCOUNT}"
        store = ["--inMemoryPersistence"] if self.in_memory else ["--location", str(self.workdir / f"data{attempt}")]
        self._popen([self._binary, "--blobHost", "127.0.0.1", "--blobPort", str(self.port), *store, "--silent",
                     "--skipApiVersionCheck", "--disableTelemetry"],
                    env={k: v for k, v in os.environ.items() if not k.startswith("AZURE_")})

    def _readiness(self):
        def ready() -> bool:
            try:
                urllib.request.urlopen(f"{self.account_url}?comp=list", timeout=2)
            except urllib.error.HTTPError:   # any HTTP answer (403: no signature) means it is up
                pass
            return True

        return ready, (urllib.error.URLError, OSError)

    def _address(self) -> str:
        return self.account_url

    def _exit_note(self) -> str:
        return f" (port {self.port} taken?)"

    def connection_string(self, account_url: str | None = None, key: str | None = None) -> str:
        return connection_string(account_url or self.account_url, key or self.account_key)

    def env(self) -> dict[str, str]:
        return {"AZURE_STORAGE_CONNECTION_STRING": self.connection_string()}

    def client(self):
        from azure.storage.blob import BlobServiceClient

        return BlobServiceClient.from_connection_string(self.connection_string())

    def sas_token(self, container: str, *, read: bool = True, list_: bool = True, hours: float = 1.0) -> str:
        """A container SAS signed with the account key."""
        import datetime

        from azure.storage.blob import ContainerSasPermissions, generate_container_sas

        return generate_container_sas(self.account, container, account_key=self.account_key,
                                      permission=ContainerSasPermissions(read=read, list=list_),
                                      expiry=datetime.datetime.now(datetime.timezone.utc)
                                      + datetime.timedelta(hours=hours))


def azure_error_body(code: str, message: str) -> bytes:
    """An Azure Storage XML error body, as the service sends it."""
    return (f'<?xml version="1.0" encoding="utf-8"?><Error><Code>{code}</Code><Message>{message}\n'
            f'RequestId:fault-proxy</Message></Error>').encode()


def _main() -> None:
    args = [a for a in sys.argv[1:] if not a.startswith("--")]
    run_by_hand(Azurite(Path(args[0] if args else "azurite-test-server"), in_memory="--in-memory" in sys.argv),
                "Azurite blob service", quote="'")


if __name__ == "__main__":
    _main()
