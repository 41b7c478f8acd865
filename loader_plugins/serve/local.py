"""An engine of this node: a ``vllm serve`` process started, swapped out, swapped in and stopped here.

The engine loads with ``--load-format streamer`` and carries the swap worker extension
(:mod:`loader_plugins.swap.vllm_ext`); swaps go through vLLM's dev-mode endpoints
(``VLLM_SERVER_DEV_MODE=1``), as docs/swap.md describes: pause scheduling, offload the weights
(and drop the KV cache), reset the prefix cache; then restore and resume. The process stays alive
while swapped out.

It listens on 127.0.0.1 only, and every start gets a new random secret: the engine's
``VLLM_API_KEY`` (vLLM's ``--api-key``) and the key of :class:`~.guard.EngineGuard`, which it
loads with ``--middleware``; so no path but ``/health`` answers without the secret, and none but
``/v1/...`` outside the node. The secret is never logged; it is kept in the engine's record
(``engines.json``, mode 0600: :mod:`.records`) so that a restarted router or agent can take the
engine over. Engines another host must reach are reached through that host's agent (:mod:`.agent`).
"""

from __future__ import annotations

import asyncio
import json
import logging
import os
import re
import secrets
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import httpx

from .catalog import ModelSpec, ServerSpec
from .engine import Engine, EngineError, EngineHost, EngineState, ProcessHandle
from .guard import SECRET_ENV
from .process import LOOPBACK, PidHandle, cmdline, free_port, stop_process_group

log = logging.getLogger(__name__)

EXTENSION = "loader_plugins.swap.vllm_ext.StreamerSwapExtension"
GUARD = "loader_plugins.serve.guard.EngineGuard"
#: seconds a stopped engine has between SIGTERM and SIGKILL
STOP_GRACE_S = 20.0

#: the vLLM adapter's log line after a load (loader_plugins/vllm_adapter/loader.py)
_LOADED = re.compile(rb"Streamer loaded ([0-9.]+) GB in ([0-9.]+) seconds")


def _end_with_parent() -> None:
    """In the child, before exec: SIGTERM when the parent (thread) dies (Linux ``PR_SET_PDEATHSIG``)."""
    import ctypes
    import signal

    ctypes.CDLL(None, use_errno=True).prctl(1, int(signal.SIGTERM), 0, 0, 0)


def _bearer(secret: str | None) -> dict[str, str]:
    return {"Authorization": f"Bearer {secret}"} if secret else {}


