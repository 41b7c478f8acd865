"""What every object-store source shares (S3, GCS, Azure Blob): the retry policy and the
resuming ranged read.

- :class:`RemoteSource.read_into` fills the destination with ranged GETs, each one's body read
  from the socket straight into the destination (:func:`fill_from`); a failed attempt
  (:class:`Transient`) is retried after a backoff, resuming from the last byte received, so no
  byte is fetched twice; the final error names the object, the byte range, the last failure and
  what to raise or check.
- :meth:`RemoteStorage._backoff`: exponential backoff with full jitter (uniform in
  ``[0, min(cap, base * 2**(n-1))]``), cut short by cancellation and refused past the load's
  deadline; :meth:`RemoteStorage._call` runs a metadata request (HEAD, LIST, a small GET) under
  the same policy.

- :meth:`RemoteSource._get_range`: one ranged GET, its answer checked, its body read into the
  destination, its connection given back to the pool when the body was read to the end and
  closed otherwise.
- :class:`RemoteStorage`'s ``exists``, ``is_dir``, ``list_dir``, ``join``: the object-store
  meaning of a directory (objects under ``prefix/``).

A store supplies its requests (``RemoteSource._send_range``, ``_check_answer``, ``_body``,
``_finish``; ``RemoteStorage._head_request``, ``_dir_request``, ``listing``) and the meaning of
its client's failures (``RemoteStorage._classify``: :class:`Transient`, or the final
:class:`~loader_plugins.errors.SourceError`). Retries are logged at INFO on the logger of the
store's own module, with the object and the reason, never a credential.
"""

from __future__ import annotations

import dataclasses
import errno
import http.client
import logging
import random
import threading
import time
from typing import TYPE_CHECKING, Any, Callable

from ...errors import CancelledError, SourceChangedError, SourceError, SourceNotFoundError
from .base import BufferPool, Source, Storage

if TYPE_CHECKING:
    from ...config import StreamerConfig

#: bytes per ``readinto`` call: the unit of resumption and of cancellation checks
READ_STEP = 1 << 20


class Transient(Exception):
    """An attempt failed in a way another attempt may fix; ``str`` is the reason."""


@dataclasses.dataclass
class RemoteStats:
    """Counters shared by a storage and its sources (thread-safe through ``add``)."""

    requests: int = 0
    retries: int = 0
    bytes_read: int = 0
    _lock: threading.Lock = dataclasses.field(default_factory=threading.Lock, repr=False, compare=False)

    def add(self, *, requests: int = 0, retries: int = 0, bytes_read: int = 0) -> None:
        with self._lock:
            self.requests += requests
            self.retries += retries
            self.bytes_read += bytes_read


class Progress:
    """Bytes of one ``read_into`` received so far, across its attempts."""

    __slots__ = ("received",)

    def __init__(self) -> None:
        self.received = 0


def check_cancelled(cancelled: threading.Event | None, uri: str) -> None:
    if cancelled is not None and cancelled.is_set():
        raise CancelledError(f"{uri}: read cancelled")


def socket_readinto(raw: Any) -> Callable[[memoryview], int] | None:
    """The ``readinto`` of the ``http.client`` response under a urllib3 response (``requests``'
    ``response.raw``, botocore's ``_raw_stream``): bytes go from the socket into the caller's
    memory with no copy. None when it is not reachable."""
    fp = getattr(raw, "_fp", None)
    return fp.readinto if fp is not None and hasattr(fp, "readinto") else None


def copying_readinto(read: Callable[[int], bytes]) -> Callable[[memoryview], int]:
    """Fallback when the raw socket response is not reachable: read and copy."""
    def readinto(view: memoryview) -> int:
        data = read(len(view))
        view[:len(data)] = data
        return len(data)
    return readinto


def fill_from(readinto: Callable[[memoryview], int], view: memoryview, *, uri: str,
              cancelled: threading.Event | None, progress: Progress, stats: RemoteStats,
              on_error: Callable[[BaseException], BaseException] | None = None) -> None:
    """Read a response body into all of ``view``, ``READ_STEP`` bytes at a time. A socket error
    or a short body is :class:`Transient` (``progress`` says how far it got); any other error
    goes through ``on_error`` (a client's own streaming errors)."""
    length = view.nbytes
    got = 0
    while got < length:
        check_cancelled(cancelled, uri)
        try:
            n = readinto(view[got:got + READ_STEP])
        except (OSError, http.client.HTTPException, ValueError) as exc:
            raise Transient(f"{type(exc).__name__} after {got} of {length} body bytes: {exc}") from exc
        except Exception as exc:  # noqa: BLE001 - mapped by the store
            if on_error is None:
                raise
            raise on_error(exc) from exc
        if not n:
            raise Transient(f"connection closed after {got} of {length} body bytes")
        got += n
        progress.received += n
        stats.add(bytes_read=n)


