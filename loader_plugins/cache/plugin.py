"""How the cache plugs into the core: its options become a config section, and the object
stores' storages (``s3://``, ``gs://``, ``az://``, Azure's ``https://``) become the tiered ones.

The core registers plain S3, GCS and Azure Blob storages and knows nothing of caches; this
registers the :class:`~loader_plugins.cache.config.CacheConfig` section (``cache_dir``,
``cache_max_bytes``, ``dram_cache_dir``, ``cache_revalidate``) and replaces those storages,
explicitly, with the hooks of :mod:`loader_plugins.cache.tiered` (imported on first use), which
are the plain storages again unless a load's config names a cache tier. ``loader_plugins`` calls
:func:`plug_in` when it is imported.
"""

from __future__ import annotations

from ..config import register_config_section
from ..core.sources.base import register_storage
from .config import SECTION, CacheConfig

TARGET = "loader_plugins.cache.tiered:s3_storage"
#: scheme -> the tiered hook (the install hints stay the core's)
TARGETS = {"s3": TARGET, "gs": "loader_plugins.cache.tiered:gs_storage",
           "az": "loader_plugins.cache.tiered:az_storage", "https": "loader_plugins.cache.tiered:az_storage"}


def plug_in() -> None:
    """Register the cache's config section and put its tiers in front of every object store
    (idempotent)."""
    register_config_section(SECTION, CacheConfig)
    for scheme, target in TARGETS.items():
        register_storage(scheme, target, replace=True)
