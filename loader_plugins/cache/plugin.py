"""How the cache plugs into the core: its options become a config section, and the ``s3://``
storage becomes the tiered one.

The core registers plain S3 for ``s3://`` and knows nothing of caches; this registers the
:class:`~loader_plugins.cache.config.CacheConfig` section (``cache_dir``, ``cache_max_bytes``,
``dram_cache_dir``) and replaces the ``s3`` storage, explicitly, with
:func:`loader_plugins.cache.tiered.s3_storage` (imported on first use), which is plain S3 again
unless a load's config names a cache tier. ``loader_plugins`` calls :func:`plug_in` when it is
imported.
"""

from __future__ import annotations

from ..config import register_config_section
from ..core.sources.base import register_storage
from .config import SECTION, CacheConfig

TARGET = "loader_plugins.cache.tiered:s3_storage"


def plug_in() -> None:
    """Register the cache's config section and put its tiers in front of ``s3://`` (idempotent)."""
    register_config_section(SECTION, CacheConfig)
    register_storage("s3", TARGET, "install loader-plugins[s3] (boto3) to read s3:// URIs", replace=True)
