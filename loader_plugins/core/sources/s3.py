"""S3 and S3-compatible object storage (AWS, MinIO, SeaweedFS, Ceph...) through boto3.

``s3://bucket/key`` names an object; ``s3://bucket/prefix`` names a "directory" when objects
exist under ``prefix/``. One boto3 client per :class:`S3Storage` (clients are thread-safe),
its connection pool sized to the reader's concurrency.

A read is a ranged GET with ``If-Match: <ETag recorded at open>``, so an object replaced
mid-load fails with :class:`SourceChangedError` instead of yielding a mixed model. The body is
read with ``readinto`` straight into the destination: no whole-object copies, no temp files.
botocore's own retries are off: a retry here resumes from the last byte received, with
exponential backoff and full jitter, and honours cancellation and the load's deadline.

Clients: :mod:`.s3_client`; what a failure means (retry, or which error): :mod:`.s3_errors`.
boto3 is imported when a storage is created, never at module import.
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
from .s3_client import shared_client
from .s3_errors import Transient, classify, explain_missing

if TYPE_CHECKING:
    from ...config import StreamerConfig

log = logging.getLogger(__name__)

_READ_STEP = 1 << 20  # bytes per readinto call: the unit of resumption and of cancellation checks


def parse_s3_uri(uri: str) -> tuple[str, str]:
    """``s3://bucket/some/key`` -> ``("bucket", "some/key")`` (key may be empty)."""
    text = str(uri)
    if not text.lower().startswith("s3://"):
        raise SourceError(errno.EINVAL, f"{text}: not an s3:// URI")
    bucket, _, key = text[5:].partition("/")
    if not bucket:
        raise SourceError(errno.EINVAL, f"{text}: no bucket name; use s3://bucket/key")
    return bucket, key


@dataclasses.dataclass
class S3Stats:
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


class _Progress:
    __slots__ = ("received",)

    def __init__(self) -> None:
        self.received = 0


class S3Source(Source):
    """One S3 object, opened with a HEAD (size and ETag recorded)."""

    #: the header reader fetches ``min(size, header_prefetch)`` first: one GET for most headers
    header_prefetch = 256 << 10
    #: bytes land straight in the destination: the reader needs no aligned staging buffers
    wants_staging = False
    remote = True       # larger reads (s3_range_bytes) and more workers (StreamerConfig.workers)

    def __init__(self, storage: "S3Storage", uri: str):
        super().__init__(uri)
        self._storage = storage
        self.bucket, self.key = parse_s3_uri(uri)
        if not self.key or self.key.endswith("/"):
            raise SourceError(errno.EISDIR, f"{uri}: names a bucket or prefix, not an object")
        #: absolute ``time.monotonic()`` after which no new attempt starts (set by the reader)
        self.deadline_at: float | None = storage.deadline_at
        head = storage._call(uri, "HEAD", storage.client.head_object, Bucket=self.bucket, Key=self.key,
                             deadline_at=self.deadline_at)
        self._size = int(head["ContentLength"])
        self.etag: str | None = head.get("ETag")
        if not self.etag:
            log.debug("%s: the server sent no ETag; changes are detected by size only", uri)

    @property
    def reads_pinned(self) -> bool:   # type: ignore[override]
        """Every ranged GET carries ``If-Match`` with the ETag seen at open."""
        return bool(self.etag)

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
        progress = _Progress()
        for attempt in range(1, attempts + 1):
            _check_cancelled(cancelled, self.uri)
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
            f"endpoint {self._storage.endpoint} is reachable and healthy, or raise request_timeout "
            f"({cfg.request_timeout:g} s) / max_retries ({cfg.max_retries})")

    def _get_range(self, start: int, view: memoryview, cancelled: threading.Event | None,
                   progress: _Progress) -> None:
        """One ranged GET filling ``view``; raises Transient (progress kept) or SourceError."""
        storage = self._storage
        length = view.nbytes
        stop = start + length  # exclusive
        kwargs: dict[str, Any] = {"Bucket": self.bucket, "Key": self.key, "Range": f"bytes={start}-{stop - 1}"}
        if self.etag:
            kwargs["IfMatch"] = self.etag
        storage.stats.add(requests=1)
        try:
            resp = storage.client.get_object(**kwargs)
        except Exception as exc:  # noqa: BLE001 - classified below
            raise storage._classify(exc, self.uri, f"GET bytes [{start}, {stop})", object_key=True) from exc
        body = resp["Body"]
        raw = None
        done = False
        try:
            self._check_response(resp, start, stop)
            raw = getattr(body, "_raw_stream", None)  # urllib3 HTTPResponse
            fp = getattr(raw, "_fp", None)  # http.client.HTTPResponse: readinto without copies
            readinto = fp.readinto if fp is not None and hasattr(fp, "readinto") else _copying_readinto(body)
            got = 0
            while got < length:
                _check_cancelled(cancelled, self.uri)
                try:
                    n = readinto(view[got:got + _READ_STEP])
                except (OSError, http.client.HTTPException, ValueError) as exc:
                    raise Transient(f"{type(exc).__name__} after {got} of {length} body bytes: {exc}") from exc
                except Exception as exc:  # noqa: BLE001 - botocore streaming errors on the fallback path
                    raise storage._classify(exc, self.uri, f"GET bytes [{start}, {stop})") from exc
                if not n:
                    raise Transient(f"connection closed after {got} of {length} body bytes")
                got += n
                progress.received += n
                storage.stats.add(bytes_read=n)
            done = True
        finally:
            if done and raw is not None and hasattr(raw, "release_conn"):
                raw.release_conn()  # body fully read: the connection goes back to the pool
            else:
                body.close()  # partial body: the connection cannot be reused

    def _check_response(self, resp: dict, start: int, stop: int) -> None:
        etag = resp.get("ETag")
        if self.etag and etag and etag != self.etag:
            raise self._changed(f"ETag {etag} differs from {self.etag} seen at open")
        crange = resp.get("ContentRange")
        status = resp.get("ResponseMetadata", {}).get("HTTPStatusCode")
        if crange:
            try:
                unit_span, _, total = crange.partition("/")
                first, _, last = unit_span.split()[-1].partition("-")
                first, last = int(first), int(last)
            except ValueError:
                raise SourceError(errno.EIO, f"{self.uri}: unparsable Content-Range {crange!r} for bytes "
                                  f"[{start}, {stop}); the endpoint is not S3-compatible") from None
            if total not in ("*", str(self._size)):
                raise self._changed(f"size is now {total} bytes, was {self._size} at open")
            if (first, last + 1) != (start, stop):
                raise SourceError(errno.EIO, f"{self.uri}: asked for bytes [{start}, {stop}) but the server "
                                  f"sent [{first}, {last + 1}); the endpoint does not honour Range requests")
        elif not (status == 200 and start == 0 and stop == self._size):
            raise SourceError(errno.EIO, f"{self.uri}: asked for bytes [{start}, {stop}) but the server sent no "
                              f"Content-Range (HTTP {status}); the endpoint does not honour Range requests")
        if int(resp.get("ContentLength", stop - start)) != stop - start:
            raise Transient(f"Content-Length {resp.get('ContentLength')} for a {stop - start}-byte range")

    def _changed(self, why: str) -> SourceChangedError:
        return SourceChangedError(errno.ESTALE, f"{self.uri}: the object changed while it was being loaded "
                                  f"({why}); load it again once it is no longer being written")

    def check_unchanged(self) -> None:
        head = self._storage._call(self.uri, "HEAD", self._storage.client.head_object, Bucket=self.bucket,
                                   Key=self.key, deadline_at=self.deadline_at)
        if int(head["ContentLength"]) != self._size:
            raise self._changed(f"size is now {head['ContentLength']} bytes, was {self._size} at open")
        if self.etag and head.get("ETag") != self.etag:
            raise self._changed(f"ETag {head.get('ETag')} differs from {self.etag} seen at open")


