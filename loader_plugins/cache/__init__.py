"""Multi-tier checkpoint cache for s3:// checkpoints: shared DRAM -> local disk -> S3.

- :mod:`.disk`: the local disk tier (write-through while loading, atomic, ETag-keyed, LRU budget);
- :mod:`.dram`: the shared-memory tier in ``/dev/shm`` and ``model-streamer cache serve``;
- :mod:`.tiered`: :class:`TieredStorage`, the ``s3://`` storage that picks the fastest tier;
- :mod:`.estimate`: load-time estimates from recorded bandwidths;
- :mod:`.metrics`: Prometheus counters and gauges per tier.

Turned on by ``StreamerConfig(cache_dir=..., dram_cache_dir=...)``. Load-time estimates:
``from loader_plugins.cache.estimate import estimate``.
"""

from .disk import DiskTier, EntryStore, entry_key
from .dram import DramTier
from .estimate import LoadHistory
from .tiered import TieredStorage, evict, s3_storage, tiered_storage_for, warm

__all__ = [
    "DiskTier",
    "DramTier",
    "EntryStore",
    "LoadHistory",
    "TieredStorage",
    "entry_key",
    "evict",
    "s3_storage",
    "tiered_storage_for",
    "warm",
]
