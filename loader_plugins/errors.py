"""Error hierarchy.

Every error raised by this package derives from :class:`StreamerError` and from the builtin
that best describes it, so callers that catch ``ValueError`` or ``OSError`` keep working.
Messages name the file, the tensor, the byte range and what to do.
"""

from __future__ import annotations


class StreamerError(Exception):
    """Base class of every error raised by loader_plugins."""


class ConfigError(StreamerError, ValueError):
    """A configuration value or key is invalid."""


class HeaderError(StreamerError, ValueError):
    """A safetensors header (or the checkpoint index) is malformed or unsafe."""


class IndexFileError(HeaderError):
    """``model.safetensors.index.json`` is malformed, unsafe or inconsistent with the shards."""


class DestinationError(StreamerError, ValueError):
    """A caller-provided destination tensor does not match the checkpoint tensor."""


class SourceError(StreamerError, OSError):
    """Reading bytes from storage failed (I/O error, short file, network failure)."""


class SourceChangedError(SourceError):
    """The object changed while it was being read (size, mtime or ETag differs)."""


class CancelledError(StreamerError, RuntimeError):
    """The load was cancelled because another worker failed or the consumer stopped."""
