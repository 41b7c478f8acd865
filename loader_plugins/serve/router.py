"""``model-streamer serve``: one OpenAI-compatible endpoint in front of on-demand vLLM engines.

A request names a model of the catalogue. A model without an engine gets one (``vllm serve``
with ``--load-format streamer``); a swapped-out one is swapped back in; either first makes room
under the memory budget by swapping out the least recently used idle models. Concurrent requests
for a model being started or swapped in wait for that one operation. A model idle for
``idle_timeout`` is swapped out; its engine process stays alive. Every decision is logged with
what it measured.

Endpoints: ``/v1/models``, ``/v1/completions``, ``/v1/chat/completions`` (streaming or not,
forwarded to the engine as they are), ``/metrics`` (Prometheus), ``/health``; admin:
``GET /admin/models``, ``POST /admin/models/{name}/swap_out|swap_in|stop``. With an API key
every endpoint but ``/health`` needs ``Authorization: Bearer KEY``. Errors use OpenAI's format.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import time
from pathlib import Path
from typing import Any

import httpx
from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse, Response, StreamingResponse

from .catalog import Catalog
from .engine import RUNNING, SWAPPED, Engine, EngineError

log = logging.getLogger(__name__)

#: how long a request waits for memory held by busy models before it is refused (503)
ROOM_WAIT_S = 300.0
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
                                    ["model", "op"], registry=self.registry,
                                    buckets=(0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 120, 300))
        self.resident = Gauge("streamer_serve_resident_bytes", "Bytes a model holds while running (as a swap "
                              "moves them)", ["model"], registry=self.registry)
        self.state = Gauge("streamer_serve_engine_state", "1 for the state each model's engine is in",
                           ["model", "state"], registry=self.registry)

    def render(self, engines: dict[str, Engine]) -> bytes:
        from prometheus_client import generate_latest

        for name, engine in engines.items():
            self.resident.labels(name).set(engine.resident_bytes)
            for state in ("stopped", "starting", "running", "swapping_out", "swapped", "swapping_in", "failed"):
                self.state.labels(name, state).set(1 if engine.state == state else 0)
        return generate_latest(self.registry)


class Router:
    """Which engines run, and the decisions that start, swap and evict them."""

    def __init__(self, catalog: Catalog, log_dir: Path):
        self.catalog = catalog
        self.engines = {name: Engine(spec, log_dir) for name, spec in catalog.models.items()}
        self.metrics = Metrics()
        self._room = asyncio.Lock()
        self._reaper: asyncio.Task | None = None

    # ---- requests ----

    def engine(self, name: Any) -> Engine:
        engine = self.engines.get(name) if isinstance(name, str) else None
        if engine is None:
            raise ServeError(404, f"The model `{name}` does not exist. Models: {', '.join(self.engines)}",
                             code="model_not_found", param="model")
        return engine

    async def acquire(self, name: Any) -> Engine:
        """The model's engine, running; counted in flight until :meth:`release`."""
        engine = self.engine(name)
        engine.inflight += 1
        engine.last_used = time.monotonic()
        try:
            await self._ready(engine)
        except BaseException:
            engine.inflight -= 1
            raise
        return engine

    def release(self, engine: Engine) -> None:
        engine.inflight -= 1
        engine.last_used = time.monotonic()

    async def _ready(self, engine: Engine) -> None:
        if engine.state == RUNNING and engine.alive():
            return
        async with engine.lock:   # later waiters find it running
            if engine.state == RUNNING and engine.alive():
                return
            name = engine.spec.name
            try:
                if engine.state == SWAPPED and engine.alive():
                    freed = await self._make_room(engine)
                    seconds = await engine.swap_in()
                    self.metrics.operations.labels(name, "swap_in").observe(seconds)
                    log.info("swap in %s: %.2f s (%d bytes resident%s)", name, seconds, engine.resident_bytes, freed)
                else:
                    if engine.proc is not None:
                        log.warning("the engine of %s is %s and its process %s; starting a new one", name,
                                    engine.state, "exited" if not engine.alive() else "is stopped")
                        await engine.stop()
                    freed = await self._make_room(engine)
                    seconds = await engine.start()
                    self.metrics.operations.labels(name, "start").observe(seconds)
                    log.info("cold start %s: %.2f s to /health (%d bytes estimated%s)", name, seconds,
                             engine.resident_bytes, freed)
            except EngineError as exc:
                raise ServeError(503, str(exc), kind="server_error", code="engine_unavailable") from exc

    async def _make_room(self, engine: Engine) -> str:
        """Swap out least recently used idle models until ``engine`` fits the budget (alone, it
        always fits). Returns what was done, for the log line."""
        evicted: list[str] = []
        deadline = time.monotonic() + ROOM_WAIT_S
        async with self._room:
            while True:
                others = [e for e in self.engines.values() if e is not engine and e.alive()
                          and e.state not in (SWAPPED,)]
                used = sum(e.resident_bytes for e in others)
                if not others or used + engine.resident_bytes <= self.catalog.budget:
                    break
                idle = sorted((e for e in others if e.state == RUNNING and e.inflight == 0), key=lambda e: e.last_used)
                if not idle:
                    if time.monotonic() > deadline:
                        raise ServeError(503, f"no memory for {engine.spec.name}: the models holding it are all "
                                              f"busy ({', '.join(e.spec.name for e in others)})",
                                         kind="server_error", code="no_capacity")
                    await asyncio.sleep(0.2)
                    continue
                victim = idle[0]
                async with victim.lock:
                    if victim.state != RUNNING or victim.inflight:
                        continue
                    report = await victim.swap_out()
                self.metrics.operations.labels(victim.spec.name, "swap_out").observe(report["seconds"])
                evicted.append(f"{victim.spec.name} ({report['bytes']} bytes in {report['seconds']:.2f} s)")
                log.info("swap out %s to make room for %s: %d bytes in %.2f s (budget %d bytes, %d in use before)",
                         victim.spec.name, engine.spec.name, report["bytes"], report["seconds"],
                         self.catalog.budget, used)
        return f"; swapped out {', '.join(evicted)}" if evicted else ""

    async def swap_out(self, name: str) -> dict:
        engine = self.engine(name)
        async with engine.lock:
            if engine.state != RUNNING or not engine.alive():
                raise ServeError(409, f"{name} is {engine.state}; only a running model can be swapped out",
                                 code="invalid_state")
            if engine.inflight:
                raise ServeError(409, f"{name} has {engine.inflight} request(s) in flight", code="busy")
            report = await engine.swap_out()
        self.metrics.operations.labels(name, "swap_out").observe(report["seconds"])
        log.info("swap out %s (asked): %d bytes in %.2f s", name, report["bytes"], report["seconds"])
        return report

    # ---- idle models ----

    def start_reaper(self) -> None:
        self._reaper = asyncio.get_running_loop().create_task(self._reap())

    async def _reap(self) -> None:
        period = min(1.0, self.catalog.idle_timeout / 4)
        while True:
            await asyncio.sleep(period)
            now = time.monotonic()
            for engine in self.engines.values():
                if engine.state != RUNNING or engine.inflight or now - engine.last_used < self.catalog.idle_timeout:
                    continue
                try:
                    async with engine.lock:
                        if engine.state != RUNNING or engine.inflight or not engine.alive():
                            continue
                        report = await engine.swap_out()
                    self.metrics.operations.labels(engine.spec.name, "swap_out").observe(report["seconds"])
                    log.info("swap out %s after %.0f s idle: %d bytes in %.2f s", engine.spec.name,
                             now - engine.last_used, report["bytes"], report["seconds"])
                except EngineError:
                    log.exception("idle swap-out of %s failed; its engine is now %s", engine.spec.name, engine.state)

    async def close(self) -> None:
        if self._reaper is not None:
            self._reaper.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._reaper
        await asyncio.gather(*(e.stop() for e in self.engines.values()))


