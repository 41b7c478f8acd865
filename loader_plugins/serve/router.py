"""``model-streamer serve``: one OpenAI-compatible endpoint in front of on-demand vLLM engines.

A request names a model of the catalogue. If the model runs on a server, the request goes to
the engine there with the fewest requests in flight. Otherwise the model is placed
(:mod:`.placement`): the server with the smallest estimated startup gets it, swapped back in if
it is swapped out there, else started (``vllm serve`` with ``--load-format streamer``); either
first makes room under that server's budget by swapping out its least recently used idle
models. Concurrent requests for a model being placed, started or swapped in wait for that one
operation. A model idle for ``idle_timeout`` is swapped out; its engine process stays alive.
Every decision is logged with what it estimated and then measured. Live engines are written to
``LOG_DIR/engines.json``; a router restarted on that directory takes them over.

Endpoints: ``/v1/models``, ``/v1/completions``, ``/v1/chat/completions`` (streaming or not,
forwarded to the engine as they are), ``/metrics`` (Prometheus), ``/health``; admin:
``GET /admin/models``, ``GET /admin/placements``,
``POST /admin/models/{name}/swap_out|swap_in|start|migrate|stop[?server=S]``. Streaming
completions move between servers while they generate (:mod:`.migration`): on request
(``migrate``), and when a server must make room and the busy model runs elsewhere too. With an API key every
endpoint but ``/health`` needs ``Authorization: Bearer KEY``. Errors use OpenAI's format.
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
import dataclasses
import json
import logging
import os
import time
from pathlib import Path
from typing import Any

import httpx
from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse, Response, StreamingResponse

from ..cache.estimate import LoadHistory
from ..config import StreamerConfig
from .catalog import Catalog, ServerSpec
from .engine import RUNNING, STOPPED, SWAPPED, Engine, EngineError
from .migration import Flight, not_migratable
from .migration import relay as migration_relay
from .placement import ServerHistory, choose, estimate_server, ratio, victims
from .remote import Agent, RemoteEngine

log = logging.getLogger(__name__)

#: how long a request waits for memory held by busy models before it is refused (503)
ROOM_WAIT_S = 300.0
#: the latest moves of a model whose prefill rate estimates the next
RECENT_MOVES = 5
#: an engine that neither answers nor dies is given up on after this long (no request hangs forever)
READ_TIMEOUT_S = 600.0


class ServeError(Exception):
    """An error with its HTTP status and OpenAI error type."""

    def __init__(self, status: int, message: str, kind: str = "invalid_request_error", code: str | None = None,
                 param: str | None = None):
        super().__init__(message)
        self.status, self.kind, self.code, self.param = status, kind, code, param

    def body(self) -> dict:
        return {"error": {"message": str(self), "type": self.kind, "param": self.param, "code": self.code}}


class Metrics:
    """The router's Prometheus collectors, in a registry of its own."""

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

    def render(self, engines: list[Engine]) -> bytes:
        from prometheus_client import generate_latest

        for engine in engines:
            name, server = engine.spec.name, engine.server.name
            self.resident.labels(name, server).set(engine.resident_bytes)
            for state in ("stopped", "starting", "running", "swapping_out", "swapped", "swapping_in", "failed"):
                self.state.labels(name, server, state).set(1 if engine.state == state else 0)
        return generate_latest(self.registry)


