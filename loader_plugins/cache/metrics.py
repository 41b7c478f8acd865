"""Prometheus metrics for the cache tiers, through ``prometheus-client`` (imported lazily).

Without ``prometheus-client`` every function here is a no-op. The metrics live in the
default registry (``prometheus_client.REGISTRY``), so an engine that already exposes
``/metrics`` shows them; ``model-streamer cache serve --metrics-port P`` exposes its own.

======================================================  ==========  =====================================
name                                                     type        meaning
======================================================  ==========  =====================================
``loader_plugins_tier_hits_total{tier}``                 counter     objects opened from dram/disk/s3
``loader_plugins_tier_bytes_total{tier}``                counter     bytes read from each tier
``loader_plugins_tier_last_gbps{tier}``                  gauge       GB/s of the last whole load
``loader_plugins_tier_loads_total{tier}``                counter     whole loads served by one tier
``loader_plugins_cache_writethrough_bytes_total{tier}``  counter     bytes written into a tier while loading
``loader_plugins_cache_stored_total{tier}``              counter     entries published
``loader_plugins_cache_evictions_total{tier}``           counter     entries evicted
``loader_plugins_cache_used_bytes{tier}``                gauge       bytes held (set by status / serve)
``loader_plugins_cache_entries{tier}``                   gauge       complete entries (set by status / serve)
======================================================  ==========  =====================================
"""

from __future__ import annotations

import logging
import threading
from typing import Any

log = logging.getLogger(__name__)

_lock = threading.Lock()
_metrics: dict[str, Any] | None = None


def _get() -> dict[str, Any] | None:
    global _metrics
    if _metrics is not None:
        return _metrics or None
    with _lock:
        if _metrics is not None:
            return _metrics or None
        try:
            from prometheus_client import Counter, Gauge
        except ImportError:
            log.debug("prometheus-client is not installed; cache metrics are off")
            _metrics = {}
            return None
        _metrics = {
            "hits": Counter("loader_plugins_tier_hits", "Objects opened from each storage tier", ["tier"]),
            "bytes": Counter("loader_plugins_tier_bytes", "Bytes read from each storage tier", ["tier"]),
            "gbps": Gauge("loader_plugins_tier_last_gbps", "GB/s of the last whole load served by a tier", ["tier"]),
            "loads": Counter("loader_plugins_tier_loads", "Whole loads served by one tier", ["tier"]),
            "writethrough": Counter("loader_plugins_cache_writethrough_bytes",
                                    "Bytes written into a cache tier while loading", ["tier"]),
            "stored": Counter("loader_plugins_cache_stored", "Cache entries published", ["tier"]),
            "evictions": Counter("loader_plugins_cache_evictions", "Cache entries evicted", ["tier"]),
            "used": Gauge("loader_plugins_cache_used_bytes", "Bytes held by a cache tier", ["tier"]),
            "entries": Gauge("loader_plugins_cache_entries", "Complete entries in a cache tier", ["tier"]),
        }
        return _metrics


def hit(tier: str) -> None:
    m = _get()
    if m:
        m["hits"].labels(tier).inc()


def read_bytes(tier: str, n: int) -> None:
    m = _get()
    if m and n:
        m["bytes"].labels(tier).inc(n)


def load_done(tier: str, nbytes: int, seconds: float) -> None:
    m = _get()
    if m and seconds > 0:
        m["loads"].labels(tier).inc()
        m["gbps"].labels(tier).set(nbytes / seconds / 1e9)


def wrote_through(tier: str, n: int) -> None:
    m = _get()
    if m and n:
        m["writethrough"].labels(tier).inc(n)


def stored(tier: str, nbytes: int) -> None:
    m = _get()
    if m:
        m["stored"].labels(tier).inc()


def evicted(tier: str) -> None:
    m = _get()
    if m:
        m["evictions"].labels(tier).inc()


def usage(tier: str, used_bytes: int, entries: int) -> None:
    m = _get()
    if m:
        m["used"].labels(tier).set(used_bytes)
        m["entries"].labels(tier).set(entries)


def start_http_server(port: int, addr: str = "127.0.0.1") -> None:
    """Expose the default registry on ``http://addr:port/metrics``."""
    try:
        from prometheus_client import start_http_server as _start
    except ImportError as exc:
        from ..errors import ConfigError
        raise ConfigError(f"--metrics-port needs prometheus-client ({exc}); pip install prometheus-client") from exc
    _get()
    _start(port, addr=addr)


def snapshot() -> dict[str, dict[str, float]]:
    """Current values as {metric: {tier: value}} (tests, ``cache status --json``)."""
    m = _get()
    out: dict[str, dict[str, float]] = {}
    if not m:
        return out
    for name, metric in m.items():
        values: dict[str, float] = {}
        for family in metric.collect():
            for sample in family.samples:
                if sample.name.endswith("_created"):
                    continue
                values[sample.labels.get("tier", "")] = sample.value
        out[name] = values
    return out
