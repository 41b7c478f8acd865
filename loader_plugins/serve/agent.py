"""``model-streamer agent``: the engines of one host, for a ``serve`` router on another.

A router whose catalogue names a server by ``url`` talks to that host's agent::

    servers:
      gpu-host-2: {url: "http://10.0.0.6:8700", api_key: "..."}

The agent starts and stops the engines there (``vllm serve --load-format streamer`` with the swap
worker extension, as the router does for its own host: :class:`~.engine.Engine`), each listening
on the agent's private address (``--engine-host``, default ``--host``, default 127.0.0.1), and
reports what placement needs from that host: its memory budget, its cache tiers and the
bandwidths its loads measured (:mod:`loader_plugins.cache.estimate`), and the load estimate of a
checkpoint through its own cache directories. Requests and swaps then go from the router to the
engine itself (vLLM's OpenAI and sleep/wake endpoints); nothing is proxied through the agent.

HTTP (FastAPI, as vLLM's own server; JSON; with ``--api-key`` every endpoint but ``/health``
needs ``Authorization: Bearer KEY``):

* ``GET /agent/info``: name, budget, cache directories, engine address, learned bandwidths, engines;
* ``POST /agent/estimate`` ``{"weights": URI, "loader": {...}}``: the load estimate on this host;
* ``GET /agent/engines``: the engines this agent runs (pid, address, port, log, timings);
* ``POST /agent/engines/start`` ``{"model", "checkpoint", "args", "env", "start_timeout",
  "weights", "loader", "extra_config"}``: start the model's engine, or return the running one
  started with the same request; answers when it answers ``/health``;
* ``POST /agent/engines/stop`` ``{"model"}``.

Engines outlive the agent's process only if it is killed; a stopped agent stops its engines.
An agent restarted on the same ``--log-dir`` takes over the engines in its ``engines.json``.
"""

from __future__ import annotations

import asyncio
import contextlib
import ipaddress
import json
import logging
import os
import socket
from pathlib import Path
from typing import Any

from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse

from ..errors import ConfigError
from .catalog import ModelSpec, ServerSpec, _args, _env, _loader, _seconds
from .engine import Engine, EngineError

log = logging.getLogger(__name__)

#: tiers whose bandwidth an agent reports
TIERS = ("dram", "disk", "s3", "local")


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
    unknown = sorted(set(body) - {"model", "checkpoint", "args", "env", "start_timeout", "weights", "loader",
                                  "extra_config"})
    if unknown:
        raise AgentError(400, f"{where}: unknown key(s) {unknown}")
    try:
        loader = _loader(where, body.get("loader"))
        extra = body.get("extra_config") or {}
        if not isinstance(extra, dict):
            raise ConfigError(f"{where}.extra_config must be a mapping")
        spec = ModelSpec(name=name, checkpoint=body["checkpoint"], args=_args(where, body.get("args")),
                         env=_env(where, body.get("env")), weights=body.get("weights") or None,
                         start_timeout=_seconds(f"{where}.start_timeout", body.get("start_timeout"), 600.0),
                         loader=loader)
    except ConfigError as exc:
        raise AgentError(400, str(exc)) from exc
    return spec, extra, body


