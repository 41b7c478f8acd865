"""Google Cloud Storage (and its emulators) through google-cloud-storage.

``gs://bucket/object`` names an object; ``gs://bucket/prefix`` a "directory" when objects exist
under ``prefix/``. One client per process and GCS settings (:mod:`.gcs_client`), its
connection pool sized to the reader's concurrency.

An object is opened with one metadata GET (size and generation recorded). A read is a ranged
media GET with ``ifGenerationMatch=<generation seen at open>``, and the answer's
``x-goog-generation`` must be that generation too, so an object replaced mid-load fails with
:class:`SourceChangedError` naming it (never a mixed model; an emulator that ignores the
precondition is caught by the header). The body is read from the socket straight into the
destination (no copies, no temp files); a failed attempt resumes from the last byte received,
with the backoff, cancellation and deadline of :mod:`.remote`. google-cloud-storage's own
retries are off. What a failure means: :mod:`.gcs_errors`.

For a cache in front of it, a source names the exact object version: ``bucket``, ``key`` (the
object name), ``generation`` (its content version) and ``etag``.
"""

from __future__ import annotations

import errno
import functools
import logging
import threading
from typing import TYPE_CHECKING, Any
from urllib.parse import quote

from ...errors import SourceError, SourceNotFoundError
from .gcs_client import endpoint_of, session_of, shared_client
from .gcs_errors import classify, classify_status, error_reason
from .remote import RemoteSource, RemoteStorage, Transient, check_http_answer, check_stored_encoding
from .remote import dir_prefix, socket_readinto
from .remote import copying_readinto as _copying

if TYPE_CHECKING:
    from ...config import StreamerConfig

log = logging.getLogger(__name__)

_SERVICE = "GCS JSON API"
_ERROR_BODY_LIMIT = 64 << 10


def parse_gs_uri(uri: str) -> tuple[str, str]:
    """``gs://bucket/some/name`` -> ``("bucket", "some/name")`` (name may be empty)."""
    text = str(uri)
    if not text.lower().startswith("gs://"):
        raise SourceError(errno.EINVAL, f"{text}: not a gs:// URI")
    bucket, _, name = text[5:].partition("/")
    if not bucket:
        raise SourceError(errno.EINVAL, f"{text}: no bucket name; use gs://bucket/object")
    return bucket, name


class GcsSource(RemoteSource):
    """One GCS object, opened with a metadata GET (size and generation recorded)."""

    def __init__(self, storage: "GcsStorage", uri: str):
        super().__init__(storage, uri)
        self._storage: GcsStorage = storage
        self.bucket, self.key = parse_gs_uri(uri)
        if not self.key or self.key.endswith("/"):
            raise SourceError(errno.EISDIR, f"{uri}: names a bucket or prefix, not an object")
        storage._ready(uri)
        blob = storage._head(uri, self.bucket, self.key, deadline_at=self.deadline_at)
        self._size = int(blob.size or 0)
        #: the object's content version: every ranged read is pinned to it
        self.generation: int | None = int(blob.generation) if blob.generation is not None else None
        self.etag: str | None = blob.etag
        check_stored_encoding(uri, blob.content_encoding)
        self._url = storage._media_url(self.bucket, self.key)
        if self.generation is not None:
            self._url += f"&ifGenerationMatch={self.generation}"

    @property
    def reads_pinned(self) -> bool:   # type: ignore[override]
        """Every ranged GET carries ``ifGenerationMatch`` with the generation seen at open."""
        return self.generation is not None

    # -- the ranged GET (RemoteSource._get_range) ---------------------------------------------
    def _send_range(self, start: int, stop: int, what: str):
        return self._storage._send(self.uri, what, self._url, {"Range": f"bytes={start}-{stop - 1}"})

    def _check_answer(self, resp: Any, start: int, stop: int, what: str) -> None:
        if resp.status_code not in (200, 206):
            raise classify_status(resp.status_code, _error_text(resp), self.uri, what,
                                  endpoint=self._storage.endpoint, object_key=True)
        generation = resp.headers.get("x-goog-generation")
        if self.generation is not None and generation and int(generation) != self.generation:
            raise self._changed(f"generation {generation} differs from {self.generation} seen at open, {what}")
        check_http_answer(self, resp.status_code, resp.headers, start, stop,
                          not_this_api=f"the endpoint does not speak the {_SERVICE}")

    def _body(self, resp: Any):
        return socket_readinto(resp.raw) or _copying(resp.raw.read)

    def _finish(self, resp: Any, complete: bool) -> None:
        if complete:
            resp.raw.release_conn()   # body fully read: the connection goes back to the pool
        else:
            resp.close()              # partial body: the connection cannot be reused

    def check_unchanged(self) -> None:
        blob = self._storage._head(self.uri, self.bucket, self.key, deadline_at=self.deadline_at)
        if int(blob.size or 0) != self._size:
            raise self._changed(f"size is now {blob.size} bytes, was {self._size} at open")
        if self.generation is not None and blob.generation is not None and int(blob.generation) != self.generation:
            raise self._changed(f"generation {blob.generation} differs from {self.generation} seen at open")


