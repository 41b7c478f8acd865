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
import functools
import logging
from typing import TYPE_CHECKING, Any

from ...errors import SourceError
from .remote import RemoteSource, RemoteStats, RemoteStorage, Transient, check_range_answer, dir_prefix, socket_readinto
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

    # -- the ranged GET (RemoteSource._get_range) ---------------------------------------------
    def _send_range(self, start: int, stop: int, what: str) -> dict:
        storage = self._storage
        kwargs: dict[str, Any] = {"Bucket": self.bucket, "Key": self.key, "Range": f"bytes={start}-{stop - 1}"}
        if self.etag:
            kwargs["IfMatch"] = self.etag
        storage.stats.add(requests=1)
        try:
            return storage.client.get_object(**kwargs)
        except Exception as exc:  # noqa: BLE001 - classified below
            raise storage._classify(exc, self.uri, what, object_key=True) from exc

    def _check_answer(self, resp: dict, start: int, stop: int, what: str) -> None:
        etag = resp.get("ETag")
        if self.etag and etag and etag != self.etag:
            raise self._changed(f"ETag {etag} differs from {self.etag} seen at open")
        check_range_answer(self, status=resp.get("ResponseMetadata", {}).get("HTTPStatusCode"),
                           content_range=resp.get("ContentRange"), content_length=resp.get("ContentLength"),
                           start=start, stop=stop, not_this_api="the endpoint is not S3-compatible")

    def _body(self, resp: dict):
        body = resp["Body"]
        # urllib3's HTTPResponse under botocore's StreamingBody: http.client's readinto, no copies;
        # else botocore's read (its streaming errors classified by the storage)
        return socket_readinto(getattr(body, "_raw_stream", None)) or _copying(body.read)

    def _finish(self, resp: dict, complete: bool) -> None:
        raw = getattr(resp["Body"], "_raw_stream", None)
        if complete and raw is not None and hasattr(raw, "release_conn"):
            raw.release_conn()  # body fully read: the connection goes back to the pool
        else:
            resp["Body"].close()  # partial body: the connection cannot be reused

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

    def _dir_request(self, uri: str):
        bucket, key = parse_s3_uri(uri)

        def any_under() -> bool:
            page = self._call(uri, "LIST", self.client.list_objects_v2, Bucket=bucket, Prefix=dir_prefix(key),
                              MaxKeys=1)
            return bool(page.get("KeyCount") or page.get("Contents") or page.get("CommonPrefixes"))

        return any_under

    def _head_request(self, uri: str):
        bucket, key = parse_s3_uri(uri)
        if not key or key.endswith("/"):
            return None
        return functools.partial(self._call, uri, "HEAD", self.client.head_object, Bucket=bucket, Key=key)

    def _nothing_under(self, uri: str) -> str:
        bucket, key = parse_s3_uri(uri)
        return f"{uri}: no objects under s3://{bucket}/{dir_prefix(key)}; check the bucket and prefix"

    def listing(self, uri: str) -> list[str] | None:
        """One LIST (more pages for more than 1000 keys): the names directly under ``uri``, or
        None when nothing is (not a directory)."""
        bucket, key = parse_s3_uri(uri)
        prefix = dir_prefix(key)
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