class S3Storage(Storage):
    """S3 buckets through one thread-safe boto3 client.

    Credentials come from boto3's standard chain (environment, shared config files, the
    profile ``config.s3_profile``, container and instance roles); they never appear in logs
    or error messages.
    """

    #: backoff before attempt n+1 is uniform in [0, min(cap, base * 2**(n-1))] seconds (full jitter)
    backoff_base = 0.2
    backoff_cap = 20.0

    def __init__(self, config: "StreamerConfig"):
        super().__init__(config)
        self.stats = S3Stats()
        #: absolute ``time.monotonic()`` deadline for metadata calls and new sources (reader sets it)
        self.deadline_at: float | None = None
        self.client = shared_client(config)
        self.endpoint = self.client.meta.endpoint_url

    # -- Storage API -------------------------------------------------------------------------
    def open(self, uri: str) -> S3Source:
        return S3Source(self, uri)

    def is_dir(self, uri: str) -> bool:
        bucket, key = parse_s3_uri(uri)
        prefix = _dir_prefix(key)
        try:
            page = self._call(uri, "LIST", self.client.list_objects_v2, Bucket=bucket, Prefix=prefix, MaxKeys=1)
        except SourceError as exc:
            if exc.errno == errno.ENOENT:
                return False
            raise
        return bool(page.get("KeyCount") or page.get("Contents") or page.get("CommonPrefixes"))

    def exists(self, uri: str) -> bool:
        bucket, key = parse_s3_uri(uri)
        if key and not key.endswith("/"):
            try:
                self._call(uri, "HEAD", self.client.head_object, Bucket=bucket, Key=key)
                return True
            except SourceError as exc:
                if exc.errno != errno.ENOENT:
                    raise
        return self.is_dir(uri)

    def list_dir(self, uri: str) -> list[str]:
        names = self.listing(uri)
        if names is None:
            bucket, key = parse_s3_uri(uri)
            raise SourceNotFoundError(errno.ENOENT, f"{uri}: no objects under s3://{bucket}/{_dir_prefix(key)}; "
                                      f"check the bucket and prefix")
        return names

    def listing(self, uri: str) -> list[str] | None:
        """One LIST (more pages for more than 1000 keys): the names directly under ``uri``, or
        None when nothing is (not a directory)."""
        bucket, key = parse_s3_uri(uri)
        prefix = _dir_prefix(key)
        names: list[str] = []
        seen_any = False
        kwargs: dict[str, Any] = {"Bucket": bucket, "Prefix": prefix, "Delimiter": "/"}
        while True:
            page = self._call(uri, "LIST", self.client.list_objects_v2, **kwargs)
            seen_any = seen_any or bool(page.get("Contents") or page.get("CommonPrefixes"))
            for obj in page.get("Contents", ()):
                name = obj["Key"][len(prefix):]
                if name:  # skip a "directory marker" object named like the prefix itself
                    names.append(name)
            token = page.get("NextContinuationToken")
            if not page.get("IsTruncated") or not token:
                break
            kwargs["ContinuationToken"] = token
        if not seen_any:
            return None
        return sorted(names)

    def read_small(self, uri: str, limit: int = 64 << 20) -> bytes:
        """A small whole object (index.json, config) in one GET, no HEAD."""
        bucket, key = parse_s3_uri(uri)
        if not key or key.endswith("/"):
            raise SourceError(errno.EISDIR, f"{uri}: names a bucket or prefix, not an object")

        def get() -> bytes:
            resp = self.client.get_object(Bucket=bucket, Key=key)
            body = resp["Body"]
            try:
                if int(resp.get("ContentLength", 0)) > limit:
                    raise SourceError(errno.EFBIG, f"{uri}: {resp['ContentLength']} bytes is larger than the "
                                                   f"{limit}-byte limit for this file")
                return body.read()
            finally:
                body.close()

        return self._call(uri, "GET", get)

    def join(self, base: str, name: str) -> str:
        return str(base).rstrip("/") + "/" + name

    def close(self) -> None:
        """The client is shared by every storage with the same settings (:func:`shared_client`)."""

    # -- retries and errors ------------------------------------------------------------------
    def _call(self, uri: str, what: str, fn: Callable[..., Any], *, deadline_at: float | None = None,
              cancelled: threading.Event | None = None, **kwargs: Any) -> Any:
        """A metadata request (HEAD, LIST) with the same retry policy as reads."""
        attempts = self.config.max_retries + 1
        deadline_at = deadline_at if deadline_at is not None else self.deadline_at
        for attempt in range(1, attempts + 1):
            _check_cancelled(cancelled, uri)
            self.stats.add(requests=1)
            try:
                return fn(**kwargs)
            except Exception as exc:  # noqa: BLE001 - classified below
                error = self._classify(exc, uri, what, object_key=what == "HEAD")
                if not isinstance(error, Transient):
                    if what == "HEAD" and getattr(error, "errno", None) == errno.ENOENT:
                        error = explain_missing(self.client, parse_s3_uri(uri)[0], uri, error, self.endpoint)
                    raise error from exc
                reason = str(error)
            if attempt < attempts:
                self._backoff(attempt, f"{uri}: {what} attempt {attempt}/{attempts} failed ({reason})", cancelled,
                              deadline_at, uri)
        raise SourceError(errno.EIO, f"{uri}: {what} failed after {attempts} attempts; last error: "
                          f"{reason.rstrip('.')}. Check that the endpoint {self.endpoint} is reachable and "
                          f"healthy, or raise request_timeout ({self.config.request_timeout:g} s) / max_retries "
                          f"({self.config.max_retries})")

    def _backoff(self, attempt: int, message: str, cancelled: threading.Event | None, deadline_at: float | None,
                 uri: str) -> None:
        delay = random.uniform(0.0, min(self.backoff_cap, self.backoff_base * 2 ** (attempt - 1)))
        if deadline_at is not None and time.monotonic() + delay >= deadline_at:
            raise SourceError(errno.ETIMEDOUT, f"{message}; the load's deadline has passed, giving up. "
                              f"Raise the deadline or check the endpoint {self.endpoint}")
        self.stats.add(retries=1)
        log.info("%s; retry in %.2f s", message, delay)
        if cancelled is not None:
            if cancelled.wait(delay):
                raise CancelledError(f"{uri}: cancelled while waiting to retry")
        else:
            time.sleep(delay)

    def _classify(self, exc: BaseException, uri: str, what: str, *, object_key: bool = False
                  ) -> "Transient | SourceError":
        return classify(exc, uri, what, endpoint=self.endpoint, profile=self.config.s3_profile,
                        object_key=object_key)



def _dir_prefix(key: str) -> str:
    key = key.strip("/")
    return key + "/" if key else ""


def _check_cancelled(cancelled: threading.Event | None, uri: str) -> None:
    if cancelled is not None and cancelled.is_set():
        raise CancelledError(f"{uri}: read cancelled")


def _copying_readinto(body) -> Callable[[memoryview], int]:
    """Fallback when the raw socket response is not reachable: read and copy."""
    def readinto(view: memoryview) -> int:
        data = body.read(len(view))
        view[:len(data)] = data
        return len(data)
    return readinto
