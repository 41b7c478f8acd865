"""Azure Blob Storage (and Azurite) through azure-storage-blob.

Two ways to name a blob: ``az://container/blob`` (in the account of :mod:`.azure_client`'s
chain: ``azure_account_url``, the connection string, ``azure_account_name``) and the blob's URL,
``https://ACCOUNT.blob.core.windows.net/container/blob`` (any ``*.blob.*`` host: sovereign
clouds, DNS-zone endpoints). A prefix names a "directory" when blobs exist under ``prefix/``.

A blob is opened with one ``Get Blob Properties`` (size and ETag recorded). A read is a ranged
``Get Blob`` with ``If-Match: <ETag seen at open>``, so a blob replaced mid-load fails with
:class:`SourceChangedError` naming it, never a mixed model. It is sent through the blob
client's own pipeline (its authentication, signing, version and logging policies) with
``stream=True``, and the body is read from the socket straight into the destination; a failed
attempt resumes from the last byte received with the backoff, cancellation and deadline of
:mod:`.remote`. The SDK's own retries are off. What a failure means: :mod:`.azure_errors`.

For a cache in front of it, a source names the exact blob version: ``account``, ``container``,
``key`` (the blob name) and ``etag``.
"""

from __future__ import annotations

import errno
import functools
import logging
from typing import TYPE_CHECKING, Any
from urllib.parse import urlsplit

from ...errors import SourceError
from .azure_client import Account, account_for_url, default_account, shared_service
from .azure_errors import classify, classify_status
from .remote import RemoteSource, RemoteStorage, Transient, check_http_answer, check_stored_encoding
from .remote import dir_prefix, socket_readinto
from .remote import copying_readinto as _copying

if TYPE_CHECKING:
    from ...config import StreamerConfig

log = logging.getLogger(__name__)

_SERVICE = "Azure Blob API"
_ERROR_BODY_LIMIT = 64 << 10


def parse_azure_uri(uri: str, config: "StreamerConfig") -> tuple[Account, str, str]:
    """``az://container/blob`` or ``https://ACCOUNT.blob.core.windows.net/container/blob`` ->
    (the account, container, blob name; the name may be empty)."""
    text = str(uri)
    lower = text.lower()
    if lower.startswith("az://"):
        container, _, name = text[5:].partition("/")
        account = default_account(config)
        if account is None:
            raise SourceError(errno.EINVAL, f"{text}: no storage account for az:// URIs; set azure_account_name "
                              f"(or AZURE_STORAGE_ACCOUNT_NAME), azure_account_url or a connection string "
                              f"(AZURE_STORAGE_CONNECTION_STRING), or name the blob by its URL "
                              f"(https://ACCOUNT.blob.core.windows.net/container/blob)")
    elif lower.startswith("https://"):
        parts = urlsplit(text)
        host = (parts.hostname or "").lower()
        labels = host.split(".")
        configured = default_account(config)
        if configured is not None and urlsplit(configured.url).netloc.lower() == parts.netloc.lower():
            account, path = configured, parts.path[len(urlsplit(configured.url).path.rstrip("/")):]
        elif len(labels) > 2 and "blob" in labels[1:]:
            account = account_for_url(config, labels[0], f"https://{parts.netloc}")
            path = parts.path
        else:
            raise SourceError(errno.EINVAL, f"{text}: not an Azure Blob URL (https://ACCOUNT.blob.core.windows.net/"
                              f"container/blob); https:// URIs are read from Azure Blob Storage only")
        if parts.query:
            raise SourceError(errno.EINVAL, f"{parts.scheme}://{parts.netloc}{parts.path}: the URL carries a query "
                              f"(a SAS token?); give the token as azure_sas_token or AZURE_STORAGE_SAS_TOKEN instead")
        container, _, name = path.lstrip("/").partition("/")
    else:
        raise SourceError(errno.EINVAL, f"{text}: not an az:// or https:// Azure Blob URI")
    if not container:
        raise SourceError(errno.EINVAL, f"{text}: no container name; use az://container/blob")
    return account, container, name


