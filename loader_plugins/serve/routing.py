"""Which engine serves a request, and the parts that decide it.

:class:`Router` holds the servers and their engines (:mod:`.server`); for a request it finds the
model's running engine with the fewest requests in flight, or has one placed and brought up
(:mod:`.scheduler`), and holds it until :meth:`Router.release`. It composes the migrations
(:mod:`.migration`), the idle reaper (:mod:`.reaper`) and the records of live engines
(:mod:`.records`) that a router restarted on the same log directory takes over.
"""

from __future__ import annotations

import asyncio
import logging
import time
from pathlib import Path
from typing import Any, Mapping

from ..cache.estimate import LoadHistory
from .catalog import Catalog, ServerSpec
from .engine import Engine, EngineHost, EngineState
from .errors import ServeError
from .metrics import Metrics
from .migration import Migrations
from .placement import ServerHistory
from .reaper import IdleReaper
from .records import FILE_NAME, EngineRecords
from .scheduler import Scheduler
from .server import Server, host_for

log = logging.getLogger(__name__)


class Router:
    """The servers, their engines and the decisions that place, start, swap and move them.
    ``hosts`` replaces the host of the servers it names (tests: engines that are fakes)."""

    def __init__(self, catalog: Catalog, log_dir: Path, hosts: Mapping[str, EngineHost] | None = None):
        self.catalog = catalog
        hosts = hosts or {}
        self.servers = {name: Server(spec, catalog, hosts.get(name) or host_for(spec, log_dir))
                        for name, spec in catalog.servers.items()}
        self.records = EngineRecords(log_dir / FILE_NAME)
        self.metrics = Metrics()
        self.migrator = Migrations(self.running, self.release, self.metrics)
        self.scheduler = Scheduler(self.servers, ServerHistory(LoadHistory(log_dir / "placement-history.json")),
                                   self.metrics, self.migrator, on_change=self.save)
        self.reaper = IdleReaper(lambda: self.engines, self.scheduler, catalog.idle_timeout)
        self._placing: dict[str, asyncio.Lock] = {name: asyncio.Lock() for name in catalog.models}
        self.cluster = None
        if catalog.ray is not None:    # the servers are the Ray cluster's nodes, as they come and go
            from .ray_cluster import RayCluster

            self.cluster = RayCluster(catalog.ray, catalog.budget)

    @property
    def engines(self) -> list[Engine]:
        return [e for server in self.servers.values() for e in server.engines.values()]

    @property
    def decisions(self):
        """The latest placements (estimates, choice, what it measured)."""
        return self.scheduler.decisions

    @property
    def migrations(self):
        """The latest moves of streams between servers."""
        return self.migrator.history

    @property
    def flights(self) -> dict:
        return self.migrator.flights

    def busy_estimate(self, engine: Engine) -> tuple[float, str] | None:
        return self.migrator.busy_estimate(engine)

    # ---- engines that outlive a router ----

    def save(self) -> None:
        """Write where every live engine is, so that a router restarted on this log directory
        finds them again (:meth:`adopt`)."""
        self.records.save(r for r in (e.record() for e in self.engines) if r is not None)

    async def adopt(self) -> list[str]:
        """Take over the engines a previous router on this log directory left running."""
        adopted = []
        for record in self.records.load():
            server = self.servers.get(record.get("server"))
            engine = server.engines.get(record.get("model")) if server else None
            if engine is None:
                log.warning("an engine of %s on %s (pid %s) is not in this catalogue; it is left alone",
                            record.get("model"), record.get("server"), record.get("pid"))
                continue
            if await engine.adopt(record):
                adopted.append(f"{engine.spec.name} on {server.spec.name} ({engine.state}, pid {record['pid']})")
        if adopted:
            log.info("found %d engine(s) again: %s", len(adopted), ", ".join(adopted))
        self.save()
        return adopted

    async def connect(self) -> None:
        if self.cluster is not None:
            self.cluster.connect()
            await self.cluster.sync(self)
        await asyncio.gather(*(s.connect() for s in self.servers.values() if not s.connected))

    async def add_server(self, spec: ServerSpec, host: EngineHost) -> Server:
        """A server that joined (a Ray node), in placement once its host has answered."""
        server = Server(spec, self.catalog, host)
        await server.connect()
        self.servers[spec.name] = server
        log.info("server %s joined (budget %d bytes)", spec.name, server.spec.budget)
        return server

    def drop_server(self, name: str, reason: str) -> None:
        """A server that is gone, with its engines: they are lost (requests in flight there end with
        an error), and it leaves placement."""
        server = self.servers.pop(name, None)
        if server is None:
            return
        lost = [e for e in server.engines.values() if e.state != EngineState.STOPPED]
        for engine in lost:
            engine.lost()
        log.warning("server %s left: %s; engines lost: %s", name, reason,
                    ", ".join(e.spec.name for e in lost) or "none")
        self.save()

    # ---- requests ----

    def check_model(self, name: Any) -> str:
        if not isinstance(name, str) or name not in self.catalog.models:
            raise ServeError(404, f"The model `{name}` does not exist. Models: {', '.join(self.catalog.models)}",
                             code="model_not_found", param="model")
        return name

    def engine(self, name: Any, server: str | None = None) -> Engine:
        """The engine of model ``name`` on ``server``; without a server, the one that is not
        stopped (there must be exactly one, or only one server)."""
        name = self.check_model(name)
        if server is not None:
            if server not in self.servers:
                raise ServeError(404, f"no server {server!r}; servers: {', '.join(self.servers)}", code="not_found",
                                 param="server")
            return self.servers[server].engines[name]
        if len(self.servers) == 1:
            return next(iter(self.servers.values())).engines[name]
        live = [s.engines[name] for s in self.servers.values() if s.engines[name].state != EngineState.STOPPED]
        if len(live) != 1:
            raise ServeError(409, f"{name} has an engine on {len(live)} servers: name one (?server=NAME)",
                             code="ambiguous", param="server")
        return live[0]

    async def acquire(self, name: Any, server: str | None = None) -> Engine:
        """A running engine of the model (on ``server`` when given, else one running already, else
        on the server placement chooses); counted in flight until :meth:`release`."""
        name = self.check_model(name)
        if server is not None:
            return await self._hold(self.engine(name, server), None)
        running = self.running(name)
        if running:
            return await self._hold(running, None)
        async with self._placing[name]:   # one placement per model; later requests find it running
            running = self.running(name)
            if running:
                return await self._hold(running, None)
            decision = await self.scheduler.place(name)
            return await self._hold(self.servers[decision["chosen"]].engines[name], decision)

    def running(self, name: str, exclude: Engine | None = None) -> Engine | None:
        """The model's running engine with the fewest requests in flight (but ``exclude``)."""
        live = [e for e in (s.engines[name] for s in self.servers.values())
                if e.state == EngineState.RUNNING and e.alive() and e is not exclude]
        return min(live, key=lambda e: e.inflight) if live else None

    async def _hold(self, engine: Engine, decision: dict | None) -> Engine:
        engine.inflight += 1
        engine.last_used = time.monotonic()
        try:
            await self.scheduler.bring_up(engine, decision)
        except BaseException:
            engine.inflight -= 1
            raise
        return engine

    def release(self, engine: Engine) -> None:
        engine.inflight -= 1
        engine.last_used = time.monotonic()

    # ---- what the admin endpoints ask ----

    async def swap_out(self, name: str, server: str | None = None) -> dict:
        return await self.scheduler.swap_out(self.engine(name, server), "(asked)", asked=True)

    async def stop(self, name: str, server: str | None = None) -> Engine:
        engine = self.engine(name, server)
        async with engine.lock:
            await engine.stop()
        self.save()
        return engine

    async def migrate(self, name: str, server: str | None = None, *, timeout: float = 300.0) -> dict:
        """Move the in-flight streaming completions of model ``name`` on ``server`` to an engine of
        the model running on another server (placed there first if none runs)."""
        source = self.engine(name, server)
        flights = self.migrator.streams(source)
        stays = source.inflight - len(flights)
        if not flights:
            return {"moved": [], "stays": stays}
        target = self.running(name, exclude=source)
        if target is None:
            decision = await self.scheduler.place(name, exclude={source.server.name})
            target = await self._hold(self.servers[decision["chosen"]].engines[name], decision)
            self.release(target)
        return {"moved": await self.migrator.move(flights, target, timeout), "stays": stays}

    # ---- life ----

    def start_reaper(self) -> None:
        self.reaper.start()
        if self.cluster is not None:
            self.cluster.start(self)

    async def close(self) -> None:
        if self.cluster is not None:
            await self.cluster.close()
        await self.reaper.close()
        await asyncio.gather(*(e.stop() for e in self.engines))
        self.save()
