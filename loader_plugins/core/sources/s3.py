"""S3 and S3-compatible object storage (AWS, MinIO, SeaweedFS, Ceph...) through boto3.

``s3://bucket/key`` names an object; ``s3://bucket/prefix`` names a "directory" when objects
exist under ``prefix/``. One boto3 client per :class:`S3Storage` (clients are thread-safe),
its connection pool sized to the reader's concurrency.

A read is a ranged GET with ``If-Match: <ETag recorded at open>``, so an object replaced
mid-load fails with :class:`SourceChangedError` instead of yielding a mixed model. The body is
read with ``readinto`` straight into the destination: no whole-object copies, no temp files.
botocore's own retries are off: a retry here resumes from the last byte received, with
exponential backoff and full jitter, and honours cancellation and the load's deadline.

Clients: :mod:`.s3_client`; what a failure means (retry, or which error): :mod:`.s3_errors`;
the retry policy and the resuming read loop, shared with GCS and Azure: :mod:`.remote`.
boto3 is imported when a storage is created, never at module import.
"""

from __future__ import annotations

import errno
import logging
import threading
from typing import TYPE_CHECKING, Any

from ...errors import SourceError, SourceNotFoundError
from .remote import Progress, RemoteSource, RemoteStats, RemoteStorage, Transient, fill_from, socket_readinto
from .remote import copying_readinto as _copying
from .s3_client import shared_client
from .s3_errors import classify, explain_missing

if TYPE_CHECKING:
    from ...config import StreamerConfig

log = logging.getLogger(__name__)


def parse_s3_uri(uri: str) -> tuple[str, str]:
    """``s3://bucket/some/key`` -> ``("bucket", "some/key")`` (key may be empty)."""
    text = str(uri)
    if not text.lower().startswith("s3://"):
        raise SourceError(errno.EINVAL, f"{text}: not an s3:// URI")
    bucket, _, key = text[5:].partition("/")
    if not bucket:
        raise SourceError(errno.EINVAL, f"{text}: no bucket name; use s3://bucket/key")
    return bucket, key


#: counters shared by a storage and its sources (the name S3 code and tests know)
S3Stats = RemoteStats


class S3Source(RemoteSource):
    """One S3 object, opened with a HEAD (size and ETag recorded)."""

    def __init__(self, storage: "S3Storage", uri: str):
        super().__init__(storage, uri)
        self._storage: S3Storage = storage
        self.bucket, self.key = parse_s3_uri(uri)
        if not self.key or self.key.endswith("/"):
            raise SourceError(errno.EISDIR, f"{uri}: names a bucket or prefix, not an object")
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

    def _get_range(self, start: int, view: memoryview, cancelled: threading.Event | None,
                   progress: Progress) -> None:
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
            # http.client.HTTPResponse: readinto without copies
            readinto = socket_readinto(raw) or _copying(body.read)
            fill_from(readinto, view, uri=self.uri, cancelled=cancelled, progress=progress, stats=storage.stats,
                      # botocore streaming errors on the fallback path
                      on_error=lambda exc: storage._classify(exc, self.uri, f"GET bytes [{start}, {stop})"))
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

    def check_unchanged(self) -> None:
        head = self._storage._call(self.uri, "HEAD", self._storage.client.head_object, Bucket=self.bucket,
                                   Key=self.key, deadline_at=self.deadline_at)
        if int(head["ContentLength"]) != self._size:
            raise self._changed(f"size is now {head['ContentLength']} bytes, was {self._size} at open")
        if self.etag and head.get("ETag") != self.etag:
            raise self._changed(f"ETag {head.get('ETag')} differs from {self.etag} seen at open")


class S3Storage(RemoteStorage):
    """S3 buckets through one thread-safe boto3 client.

    Credentials come from boto3's standard chain (environment, shared config files, the
    profile ``config.s3_profile``, container and instance roles); they never appear in logs
    or error messages.
    """

    def __init__(self, config: "StreamerConfig"):
        super().__init__(config)
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

    # -- errors (the retry policy is RemoteStorage's) ----------------------------------------
    def _final(self, error: BaseException, uri: str, what: str) -> BaseException:
        if what == "HEAD" and getattr(error, "errno", None) == errno.ENOENT:
            # a HEAD 404 has no body: ask whether the bucket exists to say which one is missing
            return explain_missing(self.client, parse_s3_uri(uri)[0], uri, error, self.endpoint)  # type: ignore[arg-type]
        return error

    def _classify(self, exc: BaseException, uri: str, what: str, *, object_key: bool = False
                  ) -> "Transient | SourceError":
        return classify(exc, uri, what, endpoint=self.endpoint, profile=self.config.s3_profile,
                        object_key=object_key)



def _dir_prefix(key: str) -> str:
    key = key.strip("/")
    return key + "/" if key else ""
