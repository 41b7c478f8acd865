"""The small base classes every storage derives from, and the registry by URI scheme.

A :class:`Storage` knows how to list a checkpoint "directory" and open objects; a
:class:`Source` is one open object. A source needs little more than :meth:`Source.size` and
:meth:`Source.read_into`; backends override the rest only to be faster.
"""

from __future__ import annotations

import importlib
import threading
from types import MappingProxyType
from typing import TYPE_CHECKING, Callable, Mapping

from ...errors import ConfigError, SourceError
from .staging import (  # noqa: F401  (re-exported: sources and the reader import them from here)
    STAGING_MAX_BYTES,
    BufferPool,
    CopyBehind,
    StagingBuffer,
    staging_bytes_for,
)

if TYPE_CHECKING:
    from ...config import StreamerConfig


class Source:
    """One open object (a file, an S3 object). Thread-safe: workers call ``read_into`` concurrently."""

    #: bytes read at once when parsing the header (one round trip for small headers)
    header_prefetch = 1 << 20
    #: read over a network (S3): planned with ``s3_range_bytes`` and more workers
    remote = False
    #: give it a pool of aligned staging buffers (for O_DIRECT); a source that never reads
    #: through one says False
    wants_staging = True
    #: ``time.monotonic()`` after which its reads give up (the reader sets it from
    #: ``StreamerConfig.deadline``); None: no deadline
    deadline_at: float | None = None
    #: every read fails if the object changed since open (S3 GETs pinned to the ETag seen at
    #: open): the reader then skips the end-of-load :meth:`check_unchanged`
    reads_pinned = False
    #: many short reads at evenly spaced offsets (the rows of a strided tensor-parallel shard)
    #: are cheap here: one pread each on a local file. A remote source says False (a request
    #: per row); the reader then reads such a shard whole and cuts it.
    gathers = False

    def __init__(self, uri: str):
        self.uri = uri

    def size(self) -> int:
        raise NotImplementedError

    def read_into(self, offset: int, dest: memoryview, *, pool: BufferPool | None = None,
                  cancelled: threading.Event | None = None, slack: bool = False, fresh: bool = False) -> None:
        """Fill ``dest`` entirely with bytes ``[offset, offset + len(dest))`` or raise SourceError.

        ``pool`` lends aligned staging buffers; ``cancelled`` aborts long reads; ``slack`` says
        that the ``alignment`` bytes before and after ``dest`` belong to the caller and may be
        overwritten (with the file's neighbouring bytes), which lets O_DIRECT read in place.
        ``fresh`` says that ``dest`` was just faulted in (scattered 4 KiB pages): a direct read
        is faster through a staging buffer on huge pages than in place.
        """
        raise NotImplementedError

    def read_rows(self, offset: int, stride: int, width: int, dest: memoryview, *,
                  cancelled: threading.Event | None = None) -> None:
        """Fill ``dest`` with ``len(dest) // width`` rows of ``width`` bytes, row ``r`` read from
        ``offset + r * stride`` (a band of a strided shard), or raise SourceError."""
        for row in range(len(dest) // width):
            if cancelled is not None and cancelled.is_set():
                return
            self.read_into(offset + row * stride, dest[row * width:(row + 1) * width], cancelled=cancelled)

    def read_bytes(self, offset: int, length: int) -> bytes:
        buf = bytearray(length)
        if length:
            self.read_into(offset, memoryview(buf))
        return bytes(buf)

    def check_unchanged(self) -> None:
        """Raise SourceChangedError if the object changed since it was opened."""

    def bypassed_page_cache(self) -> str | None:
        """The local file this source read past the page cache (O_DIRECT) in this load, None
        when it did not (:mod:`loader_plugins.core.pagecache` puts such a file back)."""
        return None

    def close(self) -> None:
        pass

    def __enter__(self) -> "Source":
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def __repr__(self) -> str:
        return f"{type(self).__name__}({self.uri!r})"


class ForwardingSource(Source):
    """A source that wraps another and forwards every capability and call to it: the flags the
    reader plans with (``header_prefetch``, ``remote``, ``wants_staging``, ``reads_pinned``,
    ``gathers``), the deadline, sizes, reads, row reads, the end-of-load check and the page-cache
    report. A wrapper overrides only what it adds (counting, keeping an entry locked, lending);
    a capability added to :class:`Source` is added here, once, for every wrapper."""

    def __init__(self, inner: Source, uri: str | None = None):
        super().__init__(inner.uri if uri is None else uri)
        self.inner = inner
        self.header_prefetch = inner.header_prefetch
        self.remote = inner.remote
        self.wants_staging = inner.wants_staging
        self.reads_pinned = inner.reads_pinned
        self.gathers = inner.gathers

    @property
    def deadline_at(self) -> float | None:   # type: ignore[override]
        return self.inner.deadline_at

    @deadline_at.setter
    def deadline_at(self, value: float | None) -> None:
        self.inner.deadline_at = value

    def size(self) -> int:
        return self.inner.size()

    def read_into(self, offset: int, dest: memoryview, *, pool: BufferPool | None = None,
                  cancelled: threading.Event | None = None, slack: bool = False, fresh: bool = False) -> None:
        self.inner.read_into(offset, dest, pool=pool, cancelled=cancelled, slack=slack, fresh=fresh)

    def read_rows(self, offset: int, stride: int, width: int, dest: memoryview, *,
                  cancelled: threading.Event | None = None) -> None:
        self.inner.read_rows(offset, stride, width, dest, cancelled=cancelled)

    def check_unchanged(self) -> None:
        self.inner.check_unchanged()

    def bypassed_page_cache(self) -> str | None:
        return self.inner.bypassed_page_cache()

    def close(self) -> None:
        self.inner.close()


class BorrowedSource(ForwardingSource):
    """An open source lent to one stream by its owner (an opened
    :class:`~loader_plugins.core.checkpoint.Checkpoint`): everything goes to the owner's source
    but :meth:`close`, which the owner does."""

    def close(self) -> None:
        pass


class Storage:
    """A storage backend: lists checkpoint directories and opens objects."""

    def __init__(self, config: "StreamerConfig"):
        self.config = config

    def open(self, uri: str) -> Source:
        raise NotImplementedError

    def is_dir(self, uri: str) -> bool:
        raise NotImplementedError

    def exists(self, uri: str) -> bool:
        raise NotImplementedError

    def list_dir(self, uri: str) -> list[str]:
        """Names (not paths) of the objects directly inside ``uri``."""
        raise NotImplementedError

    def listing(self, uri: str) -> list[str] | None:
        """:meth:`list_dir` when ``uri`` is a directory, else None (an object store answers
        both with one listing)."""
        return self.list_dir(uri) if self.is_dir(uri) else None

    def join(self, base: str, name: str) -> str:
        return base.rstrip("/") + "/" + name

    def read_small(self, uri: str, limit: int = 64 << 20) -> bytes:
        with self.open(uri) as src:
            size = src.size()
            if size > limit:
                raise SourceError(f"{uri}: {size} bytes is larger than the {limit}-byte limit for this file")
            return src.read_bytes(0, size)

    def close(self) -> None:
        pass

    def __enter__(self) -> "Storage":
        return self

    def __exit__(self, *exc) -> None:
        self.close()


# scheme -> ("module:Class" or a callable config -> Storage, hint shown when the import fails).
# The core knows its own storages only; a layer above replaces one explicitly (the cache puts its
# tiers in front of S3: ``loader_plugins.cache.plugin``).
_REGISTRY: dict[str, tuple[str | Callable, str]] = {
    "file": ("loader_plugins.core.sources.local:LocalStorage", ""),
    "s3": ("loader_plugins.core.sources.s3:S3Storage", "install loader-plugins[s3] (boto3) to read s3:// URIs"),
    "gs": ("loader_plugins.core.sources.gcs:GcsStorage", "install loader-plugins[gcs] (google-cloud-storage) to read gs:// URIs"),
    "az": ("loader_plugins.core.sources.azure:AzureStorage", "install loader-plugins[azure] (azure-storage-blob, azure-identity) to read az:// URIs"),
    "https": ("loader_plugins.core.sources.azure:AzureStorage", "install loader-plugins[azure] (azure-storage-blob, azure-identity) to read https://ACCOUNT.blob.core.windows.net/ URLs"),
}
_lock = threading.Lock()


def register_storage(scheme: str, target: str | Callable, hint: str = "", *, replace: bool = False) -> None:
    """Register the Storage for ``scheme://`` URIs: a class or factory taking the config, or a
    ``"module:name"`` path imported when first used. A scheme that has a storage already is
    replaced only with ``replace=True`` (otherwise :class:`ConfigError` names both)."""
    if not isinstance(scheme, str) or not scheme.isalnum() or scheme != scheme.lower():
        raise ConfigError(f"a storage scheme is lower-case letters and digits (as in s3://), got {scheme!r}")
    if not (callable(target) or (isinstance(target, str) and ":" in target)):
        raise ConfigError(f"storage for {scheme}:// must be a callable or a 'module:name' path, got {target!r}")
    with _lock:
        current = _REGISTRY.get(scheme)
        if current is not None and current[0] != target and not replace:
            raise ConfigError(f"{scheme}:// already has a storage ({_describe(current[0])}); registering "
                              f"{_describe(target)} would replace it: pass replace=True if that is meant")
        _REGISTRY[scheme] = (target, hint or (current[1] if current else ""))


def registered_storages() -> Mapping[str, str]:
    """A read-only view: scheme -> the storage registered for it (its ``module:name``)."""
    with _lock:
        return MappingProxyType({scheme: _describe(target) for scheme, (target, _) in _REGISTRY.items()})


def _describe(target: str | Callable) -> str:
    if isinstance(target, str):
        return target
    return f"{getattr(target, '__module__', '?')}:{getattr(target, '__qualname__', repr(target))}"


def scheme_of(uri: str) -> str:
    text = str(uri)
    if "://" in text:
        scheme = text.split("://", 1)[0].lower()
        if scheme.isalnum():
            return scheme
    return "file"


def storage_for(uri: str, config: "StreamerConfig") -> Storage:
    scheme = scheme_of(uri)
    try:
        target, hint = _REGISTRY[scheme]
    except KeyError:
        raise SourceError(
            f"{uri}: no storage registered for scheme {scheme!r}; known: {', '.join(sorted(_REGISTRY))}"
        ) from None
    if isinstance(target, str):
        module_name, _, cls_name = target.partition(":")
        try:
            cls = getattr(importlib.import_module(module_name), cls_name)
        except ImportError as exc:
            raise SourceError(f"{uri}: cannot read {scheme}:// URIs ({exc}); {hint}") from exc
    else:
        cls = target
    return cls(config)

