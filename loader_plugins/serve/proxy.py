"""One OpenAI request through to an engine and its answer back.

The model the body names gets a running engine (:meth:`~.routing.Router.acquire`); the body goes
to it as it is (with the engine's credentials), its answer comes back as it is, streamed or not.
A streaming completion that can move is relayed event by event (:func:`.migration.relay`). An
engine found dead before anything was sent is replaced once, transparently; one that dies while
answering ends the answer with an error.
"""

from __future__ import annotations

import json
import logging
from typing import TYPE_CHECKING, Any

import httpx
from fastapi import Request
from fastapi.responses import JSONResponse, Response, StreamingResponse

from .errors import ServeError
from .migration import relay as migration_relay

if TYPE_CHECKING:
    from .routing import Router

log = logging.getLogger(__name__)


def error_response(exc: ServeError) -> JSONResponse:
    return JSONResponse(exc.body(), status_code=exc.status)


class Forwarder:
    """Forwards requests for ``router`` with ``client`` (one connection pool for every engine)."""

    def __init__(self, router: "Router", client: httpx.AsyncClient):
        self.router = router
        self.client = client

    async def __call__(self, request: Request, path: str) -> Response:
        try:
            body = await request.json()
        except ValueError:
            return error_response(ServeError(400, "the request body is not JSON"))
        if not isinstance(body, dict):
            return error_response(ServeError(400, "the request body must be a JSON object"))
        return await self.forward(body, path)

    async def forward(self, body: dict[str, Any], path: str) -> Response:
        router, client, name = self.router, self.client, body.get("model")
        for attempt in (1, 2):
            try:
                engine = await router.acquire(name)
            except ServeError as exc:
                router.metrics.requests.labels(str(name)[:64], f"http_{exc.status}").inc()
                return error_response(exc)
            if attempt == 1 and not await engine.answers():
                # its process died a moment ago (nothing was sent yet): the next acquire starts a new one
                router.release(engine)
                log.warning("the engine of %s on %s does not answer and its process %s; placing it again", name,
                            engine.server.name, "exited" if not engine.alive() else "is still there")
                if not engine.alive():
                    continue
                engine = await router.acquire(name)
            flight = router.migrator.track(body, engine, path)
            url = engine.base_url + path
            try:
                if body.get("stream"):
                    sent = flight.upstream_body() if flight is not None else body
                    upstream = await client.send(client.build_request("POST", url, json=sent, headers=engine.headers),
                                                 stream=True)
                else:
                    upstream = await client.post(url, json=body, headers=engine.headers)
                break
            except httpx.TransportError as exc:
                router.migrator.finish(flight, engine)
                # A killed engine's port still accepts connections while the kernel tears the
                # process down (its memory goes before its sockets): if the process is gone now,
                # nothing was answered and a new engine is placed for the request.
                if attempt == 1 and await engine.exited():
                    log.warning("the engine of %s on %s exited as the request went out (%r); placing it again",
                                name, engine.server.name, exc)
                    continue
                router.metrics.requests.labels(name, "engine_error").inc()
                return error_response(ServeError(502, f"the engine of {name} failed this request ({exc!r}); see "
                                                      f"{engine.log_path}", kind="server_error", code="engine_error"))
        if not body.get("stream"):
            router.release(engine)
            router.metrics.requests.labels(name, f"http_{upstream.status_code}").inc()
            return Response(upstream.content, status_code=upstream.status_code,
                            media_type=upstream.headers.get("content-type"))
        if upstream.status_code != 200 and flight is not None:   # refused: relay the error as it is
            router.migrator.untrack(flight)
            flight = None
        return StreamingResponse(self._relay(name, engine, flight, upstream), status_code=upstream.status_code,
                                 media_type=upstream.headers.get("content-type", "text/event-stream"))

    async def _relay(self, name: str, engine, flight, upstream: httpx.Response):
        router = self.router
        outcome = f"http_{upstream.status_code}"
        tail = b""
        try:
            if flight is not None:
                chunks = migration_relay(flight, self.client, upstream, on_switch=router.migrator.switched,
                                         on_abandon=router.migrator.abandoned)
            else:
                chunks = upstream.aiter_raw()
            async for chunk in chunks:
                tail = (tail + chunk)[-64:]
                yield chunk
            if upstream.status_code == 200 and b"[DONE]" not in tail:
                # the engine closed the stream cleanly but unfinished (stopped with its node): say so
                outcome = "engine_error"
                failure = ServeError(502, f"the engine of {name} on {engine.server.name} ended the stream before "
                                          f"it finished; see {engine.log_path}", kind="server_error",
                                     code="engine_error")
                yield f"data: {json.dumps(failure.body())}\n\n".encode()
        except httpx.TransportError as exc:   # the engine died mid-stream: say so, then end the stream
            outcome = "engine_error"
            failure = ServeError(502, f"the engine of {name} failed mid-stream ({exc!r})", kind="server_error",
                                 code="engine_error")
            yield f"data: {json.dumps(failure.body())}\n\n".encode()
        finally:
            await upstream.aclose()
            router.migrator.finish(flight, engine)
            router.metrics.requests.labels(name, outcome).inc()