def parse_content_range(value: str) -> tuple[int, int, str]:
    """``"bytes 10-19/100"`` -> ``(10, 20, "100")`` (end exclusive; total may be ``"*"``);
    ValueError when it is not one."""
    unit_span, _, total = value.partition("/")
    first, _, last = unit_span.split()[-1].partition("-")
    return int(first), int(last) + 1, total.strip()


def dir_prefix(name: str) -> str:
    """The prefix of the objects "in" the directory ``name``: ``"a/b"`` -> ``"a/b/"``, ``""`` -> ``""``."""
    name = name.strip("/")
    return name + "/" if name else ""


def check_stored_encoding(uri: str, encoding: str | None) -> None:
    """An object stored compressed cannot be read by ranges (checked at open)."""
    encoding = (encoding or "").strip().lower()
    if encoding not in ("", "identity"):
        raise SourceError(errno.EINVAL, f"{uri}: stored with Content-Encoding {encoding!r}; ranged reads would "
                          f"return compressed bytes. Upload the checkpoint without compression")


def check_range_answer(source: "RemoteSource", *, status: int | None, content_range: str | None,
                       content_length: str | int | None, start: int, stop: int, not_this_api: str) -> None:
    """The checks every ranged GET's answer passes before its body is read: the range asked
    for, the object's size unchanged, the body's length. ``not_this_api`` ends the message when
    the Content-Range cannot be parsed ("the endpoint does not speak the GCS JSON API")."""
    if content_range:
        try:
            first, end, total = parse_content_range(content_range)
        except (ValueError, IndexError):
            raise SourceError(errno.EIO, f"{source.uri}: unparsable Content-Range {content_range!r} for bytes "
                              f"[{start}, {stop}); {not_this_api}") from None
        if total not in ("*", str(source.size())):
            raise source._changed(f"size is now {total} bytes, was {source.size()} at open")
        if (first, end) != (start, stop):
            raise SourceError(errno.EIO, f"{source.uri}: asked for bytes [{start}, {stop}) but the server sent "
                              f"[{first}, {end}); the endpoint does not honour Range requests")
    elif not (status == 200 and start == 0 and stop == source.size()):
        raise SourceError(errno.EIO, f"{source.uri}: asked for bytes [{start}, {stop}) but the server sent no "
                          f"Content-Range (HTTP {status}); the endpoint does not honour Range requests")
    if content_length is not None and int(content_length) != stop - start:
        raise Transient(f"Content-Length {content_length} for a {stop - start}-byte range")


def check_http_answer(source: "RemoteSource", status: int, headers: Any, start: int, stop: int, *,
                      not_this_api: str) -> None:
    """:func:`check_range_answer` from an HTTP answer's headers (lower-case names), and its bytes
    must be the object's own: no Content-Encoding but identity."""
    encoding = (headers.get("content-encoding") or "").strip().lower()
    if encoding not in ("", "identity"):
        raise SourceError(errno.EIO, f"{source.uri}: the server sent bytes [{start}, {stop}) with Content-Encoding "
                          f"{encoding!r}; upload the checkpoint without compression")
    check_range_answer(source, status=status, content_range=headers.get("content-range"),
                       content_length=headers.get("content-length"), start=start, stop=stop, not_this_api=not_this_api)


