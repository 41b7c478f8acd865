"""A place engines run: its host, one engine per model of the catalogue, a budget, what is under way."""

from __future__ import annotations

import asyncio
import dataclasses
import logging
from pathlib import Path
from typing import Any

from .catalog import Catalog, ServerSpec
from .engine import EngineError, EngineHost
from .local import LocalHost
from .remote import AgentHost

log = logging.getLogger(__name__)


def host_for(spec: ServerSpec, log_dir: Path) -> EngineHost:
    """The host of a server of the catalogue: another host's agent when it has a ``url``, else this node."""
    return AgentHost(spec.url, spec.api_key) if spec.url else LocalHost(log_dir)


class Server:
    """One server: an engine per model (started on demand), its budget, the operations under way
    there. It takes part in placement once its host has answered (:meth:`connect`): another
    host's agent reports its budget (unless the catalogue sets one), cache tiers and bandwidths."""

    def __init__(self, spec: ServerSpec, catalog: Catalog, host: EngineHost):
        self.spec = spec
        self.host = host
        self.engines = {name: host.engine(model, spec, catalog.extra_config(model, spec))
                        for name, model in catalog.models.items()}
        self.room = asyncio.Lock()
        self.underway: dict[int, float] = {}    # operation id -> when it is estimated to end
        self.connected = False
        self.reported: dict[str, Any] | None = None   # what its host said of itself

    async def connect(self) -> bool:
        """Ask the host what the catalogue does not say of it (this node: nothing to ask)."""
        try:
            info = await self.host.info()
        except EngineError as exc:
            log.warning("server %s: %s; it is left out of placement until it answers", self.spec.name, exc)
            return False
        if info is not None:
            self.spec = dataclasses.replace(self.spec, budget=self.spec.budget or int(info["budget"]),
                                            cache_dir=info.get("cache_dir"), dram_cache_dir=info.get("dram_cache_dir"))
            for engine in self.engines.values():
                engine.server = self.spec
            log.info("server %s is the agent at %s (host %s): budget %d bytes, engines on %s, cache %s, "
                     "bandwidths %s", self.spec.name, self.spec.url, info.get("hostname"), self.spec.budget,
                     info.get("engine_host"),
                     {k: info.get(k) for k in ("cache_dir", "dram_cache_dir") if info.get(k)} or "none",
                     {t: b["gbps"] for t, b in (info.get("bandwidths") or {}).items() if b.get("samples")}
                     or "none yet")
        self.reported, self.connected = info, True
        return True

    def queue_seconds(self, now: float) -> float:
        return max((end - now for end in self.underway.values()), default=0.0)
