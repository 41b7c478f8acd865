"""A real Azure Blob emulator on 127.0.0.1 for integration tests.

:class:`Azurite` starts Azurite's blob service (``.ci/setup`` installs it with npm into
``.cache/azurite``; an ``azurite-blob`` on PATH works too) in its own process group and always
SIGKILLs that group on exit. It checks Shared Key signatures and SAS tokens of the well-known
development account, honours ``If-Match`` and ranges. Faults are injected by
:class:`~s3_server.FaultProxy` in front of it (503 ServerBusy / 429 answers with Azure's XML
error bodies and ``x-ms-error-code``, cut and reset connections, stalls).

Run an emulator by hand (prints the endpoint and the variable to export)::

    .venv/bin/python integration_tests/azure_server.py /tmp/azuritedata [--in-memory]
"""

from __future__ import annotations

import contextlib
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
from pathlib import Path

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


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def connection_string(account_url: str, key: str = ACCOUNT_KEY) -> str:
    return (f"DefaultEndpointsProtocol=http;AccountName={ACCOUNT};AccountKey={key};"
            f"BlobEndpoint={account_url};")


class Azurite:
    """Azurite's blob service over HTTP on 127.0.0.1, as a context manager.

    ``workdir`` holds its data (or nothing, ``in_memory=True``) and ``azurite.log``. Once started:
    ``account_url`` (``http://127.0.0.1:P/devstoreaccount1``), ``port``; :meth:`client` is a
    ``BlobServiceClient`` with the account key, :meth:`env` the connection string variable."""

    def __init__(self, workdir: str | os.PathLike, *, in_memory: bool = False, ready_timeout: float = 60.0):
        self.workdir = Path(workdir)
        self.in_memory = in_memory
        self.ready_timeout = ready_timeout
        self.account = ACCOUNT
        self.account_key = ACCOUNT_KEY
        self.port = 0
        self.account_url = ""
        self.log_path = self.workdir / "azurite.log"
        self._proc: subprocess.Popen | None = None
        self._log = None

    def start(self, *, tries: int = 3) -> "Azurite":
        binary = azurite_binary()
        if binary is None:
            raise FileNotFoundError("azurite-blob was not found; run .ci/setup (npm install azurite into .cache/azurite)")
        self.workdir.mkdir(parents=True, exist_ok=True)
        for attempt in range(1, tries + 1):
            self.port = free_port()
            self.account_url = f"http://127.0.0.1:{self.port}/{ACCOUNT}"
            store = ["--inMemoryPersistence"] if self.in_memory else ["--location", str(self.workdir / f"data{attempt}")]
            self._log = open(self.log_path, "ab")
            self._proc = subprocess.Popen(
                [binary, "--blobHost", "127.0.0.1", "--blobPort", str(self.port), *store, "--silent",
                 "--skipApiVersionCheck", "--disableTelemetry"],
                stdout=self._log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL, cwd=self.workdir,
                env={k: v for k, v in os.environ.items() if not k.startswith("AZURE_")}, start_new_session=True)
            try:
                self._wait_ready()
                return self
            except _EarlyExit:
                self.kill()
                if attempt == tries:
                    raise
            except BaseException:
                self.kill()
                raise
        return self

    def _wait_ready(self) -> None:
        deadline = time.monotonic() + self.ready_timeout
        last: Exception | None = None
        while time.monotonic() < deadline:
            if self._proc.poll() is not None:
                raise _EarlyExit(f"azurite-blob exited with status {self._proc.returncode} while starting "
                                 f"(port {self.port} taken?); log tail:\n{self.log_tail()}")
            try:
                urllib.request.urlopen(f"{self.account_url}?comp=list", timeout=2)
                return
            except urllib.error.HTTPError:   # any HTTP answer (403: no signature) means it is up
                return
            except (urllib.error.URLError, OSError) as exc:
                last = exc
            time.sleep(0.1)
        raise TimeoutError(f"Azurite at {self.account_url} not ready after {self.ready_timeout:.0f} s "
                           f"(last error: {last}); log tail:\n{self.log_tail()}")

    def kill(self) -> None:
        proc = self._proc
        if proc is not None and proc.returncode is None:
            with contextlib.suppress(ProcessLookupError, PermissionError):
                os.killpg(proc.pid, signal.SIGKILL)
            with contextlib.suppress(subprocess.TimeoutExpired):
                proc.wait(timeout=30)
        if self._log is not None:
            self._log.close()
            self._log = None

    @property
    def alive(self) -> bool:
        return self._proc is not None and self._proc.poll() is None

    def __enter__(self) -> "Azurite":
        return self.start()

    def __exit__(self, *exc) -> None:
        self.kill()

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

    def log_tail(self, lines: int = 30) -> str:
        try:
            return "\n".join(self.log_path.read_text(errors="replace").splitlines()[-lines:])
        except OSError:
            return "(no log)"


class _EarlyExit(RuntimeError):
    pass


def azure_error_body(code: str, message: str) -> bytes:
    """An Azure Storage XML error body, as the service sends it."""
    return (f'<?xml version="1.0" encoding="utf-8"?><Error><Code>{code}</Code><Message>{message}\n'
            f'RequestId:fault-proxy</Message></Error>').encode()


def _main() -> None:
    def stop(signum, frame):
        raise KeyboardInterrupt

    for sig in (signal.SIGINT, signal.SIGTERM, signal.SIGHUP):
        signal.signal(sig, stop)
    args = [a for a in sys.argv[1:] if not a.startswith("--")]
    workdir = Path(args[0] if args else "azurite-test-server")
    with Azurite(workdir, in_memory="--in-memory" in sys.argv) as server:
        print(f"Azurite blob service ready at {server.account_url}; log: {server.log_path}", flush=True)
        for key, value in server.env().items():
            print(f"export {key}='{value}'")
        print("Ctrl-C (or SIGTERM) stops it", flush=True)
        with contextlib.suppress(KeyboardInterrupt):
            while True:
                signal.pause()


if __name__ == "__main__":
    _main()
