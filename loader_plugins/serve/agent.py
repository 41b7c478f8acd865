"""``model-streamer agent``: the engines of one host, for a ``serve`` router on another.

A router whose catalogue names a server by ``url`` talks to that host's agent::

    servers:
      gpu-host-2: {url: "http://10.0.0.6:8700", api_key: "..."}

The agent starts and stops the engines there (``vllm serve --load-format streamer`` with the swap
worker extension, as the router does for its own host: :class:`~.local.LocalEngine`), swaps
them out and in, and reports what placement needs from that host: its memory budget, its cache
tiers and the bandwidths its loads measured (:mod:`loader_plugins.cache.estimate`), and the load
estimate of a checkpoint through its own cache directories. Its engines listen on this host's
127.0.0.1 with a secret of their own (:mod:`.guard`): the agent is their only door from other
hosts, and relays the router's OpenAI requests to them (``/agent/v1/...``, streamed as they come).

HTTP (FastAPI, as vLLM's own server; JSON; with ``--api-key`` every endpoint but ``/health``
needs ``Authorization: Bearer KEY``):

* ``GET /agent/info``: name, budget, cache directories, learned bandwidths, engines;
* ``POST /agent/estimate`` ``{"weights": URI, "loader": {...}}``: the load estimate on this host;
* ``GET /agent/engines``: the engines this agent runs (pid, port, state, log, timings);
* ``POST /agent/engines/start`` ``{"model", "checkpoint", "args", "env", "start_timeout",
  "weights", "loader", "extra_config"}``: start the model's engine, or return the running one
  started with the same request; answers when it answers ``/health``;
* ``POST /agent/engines/stop|swap_out|swap_in`` ``{"model"}``;
* ``POST /agent/engines/check`` ``{"model", "grace"}``: whether its process lives and it answers;
* ``POST /agent/v1/...``: an OpenAI request, to the engine of the model its body names.

Engines outlive the agent's process only if it is killed; a stopped agent stops its engines.
An agent restarted on the same ``--log-dir`` takes over the engines in its ``engines.json``.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import socket
from pathlib import Path
from typing import Any

import anyio
import httpx
from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse, StreamingResponse

from ..errors import ConfigError
from .catalog import ModelSpec, ServerSpec, parse_model
from .engine import EngineError, EngineState
from .local import LocalEngine
from .process import LOOPBACK, is_loopback
from .records import FILE_NAME, EngineRecords

log = logging.getLogger(__name__)

#: tiers whose bandwidth an agent reports
TIERS = ("dram", "disk", "s3", "local")
#: keys of a start request
_START_KEYS = ("model", "checkpoint", "args", "env", "start_timeout", "weights", "loader", "extra_config")
#: an engine that neither answers nor dies is given up on after this long (as the router does)
READ_TIMEOUT_S = 600.0


class AgentError(Exception):
    def __init__(self, status: int, message: str):
        super().__init__(message)
        self.status = status


def _model_spec(body: Any) -> tuple[ModelSpec, dict[str, Any], dict[str, Any]]:
    """The model, its extra config and the request as posted, validated as the catalogue
    validates a model (reserved flags, loader keys): an agent never runs an engine on an address
    or with options the catalogue would refuse."""
    if not isinstance(body, dict) or not isinstance(body.get("model"), str) or not body["model"].strip() \
            or not isinstance(body.get("checkpoint"), str):
        raise AgentError(400, "the start request needs 'model' and 'checkpoint' strings")
    name = body["model"]
    where = f"start request for {name}"
    unknown = sorted(set(body) - set(_START_KEYS))
    if unknown:
        raise AgentError(400, f"{where}: unknown key(s) {unknown}")
    entry = {k: body[k] for k in ("checkpoint", "args", "env", "start_timeout", "weights", "loader")
             if body.get(k) is not None}
    try:
        extra = body.get("extra_config") or {}
        if not isinstance(extra, dict):
            raise ConfigError(f"{where}.extra_config must be a mapping")
        spec = parse_model(where, name, entry)
    except ConfigError as exc:
        raise AgentError(400, str(exc)) from exc
    return spec, extra, body


class HostAgent:
    """The engines of this host and what it reports about itself."""

    def __init__(self, spec: ServerSpec, log_dir: Path):
        self.spec = spec
        self.log_dir = log_dir
        self.engines: dict[str, LocalEngine] = {}
        self.requests: dict[str, dict] = {}     # model -> the start request its engine was started with
        self.locks: dict[str, asyncio.Lock] = {}
        self.records = EngineRecords(log_dir / FILE_NAME)

    def _lock(self, name: str) -> asyncio.Lock:
        return self.locks.setdefault(name, asyncio.Lock())

    # ---- what a kind of host adds (a Ray node: engines tied to it, GPUs held for them) ----

    def _new_engine(self, spec: ModelSpec, extra: dict[str, Any]) -> LocalEngine:
        return LocalEngine(spec, self.log_dir, self.spec, extra)

    async def _prepare(self, engine: LocalEngine) -> None:
        """Before ``engine`` starts."""

    async def _released(self, engine: LocalEngine) -> None:
        """After ``engine`` stopped, or failed to start."""

    def _engine(self, body: Any) -> LocalEngine:
        name = body.get("model") if isinstance(body, dict) else None
        engine = self.engines.get(name) if isinstance(name, str) else None
        if engine is None:
            raise AgentError(404, f"no engine of {name!r} here; engines: {', '.join(self.engines) or 'none'}")
        return engine

    def history(self):
        from ..cache.estimate import LoadHistory, history_path
        from ..config import StreamerConfig

        return LoadHistory(history_path(StreamerConfig.from_dict(self.spec.loader_keys(), where="agent")))

    def info(self) -> dict[str, Any]:
        from ..cache.estimate import bandwidth

        history = self.history()
        bandwidths = {}
        for tier in TIERS:
            gbps, basis, n = bandwidth(tier, 0, history)
            bandwidths[tier] = {"gbps": round(gbps, 4), "samples": n, "basis": basis}
        return {"server": self.spec.name, "hostname": socket.gethostname(), "budget": self.spec.budget,
                "cache_dir": self.spec.cache_dir, "dram_cache_dir": self.spec.dram_cache_dir,
                "engine_host": LOOPBACK, "history": str(history.path), "bandwidths": bandwidths,
                "engines": self.describe()}

    def describe(self) -> list[dict[str, Any]]:
        return [self._describe(e) for e in self.engines.values() if e.alive()]

    @staticmethod
    def _describe(engine: LocalEngine) -> dict[str, Any]:
        return {**engine.describe(), "alive": engine.alive(), "pid": engine.proc.pid if engine.alive() else None,
                "returncode": engine.proc.poll() if engine.proc is not None else None}

    def estimate(self, body: Any) -> dict[str, Any]:
        from ..cache.estimate import estimate
        from ..config import StreamerConfig

        if not isinstance(body, dict) or not isinstance(body.get("weights"), str):
            raise AgentError(400, "the estimate request needs 'weights' (a path or s3:// URI)")
        loader = body.get("loader") or {}
        if not isinstance(loader, dict):
            raise AgentError(400, "'loader' must map --model-loader-extra-config keys to values")
        keys = {k: v for k, v in loader.items() if k not in ("weights_uri", "in_place", "cache_dir", "dram_cache_dir")}
        try:
            config = StreamerConfig.from_dict({**keys, **self.spec.loader_keys()}, where="estimate request")
        except ConfigError as exc:
            raise AgentError(400, str(exc)) from exc
        return estimate(body["weights"], config)

    async def start(self, body: Any) -> dict[str, Any]:
        spec, extra, request = _model_spec(body)
        async with self._lock(spec.name):
            engine = self.engines.get(spec.name)
            if engine is not None and engine.alive():
                if self.requests.get(spec.name) == request:
                    return self._describe(engine)
                raise AgentError(409, f"{spec.name} already runs here (pid {engine.proc.pid}) with another "
                                      f"configuration; stop it first")
            extra = {**{k: v for k, v in extra.items() if k not in ("cache_dir", "dram_cache_dir")},
                     **self.spec.loader_keys()}
            engine = self._new_engine(spec, extra)
            self.engines[spec.name], self.requests[spec.name] = engine, request
            try:
                await self._prepare(engine)
                await engine.start()
            except EngineError as exc:
                await self._released(engine)
                raise AgentError(503, str(exc)) from exc
            except BaseException:
                await self._released(engine)
                raise
            finally:
                self.save()
            log.info("started %s on %s:%s in %.2f s (load %s s)", spec.name, engine.host, engine.port,
                     engine.timings["start"], engine.timings.get("load"))
            return self._describe(engine)

    async def stop(self, body: Any) -> dict[str, Any]:
        engine = self._engine(body)
        async with self._lock(engine.spec.name):
            await engine.stop()
            await self._released(engine)
            self.save()
        return {"model": engine.spec.name, "stopped": True}

    async def swap_out(self, body: Any) -> dict[str, Any]:
        engine = self._engine(body)
        async with self._lock(engine.spec.name):
            self._expect(engine, EngineState.RUNNING)
            try:
                report = await engine.swap_out()
            except EngineError as exc:
                raise AgentError(503, str(exc)) from exc
        log.info("swapped out %s: %d bytes in %.2f s", engine.spec.name, report["bytes"], report["seconds"])
        return report

    async def swap_in(self, body: Any) -> dict[str, Any]:
        engine = self._engine(body)
        async with self._lock(engine.spec.name):
            self._expect(engine, EngineState.SWAPPED)
            try:
                seconds = await engine.swap_in()
            except EngineError as exc:
                raise AgentError(503, str(exc)) from exc
        log.info("swapped in %s in %.2f s", engine.spec.name, seconds)
        return {"seconds": seconds}

    @staticmethod
    def _expect(engine: LocalEngine, state: EngineState) -> None:
        if engine.state != state or not engine.alive():
            raise AgentError(409, f"{engine.spec.name} is {engine.state} here, not {state}")

    async def check(self, body: Any) -> dict[str, Any]:
        """Whether the model's engine lives and answers (an unknown model: it does not live)."""
        try:
            engine = self._engine(body)
        except AgentError:
            return {"alive": False, "answers": False}
        grace = body.get("grace", 5.0)
        grace = float(grace) if isinstance(grace, (int, float)) and 0 <= grace <= 60 else 5.0
        answers = engine.alive() and await engine.answers(grace)
        return {**self._describe(engine), "answers": answers}

    def running(self, model: Any) -> LocalEngine:
        """The engine a relayed OpenAI request goes to."""
        engine = self._engine({"model": model})
        if not engine.alive():
            raise AgentError(503, f"the engine of {model} here has exited; see {engine.log_path}")
        return engine

    def save(self) -> None:
        self.records.save({**record, "host": engine.host, "request": self.requests.get(name)}
                          for name, engine in self.engines.items() if (record := engine.record()) is not None)

    async def adopt(self) -> list[str]:
        """Take over the engines an earlier agent on this log directory left running."""
        found = []
        for record in self.records.load():
            try:
                spec, extra, request = _model_spec(record.get("request"))
            except AgentError:
                continue
            if not is_loopback(record.get("host") or LOOPBACK):
                log.warning("the engine of %s (pid %s) listens on %s, not on 127.0.0.1: it is left alone; stop it",
                            spec.name, record.get("pid"), record.get("host"))
                continue
            engine = self._new_engine(spec, {**extra, **self.spec.loader_keys()})
            if await engine.adopt(record):
                self.engines[spec.name], self.requests[spec.name] = engine, request
                found.append(f"{spec.name} (pid {record['pid']})")
        if found:
            log.info("found %d engine(s) again: %s", len(found), ", ".join(found))
        self.save()
        return found

    async def close(self) -> None:
        await asyncio.gather(*(e.stop() for e in self.engines.values()))
        for engine in self.engines.values():
            await self._released(engine)
        self.save()


