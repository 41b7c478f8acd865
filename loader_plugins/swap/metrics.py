"""Per-swap metrics: bytes, seconds and GB/s of every offload, restore and spill.

Each swap is logged (``logging``, INFO, lazy ``%`` arguments) and counted (:meth:`SwapMetrics.summary`).
For Prometheus, as the cache's metrics (:mod:`loader_plugins.cache.metrics`), the one path is
``prometheus_client`` (the ``metrics`` extra; imported lazily, when the first
:class:`SwapMetrics` is made): its collectors, and :meth:`SwapMetrics.render` for their text.

Exported names (labels ``op`` = offload | restore | spill, ``tier`` = host | disk):

- ``streamer_swap_operations_total``, ``streamer_swap_bytes_total``, ``streamer_swap_seconds_total``
- ``streamer_swap_duration_seconds`` (histogram), ``streamer_swap_throughput_gbps`` (histogram)
- ``streamer_swap_last_bytes``, ``streamer_swap_last_seconds``, ``streamer_swap_last_gbps`` (gauges)

The default instance (:func:`default_metrics`) also registers its collectors in
``prometheus_client``'s default registry, so a process that serves that registry exports them.
In vLLM the swaps run in the worker process: read them there with
``collective_rpc("streamer_swap_stats")`` (its ``prometheus`` field is this text).
"""

from __future__ import annotations

import collections
import dataclasses
import logging
import threading
import time
from typing import Any

log = logging.getLogger(__name__)

NAMESPACE = "streamer_swap"
_DURATION_BUCKETS = (0.01, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 120.0, 300.0)
_GBPS_BUCKETS = (0.25, 0.5, 1.0, 2.0, 4.0, 8.0, 12.0, 16.0, 25.0, 32.0, 50.0)


@dataclasses.dataclass(frozen=True)
class SwapEvent:
    """One swap: what moved, where to, how fast."""

    op: str
    tier: str
    name: str
    bytes: int
    seconds: float
    time: float

    @property
    def gbps(self) -> float:
        return self.bytes / self.seconds / 1e9 if self.seconds > 0 else 0.0

    def as_dict(self) -> dict[str, Any]:
        return {"op": self.op, "tier": self.tier, "name": self.name, "bytes": self.bytes,
                "seconds": round(self.seconds, 6), "gbps": round(self.gbps, 3), "time": self.time}


class _Prometheus:
    """The prometheus_client collectors of one :class:`SwapMetrics`."""

    def __init__(self, prom, registry, namespace: str):
        labels = ("op", "tier")
        self.registry = registry
        self.operations = prom.Counter(f"{namespace}_operations", "Swaps done", labels, registry=registry)
        self.bytes = prom.Counter(f"{namespace}_bytes", "Bytes moved by swaps", labels, registry=registry)
        self.seconds = prom.Counter(f"{namespace}_seconds", "Seconds spent in swaps", labels, registry=registry)
        self.duration = prom.Histogram(f"{namespace}_duration_seconds", "Duration of one swap", labels,
                                       buckets=_DURATION_BUCKETS, registry=registry)
        self.throughput = prom.Histogram(f"{namespace}_throughput_gbps", "GB/s of one swap", labels,
                                         buckets=_GBPS_BUCKETS, registry=registry)
        self.last_bytes = prom.Gauge(f"{namespace}_last_bytes", "Bytes of the last swap", labels, registry=registry)
        self.last_seconds = prom.Gauge(f"{namespace}_last_seconds", "Seconds of the last swap", labels,
                                       registry=registry)
        self.last_gbps = prom.Gauge(f"{namespace}_last_gbps", "GB/s of the last swap", labels, registry=registry)
        self.collectors = (self.operations, self.bytes, self.seconds, self.duration, self.throughput,
                           self.last_bytes, self.last_seconds, self.last_gbps)

    def observe(self, event: SwapEvent) -> None:
        key = (event.op, event.tier)
        self.operations.labels(*key).inc()
        self.bytes.labels(*key).inc(event.bytes)
        self.seconds.labels(*key).inc(event.seconds)
        self.duration.labels(*key).observe(event.seconds)
        if event.bytes:
            self.throughput.labels(*key).observe(event.gbps)
        self.last_bytes.labels(*key).set(event.bytes)
        self.last_seconds.labels(*key).set(event.seconds)
        self.last_gbps.labels(*key).set(event.gbps)


