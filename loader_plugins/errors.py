"""Error hierarchy.

Every error raised by this package derives from :class:`StreamerError` and from the builtin
that best describes it, so callers that catch ``ValueError``, ``OSError`` or
``FileNotFoundError`` keep working. When the ``safetensors`` package is installed,
:class:`StreamerError` also derives from ``safetensors.SafetensorError``, so an ``except``
clause written for ``safetensors.torch.load_file`` catches ours too. Messages name the file,
the tensor, the byte range and what to do.
"""

from __future__ import annotations


def _base() -> type[Exception]:
    try:
        from safetensors import SafetensorError
    except ImportError:   # safetensors is optional; without it there is no clause to satisfy
        return Exception
    return SafetensorError


class StreamerError(_base()):
    """Base class of every error raised by loader_plugins (never raised itself)."""


class ConfigError(StreamerError, ValueError):
    """A configuration value, option or argument is invalid."""


class UsageError(StreamerError, ValueError):
    """An API was called in a way it cannot serve (a tensor name not in the checkpoint,
    ``get_tensors()`` before ``stream_file()``...)."""


class HeaderError(StreamerError, ValueError):
    """A safetensors header (or the checkpoint index) is malformed or unsafe."""


class IndexFileError(HeaderError):
    """``model.safetensors.index.json`` is malformed, unsafe or inconsistent with the shards."""


class DestinationError(StreamerError, ValueError):
    """A caller-provided destination tensor does not match the checkpoint tensor."""


class SourceError(StreamerError, OSError):
    """Reading bytes from storage failed (I/O error, short file, network failure)."""


class SourceNotFoundError(SourceError, FileNotFoundError):
    """A checkpoint file, directory or object does not exist."""


class SourceChangedError(SourceError):
    """The object changed while it was being read (size, mtime or ETag differs)."""


class DeviceError(StreamerError, RuntimeError):
    """The requested device is not available in this process (as torch reports it)."""


class CancelledError(StreamerError, RuntimeError):
    """The load was cancelled because another worker failed or the consumer stopped."""


class InternalError(StreamerError, RuntimeError):
    """A bug in loader_plugins (an invariant did not hold); please report it with the message."""


class MissingDependencyError(StreamerError, ImportError):
    """An optional dependency this call needs (CuPy, boto3...) is not installed."""