def create_agent_app(spec: ServerSpec, log_dir: Path, *, engine_host: str = LOOPBACK, api_key: str | None = None,
                     agent: HostAgent | None = None):
    """The agent's ASGI app (FastAPI, which vLLM installs). Engines listen on 127.0.0.1 only:
    ``engine_host`` is accepted for the command line's sake and must be a loopback address.
    ``agent``: engines held and driven by another owner (a Ray node actor, :mod:`.ray_node`);
    the app is then only their relay, ``/health`` and ``/agent/v1/...``."""
    _check_engine_host(engine_host)
    owned = agent is None
    agent = agent or HostAgent(spec, log_dir)
    client = httpx.AsyncClient(timeout=httpx.Timeout(READ_TIMEOUT_S, connect=10.0))

    @contextlib.asynccontextmanager
    async def lifespan(_app):
        if owned:
            await agent.adopt()
            log.info("Agent %s: budget %d bytes, engines on %s, cache %s, log directory %s", spec.name, spec.budget,
                     LOOPBACK, spec.loader_keys() or "none", log_dir)
        try:
            yield
        finally:
            if owned:
                await agent.close()
            await client.aclose()

    app = FastAPI(title="model-streamer agent", lifespan=lifespan)
    app.state.agent = agent

    def error(status: int, message: str) -> JSONResponse:
        return JSONResponse({"error": {"message": message, "type": "agent_error", "code": status}}, status_code=status)

    @app.middleware("http")
    async def authorize(request: Request, call_next):
        if api_key and request.url.path != "/health" \
                and request.headers.get("authorization", "") != f"Bearer {api_key}":
            return error(401, "Invalid or missing API key (Authorization: Bearer KEY)")
        return await call_next(request)

    async def body(request: Request) -> Any:
        try:
            return await request.json()
        except ValueError as exc:
            raise AgentError(400, "the request body is not JSON") from exc

    @app.exception_handler(AgentError)
    async def agent_error(_request: Request, exc: AgentError):
        return error(exc.status, str(exc))

    @app.get("/health")
    async def health():
        return {"status": "ok"}

    if owned:
        _add_operations(app, agent, body)

    @app.post("/agent/v1/{path:path}")
    async def relay(path: str, request: Request):
        raw = await request.body()
        try:
            model = json.loads(raw).get("model")
        except (ValueError, AttributeError) as exc:
            raise AgentError(400, "the request body must be a JSON object naming the model") from exc
        return await _relay(client, agent.running(model), f"/v1/{path}", raw)

    return app