class AzureSource(RemoteSource):
    """One blob, opened with Get Blob Properties (size and ETag recorded)."""

    def __init__(self, storage: "AzureStorage", uri: str):
        super().__init__(storage, uri)
        self._storage: AzureStorage = storage
        account, self.container, self.key = parse_azure_uri(uri, storage.config)
        if not self.key or self.key.endswith("/"):
            raise SourceError(errno.EISDIR, f"{uri}: names a container or prefix, not a blob")
        self.account: str | None = account.name
        service = storage._service(account)
        self.endpoint = account.endpoint
        self._blob = service.get_blob_client(self.container, self.key)
        props = storage._call(uri, "HEAD", self._blob.get_blob_properties, deadline_at=self.deadline_at)
        self._size = int(props.size)
        self.etag: str | None = props.etag
        check_stored_encoding(uri, getattr(props.content_settings, "content_encoding", None))
        if not self.etag:
            log.debug("%s: the server sent no ETag; changes are detected by size only", uri)

    @property
    def bucket(self) -> str:
        """The container (the name a bucket-keyed cache looks for; pair it with ``account``)."""
        return self.container

    @property
    def reads_pinned(self) -> bool:   # type: ignore[override]
        """Every ranged GET carries ``If-Match`` with the ETag seen at open."""
        return bool(self.etag)

    # -- the ranged GET (RemoteSource._get_range) ---------------------------------------------
    def _send_range(self, start: int, stop: int, what: str):
        headers = {"x-ms-range": f"bytes={start}-{stop - 1}"}
        if self.etag:
            headers["If-Match"] = self.etag
        return self._storage._send(self.uri, what, self._blob, headers)

    def _check_answer(self, response: Any, start: int, stop: int, what: str) -> None:
        if response.status_code not in (200, 206):
            raise classify_status(response.status_code, response.headers.get("x-ms-error-code"), self.uri, what,
                                  endpoint=self.endpoint, object_key=True)
        etag = response.headers.get("etag")
        if self.etag and etag and etag != self.etag:
            raise self._changed(f"ETag {etag} differs from {self.etag} seen at open, {what}")
        check_http_answer(self, response.status_code, response.headers, start, stop,
                          not_this_api=f"the endpoint does not speak the {_SERVICE}")

    def _body(self, response: Any):
        raw = response.internal_response.raw
        return socket_readinto(raw) or _copying(raw.read)

    def _finish(self, response: Any, complete: bool) -> None:
        if complete:
            response.internal_response.raw.release_conn()   # body fully read: the connection goes back to the pool
        else:
            response.internal_response.close()   # partial body: the connection cannot be reused

    def check_unchanged(self) -> None:
        props = self._storage._call(self.uri, "HEAD", self._blob.get_blob_properties, deadline_at=self.deadline_at)
        if int(props.size) != self._size:
            raise self._changed(f"size is now {props.size} bytes, was {self._size} at open")
        if self.etag and props.etag != self.etag:
            raise self._changed(f"ETag {props.etag} differs from {self.etag} seen at open")