class GcsStorage(RemoteStorage):
    """GCS buckets through one shared google-cloud-storage client (thread-safe requests session).

    Credentials come from google-auth's chain (see :mod:`.gcs_client`); they never appear in
    logs or error messages.
    """

    def __init__(self, config: "StreamerConfig"):
        super().__init__(config)
        self.client: Any = None
        self.session: Any = None
        self._lock = threading.Lock()

    def _ready(self, uri: str) -> None:
        """Make (or find) the shared client on first use: a credentials problem then names the
        URI that needed them."""
        if self.client is None:
            with self._lock:
                if self.client is None:
                    client = shared_client(self.config, uri)
                    self.endpoint = endpoint_of(client)
                    self.session = session_of(client)
                    self.client = client

    # -- Storage API -------------------------------------------------------------------------
    def open(self, uri: str) -> GcsSource:
        return GcsSource(self, uri)

    def _dir_request(self, uri: str):
        bucket, name = parse_gs_uri(uri)
        self._ready(uri)

        def any_under() -> bool:
            found = self._call(uri, "LIST", self._list_page, bucket=bucket, prefix=dir_prefix(name), limit=1)
            return bool(found[0] or found[1])

        return any_under

    def _head_request(self, uri: str):
        bucket, name = parse_gs_uri(uri)
        self._ready(uri)
        if not name or name.endswith("/"):
            return None
        return functools.partial(self._head, uri, bucket, name)

    def _nothing_under(self, uri: str) -> str:
        bucket, name = parse_gs_uri(uri)
        return f"{uri}: no objects under gs://{bucket}/{dir_prefix(name)}; check the bucket and prefix"

    def listing(self, uri: str) -> list[str] | None:
        """One LIST (more pages for more than 1000 objects): the names directly under ``uri``,
        or None when nothing is (not a directory)."""
        bucket, name = parse_gs_uri(uri)
        self._ready(uri)
        prefix = dir_prefix(name)
        blobs, prefixes = self._call(uri, "LIST", self._list_page, bucket=bucket, prefix=prefix, delimiter="/")
        if not blobs and not prefixes:
            return None
        return sorted(n[len(prefix):] for n in blobs if n[len(prefix):])  # skip a marker named like the prefix

    def read_small(self, uri: str, limit: int = 64 << 20) -> bytes:
        """A small whole object (index.json, config) in one GET, no metadata request."""
        bucket, name = parse_gs_uri(uri)
        if not name or name.endswith("/"):
            raise SourceError(errno.EISDIR, f"{uri}: names a bucket or prefix, not an object")
        self._ready(uri)
        url = self._media_url(bucket, name)

        def get() -> bytes:
            resp = self._send(uri, "GET", url, {})
            try:
                if resp.status_code != 200:
                    raise classify_status(resp.status_code, _error_text(resp), uri, "GET", endpoint=self.endpoint,
                                          object_key=True)
                if int(resp.headers.get("content-length") or 0) > limit:
                    raise SourceError(errno.EFBIG, f"{uri}: {resp.headers['content-length']} bytes is larger than "
                                      f"the {limit}-byte limit for this file")
                return resp.content
            finally:
                resp.close()

        try:
            return self._call(uri, "GET", get)
        except SourceNotFoundError as exc:
            raise self._explain_missing(uri, exc) from exc

    # -- requests ----------------------------------------------------------------------------
    def _media_url(self, bucket: str, name: str) -> str:
        return f"{self.endpoint}/download/storage/v1/b/{quote(bucket, safe='')}/o/{quote(name, safe='')}?alt=media"

    def _send(self, uri: str, what: str, url: str, headers: dict[str, str]):
        """One GET through the authorized session, its body not read yet (``stream=True``)."""
        self.stats.add(requests=1)
        timeout = self.config.request_timeout
        try:
            # identity: a body transcoded by the server would not match the range asked for
            return self.session.get(url, headers={**headers, "Accept-Encoding": "identity"}, stream=True,
                                    timeout=(timeout, timeout))
        except Exception as exc:  # noqa: BLE001 - classified
            raise self._classify(exc, uri, what, object_key=True) from exc

    def _head(self, uri: str, bucket: str, name: str, *, deadline_at: float | None = None):
        """The object's metadata (one GET of its resource), or SourceNotFoundError saying
        whether the bucket or the object is missing."""
        timeout = self.config.request_timeout

        def get():
            blob = self.client.bucket(bucket).get_blob(name, timeout=timeout, retry=None)
            if blob is None:    # google-cloud-storage answers a 404 with None
                raise SourceNotFoundError(errno.ENOENT, f"{uri}: HEAD found no such object (HTTP 404)")
            return blob

        try:
            return self._call(uri, "HEAD", get, deadline_at=deadline_at)
        except SourceNotFoundError as exc:
            raise self._explain_missing(uri, exc) from exc

    def _explain_missing(self, uri: str, error: SourceError) -> SourceError:
        """A 404 for an object: ask whether its bucket exists to say which one is missing."""
        bucket, name = parse_gs_uri(uri)
        try:
            missing_bucket = not self.client.bucket(bucket).exists(timeout=self.config.request_timeout, retry=None)
        except Exception:  # noqa: BLE001 - no right to read the bucket's metadata: say what is known
            return error
        if missing_bucket:
            return SourceNotFoundError(errno.ENOENT, f"{uri}: bucket {bucket!r} does not exist (HTTP 404) at endpoint "
                                       f"{self.endpoint}; check the bucket name and the endpoint (gcs_endpoint_url / "
                                       f"STORAGE_EMULATOR_HOST)")
        return SourceNotFoundError(errno.ENOENT, f"{uri}: no such object {name!r} in bucket {bucket!r} (HTTP 404) at "
                                   f"endpoint {self.endpoint}; check the object name")

    def _list_page(self, bucket: str, prefix: str, delimiter: str | None = None, limit: int | None = None
                   ) -> tuple[list[str], set[str]]:
        """Object names and sub-prefixes under ``prefix`` (every page, or ``limit`` objects)."""
        iterator = self.client.list_blobs(bucket, prefix=prefix or None, delimiter=delimiter, max_results=limit,
                                          timeout=self.config.request_timeout, retry=None)
        names = [blob.name for blob in iterator]
        return names, set(getattr(iterator, "prefixes", ()) or ())

    # -- errors (the retry policy is RemoteStorage's) ----------------------------------------
    def _classify(self, exc: BaseException, uri: str, what: str, *, object_key: bool = False
                  ) -> "Transient | SourceError":
        return classify(exc, uri, what, endpoint=self.endpoint, object_key=object_key)

    def _final(self, error: BaseException, uri: str, what: str) -> BaseException:
        if what == "LIST" and getattr(error, "errno", None) == errno.ENOENT:
            bucket = parse_gs_uri(uri)[0]
            return SourceNotFoundError(errno.ENOENT, f"{uri}: bucket {bucket!r} does not exist (HTTP 404) at endpoint "
                                       f"{self.endpoint}; check the bucket name and the endpoint (gcs_endpoint_url / "
                                       f"STORAGE_EMULATOR_HOST)")
        return error


def _error_text(resp: Any) -> str:
    """The reason of an error answer (its JSON body, at most 64 KiB read)."""
    try:
        body = resp.raw.read(_ERROR_BODY_LIMIT, decode_content=True)
    except Exception:  # noqa: BLE001 - the status alone still says enough
        return ""
    return error_reason(body)