class LocalEngine(Engine):
    """The engine of one model on a server of this node (the router's own, or an agent's)."""

    def __init__(self, spec: ModelSpec, log_dir: Path, server: ServerSpec | None = None,
                 extra_config: dict[str, Any] | None = None):
        server = server or ServerSpec(name="local", budget=1)
        super().__init__(spec, server, extra_config,
                         log_path=log_dir / server.name / f"{spec.name.replace('/', '_')}.log")
        self.host = LOOPBACK
        self.secret: str | None = None
        self.tied = False      # True: the process is sent SIGTERM when the thread that started it ends (Ray nodes)
        self._log_offset = 0

    @property
    def base_url(self) -> str:
        return f"http://{self.host}:{self.port}"

    @property
    def headers(self) -> dict[str, str]:
        return _bearer(self.secret)

    async def answers(self, grace: float = 5.0) -> bool:
        try:
            _reader, writer = await asyncio.wait_for(asyncio.open_connection(self.host, self.port), grace)
            writer.close()
            return True
        except (OSError, asyncio.TimeoutError):
            pass
        await self.exited(grace)
        if not self.alive():
            self.state = EngineState.FAILED
        return False

    async def load_estimate(self) -> dict:
        from ..cache.estimate import estimate
        from ..config import StreamerConfig

        extra = {k: v for k, v in self.extra_config.items() if k not in ("weights_uri", "in_place")}
        return await asyncio.to_thread(estimate, self.spec.weights_location,
                                       StreamerConfig.from_dict(extra, where="serve"))

    async def adopt(self, record: dict[str, Any]) -> bool:
        """Only if that pid is still an engine of ours on that port serving this model, answering
        /health; paused scheduling means swapped out."""
        pid, port = int(record["pid"]), int(record["port"])
        words = cmdline(pid)
        if "loader_plugins.serve.vllm_cli" not in words or str(port) not in words or self.spec.name not in words:
            return False
        secret = record.get("secret") or None
        try:
            async with httpx.AsyncClient(base_url=f"http://{self.host}:{port}", headers=_bearer(secret),
                                         timeout=10) as client:
                if (await client.get("/health")).status_code != 200:
                    return False
                sleeping = (await client.get("/is_sleeping")).json().get("is_sleeping")
        except (httpx.HTTPError, ValueError, AttributeError):
            return False
        self.proc, self.port, self.secret = PidHandle(pid), port, secret
        self._adopted(record, bool(sleeping))
        return True

    async def _launch(self) -> float | None:
        """``vllm serve`` on 127.0.0.1 and a free port, until it answers ``/health``."""
        self.port = free_port(self.host)
        self.secret = secrets.token_urlsafe(32)
        cmd = [sys.executable, "-m", "loader_plugins.serve.vllm_cli", "serve", self.spec.checkpoint,
               "--host", self.host, "--port", str(self.port), "--served-model-name", self.spec.name,
               "--load-format", "streamer", "--worker-extension-cls", EXTENSION, "--middleware", GUARD,
               *self.spec.args]
        if self.extra_config:
            cmd += ["--model-loader-extra-config", json.dumps(self.extra_config)]
        env = {**os.environ, **self.server.env, **self.spec.env, "VLLM_SERVER_DEV_MODE": "1",
               SECRET_ENV: self.secret}
        log.info("Starting the engine of %s on %s: %s (log %s)", self.spec.name, self.server.name, " ".join(cmd),
                 self.log_path)
        self.log_path.parent.mkdir(parents=True, exist_ok=True)
        self._log_offset = self.log_path.stat().st_size if self.log_path.exists() else 0
        with open(self.log_path, "ab") as out:
            self.proc = subprocess.Popen(cmd, stdout=out, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
                                         start_new_session=True, env=env,
                                         preexec_fn=_end_with_parent if self.tied else None)
        t0 = time.monotonic()
        async with httpx.AsyncClient(timeout=5) as client:
            while True:
                if not self.alive():
                    raise EngineError(f"the engine of {self.spec.name!r} exited with {self.proc.returncode} while "
                                      f"starting; see {self.log_path}:\n{self._log_tail()}")
                if time.monotonic() - t0 > self.spec.start_timeout:
                    await self.stop()
                    raise EngineError(f"the engine of {self.spec.name!r} did not answer /health within "
                                      f"{self.spec.start_timeout:.0f} s; see {self.log_path}")
                try:
                    if (await client.get(self.base_url + "/health")).status_code == 200:
                        return self._loaded()
                except httpx.TransportError:
                    pass
                await asyncio.sleep(0.25)

    async def _terminate(self, proc: ProcessHandle) -> None:
        await asyncio.to_thread(stop_process_group, proc, STOP_GRACE_S)

    async def _offload(self) -> dict[str, int]:
        async with httpx.AsyncClient(base_url=self.base_url, headers=self.headers, timeout=600) as client:
            await self._post(client, "/sleep", params={"level": "0"})
            reply = await self._rpc(client, "streamer_offload", discard_kv_cache="true")
            await self._post(client, "/reset_prefix_cache")
        return {"bytes": sum(int(r.get("bytes", 0)) for r in reply),
                "opaque_bytes": sum(int((r.get("opaque") or {}).get("bytes", 0)) for r in reply)}

    async def _restore(self) -> None:
        async with httpx.AsyncClient(base_url=self.base_url, headers=self.headers, timeout=600) as client:
            await self._rpc(client, "streamer_restore")
            await self._post(client, "/wake_up", params={"tags": "scheduling"})

    def _recorded(self) -> dict[str, Any]:
        return {"secret": self.secret} if self.secret else {}

    def _loaded(self) -> float | None:
        """Seconds the streamer's load took in this start, from the engine's log (None if absent)."""
        try:
            with open(self.log_path, "rb") as f:
                f.seek(self._log_offset)
                found = _LOADED.findall(f.read())
        except OSError:
            return None
        return float(found[-1][1]) if found else None

    async def _post(self, client: httpx.AsyncClient, path: str, **kwargs) -> httpx.Response:
        try:
            response = await client.post(path, **kwargs)
        except httpx.TransportError as exc:
            raise EngineError(f"the engine of {self.spec.name!r} did not answer POST {path} ({exc!r}); "
                              f"see {self.log_path}") from exc
        if response.status_code >= 400:
            raise EngineError(f"the engine of {self.spec.name!r} refused POST {path}: HTTP {response.status_code} "
                              f"{response.text[:500]}")
        return response

    async def _rpc(self, client: httpx.AsyncClient, method: str, **kwargs) -> list[dict]:
        response = await self._post(client, "/collective_rpc", json={"method": method, "kwargs": kwargs})
        results = response.json().get("results")
        if not isinstance(results, list):
            raise EngineError(f"the engine of {self.spec.name!r}: {method} returned {response.text[:500]}")
        return results

    def _log_tail(self, lines: int = 30) -> str:
        try:
            return "\n".join(self.log_path.read_text(errors="replace").splitlines()[-lines:])
        except OSError:
            return "(the log cannot be read)"


class LocalHost(EngineHost):
    """This node: engines are :class:`LocalEngine` processes, their logs under ``log_dir``."""

    def __init__(self, log_dir: Path):
        self.log_dir = log_dir

    def engine(self, model: ModelSpec, server: ServerSpec, extra_config: dict[str, Any]) -> LocalEngine:
        return LocalEngine(model, self.log_dir, server, extra_config)
