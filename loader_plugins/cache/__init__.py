"""Multi-tier checkpoint cache for object-store checkpoints (s3://, gs://, az://, Azure https://
blob URLs): shared DRAM -> local disk -> the store.

- :mod:`.disk`: the local disk tier (atomic, ETag-keyed, LRU budget); :mod:`.fill` writes one
  entry (write-through while loading), :mod:`.files` the locking file helpers;
- :mod:`.dram`: the shared-memory tier in ``/dev/shm``; :mod:`.dram_server` is ``cache serve``;
- :mod:`.tiered`: :class:`TieredStorage`, the object stores' storage that picks the fastest tier;
  :mod:`.remotes`: how each store names an object version (the entries' keys);
- :mod:`.warm`: ``cache warm`` / ``evict`` and promotion, outside a load;
- :mod:`.estimate`: load-time estimates from recorded bandwidths;
- :mod:`.metrics`: Prometheus counters and gauges per tier.

Plugged into the core from outside (:mod:`.plugin`, called when ``loader_plugins`` is imported):
the ``s3``, ``gs``, ``az`` and ``https`` storages become the tiered hooks (:func:`.tiered.s3_storage`...).
Turned on per load by
its config section (:mod:`.config`: ``cache_dir``, ``cache_max_bytes``, ``dram_cache_dir``,
given flat like every StreamerConfig key). Load-time estimates:
``from loader_plugins.cache.estimate import estimate``.
"""

import importlib

#: public names -> the submodule that defines them (imported on first use: importing the
#: package, as ``loader_plugins`` does to plug the cache in, costs nothing)
_LAZY = {"DiskTier": "disk", "EntryStore": "disk", "entry_key": "disk", "DramTier": "dram", "LoadHistory": "estimate",
         "TieredStorage": "tiered", "evict": "warm", "s3_storage": "tiered", "tiered_storage_for": "tiered",
         "warm": "warm"}

__all__ = sorted(_LAZY)


def __getattr__(name: str):
    module = _LAZY.get(name)
    if module is None:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    return getattr(importlib.import_module(f"{__name__}.{module}"), name)
