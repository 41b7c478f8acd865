"""The small base classes every storage derives from, and the registry by URI scheme.

A :class:`Storage` knows how to list a checkpoint "directory" and open objects; a
:class:`Source` is one open object. A source needs little more than :meth:`Source.size` and
:meth:`Source.read_into`; backends override the rest only to be faster.
"""

from __future__ import annotations

import importlib
import mmap
import threading
from typing import TYPE_CHECKING, Callable

from ...errors import SourceError, StreamerError

if TYPE_CHECKING:
    from ...config import StreamerConfig


class BufferPool:
    """A bounded pool of page-aligned staging buffers (anonymous mmaps), allocated lazily.

    ``acquire`` blocks while all buffers are lent out; ``cancelled`` (an Event) aborts the
    wait. Used for O_DIRECT reads, whose buffers must be aligned.
    """

    def __init__(self, buffer_bytes: int, count: int, cancelled: threading.Event | None = None):
        if count < 1:
            raise ValueError("a buffer pool needs at least one buffer")
        self.buffer_bytes = buffer_bytes
        self.count = count
        self._free: list[mmap.mmap] = []
        self._made = 0
        self._cond = threading.Condition()
        self._cancelled = cancelled or threading.Event()
        self._closed = False

    @property
    def capacity_bytes(self) -> int:
        return self.buffer_bytes * self.count

    @property
    def allocated_bytes(self) -> int:
        return self.buffer_bytes * self._made

    def acquire(self) -> mmap.mmap:
        with self._cond:
            while True:
                if self._cancelled.is_set() or self._closed:
                    raise StreamerError("buffer pool closed: the load was cancelled")
                if self._free:
                    return self._free.pop()
                if self._made < self.count:
                    self._made += 1
                    return mmap.mmap(-1, self.buffer_bytes)
                self._cond.wait(0.1)

    def release(self, buf: mmap.mmap) -> None:
        with self._cond:
            if self._closed:
                buf.close()
                return
            self._free.append(buf)
            self._cond.notify()

    def close(self) -> None:
        with self._cond:
            self._closed = True
            for buf in self._free:
                buf.close()
            self._free.clear()
            self._cond.notify_all()


class Source:
    """One open object (a file, an S3 object). Thread-safe: workers call ``read_into`` concurrently."""

    #: bytes read at once when parsing the header (one round trip for small headers)
    header_prefetch = 1 << 20

    def __init__(self, uri: str):
        self.uri = uri

    def size(self) -> int:
        raise NotImplementedError

    def read_into(self, offset: int, dest: memoryview, pool: BufferPool | None = None,
                  cancelled: threading.Event | None = None, slack: bool = False) -> None:
        """Fill ``dest`` entirely with bytes ``[offset, offset + len(dest))`` or raise SourceError.

        ``pool`` lends aligned staging buffers; ``cancelled`` aborts long reads; ``slack`` says
        that the ``alignment`` bytes before and after ``dest`` belong to the caller and may be
        overwritten (with the file's neighbouring bytes), which lets O_DIRECT read in place.
        """
        raise NotImplementedError

    def read_bytes(self, offset: int, length: int) -> bytes:
        buf = bytearray(length)
        if length:
            self.read_into(offset, memoryview(buf))
        return bytes(buf)

    def check_unchanged(self) -> None:
        """Raise SourceChangedError if the object changed since it was opened."""

    def close(self) -> None:
        pass

    def __enter__(self) -> "Source":
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def __repr__(self) -> str:
        return f"{type(self).__name__}({self.uri!r})"


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


# scheme -> ("module:Class", hint shown when the import fails)
_REGISTRY: dict[str, tuple[str, str]] = {
    "file": ("loader_plugins.core.sources.local:LocalStorage", ""),
    # plain S3, or the cache tiers (DRAM -> disk -> S3) in front of it when the config enables them
    "s3": ("loader_plugins.cache.tiered:s3_storage", "install loader-plugins[s3] (boto3) to read s3:// URIs"),
}
_lock = threading.Lock()


def register_storage(scheme: str, target: str | Callable, hint: str = "") -> None:
    """Register a Storage class (or "module:Class" path, imported lazily) for ``scheme://`` URIs."""
    with _lock:
        _REGISTRY[scheme] = (target, hint)  # type: ignore[assignment]


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