class Agent:
    """The engines of this host and what it reports about itself."""

    def __init__(self, spec: ServerSpec, log_dir: Path, engine_host: str):
        self.spec = spec
        self.log_dir = log_dir
        self.engine_host = engine_host
        self.engines: dict[str, Engine] = {}
        self.requests: dict[str, dict] = {}     # model -> the start request its engine was started with
        self.locks: dict[str, asyncio.Lock] = {}
        self.state_path = log_dir / "engines.json"

    def _lock(self, name: str) -> asyncio.Lock:
        return self.locks.setdefault(name, asyncio.Lock())

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
                "engine_host": self.engine_host, "history": str(history.path), "bandwidths": bandwidths,
                "engines": self.describe()}

    def describe(self) -> list[dict[str, Any]]:
        return [self._describe(e) for e in self.engines.values() if e.alive()]

    @staticmethod
    def _describe(engine: Engine) -> dict[str, Any]:
        # the agent knows the process, not the swaps (the router drives those on the engine itself)
        out = engine.describe()
        out.pop("state", None)
        return {**out, "alive": engine.alive(), "pid": engine.proc.pid if engine.alive() else None,
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
            engine = Engine(spec, self.log_dir, self.spec, extra, host=self.engine_host)
            self.engines[spec.name], self.requests[spec.name] = engine, request
            try:
                await engine.start()
            except EngineError as exc:
                raise AgentError(503, str(exc)) from exc
            finally:
                self.save()
            log.info("started %s on %s:%s in %.2f s (load %s s)", spec.name, engine.host, engine.port,
                     engine.timings["start"], engine.timings.get("load"))
            return self._describe(engine)

    async def stop(self, body: Any) -> dict[str, Any]:
        name = body.get("model") if isinstance(body, dict) else None
        engine = self.engines.get(name) if isinstance(name, str) else None
        if engine is None:
            raise AgentError(404, f"no engine of {name!r} here; engines: {', '.join(self.engines) or 'none'}")
        async with self._lock(name):
            await engine.stop()
            self.save()
        return {"model": name, "stopped": True}

    def save(self) -> None:
        records = []
        for name, engine in self.engines.items():
            record = engine.record()
            if record is not None:
                records.append({**record, "host": engine.host, "request": self.requests.get(name)})
        self.state_path.parent.mkdir(parents=True, exist_ok=True)
        tmp = self.state_path.with_name(f"{self.state_path.name}.{os.getpid()}.tmp")
        tmp.write_text(json.dumps({"engines": records}, indent=1))
        os.replace(tmp, self.state_path)

    async def adopt(self) -> list[str]:
        """Take over the engines an earlier agent on this log directory left running."""
        try:
            records = json.loads(self.state_path.read_text()).get("engines", [])
        except (OSError, ValueError):
            return []
        found = []
        for record in records:
            try:
                spec, extra, request = _model_spec(record.get("request"))
            except AgentError:
                continue
            engine = Engine(spec, self.log_dir, self.spec, {**extra, **self.spec.loader_keys()},
                            host=record.get("host") or self.engine_host)
            if await engine.adopt(record):
                self.engines[spec.name], self.requests[spec.name] = engine, request
                found.append(f"{spec.name} (pid {record['pid']})")
        if found:
            log.info("found %d engine(s) again: %s", len(found), ", ".join(found))
        self.save()
        return found

    async def close(self) -> None:
        await asyncio.gather(*(e.stop() for e in self.engines.values()))
        self.save()


def create_agent_app(spec: ServerSpec, log_dir: Path, *, engine_host: str = "127.0.0.1",
                     api_key: str | None = None):
    """The agent's ASGI app (FastAPI, which vLLM installs)."""
    agent = Agent(spec, log_dir, engine_host)

    @contextlib.asynccontextmanager
    async def lifespan(_app):
        await agent.adopt()
        log.info("Agent %s: budget %d bytes, engines on %s, cache %s, log directory %s", spec.name, spec.budget,
                 engine_host, spec.loader_keys() or "none", log_dir)
        try:
            yield
        finally:
            await agent.close()

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

    @app.get("/agent/info")
    async def info():
        return await asyncio.to_thread(agent.info)

    @app.get("/agent/engines")
    async def engines():
        return {"engines": agent.describe()}

    @app.post("/agent/estimate")
    async def estimate(request: Request):
        return await asyncio.to_thread(agent.estimate, await body(request))

    @app.post("/agent/engines/start")
    async def start(request: Request):
        return await agent.start(await body(request))

    @app.post("/agent/engines/stop")
    async def stop(request: Request):
        return await agent.stop(await body(request))

    return app


def _is_loopback(host: str) -> bool:
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return host == "localhost"


def run_agent(*, name: str, host: str, port: int, engine_host: str | None, budget: int | None,
              cache_dir: str | None, dram_cache_dir: str | None, log_dir: Path, api_key: str | None) -> None:
    """Run an agent until interrupted (its engines are stopped on the way out)."""
    import uvicorn

    from .catalog import default_budget

    if not _is_loopback(host) and not api_key:
        raise ConfigError(f"the agent would listen on {host} without an API key: give --api-key (or "
                          f"$MODEL_STREAMER_AGENT_KEY), or listen on 127.0.0.1")
    spec = ServerSpec(name=name, budget=budget or default_budget(), cache_dir=cache_dir,
                      dram_cache_dir=dram_cache_dir)
    app = create_agent_app(spec, log_dir, engine_host=engine_host or host, api_key=api_key)
    uvicorn.run(app, host=host, port=port, log_level="info")