class AzureStorage(RemoteStorage):
    """Azure Blob containers through shared ``BlobServiceClient`` s, one per account.

    Credentials come from :mod:`.azure_client`'s chain; they never appear in logs or messages.
    """

    def __init__(self, config: "StreamerConfig"):
        super().__init__(config)
        account = default_account(config)
        self.endpoint = account.endpoint if account is not None else None

    def _service(self, account: Account):
        return shared_service(self.config, account)

    # -- Storage API -------------------------------------------------------------------------
    def open(self, uri: str) -> AzureSource:
        return AzureSource(self, uri)

    def _dir_request(self, uri: str):
        account, container, name = parse_azure_uri(uri, self.config)

        def any_under() -> bool:
            found = self._call(uri, "LIST", self._list, account=account, container=container,
                               prefix=dir_prefix(name), limit=1)
            return bool(found[0] or found[1])

        return any_under

    def _head_request(self, uri: str):
        account, container, name = parse_azure_uri(uri, self.config)
        if not name or name.endswith("/"):
            return None
        blob = self._service(account).get_blob_client(container, name)
        return functools.partial(self._call, uri, "HEAD", blob.get_blob_properties)

    def _nothing_under(self, uri: str) -> str:
        _, container, name = parse_azure_uri(uri, self.config)
        return f"{uri}: no blobs under {container}/{dir_prefix(name)}; check the container and prefix"

    def listing(self, uri: str) -> list[str] | None:
        """One listing (more pages for more than 5000 blobs): the names directly under ``uri``,
        or None when nothing is (not a directory)."""
        account, container, name = parse_azure_uri(uri, self.config)
        prefix = dir_prefix(name)
        blobs, prefixes = self._call(uri, "LIST", self._list, account=account, container=container, prefix=prefix,
                                     delimiter="/")
        if not blobs and not prefixes:
            return None
        return sorted(n[len(prefix):] for n in blobs if n[len(prefix):])   # skip a marker named like the prefix

    def read_small(self, uri: str, limit: int = 64 << 20) -> bytes:
        """A small whole blob (index.json, config) in one GET, no properties request."""
        account, container, name = parse_azure_uri(uri, self.config)
        if not name or name.endswith("/"):
            raise SourceError(errno.EISDIR, f"{uri}: names a container or prefix, not a blob")
        blob = self._service(account).get_blob_client(container, name)

        def get() -> bytes:
            response = self._send(uri, "GET", blob, {})
            try:
                if response.status_code != 200:
                    raise classify_status(response.status_code, response.headers.get("x-ms-error-code"), uri, "GET",
                                          endpoint=account.endpoint, object_key=True)
                if int(response.headers.get("content-length") or 0) > limit:
                    raise SourceError(errno.EFBIG, f"{uri}: {response.headers['content-length']} bytes is larger "
                                      f"than the {limit}-byte limit for this file")
                return response.internal_response.content
            finally:
                response.internal_response.close()

        return self._call(uri, "GET", get)

    # -- requests ----------------------------------------------------------------------------
    def _send(self, uri: str, what: str, blob: Any, headers: dict[str, str]):
        """One Get Blob through the blob client's pipeline, its body not read yet."""
        from azure.core.pipeline.transport import HttpRequest

        self.stats.add(requests=1)
        # the blob client's own pipeline (azure-storage-blob keeps it as ``_pipeline``): the same
        # authentication, signing and logging policies as its download_blob, retries off
        request = HttpRequest("GET", blob.url, headers={**headers, "x-ms-version": blob.api_version})
        try:
            return blob._pipeline.run(request, stream=True).http_response
        except Exception as exc:  # noqa: BLE001 - classified
            raise self._classify(exc, uri, what, object_key=True) from exc

    def _list(self, account: Account, container: str, prefix: str, delimiter: str | None = None,
              limit: int | None = None) -> tuple[list[str], list[str]]:
        """Blob names and sub-prefixes under ``prefix`` (every page, or the first ``limit``)."""
        client = self._service(account).get_container_client(container)
        if delimiter:
            items = client.walk_blobs(name_starts_with=prefix or None, delimiter=delimiter)
        else:
            items = client.list_blobs(name_starts_with=prefix or None, results_per_page=limit)
        blobs: list[str] = []
        prefixes: list[str] = []
        for item in items:
            (prefixes if type(item).__name__ == "BlobPrefix" else blobs).append(item.name)
            if limit is not None and len(blobs) + len(prefixes) >= limit:
                break
        return blobs, prefixes

    # -- errors (the retry policy is RemoteStorage's) ----------------------------------------
    def _endpoint_for(self, uri: str) -> str | None:
        try:
            return parse_azure_uri(uri, self.config)[0].endpoint
        except SourceError:
            return self.endpoint

    def _classify(self, exc: BaseException, uri: str, what: str, *, object_key: bool = False
                  ) -> "Transient | SourceError":
        return classify(exc, uri, what, endpoint=self._endpoint_for(uri), object_key=object_key)
