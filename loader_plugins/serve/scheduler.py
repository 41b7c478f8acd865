"""Where a model starts and how it gets there.

:meth:`Scheduler.place` estimates the model's startup on every server (:mod:`.placement`, pure)
and chooses the fastest; :meth:`Scheduler.bring_up` swaps it back in there or starts it, first
making room under that server's budget (:meth:`Scheduler.make_room`: idle models swapped out,
least recently used first; a busy one's streams moved to its engine elsewhere
(:mod:`.migration`), or waited for). Every decision is logged with what it estimated and then
measured; swap and start-up samples go to the placement history. Engines are driven only through
the interface of :mod:`.engine`.
"""

from __future__ import annotations

import asyncio
import collections
import logging
import time
from typing import TYPE_CHECKING, Callable, Mapping

from .engine import Engine, EngineError, EngineState
from .errors import ServeError
from .placement import ServerHistory, choose, estimate_server, ratio, victims

if TYPE_CHECKING:
    from .metrics import Metrics
    from .migration import Migrations
    from .server import Server

log = logging.getLogger(__name__)

#: how long a request waits for memory held by busy models before it is refused (503)
ROOM_WAIT_S = 300.0


class Scheduler:
    """Placement, bring-up and swap-outs over ``servers``. ``on_change()`` runs whenever an
    engine's record may have changed (the router saves its records)."""

    def __init__(self, servers: Mapping[str, "Server"], history: ServerHistory, metrics: "Metrics",
                 migrations: "Migrations", on_change: Callable[[], None]):
        self.servers = servers
        self.history = history
        self.metrics = metrics
        self.migrations = migrations
        self.on_change = on_change
        self.decisions: collections.deque[dict] = collections.deque(maxlen=200)

    # ---- placement ----

    async def place(self, name: str, exclude: frozenset[str] | set[str] = frozenset()) -> dict:
        """Estimate the model's startup on every server (but ``exclude``), choose the fastest, log
        the decision."""
        now = time.monotonic()
        estimates = []
        unreachable = []
        for server in self.servers.values():
            if server.spec.name in exclude:
                continue
            if not server.connected and not await server.connect():
                unreachable.append(server.spec.name)
                continue
            engine = server.engines[name]
            load = None
            if not (engine.alive() and engine.state in (EngineState.RUNNING, EngineState.SWAPPED)):
                try:
                    load = await engine.load_estimate()
                except EngineError as exc:
                    log.warning("place %s: no estimate from %s (%s); left out", name, server.spec.name, exc)
                    unreachable.append(server.spec.name)
                    continue
                if not engine.measured and load["bytes"] > 0:
                    engine.resident_bytes = load["bytes"]   # the checkpoint's size until a swap measures it
            estimates.append(estimate_server(server.spec.name, engine, list(server.engines.values()),
                                             server.spec.budget, self.history, load=load,
                                             queue_s=server.queue_seconds(now), now=now,
                                             busy=self.migrations.busy_estimate))
        if not estimates:
            left_out = sorted(exclude) + [f"{s} (its agent does not answer)" for s in unreachable]
            raise ServeError(503 if unreachable else 409, f"no server but {', '.join(left_out)} can run {name}",
                             code="no_server", kind="server_error" if unreachable else "invalid_request_error")
        best = choose(estimates)
        decision = {"model": name, "chosen": best.server, "how": best.how, "estimated_seconds": round(best.seconds, 4),
                    "measured_seconds": None, "ratio": None, "at": time.time(),
                    "candidates": [e.describe() for e in estimates], "unreachable": unreachable}
        self.decisions.append(decision)
        log.info("place %s on %s: %s", name, best.server, "; ".join(e.line() for e in estimates))
        for line in best.basis:
            log.info("  place %s on %s: %s", name, best.server, line)
        return decision

    # ---- bringing an engine up ----

    async def bring_up(self, engine: Engine, decision: dict | None) -> None:
        """Make ``engine`` run (swapped in, or started), room made first; ``decision``: the
        placement that chose it, completed with what it measured."""
        if engine.state == EngineState.RUNNING and engine.alive():
            return
        async with engine.lock:   # later waiters find it running
            if engine.state == EngineState.RUNNING and engine.alive():
                return
            name, server = engine.spec.name, self.servers[engine.server.name]
            if not server.connected and not await server.connect():
                raise ServeError(503, f"the agent of server {server.spec.name} ({server.spec.url}) does not answer",
                                 kind="server_error", code="engine_unavailable")
            op = id(engine)
            server.underway[op] = time.monotonic() + (decision["estimated_seconds"] if decision else 0.0)
            t0 = time.monotonic()
            try:
                if engine.state == EngineState.SWAPPED and engine.alive():
                    freed = await self.make_room(engine)
                    seconds = await engine.swap_in()
                    self.history.record(server.spec.name, "host", engine.resident_bytes, seconds, model=name)
                    self.metrics.operations.labels(name, server.spec.name, "swap_in").observe(seconds)
                    log.info("swap in %s on %s: %.2f s (%d bytes resident%s)", name, server.spec.name, seconds,
                             engine.resident_bytes, freed)
                else:
                    if engine.proc is not None:
                        log.warning("the engine of %s on %s is %s and its process %s; starting a new one", name,
                                    server.spec.name, engine.state, "exited" if not engine.alive() else "is stopped")
                        await engine.stop()
                    freed = await self.make_room(engine)
                    seconds = await engine.start()
                    load = engine.timings.get("load")
                    if load is not None:
                        self.history.record(server.spec.name, "engine", engine.resident_bytes, seconds - load)
                    self.metrics.operations.labels(name, server.spec.name, "start").observe(seconds)
                    log.info("cold start %s on %s: %.2f s to /health (load %s; %d bytes estimated%s)", name,
                             server.spec.name, seconds, f"{load:.2f} s" if load is not None else "not logged",
                             engine.resident_bytes, freed)
            except EngineError as exc:
                raise ServeError(503, str(exc), kind="server_error", code="engine_unavailable") from exc
            finally:
                server.underway.pop(op, None)
                self.on_change()
            if decision is not None:
                measured = time.monotonic() - t0
                decision["measured_seconds"] = round(measured, 4)
                decision["ratio"] = ratio(measured, decision["estimated_seconds"])
                log.info("place %s on %s: measured %.2f s, estimated %.2f s (%sx)", name, server.spec.name,
                         measured, decision["estimated_seconds"], decision["ratio"])

    async def make_room(self, engine: Engine) -> str:
        """Swap out least recently used idle models on the engine's server until it fits the
        server's budget (alone, it always fits). Returns what was done, for the log line."""
        server = self.servers[engine.server.name]
        evicted: list[str] = []
        deadline = time.monotonic() + ROOM_WAIT_S
        async with server.room:
            while True:
                idle, busy = victims(engine, list(server.engines.values()), server.spec.budget)
                if not idle and not busy:
                    break
                if not idle and await self.migrations.migrate_away(busy, engine, ROOM_WAIT_S):
                    continue
                if not idle:
                    if time.monotonic() > deadline:
                        raise ServeError(503, f"no memory for {engine.spec.name} on {server.spec.name}: the models "
                                              f"holding it are all busy ({', '.join(e.spec.name for e in busy)})",
                                         kind="server_error", code="no_capacity")
                    await asyncio.sleep(0.2)
                    continue
                victim = idle[0]
                report = await self.swap_out(victim, f"to make room for {engine.spec.name}")
                if report is not None:
                    evicted.append(f"{victim.spec.name} ({report['bytes']} bytes in {report['seconds']:.2f} s)")
        return f"; swapped out {', '.join(evicted)}" if evicted else ""

    # ---- swapping out ----

    async def swap_out(self, engine: Engine, why: str, *, asked: bool = False) -> dict | None:
        """Swap out ``engine`` if it runs and serves no request (else None; :class:`ServeError`
        409 when ``asked``); recorded and logged with ``why``."""
        async with engine.lock:
            refusal = None
            if engine.state != EngineState.RUNNING or not engine.alive():
                refusal = ServeError(409, f"{engine.spec.name} is {engine.state}; only a running model can be "
                                          f"swapped out", code="invalid_state")
            elif engine.inflight:
                refusal = ServeError(409, f"{engine.spec.name} has {engine.inflight} request(s) in flight",
                                     code="busy")
            if refusal is not None:
                if asked:
                    raise refusal
                return None
            report = await engine.swap_out()
        server = engine.server.name
        self.on_change()
        self.history.record(server, "swap_out", report["bytes"], report["seconds"], model=engine.spec.name)
        self.metrics.operations.labels(engine.spec.name, server, "swap_out").observe(report["seconds"])
        log.info("swap out %s on %s %s: %d bytes in %.2f s", engine.spec.name, server, why, report["bytes"],
                 report["seconds"])
        return report