class Server:
    """A place engines run: one engine per model (started on demand), a budget, what is under way.
    A server with a ``url`` is another host's agent (:mod:`.agent`): its engines are
    :class:`~.remote.RemoteEngine`; it takes part in placement once its agent has answered."""

    def __init__(self, spec: ServerSpec, catalog: Catalog, log_dir: Path):
        self.spec = spec
        kind = RemoteEngine if spec.url else Engine
        self.engines = {name: kind(model, log_dir, spec, catalog.extra_config(model, spec))
                        for name, model in catalog.models.items()}
        self.room = asyncio.Lock()
        self.underway: dict[int, float] = {}    # operation id -> when it is estimated to end
        self.agent: dict | None = None           # what the agent last reported (``GET /agent/info``)

    @property
    def connected(self) -> bool:
        return self.spec.url is None or self.agent is not None

    async def connect(self) -> bool:
        """Ask the agent for its budget, tiers and bandwidths (a server of this host: nothing to do)."""
        if self.spec.url is None:
            return True
        agent = Agent(self.spec.url, self.spec.api_key)
        try:
            info = await agent.call("GET", "/agent/info")
        except EngineError as exc:
            log.warning("server %s: %s; it is left out of placement until it answers", self.spec.name, exc)
            return False
        self.spec = dataclasses.replace(self.spec, budget=self.spec.budget or int(info["budget"]),
                                        cache_dir=info.get("cache_dir"), dram_cache_dir=info.get("dram_cache_dir"))
        for engine in self.engines.values():
            engine.server = self.spec
        self.agent = info
        log.info("server %s is the agent at %s (host %s): budget %d bytes, engines on %s, cache %s, bandwidths %s",
                 self.spec.name, self.spec.url, info.get("hostname"), self.spec.budget, info.get("engine_host"),
                 {k: info.get(k) for k in ("cache_dir", "dram_cache_dir") if info.get(k)} or "none",
                 {t: b["gbps"] for t, b in (info.get("bandwidths") or {}).items() if b.get("samples")} or "none yet")
        return True

    def queue_seconds(self, now: float) -> float:
        return max((end - now for end in self.underway.values()), default=0.0)


