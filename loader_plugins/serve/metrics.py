"""The router's Prometheus collectors (``/metrics``)."""

from __future__ import annotations

from typing import Iterable

from .engine import Engine, EngineState


class Metrics:
    """The router's collectors, in a registry of its own."""

    def __init__(self):
        from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram

        self.registry = CollectorRegistry()
        self.requests = Counter("streamer_serve_requests", "Requests by model and outcome", ["model", "outcome"],
                                registry=self.registry)
        self.operations = Histogram("streamer_serve_operation_seconds", "Engine starts and swaps",
                                    ["model", "server", "op"], registry=self.registry,
                                    buckets=(0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 120, 300))
        self.resident = Gauge("streamer_serve_resident_bytes", "Bytes a model holds while running (as a swap "
                              "moves them)", ["model", "server"], registry=self.registry)
        self.state = Gauge("streamer_serve_engine_state", "1 for the state each model's engine is in",
                           ["model", "server", "state"], registry=self.registry)

    def render(self, engines: Iterable[Engine]) -> bytes:
        from prometheus_client import generate_latest

        for engine in engines:
            name, server = engine.spec.name, engine.server.name
            self.resident.labels(name, server).set(engine.resident_bytes)
            for state in EngineState:
                self.state.labels(name, server, state.value).set(1 if engine.state == state else 0)
        return generate_latest(self.registry)
