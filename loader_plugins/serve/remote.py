"""An engine on another host: started, stopped and estimated by that host's agent (:mod:`.agent`).

Requests and swaps go to the engine itself, at the private address and port its agent reports,
exactly as for an engine of the router's own host; only the process's life goes through the
agent. What the router knows of that process is what the agent last said, checked again when the
engine stops answering (:meth:`RemoteEngine.answers`).
"""

from __future__ import annotations

import asyncio
import logging
import time
from pathlib import PurePosixPath
from typing import Any

import httpx

from .catalog import ModelSpec, ServerSpec
from .engine import FAILED, RUNNING, STARTING, STOPPED, SWAPPED, Engine, EngineError

log = logging.getLogger(__name__)


class AgentProcess:
    """The subset of :class:`subprocess.Popen` the router uses, for a process on another host,
    as its agent last reported it."""

    def __init__(self, pid: int):
        self.pid = pid
        self.returncode: int | None = None

    def poll(self) -> int | None:
        return self.returncode


class Agent:
    """An HTTP client of one host's agent."""

    def __init__(self, url: str, api_key: str | None):
        self.url = url.rstrip("/")
        self.headers = {"Authorization": f"Bearer {api_key}"} if api_key else {}

    async def call(self, method: str, path: str, *, timeout: float = 30.0, **kwargs) -> Any:
        try:
            async with httpx.AsyncClient(base_url=self.url, headers=self.headers, timeout=timeout) as client:
                response = await client.request(method, path, **kwargs)
        except httpx.HTTPError as exc:
            raise EngineError(f"the agent at {self.url} did not answer {method} {path} ({exc!r})") from exc
        if response.status_code >= 400:
            try:
                message = response.json()["error"]["message"]
            except (ValueError, KeyError, TypeError):
                message = response.text[:500]
            raise EngineError(f"the agent at {self.url} refused {method} {path}: HTTP {response.status_code}: "
                              f"{message}")
        return response.json()


class RemoteEngine(Engine):
    """The engine of one model on a server that is another host's agent."""

    def __init__(self, spec: ModelSpec, log_dir, server: ServerSpec, extra_config: dict[str, Any] | None = None):
        super().__init__(spec, log_dir, server, extra_config, host="")
        self.agent = Agent(server.url or "", server.api_key)
        self.log_path = PurePosixPath(f"(on {self.agent.url}) {spec.name}.log")   # type: ignore[assignment]

    def describe(self) -> dict[str, Any]:
        return {**super().describe(), "agent": self.agent.url}

    def _take(self, reply: dict) -> None:
        self.host, self.port = str(reply["host"]), int(reply["port"])
        self.proc = AgentProcess(int(reply["pid"]))   # type: ignore[assignment]
        self.log_path = PurePosixPath(f"{self.agent.url}: {reply.get('log')}")   # type: ignore[assignment]

    def _request(self) -> dict[str, Any]:
        spec = self.spec
        return {"model": spec.name, "checkpoint": spec.checkpoint, "args": list(spec.args),
                "env": {**self.server.env, **spec.env}, "start_timeout": spec.start_timeout,
                "weights": spec.weights, "loader": dict(spec.loader), "extra_config": self.extra_config}

    async def estimate(self) -> dict:
        """The load estimate of the model's weights on the agent's host (its tiers, its history)."""
        return await self.agent.call("POST", "/agent/estimate", timeout=120,
                                     json={"weights": self.spec.weights_location, "loader": self.extra_config})

    async def start(self) -> float:
        t0 = time.monotonic()
        self.state = STARTING
        try:
            reply = await self.agent.call("POST", "/agent/engines/start", json=self._request(),
                                          timeout=self.spec.start_timeout + 60)
        except EngineError:
            self.state = FAILED
            raise
        self._take(reply)
        self.state = RUNNING
        self.timings["start"] = time.monotonic() - t0
        self.timings.pop("load", None)
        if reply.get("last_load_seconds") is not None:
            self.timings["load"] = float(reply["last_load_seconds"])
        return self.timings["start"]

    async def stop(self) -> None:
        proc, self.proc = self.proc, None
        self.state = STOPPED
        if proc is None or proc.poll() is not None:
            return
        try:
            await self.agent.call("POST", "/agent/engines/stop", json={"model": self.spec.name}, timeout=120)
        except EngineError as exc:
            log.warning("stopping %s on %s: %s", self.spec.name, self.server.name, exc)

    async def _reported(self) -> dict | None:
        """The agent's entry for this model's engine (None if it runs none)."""
        reply = await self.agent.call("GET", "/agent/engines")
        return next((e for e in reply.get("engines", []) if e.get("model") == self.spec.name), None)

    async def answers(self, grace: float = 5.0) -> bool:
        if await self._port_open(grace):
            return True
        try:
            entry = await self._reported()
        except EngineError:
            return False        # the host is unreachable: say no, keep what is known
        if entry is None or not entry.get("alive") or (self.proc is not None and entry.get("pid") != self.proc.pid):
            if self.proc is not None:
                self.proc.returncode = -1
            self.state = FAILED
        return False

    async def _port_open(self, grace: float) -> bool:
        try:
            _reader, writer = await asyncio.wait_for(asyncio.open_connection(self.host, self.port), grace)
            writer.close()
            return True
        except (OSError, asyncio.TimeoutError):
            return False

    def record(self) -> dict[str, Any] | None:
        out = super().record()
        return None if out is None else {**out, "agent": self.agent.url, "host": self.host}

    async def adopt(self, record: dict[str, Any]) -> bool:
        """Take over an engine a previous router had on this agent: only if the agent still runs
        it with that pid and it answers ``/health``; swapped out if its scheduling is paused."""
        try:
            entry = await self._reported()
        except EngineError as exc:
            log.warning("cannot find %s on %s again: %s", self.spec.name, self.server.name, exc)
            return False
        if entry is None or not entry.get("alive") or entry.get("pid") != record.get("pid"):
            return False
        self._take(entry)
        try:
            async with httpx.AsyncClient(base_url=self.base_url, timeout=10) as client:
                if (await client.get("/health")).status_code != 200:
                    return False
                sleeping = (await client.get("/is_sleeping")).json().get("is_sleeping")
        except (httpx.HTTPError, ValueError):
            return False
        self.state = SWAPPED if sleeping else RUNNING
        self.resident_bytes = int(record.get("resident_bytes") or self.resident_bytes)
        self.measured = bool(record.get("measured"))
        self.last_used = time.monotonic()
        return True