class SwapMetrics:
    """Counts swaps and renders them for Prometheus.

    ``prometheus``: ``"auto"`` uses ``prometheus_client`` when it is importable, ``False`` never.
    Each instance has its own registry (tests can make as many as they like).
    """

    def __init__(self, *, namespace: str = NAMESPACE, history: int = 256, prometheus: Any = "auto"):
        self.namespace = namespace
        self.events: collections.deque[SwapEvent] = collections.deque(maxlen=history)
        self._totals: dict[tuple[str, str], list[float]] = {}
        self._last: dict[tuple[str, str], SwapEvent] = {}
        self._lock = threading.Lock()
        self.logger = log  # engines point this at their own logger tree (vLLM: "vllm.*")
        self._prom: _Prometheus | None = None
        self._prom_module = None
        if prometheus:
            try:
                import prometheus_client as prom
            except ImportError:
                log.debug("prometheus_client is not installed (loader-plugins[metrics]): swaps are logged and "
                          "summarized, not exported")
            else:
                self._prom_module = prom
                self._prom = _Prometheus(prom, prom.CollectorRegistry(auto_describe=True), namespace)

    @property
    def uses_prometheus_client(self) -> bool:
        return self._prom is not None

    def export_to_default_registry(self) -> bool:
        """Also register the collectors in prometheus_client's default registry (once)."""
        if self._prom is None:
            return False
        registry = self._prom_module.REGISTRY
        for collector in self._prom.collectors:
            try:
                registry.register(collector)
            except ValueError:  # already there (same collector, or a name taken by someone else)
                pass
        return True

    def record(self, op: str, nbytes: int, seconds: float, *, tier: str = "host", name: str = "",
               extra: str = "") -> SwapEvent:
        """Count one swap and log it."""
        event = SwapEvent(op, tier, name, int(nbytes), float(seconds), time.time())
        with self._lock:
            self.events.append(event)
            totals = self._totals.setdefault((op, tier), [0, 0, 0.0])
            totals[0] += 1
            totals[1] += event.bytes
            totals[2] += event.seconds
            self._last[(op, tier)] = event
            if self._prom is not None:
                self._prom.observe(event)
        self.logger.info("swap %s%s (%s): %.3f GB in %.3f s (%.2f GB/s)%s", op, f" {name}" if name else "", tier,
                 event.bytes / 1e9, event.seconds, event.gbps, f"; {extra}" if extra else "")
        return event

    def summary(self) -> dict[str, Any]:
        """Totals and the last swap per (op, tier), JSON-friendly."""
        with self._lock:
            out = {}
            for (op, tier), (count, nbytes, seconds) in sorted(self._totals.items()):
                out[f"{op}/{tier}"] = {"operations": int(count), "bytes": int(nbytes), "seconds": round(seconds, 6),
                                       "gbps": round(nbytes / seconds / 1e9, 3) if seconds > 0 else 0.0,
                                       "last": self._last[(op, tier)].as_dict()}
            return out

    def render(self) -> str:
        """The Prometheus text exposition of these metrics ("" without ``prometheus_client``:
        install loader-plugins[metrics]; :meth:`summary` has the totals either way)."""
        if self._prom is not None:
            return self._prom_module.generate_latest(self._prom.registry).decode()
        return ""


_default: SwapMetrics | None = None
_default_lock = threading.Lock()


def default_metrics() -> SwapMetrics:
    """The process-wide instance used when no ``metrics=`` is given (exported to the default registry)."""
    global _default
    with _default_lock:
        if _default is None:
            _default = SwapMetrics()
            _default.export_to_default_registry()
        return _default


__all__ = ["SwapEvent", "SwapMetrics", "default_metrics"]
