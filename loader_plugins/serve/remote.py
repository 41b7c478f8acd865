"""An engine on another host, run by that host's agent (:mod:`.agent`).

The engine listens on its own host's 127.0.0.1 (:mod:`.local`); the agent is its only door:
the router asks the agent to start, stop, swap out and in and check the engine, and sends the
OpenAI requests to the agent's ``/agent/v1/...``, which relays them to the engine with the
engine's secret (the secret never leaves that host). Every call carries the agent's API key.
What the router knows of the engine's process is what the agent last said, asked again when the
engine stops answering (:meth:`AgentEngine.answers`).
"""

from __future__ import annotations

import logging
from pathlib import PurePosixPath
from typing import Any

import httpx

from .catalog import ModelSpec, ServerSpec
from .engine import Engine, EngineError, EngineHost, EngineLost, EngineState, ProcessHandle

log = logging.getLogger(__name__)


class AgentClient:
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


class ReportedProcess:
    """A process on another host, as its agent last reported it (:class:`~.engine.ProcessHandle`)."""

    def __init__(self, pid: int):
        self.pid = pid
        self.returncode: int | None = None

    def poll(self) -> int | None:
        return self.returncode


class AgentEngine(Engine):
    """The engine of one model on a server that is another host's agent."""

    def __init__(self, spec: ModelSpec, server: ServerSpec, agent: AgentClient,
                 extra_config: dict[str, Any] | None = None):
        super().__init__(spec, server, extra_config, log_path=PurePosixPath(f"(on {agent.url}) {spec.name}.log"))
        self.agent = agent

    @property
    def base_url(self) -> str:
        return f"{self.agent.url}/agent"

    @property
    def headers(self) -> dict[str, str]:
        return self.agent.headers

    def _take(self, reply: dict) -> None:
        self.host, self.port = str(reply["host"]), int(reply["port"])
        self.proc = ReportedProcess(int(reply["pid"]))
        self.log_path = PurePosixPath(f"{self.agent.url}: {reply.get('log')}")

    def _request(self) -> dict[str, Any]:
        spec = self.spec
        return {"model": spec.name, "checkpoint": spec.checkpoint, "args": list(spec.args),
                "env": {**self.server.env, **spec.env}, "start_timeout": spec.start_timeout,
                "weights": spec.weights, "loader": dict(spec.loader), "extra_config": self.extra_config}

    async def _ask(self, op: str, *, timeout: float = 30.0, **body) -> dict:
        return await self.agent.call("POST", f"/agent/engines/{op}", json={"model": self.spec.name, **body},
                                     timeout=timeout)

    async def load_estimate(self) -> dict:
        """Made on the agent's host (its tiers, its history)."""
        return await self.agent.call("POST", "/agent/estimate", timeout=120,
                                     json={"weights": self.spec.weights_location, "loader": self.extra_config})

    async def _launch(self) -> float | None:
        reply = await self.agent.call("POST", "/agent/engines/start", json=self._request(),
                                      timeout=self.spec.start_timeout + 60)
        self._take(reply)
        load = reply.get("last_load_seconds")
        return None if load is None else float(load)

    async def _terminate(self, proc: ProcessHandle) -> None:
        try:
            await self._ask("stop", timeout=120)
        except EngineError as exc:
            log.warning("stopping %s on %s: %s", self.spec.name, self.server.name, exc)

    async def _offload(self) -> dict[str, int]:
        reply = await self._ask("swap_out", timeout=660)
        return {"bytes": int(reply.get("bytes", 0)), "opaque_bytes": int(reply.get("opaque_bytes", 0))}

    async def _restore(self) -> None:
        await self._ask("swap_in", timeout=660)

    async def answers(self, grace: float = 5.0) -> bool:
        try:
            entry = await self._ask("check", grace=grace, timeout=grace + 30)
        except EngineLost:
            self.lost()
            return False
        except EngineError:
            return False        # the host is unreachable: say no, keep what is known
        if not entry.get("alive") or (self.proc is not None and entry.get("pid") != self.proc.pid):
            self.lost()
            return False
        return bool(entry.get("answers"))

    def lost(self) -> None:
        """Its process is gone (its host may be too)."""
        if self.proc is not None:
            self.proc.returncode = -1
        self.state = EngineState.FAILED

    async def adopt(self, record: dict[str, Any]) -> bool:
        """Only if the agent still runs it with that pid and it answers; swapped out if the agent
        says so."""
        try:
            entry = await self._ask("check", grace=5.0, timeout=60)
        except EngineError as exc:
            log.warning("cannot find %s on %s again: %s", self.spec.name, self.server.name, exc)
            return False
        if not (entry.get("alive") and entry.get("answers")) or entry.get("pid") != record.get("pid") \
                or entry.get("state") not in (EngineState.RUNNING, EngineState.SWAPPED):
            return False
        self._take(entry)
        self._adopted(record, entry["state"] == EngineState.SWAPPED)
        return True

    def _described(self) -> dict[str, Any]:
        return {"agent": self.agent.url}

    def _recorded(self) -> dict[str, Any]:
        return {"agent": self.agent.url, "host": self.host}


class AgentHost(EngineHost):
    """Another host, through its agent at ``url``."""

    def __init__(self, url: str, api_key: str | None):
        self.client = AgentClient(url, api_key)

    def engine(self, model: ModelSpec, server: ServerSpec, extra_config: dict[str, Any]) -> AgentEngine:
        return AgentEngine(model, server, self.client, extra_config)

    async def info(self) -> dict[str, Any]:
        return await self.client.call("GET", "/agent/info")
