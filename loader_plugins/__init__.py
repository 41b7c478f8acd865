"""Streamer: concurrent safetensors loading for vLLM, SGLang and TGI, from local disk or S3.

Public names only; the machinery lives in :mod:`loader_plugins.core`.
"""

from .cache.plugin import plug_in as _plug_in_the_cache
from .config import StreamerConfig
from .errors import (
    ConfigError,
    DestinationError,
    HeaderError,
    IndexFileError,
    SourceChangedError,
    SourceError,
    StreamerError,
)
from .streamer import SafetensorsStreamer, load_file
from .swap import Snapshot, SnapshotPool, SwapError, offload, restore

__version__ = "0.1.0"

_plug_in_the_cache()   # the core reads s3:// plainly; the cache's tiers go in front of it here

__all__ = [
    "ConfigError",
    "DestinationError",
    "HeaderError",
    "IndexFileError",
    "SafetensorsStreamer",
    "Snapshot",
    "SnapshotPool",
    "SourceChangedError",
    "SourceError",
    "StreamerConfig",
    "StreamerError",
    "SwapError",
    "load_file",
    "offload",
    "restore",
]