def create_app(catalog: Catalog, log_dir: Path, *, api_key: str | None = None):
    """The ASGI app (FastAPI, which vLLM installs)."""
    router = Router(catalog, log_dir)
    key = api_key or catalog.api_key
    client = httpx.AsyncClient(timeout=httpx.Timeout(READ_TIMEOUT_S, connect=10.0))

    @contextlib.asynccontextmanager
    async def lifespan(_app):
        router.start_reaper()
        log.info("Serving %d model(s) under a budget of %d bytes, idle timeout %.0f s: %s", len(router.engines),
                 catalog.budget, catalog.idle_timeout, ", ".join(router.engines))
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
        return {"object": "list", "data": [{"id": name, "object": "model", "owned_by": "model-streamer",
                                            "state": engine.state} for name, engine in router.engines.items()]}

    @app.get("/metrics")
    async def metrics():
        from prometheus_client import CONTENT_TYPE_LATEST

        return Response(router.metrics.render(router.engines), media_type=CONTENT_TYPE_LATEST)

    @app.get("/admin/models")
    async def admin_models():
        return {"budget": catalog.budget, "idle_timeout": catalog.idle_timeout,
                "models": [e.describe() for e in router.engines.values()]}

    @app.post("/admin/models/{name:path}/{op}")
    async def admin_op(name: str, op: str):
        try:
            if op == "swap_out":
                return await router.swap_out(name)
            if op == "swap_in":
                engine = await router.acquire(name)
                router.release(engine)
                return engine.describe()
            if op == "stop":
                engine = router.engine(name)
                async with engine.lock:
                    await engine.stop()
                return engine.describe()
            raise ServeError(404, f"unknown operation {op!r}: swap_out, swap_in or stop", code="unknown_operation")
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
        try:
            engine = await router.acquire(name)
        except ServeError as exc:
            router.metrics.requests.labels(str(name)[:64], f"http_{exc.status}").inc()
            return error(exc)
        url = engine.base_url + path
        try:
            if body.get("stream"):
                upstream = await client.send(client.build_request("POST", url, json=body), stream=True)
            else:
                upstream = await client.post(url, json=body)
        except httpx.TransportError as exc:
            router.release(engine)
            router.metrics.requests.labels(name, "engine_error").inc()
            return error(ServeError(502, f"the engine of {name} failed this request ({exc!r}); see {engine.log_path}",
                                    kind="server_error", code="engine_error"))
        if not body.get("stream"):
            router.release(engine)
            router.metrics.requests.labels(name, f"http_{upstream.status_code}").inc()
            return Response(upstream.content, status_code=upstream.status_code,
                            media_type=upstream.headers.get("content-type"))

        async def relay():
            outcome = f"http_{upstream.status_code}"
            try:
                async for chunk in upstream.aiter_raw():
                    yield chunk
            except httpx.TransportError as exc:   # the engine died mid-stream: say so, then end the stream
                outcome = "engine_error"
                failure = ServeError(502, f"the engine of {name} failed mid-stream ({exc!r})", kind="server_error",
                                     code="engine_error")
                yield f"data: {json.dumps(failure.body())}\n\n".encode()
            finally:
                await upstream.aclose()
                router.release(engine)
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