class RemoteStorage(Storage):
    """An object store reached over the network: the retry policy its sources share."""

    #: backoff before attempt n+1 is uniform in [0, min(cap, base * 2**(n-1))] seconds (full jitter)
    backoff_base = 0.2
    backoff_cap = 20.0
    #: where requests go, for messages (no credentials in it)
    endpoint: str | None = None

    def __init__(self, config: "StreamerConfig"):
        super().__init__(config)
        self.stats = RemoteStats()
        #: absolute ``time.monotonic()`` deadline for metadata calls and new sources (reader sets it)
        self.deadline_at: float | None = None

    # -- Storage API: a directory is the objects under ``prefix/`` ---------------------------------
    def is_dir(self, uri: str) -> bool:
        request = self._dir_request(uri)
        try:
            return request()
        except SourceError as exc:
            if exc.errno == errno.ENOENT:
                return False
            raise

    def exists(self, uri: str) -> bool:
        request = self._head_request(uri)
        if request is not None:
            try:
                request()
                return True
            except SourceError as exc:
                if exc.errno != errno.ENOENT:
                    raise
        return self.is_dir(uri)

    def list_dir(self, uri: str) -> list[str]:
        names = self.listing(uri)
        if names is None:
            raise SourceNotFoundError(errno.ENOENT, self._nothing_under(uri))
        return names

    def join(self, base: str, name: str) -> str:
        return str(base).rstrip("/") + "/" + name

    def close(self) -> None:
        """A store's clients are shared by every storage with the same settings (its ``shared_client``)."""

    # -- what a store says -------------------------------------------------------------------
    def _head_request(self, uri: str) -> Callable[[], Any] | None:
        """The metadata request of the object ``uri`` names (run by :meth:`exists`, a missing
        object raising ENOENT), or None when ``uri`` names a bucket or a prefix. A bad URI
        raises here."""
        raise NotImplementedError

    def _dir_request(self, uri: str) -> Callable[[], bool]:
        """A request that is True when an object lies under ``uri``'s prefix (a missing bucket
        raising ENOENT). A bad URI raises here."""
        raise NotImplementedError

    def _nothing_under(self, uri: str) -> str:
        """The message when ``uri`` names no directory."""
        raise NotImplementedError

    def _classify(self, exc: BaseException, uri: str, what: str, *, object_key: bool = False
                  ) -> "Transient | SourceError":
        """Map a failure of this store's client to Transient (retry) or a final SourceError."""
        raise NotImplementedError

    def _endpoint_for(self, uri: str) -> str | None:
        """The endpoint requests for ``uri`` go to, for messages (a store with several accounts
        says which)."""
        return self.endpoint

    def _final(self, error: BaseException, uri: str, what: str) -> BaseException:
        """A final error about to be raised from :meth:`_call`; a store may make it more precise
        (which of bucket and object is missing)."""
        return error

    def _call(self, uri: str, what: str, fn: Callable[..., Any], *, deadline_at: float | None = None,
              cancelled: threading.Event | None = None, **kwargs: Any) -> Any:
        """A metadata request (HEAD, LIST, a small GET) with the same retry policy as reads."""
        attempts = self.config.max_retries + 1
        deadline_at = deadline_at if deadline_at is not None else self.deadline_at
        for attempt in range(1, attempts + 1):
            check_cancelled(cancelled, uri)
            self.stats.add(requests=1)
            try:
                return fn(**kwargs)
            except Exception as exc:  # noqa: BLE001 - classified below
                error = self._classify(exc, uri, what, object_key=what == "HEAD")
                if not isinstance(error, Transient):
                    raise self._final(error, uri, what) from exc
                reason = str(error)
            if attempt < attempts:
                self._backoff(attempt, f"{uri}: {what} attempt {attempt}/{attempts} failed ({reason})", cancelled,
                              deadline_at, uri)
        raise SourceError(errno.EIO, f"{uri}: {what} failed after {attempts} attempts; last error: "
                          f"{reason.rstrip('.')}. Check that the endpoint {self._endpoint_for(uri)} is reachable and "
                          f"healthy, or raise request_timeout ({self.config.request_timeout:g} s) / max_retries "
                          f"({self.config.max_retries})")

    def _backoff(self, attempt: int, message: str, cancelled: threading.Event | None, deadline_at: float | None,
                 uri: str) -> None:
        delay = random.uniform(0.0, min(self.backoff_cap, self.backoff_base * 2 ** (attempt - 1)))
        if deadline_at is not None and time.monotonic() + delay >= deadline_at:
            raise SourceError(errno.ETIMEDOUT, f"{message}; the load's deadline has passed, giving up. "
                              f"Raise the deadline or check the endpoint {self._endpoint_for(uri)}")
        self.stats.add(retries=1)
        logging.getLogger(type(self).__module__).info("%s; retry in %.2f s", message, delay)
        if cancelled is not None:
            if cancelled.wait(delay):
                raise CancelledError(f"{uri}: cancelled while waiting to retry")
        else:
            time.sleep(delay)


