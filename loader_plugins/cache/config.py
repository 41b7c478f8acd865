"""The cache's own options, a section of :class:`~loader_plugins.config.StreamerConfig`.

Registered by :func:`loader_plugins.cache.plugin.plug_in`; the keys are given flat like the
core's (``StreamerConfig.from_dict({"cache_dir": ...})``, ``--cache-dir``, vLLM's
``--model-loader-extra-config``, ``TGI_STREAMER_CACHE_DIR``) and read with
:func:`cache_config`.
"""

from __future__ import annotations

import dataclasses
from typing import TYPE_CHECKING, ClassVar

from ..errors import ConfigError

if TYPE_CHECKING:
    from ..config import StreamerConfig

SECTION = "cache"


@dataclasses.dataclass(frozen=True)
class CacheConfig:
    """Checkpoint cache tiers for object-store checkpoints (s3://, gs://, az://, Azure https:// blob
    URLs): DRAM -> local disk -> the store."""

    cache_dir: str | None = None
    """Local disk tier for s3://, gs:// and az:// checkpoints: loads from the store write through into
    this directory and later loads read the local copy (keyed by scheme and bucket or account and
    container, object name and ETag or GCS generation); ``None`` turns it off."""

    cache_max_bytes: int = 0
    """Size budget of the disk tier; least recently used entries not being read are evicted to
    stay within it. ``0`` for unlimited."""

    dram_cache_dir: str | None = None
    """Shared-memory tier, e.g. ``/dev/shm/loader-plugins`` (filled by ``model-streamer cache warm``
    or ``cache serve``); checked before the disk tier. ``None`` turns it off."""

    cache_revalidate: str = "auto"
    """When the object store cannot be reached (down, no egress, a revoked credential) and a tier
    holds a complete copy of the checkpoint as the last load that reached the store saw it:
    ``auto`` serves that copy with a warning that it was not revalidated; ``required`` fails the
    load instead, as without a cache."""

    SIZE_FIELDS: ClassVar[tuple[str, ...]] = ("cache_max_bytes",)

    def validate(self) -> None:
        if isinstance(self.cache_max_bytes, bool) or not isinstance(self.cache_max_bytes, int) \
                or self.cache_max_bytes < 0:
            raise ConfigError(f"config key 'cache_max_bytes'={self.cache_max_bytes!r}: must be a size of 0 "
                              f"(unlimited) or more")
        if self.cache_revalidate not in ("auto", "required"):
            raise ConfigError(f"config key 'cache_revalidate'={self.cache_revalidate!r}: must be 'auto' (serve a "
                              f"cached copy when the store cannot be reached) or 'required'")
        for key in ("cache_dir", "dram_cache_dir"):
            value = getattr(self, key)
            if value is not None and not isinstance(value, str):
                raise ConfigError(f"config key {key!r}={value!r}: must be a directory path or null")

    @property
    def enabled(self) -> bool:
        """A tier is configured (loads from an object store go through the tiers)."""
        return bool(self.cache_dir or self.dram_cache_dir)


def cache_config(config: "StreamerConfig") -> CacheConfig:
    """The cache section of ``config`` (its defaults when the config names no cache key)."""
    return config.section(SECTION)