def _add_operations(app: FastAPI, agent: HostAgent, body) -> None:
    """The endpoints a router drives an agent's engines through."""

    @app.get("/agent/info")
    async def info():
        return await asyncio.to_thread(agent.info)

    @app.get("/agent/engines")
    async def engines():
        return {"engines": agent.describe()}

    @app.post("/agent/estimate")
    async def estimate(request: Request):
        return await asyncio.to_thread(agent.estimate, await body(request))

    operations = {"start": agent.start, "stop": agent.stop, "swap_out": agent.swap_out, "swap_in": agent.swap_in,
                  "check": agent.check}

    @app.post("/agent/engines/{op}")
    async def operation(op: str, request: Request):
        if op not in operations:
            raise AgentError(404, f"unknown operation {op!r}: {', '.join(operations)}")
        return await operations[op](await body(request))


async def _relay(client: httpx.AsyncClient, engine: LocalEngine, path: str, raw: bytes) -> StreamingResponse:
    """``raw`` posted to ``engine`` with its secret; its answer streamed back as it comes. An
    engine that fails mid-answer fails the relayed answer too (the connection is cut)."""
    request = client.build_request("POST", engine.base_url + path, content=raw,
                                   headers={**engine.headers, "content-type": "application/json"})
    try:
        upstream = await client.send(request, stream=True)
    except httpx.TransportError as exc:
        raise AgentError(502, f"the engine of {engine.spec.name} did not answer POST {path} ({exc!r}); "
                              f"see {engine.log_path}") from exc

    async def chunks():
        try:
            async for chunk in upstream.aiter_raw():
                yield chunk
        finally:       # the caller went away, or the engine did: vLLM aborts a request whose connection closes
            with anyio.CancelScope(shield=True):
                await upstream.aclose()

    return StreamingResponse(chunks(), status_code=upstream.status_code,
                             media_type=upstream.headers.get("content-type"))


def _check_engine_host(engine_host: str | None) -> None:
    if engine_host is not None and not is_loopback(engine_host):
        raise ConfigError(f"--engine-host {engine_host}: engines listen on 127.0.0.1 only (their dev-mode endpoints "
                          f"must not be reachable from other hosts); the agent relays the router's requests to them. "
                          f"Leave --engine-host out")


def run_agent(*, name: str, host: str, port: int, engine_host: str | None, budget: int | None,
              cache_dir: str | None, dram_cache_dir: str | None, log_dir: Path, api_key: str | None) -> None:
    """Run an agent until interrupted (its engines are stopped on the way out)."""
    import uvicorn

    from .catalog import default_budget

    if not is_loopback(host) and not api_key:
        raise ConfigError(f"the agent would listen on {host} without an API key: give --api-key (or "
                          f"$MODEL_STREAMER_AGENT_KEY), or listen on 127.0.0.1")
    _check_engine_host(engine_host)
    spec = ServerSpec(name=name, budget=budget or default_budget(), cache_dir=cache_dir,
                      dram_cache_dir=dram_cache_dir)
    app = create_agent_app(spec, log_dir, api_key=api_key)
    uvicorn.run(app, host=host, port=port, log_level="info")
