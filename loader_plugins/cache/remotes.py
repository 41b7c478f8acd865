"""The object stores the cache tiers serve, and how each names one version of an object.

A cache entry is one object at one version (:func:`loader_plugins.cache.disk.entry_key` of
``namespace``, ``key`` and ``version``): the namespace says which store and bucket, the key which
object, the version which of its contents, as the store reports it. Two buckets, two accounts or
a replaced object never share an entry::

    scheme   namespace                    key           version      tier
    s3       bucket                       object key    ETag         s3
    gs       gs://bucket                  object name   generation   gcs
    az       az://account/container       blob name     ETag         azure
    https    az://account/container       blob name     ETag         azure

An S3 namespace is the bare bucket (the key entries had before GCS and Azure joined: caches on
disk stay valid); no S3 bucket name holds ``:``, so it never equals another scheme's. The blob
URL ``https://ACCOUNT.blob.core.windows.net/c/b`` and ``az://c/b`` in that account name the same
blob and share its entry. The namespace and key come from the URI alone (no request), so a tier
can serve a recorded version while the store cannot be reached (:mod:`.offline`).
"""

from __future__ import annotations

import dataclasses
import hashlib
import importlib
import os
import threading
from typing import TYPE_CHECKING, Callable

from ..core.sources.base import Source, Storage, scheme_of

if TYPE_CHECKING:
    from ..config import StreamerConfig


def _s3_name(uri: str, config: "StreamerConfig") -> tuple[str, str]:
    from ..core.sources.s3 import parse_s3_uri

    return parse_s3_uri(uri)


def _gs_name(uri: str, config: "StreamerConfig") -> tuple[str, str]:
    from ..core.sources.gcs import parse_gs_uri

    bucket, name = parse_gs_uri(uri)
    return f"gs://{bucket}", name


def _az_name(uri: str, config: "StreamerConfig") -> tuple[str, str]:
    from ..core.sources.azure import parse_azure_uri

    account, container, name = parse_azure_uri(uri, config)
    return f"az://{account.name or account.endpoint}/{container}", name


def _etag(src: Source) -> str | None:
    return getattr(src, "etag", None) or None


def _generation(src: Source) -> str | None:
    generation = getattr(src, "generation", None)
    return str(generation) if generation is not None else None


@dataclasses.dataclass(frozen=True)
class Remote:
    """One object store the tiers serve."""

    #: the tier's name in metrics, estimates and ``TIER_BYTES`` (bytes read from the store itself)
    tier: str
    #: the core's storage for the scheme (``module:Class``): the tiers read through it
    storage: str
    #: the client library, imported before an estimate times its requests (one-time cost)
    client_module: str
    #: ``(uri, config) -> (namespace, key)``, from the URI alone
    identity: Callable[[str, "StreamerConfig"], tuple[str, str]]
    #: an open source -> its version as the store reported it at open (None: not cacheable)
    version: Callable[[Source], str | None]

    def plain_storage(self, config: "StreamerConfig") -> Storage:
        module, _, cls = self.storage.partition(":")
        return getattr(importlib.import_module(module), cls)(config)


_AZURE = Remote("azure", "loader_plugins.core.sources.azure:AzureStorage", "azure.storage.blob", _az_name, _etag)

#: scheme -> the store behind it (``https`` is Azure Blob's URL form, as in the core's registry)
REMOTES: dict[str, Remote] = {
    "s3": Remote("s3", "loader_plugins.core.sources.s3:S3Storage", "boto3", _s3_name, _etag),
    "gs": Remote("gcs", "loader_plugins.core.sources.gcs:GcsStorage", "google.cloud.storage", _gs_name,
                 _generation),
    "az": _AZURE,
    "https": _AZURE,
}

#: names of the remote tiers (bytes read from a store itself, not from a cache tier)
REMOTE_TIERS = frozenset(r.tier for r in REMOTES.values())


def remote_for(uri: str) -> Remote | None:
    """The store the tiers serve ``uri`` from, None for a scheme they do not cache (local files)."""
    return REMOTES.get(scheme_of(uri))


_shared: dict[tuple, Storage] = {}
_shared_lock = threading.Lock()


def shared_storage(remote: Remote, config: "StreamerConfig") -> Storage:
    """One plain storage per process, store and settings, reused across loads (never closed).

    Creating a boto3 client costs about 50 ms here and a load used to create two (listing, then
    reading): a tenth of a second a cache hit should not pay. Keyed by pid so a forked child never
    shares its parent's connections, and by a digest of the settings (no secret kept in a key)."""
    digest = hashlib.sha256(repr(sorted(config.to_dict().items())).encode()).hexdigest()
    key = (os.getpid(), remote.storage, digest)
    with _shared_lock:
        storage = _shared.get(key)
        if storage is None:
            storage = _shared[key] = remote.plain_storage(config)
        return storage