class RemoteSource(Source):
    """One object of a :class:`RemoteStorage`, read by ranged GETs that resume on failure."""

    #: the header reader fetches ``min(size, header_prefetch)`` first: one GET for most headers
    header_prefetch = 256 << 10
    #: bytes land straight in the destination: the reader needs no aligned staging buffers
    wants_staging = False
    remote = True       # larger reads (s3_range_bytes) and more workers (StreamerConfig.workers)

    def __init__(self, storage: RemoteStorage, uri: str):
        super().__init__(uri)
        self._storage = storage
        #: absolute ``time.monotonic()`` after which no new attempt starts (set by the reader)
        self.deadline_at: float | None = storage.deadline_at
        self._size = 0

    def size(self) -> int:
        return self._size

    def read_into(self, offset: int, dest: memoryview, *, pool: BufferPool | None = None,
                  cancelled: threading.Event | None = None, slack: bool = False, fresh: bool = False) -> None:
        view = memoryview(dest)
        if view.ndim != 1 or view.format not in ("B", "b", "c"):
            view = view.cast("B")
        length = view.nbytes
        if length == 0:
            return
        end = offset + length
        if offset < 0 or end > self._size:
            raise SourceError(errno.EINVAL, f"{self.uri}: bytes [{offset}, {end}) lie outside the "
                              f"{self._size}-byte object")
        cfg = self._storage.config
        attempts = cfg.max_retries + 1
        progress = Progress()
        for attempt in range(1, attempts + 1):
            check_cancelled(cancelled, self.uri)
            start = offset + progress.received
            try:
                self._get_range(start, view[progress.received:], cancelled, progress)
                return
            except Transient as exc:
                reason = str(exc)
            if attempt == attempts:
                break
            self._storage._backoff(
                attempt, f"{self.uri}: GET bytes [{offset}, {end}) attempt {attempt}/{attempts} failed ({reason}); "
                f"resuming from byte {offset + progress.received}", cancelled, self.deadline_at, self.uri)
        raise SourceError(
            errno.EIO, f"{self.uri}: GET of bytes [{offset}, {end}) failed after {attempts} attempts "
            f"({progress.received} of {length} bytes received); last error: {reason.rstrip('.')}. Check that the "
            f"endpoint {self._storage._endpoint_for(self.uri)} is reachable and healthy, or raise request_timeout "
            f"({cfg.request_timeout:g} s) / max_retries ({cfg.max_retries})")

    def _get_range(self, start: int, view: memoryview, cancelled: threading.Event | None,
                   progress: Progress) -> None:
        """One ranged GET filling ``view`` from byte ``start``; raises Transient (``progress``
        kept: the next attempt resumes after it) or a final SourceError."""
        storage = self._storage
        stop = start + view.nbytes  # exclusive
        what = f"GET bytes [{start}, {stop})"
        answer = self._send_range(start, stop, what)
        complete = False
        try:
            self._check_answer(answer, start, stop, what)
            fill_from(self._body(answer), view, uri=self.uri, cancelled=cancelled, progress=progress,
                      stats=storage.stats,
                      # the client's own streaming errors (a copying fallback's)
                      on_error=lambda exc: storage._classify(exc, self.uri, what))
            complete = True
        finally:
            self._finish(answer, complete)

    # -- what a store says -------------------------------------------------------------------
    def _send_range(self, start: int, stop: int, what: str) -> Any:
        """Send the GET of bytes [start, stop) (counted in the storage's stats); its answer, the
        body not read yet. A failure to send raises the storage's classified error."""
        raise NotImplementedError

    def _check_answer(self, answer: Any, start: int, stop: int, what: str) -> None:
        """Raise when the answer is not the object's bytes [start, stop) (an error status, another
        version, another range; :func:`check_range_answer`)."""
        raise NotImplementedError

    def _body(self, answer: Any) -> Callable[[memoryview], int]:
        """The answer's body as a ``readinto`` (:func:`socket_readinto`, else a copy)."""
        raise NotImplementedError

    def _finish(self, answer: Any, complete: bool) -> None:
        """After the body: its connection back to the pool when ``complete`` (read to the end),
        else closed (a partial body: the connection cannot be reused)."""
        raise NotImplementedError

    def _changed(self, why: str) -> SourceChangedError:
        return SourceChangedError(errno.ESTALE, f"{self.uri}: the object changed while it was being loaded "
                                  f"({why}); load it again once it is no longer being written")