class Router:
    """Which engines run where, and the decisions that place, start, swap and evict them."""

    def __init__(self, catalog: Catalog, log_dir: Path):
        self.catalog = catalog
        self.servers = {name: Server(spec, catalog, log_dir) for name, spec in catalog.servers.items()}
        self.history = ServerHistory(LoadHistory(log_dir / "placement-history.json"))
        self.metrics = Metrics()
        self.decisions: collections.deque[dict] = collections.deque(maxlen=200)
        self._placing: dict[str, asyncio.Lock] = {name: asyncio.Lock() for name in catalog.models}
        self._reaper: asyncio.Task | None = None
        self.state_path = log_dir / "engines.json"
        self.flights: dict[int, set[Flight]] = {}      # id(engine) -> its migratable streams in flight
        self.migrations: collections.deque[dict] = collections.deque(maxlen=200)

    # ---- engines that outlive a router ----

    def save(self) -> None:
        """Write where every live engine is, so that a router restarted on this log directory
        finds them again (:meth:`adopt`)."""
        records = [r for r in (e.record() for e in self.engines) if r is not None]
        self.state_path.parent.mkdir(parents=True, exist_ok=True)
        tmp = self.state_path.with_name(f"{self.state_path.name}.{os.getpid()}.tmp")
        tmp.write_text(json.dumps({"engines": records}, indent=1))
        os.replace(tmp, self.state_path)

    async def adopt(self) -> list[str]:
        """Take over the engines a previous router on this log directory left running."""
        try:
            records = json.loads(self.state_path.read_text()).get("engines", [])
        except (OSError, ValueError):
            return []
        adopted = []
        for record in records:
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

    @property
    def engines(self) -> list[Engine]:
        return [e for server in self.servers.values() for e in server.engines.values()]

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
        live = [s.engines[name] for s in self.servers.values() if s.engines[name].state != STOPPED]
        if len(live) != 1:
            raise ServeError(409, f"{name} has an engine on {len(live)} servers: name one (?server=NAME)",
                             code="ambiguous", param="server")
        return live[0]

    async def acquire(self, name: Any, server: str | None = None) -> Engine:
        """A running engine of the model (on ``server`` when given, else one running already, else
        on the server :meth:`place` chooses); counted in flight until :meth:`release`."""
        name = self.check_model(name)
        if server is not None:
            return await self._hold(self.engine(name, server), None)
        running = self._running(name)
        if running:
            return await self._hold(running, None)
        async with self._placing[name]:   # one placement per model; later requests find it running
            running = self._running(name)
            if running:
                return await self._hold(running, None)
            decision = await self.place(name)
            chosen = self.servers[decision["chosen"]].engines[name]
            return await self._hold(chosen, decision)

    def _running(self, name: str, exclude: Engine | None = None) -> Engine | None:
        live = [s.engines[name] for s in self.servers.values()
                if s.engines[name].state == RUNNING and s.engines[name].alive() and s.engines[name] is not exclude]
        return min(live, key=lambda e: e.inflight) if live else None

    async def _hold(self, engine: Engine, decision: dict | None) -> Engine:
        engine.inflight += 1
        engine.last_used = time.monotonic()
        try:
            await self._ready(engine, decision)
        except BaseException:
            engine.inflight -= 1
            raise
        return engine

    def release(self, engine: Engine) -> None:
        engine.inflight -= 1
        engine.last_used = time.monotonic()

    # ---- live migration ----

    def busy_estimate(self, engine: Engine) -> tuple[float, str] | None:
        """Seconds until busy ``engine`` is idle, as :meth:`_make_room` would get it there: its
        streams moved to the model's engine on another server (when every request is a stream that
        can move, and a move of this model has been measured), else waited for (each stream's
        tokens left at its own decode rate). None when some request's end cannot be estimated."""
        flights = [f for f in self.flights.get(id(engine), set()) if f.target is None]
        if not flights or len(flights) != engine.inflight:
            return None
        target = self._running(engine.spec.name, exclude=engine)
        rate = self._catch_up_rate(engine.spec.name)
        if target is not None and rate is not None:
            tokens = sum(f.tokens for f in flights)
            return (tokens / rate[0], f"move {len(flights)} stream(s), {tokens} tokens, to {target.server.name} at "
                                      f"{rate[0]:.0f} tokens/s of prefill ({rate[1]} earlier move(s) of it)")
        left = [f.remaining_seconds() for f in flights]
        if any(s is None for s in left):
            return None
        return max(left), f"wait for {len(flights)} stream(s) to end at their own decode rates"

    def _catch_up_rate(self, model: str) -> tuple[float, int] | None:
        """Tokens per second the destinations of this model's latest moves prefilled (tokens sent
        over the time to the destination's first token), and how many moves that is."""
        moves = [m for m in self.migrations if m["model"] == model and m.get("catch_up_seconds")][-RECENT_MOVES:]
        seconds = sum(m["catch_up_seconds"] for m in moves)
        if not moves or seconds <= 0:
            return None
        return sum(m["prompt_tokens"] + m["tokens_moved"] for m in moves) / seconds, len(moves)

    def finish(self, flight: Flight | None, engine: Engine) -> None:
        """A request ended: release the engine that served it last."""
        if flight is None:
            self.release(engine)
            return
        self.flights.get(id(flight.engine), set()).discard(flight)
        if flight.target is not None and not flight.moved.is_set():   # a move still pending: never happens
            self.abandoned(flight, "the request ended")
        self.release(flight.engine)

    def switched(self, flight: Flight, report: dict) -> None:
        source, target = flight.engine, flight.target
        self.flights.get(id(source), set()).discard(flight)
        self.flights.setdefault(id(target), set()).add(flight)
        flight.engine, flight.target = target, None
        self.release(source)                  # the target counted the flight when the move was asked
        flight.report = report
        self.migrations.append({"model": source.spec.name, "at": time.time(), **report})
        self.metrics.operations.labels(source.spec.name, report["from"], "migrate").observe(
            report["catch_up_seconds"])
        log.info("migrated a request of %s from %s to %s: %d prompt + %d generated tokens sent, caught up in "
                 "%.3f s (%d token(s) the source produced meanwhile not repeated)", source.spec.name, report["from"],
                 report["to"], report["prompt_tokens"], report["tokens_moved"], report["catch_up_seconds"],
                 report["repeated"])
        flight.moved.set()

    def abandoned(self, flight: Flight, reason: str) -> None:
        target = flight.target
        if target is not None:
            flight.target = None
            self.release(target)
        flight.report = {"abandoned": reason}
        log.info("a move of a %s request from %s was given up: %s", flight.engine.spec.name,
                 flight.engine.server.name, reason)
        flight.moved.set()

    async def migrate(self, name: str, server: str | None = None, *, timeout: float = 300.0) -> dict:
        """Move the in-flight streaming completions of model ``name`` on ``server`` to an engine of
        the model running on another server (placed there first if none runs)."""
        source = self.engine(name, server)
        flights = [f for f in self.flights.get(id(source), set()) if f.target is None]
        stays = source.inflight - len(flights)
        if not flights:
            return {"moved": [], "stays": stays}
        target = self._running(name, exclude=source)
        if target is None:
            decision = await self.place(name, exclude={source.server.name})
            target = await self._hold(self.servers[decision["chosen"]].engines[name], decision)
            self.release(target)
        return {"moved": await self._move(flights, target, timeout), "stays": stays}

    async def _move(self, flights: list[Flight], target: Engine, timeout: float) -> list[dict]:
        for flight in flights:
            target.inflight += 1
            flight.moved.clear()
            flight.move(target)
        try:
            await asyncio.wait_for(asyncio.gather(*(f.moved.wait() for f in flights)), timeout)
        except asyncio.TimeoutError:
            for f in flights:
                if not f.moved.is_set():
                    self.abandoned(f, f"no switch within {timeout:.0f} s")
        return [f.report or {} for f in flights]

    # ---- placement ----

    async def place(self, name: str, exclude: set[str] = frozenset()) -> dict:
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
            if not (engine.alive() and engine.state in (RUNNING, SWAPPED)):
                try:
                    load = await self._load_estimate(engine)
                except EngineError as exc:
                    log.warning("place %s: no estimate from %s (%s); left out", name, server.spec.name, exc)
                    unreachable.append(server.spec.name)
                    continue
                if not engine.measured and load["bytes"] > 0:
                    engine.resident_bytes = load["bytes"]   # the checkpoint's size until a swap measures it
            estimates.append(estimate_server(server.spec.name, engine, list(server.engines.values()),
                                             server.spec.budget, self.history, load=load,
                                             queue_s=server.queue_seconds(now), now=now,
                                             busy=self.busy_estimate))
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

    async def _load_estimate(self, engine: Engine) -> dict:
        """The model's load estimate through that server's tiers: asked of its agent for another
        host, computed here (:func:`~loader_plugins.cache.estimate.estimate`) for this one."""
        if isinstance(engine, RemoteEngine):
            return await engine.estimate()
        from ..cache.estimate import estimate

        extra = {k: v for k, v in engine.extra_config.items() if k not in ("weights_uri", "in_place")}
        return await asyncio.to_thread(estimate, engine.spec.weights_location,
                                       StreamerConfig.from_dict(extra, where="serve"))

    # ---- bringing an engine up ----

    async def _ready(self, engine: Engine, decision: dict | None) -> None:
        if engine.state == RUNNING and engine.alive():
            return
        async with engine.lock:   # later waiters find it running
            if engine.state == RUNNING and engine.alive():
                return
            name, server = engine.spec.name, self.servers[engine.server.name]
            if not server.connected and not await server.connect():
                raise ServeError(503, f"the agent of server {server.spec.name} ({server.spec.url}) does not answer",
                                 kind="server_error", code="engine_unavailable")
            op = id(engine)
            server.underway[op] = time.monotonic() + (decision["estimated_seconds"] if decision else 0.0)
            t0 = time.monotonic()
            try:
                if engine.state == SWAPPED and engine.alive():
                    freed = await self._make_room(engine)
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
                    freed = await self._make_room(engine)
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
                self.save()
            if decision is not None:
                measured = time.monotonic() - t0
                decision["measured_seconds"] = round(measured, 4)
                decision["ratio"] = ratio(measured, decision["estimated_seconds"])
                log.info("place %s on %s: measured %.2f s, estimated %.2f s (%sx)", name, server.spec.name,
                         measured, decision["estimated_seconds"], decision["ratio"])

    async def _make_room(self, engine: Engine) -> str:
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
                if not idle and await self._migrate_away(busy, engine):
                    continue
                if not idle:
                    if time.monotonic() > deadline:
                        raise ServeError(503, f"no memory for {engine.spec.name} on {server.spec.name}: the models "
                                              f"holding it are all busy ({', '.join(e.spec.name for e in busy)})",
                                         kind="server_error", code="no_capacity")
                    await asyncio.sleep(0.2)
                    continue
                victim = idle[0]
                async with victim.lock:
                    if victim.state != RUNNING or victim.inflight:
                        continue
                    report = await victim.swap_out()
                self._swapped_out(victim, report, f"to make room for {engine.spec.name}")
                evicted.append(f"{victim.spec.name} ({report['bytes']} bytes in {report['seconds']:.2f} s)")
        return f"; swapped out {', '.join(evicted)}" if evicted else ""

    async def _migrate_away(self, busy: list[Engine], engine: Engine) -> bool:
        """Make one busy model idle by moving its streams to its engine on another server (only
        when every request it serves can move, and it runs elsewhere). True if one moved."""
        for victim in busy:
            flights = [f for f in self.flights.get(id(victim), set()) if f.target is None]
            target = self._running(victim.spec.name, exclude=victim)
            if target is None or not flights or len(flights) != victim.inflight:
                continue
            log.info("moving %d request(s) of %s off %s to make room for %s", len(flights), victim.spec.name,
                     victim.server.name, engine.spec.name)
            reports = await self._move(flights, target, ROOM_WAIT_S)
            if any("abandoned" not in r for r in reports):
                return True
        return False

    def _swapped_out(self, engine: Engine, report: dict, why: str) -> None:
        server = engine.server.name
        self.save()
        self.history.record(server, "swap_out", report["bytes"], report["seconds"], model=engine.spec.name)
        self.metrics.operations.labels(engine.spec.name, server, "swap_out").observe(report["seconds"])
        log.info("swap out %s on %s %s: %d bytes in %.2f s", engine.spec.name, server, why, report["bytes"],
                 report["seconds"])

    async def swap_out(self, name: str, server: str | None = None) -> dict:
        engine = self.engine(name, server)
        async with engine.lock:
            if engine.state != RUNNING or not engine.alive():
                raise ServeError(409, f"{name} is {engine.state}; only a running model can be swapped out",
                                 code="invalid_state")
            if engine.inflight:
                raise ServeError(409, f"{name} has {engine.inflight} request(s) in flight", code="busy")
            report = await engine.swap_out()
        self._swapped_out(engine, report, "(asked)")
        return report

    # ---- idle models ----

    def start_reaper(self) -> None:
        self._reaper = asyncio.get_running_loop().create_task(self._reap())

    async def _reap(self) -> None:
        period = min(1.0, self.catalog.idle_timeout / 4)
        while True:
            await asyncio.sleep(period)
            now = time.monotonic()
            for engine in self.engines:
                if engine.state != RUNNING or engine.inflight or now - engine.last_used < self.catalog.idle_timeout:
                    continue
                try:
                    async with engine.lock:
                        if engine.state != RUNNING or engine.inflight or not engine.alive():
                            continue
                        report = await engine.swap_out()
                    self._swapped_out(engine, report, f"after {now - engine.last_used:.0f} s idle")
                except EngineError:
                    log.exception("idle swap-out of %s on %s failed; its engine is now %s", engine.spec.name,
                                  engine.server.name, engine.state)

    async def close(self) -> None:
        if self._reaper is not None:
            self._reaper.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._reaper
        await asyncio.gather(*(e.stop() for e in self.engines))
        self.save()


