"""``model-streamer serve``: one OpenAI-compatible endpoint in front of on-demand vLLM engines.

A request names a model of the catalogue. If the model runs on a server, the request goes to
the engine there with the fewest requests in flight. Otherwise the model is placed
(:mod:`.scheduler`, :mod:`.placement`): the server with the smallest estimated startup gets it,
swapped back in if it is swapped out there, else started (``vllm serve`` with ``--load-format
streamer``); either first makes room under that server's budget by swapping out its least
recently used idle models. Concurrent requests for a model being placed, started or swapped in
wait for that one operation. A model idle for ``idle_timeout`` is swapped out (:mod:`.reaper`);
its engine process stays alive. Every decision is logged with what it estimated and then
measured. Live engines are written to ``LOG_DIR/engines.json``; a router restarted on that
directory takes them over (:mod:`.records`).

Endpoints: ``/v1/models``, ``/v1/completions``, ``/v1/chat/completions`` (streaming or not,
forwarded to the engine as they are: :mod:`.proxy`), ``/metrics`` (Prometheus), ``/health``;
admin: ``GET /admin/models``, ``GET /admin/placements``,
``POST /admin/models/{name}/swap_out|swap_in|start|migrate|stop[?server=S]``. Streaming
completions move between servers while they generate (:mod:`.migration`): on request
(``migrate``), and when a server must make room and the busy model runs elsewhere too. With an API
key every endpoint but ``/health`` needs ``Authorization: Bearer KEY``. Errors use OpenAI's format.

This module is the HTTP front only: the decisions are :class:`~.routing.Router`'s.
"""

from __future__ import annotations

import contextlib
import logging
from pathlib import Path

import httpx
from fastapi import FastAPI, Request
from fastapi.responses import Response

from .catalog import Catalog
from .errors import ServeError
from .proxy import Forwarder, error_response
from .routing import Router

log = logging.getLogger(__name__)

#: an engine that neither answers nor dies is given up on after this long (no request hangs forever)
READ_TIMEOUT_S = 600.0


def create_app(catalog: Catalog, log_dir: Path, *, api_key: str | None = None, router: Router | None = None):
    """The ASGI app (FastAPI, which vLLM installs); ``router``: one made already (else one for
    ``catalog`` and ``log_dir``)."""
    router = router or Router(catalog, log_dir)
    key = api_key or catalog.api_key
    client = httpx.AsyncClient(timeout=httpx.Timeout(READ_TIMEOUT_S, connect=10.0))
    forward = Forwarder(router, client)

    @contextlib.asynccontextmanager
    async def lifespan(_app):
        await router.connect()
        await router.adopt()
        router.start_reaper()
        log.info("Serving %d model(s) on %s, idle timeout %.0f s: %s", len(catalog.models),
                 ", ".join(f"{s.spec.name} (budget {s.spec.budget} bytes)" for s in router.servers.values())
                 or "no server yet",
                 catalog.idle_timeout, ", ".join(catalog.models))
        try:
            yield
        finally:
            await router.close()
            await client.aclose()

    app = FastAPI(title="model-streamer serve", lifespan=lifespan)
    app.state.router = router

    @app.middleware("http")
    async def authorize(request: Request, call_next):
        if key and request.url.path != "/health":
            if request.headers.get("authorization", "") != f"Bearer {key}":
                return error_response(ServeError(401, "Invalid or missing API key (Authorization: Bearer KEY)",
                                                 code="invalid_api_key"))
        return await call_next(request)

    @app.get("/health")
    async def health():
        return {"status": "ok"}

    @app.get("/v1/models")
    async def models():
        return {"object": "list", "data": [
            {"id": name, "object": "model", "owned_by": "model-streamer",
             "servers": {s.spec.name: s.engines[name].state.value for s in router.servers.values()}}
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
                                          "bandwidths": (s.reported or {}).get("bandwidths")}
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
                return (await router.stop(name, server)).describe()
            raise ServeError(404, f"unknown operation {op!r}: swap_out, swap_in, start, migrate or stop",
                             code="unknown_operation")
        except ServeError as exc:
            return error_response(exc)

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
