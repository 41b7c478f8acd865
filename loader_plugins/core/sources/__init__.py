"""Storage sources, one module per storage, found by URI scheme through a lazy registry."""

from .base import BufferPool, Source, Storage, register_storage, registered_storages, scheme_of, storage_for

__all__ = ["BufferPool", "Source", "Storage", "register_storage", "registered_storages", "scheme_of", "storage_for"]
