"""How the cache plugs into the core: the ``s3://`` storage becomes the tiered one.

The core registers plain S3 for ``s3://`` and knows nothing of caches; this replaces that entry,
explicitly, with :func:`loader_plugins.cache.tiered.s3_storage` (imported on first use), which is
plain S3 again unless a load's config names a cache tier. ``loader_plugins`` calls
:func:`plug_in` when it is imported.
"""

from __future__ import annotations

from ..core.sources.base import register_storage

TARGET = "loader_plugins.cache.tiered:s3_storage"


def plug_in() -> None:
    """Put the cache tiers in front of ``s3://`` (idempotent)."""
    register_storage("s3", TARGET, "install loader-plugins[s3] (boto3) to read s3:// URIs", replace=True)
