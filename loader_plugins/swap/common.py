"""Constants and the error shared by the swap modules."""

from __future__ import annotations

import mmap

from ..errors import StreamerError

DEFAULT_CHUNK_BYTES = 32 << 20
ARENA_ALIGN = 4096
RELEASE_MODES = ("auto", "pages", "resize", "none")
METADATA_KEY = "loader_plugins.swap"
STORAGE_SUFFIX = "@storage"
MADV_DONTNEED = getattr(mmap, "MADV_DONTNEED", 4)
PAGE = mmap.PAGESIZE
PREFAULT_MIN = 1 << 20


class SwapError(StreamerError, RuntimeError):
    """An offload or restore cannot be done (wrong state, model changed, bad arguments)."""