def create_app(catalog: Catalog, log_dir: Path, *, api_key: str | None = None):
    """The ASGI app (FastAPI, which vLLM installs)."""
    router = Router(catalog, log_dir)
    key = api_key or catalog.api_key
    client = httpx.AsyncClient(timeout=httpx.Timeout(READ_TIMEOUT_S, connect=10.0))

    @contextlib.asynccontextmanager
    async def lifespan(_app):
        await asyncio.gather(*(s.connect() for s in router.servers.values()))
        await router.adopt()
        router.start_reaper()
        log.info("Serving %d model(s) on %s, idle timeout %.0f s: %s", len(catalog.models),
                 ", ".join(f"{s.name} (budget {s.budget} bytes)" for s in catalog.servers.values()),
                 catalog.idle_timeout, ", ".join(catalog.models))
        try:
            yield
        finally:
            await router.close()
            await client.aclose()

    app = FastAPI(title="model-streamer serve", lifespan=lifespan)
    app.state.router = router

    def error(exc: ServeError) -> JSONResponse:
        return JSONResponse(exc.body(), status_code=exc.status)

    @app.middleware("http")
    async def authorize(request: Request, call_next):
        if key and request.url.path != "/health":
            if request.headers.get("authorization", "") != f"Bearer {key}":
                return error(ServeError(401, "Invalid or missing API key (Authorization: Bearer KEY)",
                                        code="invalid_api_key"))
        return await call_next(request)

    @app.get("/health")
    async def health():
        return {"status": "ok"}

    @app.get("/v1/models")
    async def models():
        return {"object": "list", "data": [
            {"id": name, "object": "model", "owned_by": "model-streamer",
             "servers": {s.spec.name: s.engines[name].state for s in router.servers.values()}}
            for name in catalog.models]}

    @app.get("/metrics")
    async def metrics():
        from prometheus_client import CONTENT_TYPE_LATEST

        return Response(router.metrics.render(router.engines), media_type=CONTENT_TYPE_LATEST)

    @app.get("/admin/models")
    async def admin_models():
        return {"idle_timeout": catalog.idle_timeout,
                "servers": {s.spec.name: {"budget": s.spec.budget, "cache_dir": s.spec.cache_dir,
                                          "dram_cache_dir": s.spec.dram_cache_dir, "url": s.spec.url,
                                          "connected": s.connected,
                                          "bandwidths": (s.agent or {}).get("bandwidths")}
                            for s in router.servers.values()},
                "models": [e.describe() for e in router.engines]}

    @app.get("/admin/placements")
    async def admin_placements():
        return {"placements": list(router.decisions), "migrations": list(router.migrations)}

    @app.post("/admin/models/{name:path}/{op}")
    async def admin_op(name: str, op: str, server: str | None = None):
        try:
            if op == "swap_out":
                return await router.swap_out(name, server)
            if op in ("swap_in", "start"):   # running on ``server``, or where placement puts it
                engine = await router.acquire(name, server)
                router.release(engine)
                return engine.describe()
            if op == "migrate":   # move its streams in flight on ``server`` to another server
                return await router.migrate(name, server)
            if op == "stop":
                engine = router.engine(name, server)
                async with engine.lock:
                    await engine.stop()
                router.save()
                return engine.describe()
            raise ServeError(404, f"unknown operation {op!r}: swap_out, swap_in, start, migrate or stop",
                             code="unknown_operation")
        except ServeError as exc:
            return error(exc)

    async def forward(request: Request, path: str):
        try:
            body = await request.json()
        except ValueError:
            return error(ServeError(400, "the request body is not JSON"))
        if not isinstance(body, dict):
            return error(ServeError(400, "the request body must be a JSON object"))
        name = body.get("model")
        for attempt in (1, 2):
            try:
                engine = await router.acquire(name)
            except ServeError as exc:
                router.metrics.requests.labels(str(name)[:64], f"http_{exc.status}").inc()
                return error(exc)
            if attempt == 1 and not await engine.answers():
                # its process died a moment ago (nothing was sent yet): the next acquire starts a new one
                router.release(engine)
                log.warning("the engine of %s on %s does not answer and its process %s; placing it again", name,
                            engine.server.name, "exited" if not engine.alive() else "is still there")
                if not engine.alive():
                    continue
                engine = await router.acquire(name)
            flight = None
            if body.get("stream") and path == "/v1/completions" and not_migratable(body) is None:
                flight = Flight(body, engine)
                router.flights.setdefault(id(engine), set()).add(flight)
            url = engine.base_url + path
            try:
                if body.get("stream"):
                    sent = flight.upstream_body() if flight is not None else body
                    upstream = await client.send(client.build_request("POST", url, json=sent), stream=True)
                else:
                    upstream = await client.post(url, json=body)
                break
            except httpx.TransportError as exc:
                router.finish(flight, engine)
                # A killed engine's port still accepts connections while the kernel tears the
                # process down (its memory goes before its sockets): if the process is gone now,
                # nothing was answered and a new engine is placed for the request.
                if attempt == 1 and await engine.exited():
                    log.warning("the engine of %s on %s exited as the request went out (%r); placing it again",
                                name, engine.server.name, exc)
                    continue
                router.metrics.requests.labels(name, "engine_error").inc()
                return error(ServeError(502, f"the engine of {name} failed this request ({exc!r}); see "
                                        f"{engine.log_path}", kind="server_error", code="engine_error"))
        if not body.get("stream"):
            router.release(engine)
            router.metrics.requests.labels(name, f"http_{upstream.status_code}").inc()
            return Response(upstream.content, status_code=upstream.status_code,
                            media_type=upstream.headers.get("content-type"))
        if upstream.status_code != 200 and flight is not None:   # refused: relay the error as it is
            router.flights.get(id(engine), set()).discard(flight)
            flight = None

        async def relay():
            outcome = f"http_{upstream.status_code}"
            try:
                if flight is not None:
                    async for chunk in migration_relay(flight, client, upstream, on_switch=router.switched,
                                                       on_abandon=router.abandoned):
                        yield chunk
                else:
                    async for chunk in upstream.aiter_raw():
                        yield chunk
            except httpx.TransportError as exc:   # the engine died mid-stream: say so, then end the stream
                outcome = "engine_error"
                failure = ServeError(502, f"the engine of {name} failed mid-stream ({exc!r})", kind="server_error",
                                     code="engine_error")
                yield f"data: {json.dumps(failure.body())}\n\n".encode()
            finally:
                await upstream.aclose()
                router.finish(flight, engine)
                router.metrics.requests.labels(name, outcome).inc()

        return StreamingResponse(relay(), status_code=upstream.status_code,
                                 media_type=upstream.headers.get("content-type", "text/event-stream"))

    @app.post("/v1/completions")
    async def completions(request: Request):
        return await forward(request, "/v1/completions")

    @app.post("/v1/chat/completions")
    async def chat_completions(request: Request):
        return await forward(request, "/v1/chat/completions")

    return app


def serve(catalog: Catalog, *, host: str, port: int, log_dir: Path, api_key: str | None = None) -> None:
    """Run the router until interrupted (engines are stopped on the way out)."""
    import uvicorn

    uvicorn.run(create_app(catalog, log_dir, api_key=api_key), host=host, port=port, log_level="info")
