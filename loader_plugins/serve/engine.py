"""The engine interface: what the router needs of one model's engine on one server, whatever runs it.

An engine starts, stops, swaps out (its weights to host memory, its process alive) and back in,
says whether it answers and whether its process has exited, describes itself for the admin
endpoints, writes the record a restarted router takes it over from, and estimates its load
through its server's cache tiers. The bookkeeping every kind shares (state, resident bytes,
requests in flight, timings, the record) lives here, once; a kind implements the operations that
differ. Kinds: :class:`~.local.LocalEngine` (a ``vllm serve`` process of this node) and
:class:`~.remote.AgentEngine` (one that another host's agent runs). An :class:`EngineHost` makes
the engines of one server and reports what placement needs to know of that place.
"""

from __future__ import annotations

import abc
import asyncio
import enum
import time
from pathlib import Path, PurePath
from typing import Any, Protocol

from ..errors import StreamerError
from .catalog import ModelSpec, ServerSpec


class EngineState(str, enum.Enum):
    """An engine's state. Its value is the string that ``/admin/models``, ``/v1/models``, the
    metrics and the agent's reports carry."""

    STOPPED = "stopped"
    STARTING = "starting"
    RUNNING = "running"
    SWAPPING_OUT = "swapping_out"
    SWAPPED = "swapped"
    SWAPPING_IN = "swapping_in"
    FAILED = "failed"

    def __str__(self) -> str:
        return self.value


class EngineError(StreamerError, RuntimeError):
    """An engine did not start, or a swap failed (the message names the model and the log file)."""


class EngineLost(EngineError):
    """The place an engine ran is gone, and the engine with it (a Ray node that died)."""


class ProcessHandle(Protocol):
    """The part of :class:`subprocess.Popen` an engine uses of its process (which may be a
    process found again by pid, or one on another host as its agent reported it)."""

    pid: int
    returncode: int | None

    def poll(self) -> int | None: ...


def checkpoint_bytes(checkpoint: str) -> int:
    """Bytes of a local checkpoint's safetensors files (0 when they cannot be listed)."""
    path = Path(checkpoint)
    try:
        return sum(f.stat().st_size for f in path.glob("*.safetensors")) if path.is_dir() else path.stat().st_size
    except OSError:
        return 0


class Engine(abc.ABC):
    """The engine of one model on one server. ``resident_bytes`` is what it holds while running,
    counted as the bytes a swap moves (measured at its first swap-out; the checkpoint's size until
    then). ``lock``: one start or swap at a time; waiters share its outcome."""

    def __init__(self, spec: ModelSpec, server: ServerSpec, extra_config: dict[str, Any] | None = None, *,
                 log_path: PurePath | str = ""):
        self.spec = spec
        self.server = server
        self.extra_config = dict(extra_config or {})
        self.state = EngineState.STOPPED
        self.proc: ProcessHandle | None = None
        self.host = ""                 # the address the engine listens on, on its node
        self.port: int | None = None
        self.log_path = log_path
        self.resident_bytes = checkpoint_bytes(spec.weights_location)
        self.measured = False          # resident_bytes comes from a swap, not the checkpoint size
        self.last_used = 0.0
        self.inflight = 0
        self.lock = asyncio.Lock()
        self.timings: dict[str, float] = {}

    # ---- where requests go ----

    @property
    @abc.abstractmethod
    def base_url(self) -> str:
        """The URL the engine's OpenAI paths (``/v1/...``) are under, for the router."""

    @property
    @abc.abstractmethod
    def headers(self) -> dict[str, str]:
        """What authenticates the router's requests to those paths."""

    # ---- what the router asks ----

    def alive(self) -> bool:
        return self.proc is not None and self.proc.poll() is None

    async def exited(self, grace: float = 5.0) -> bool:
        """True once the engine's process has exited, waiting up to ``grace`` seconds for it."""
        deadline = time.monotonic() + grace
        while self.alive():
            if time.monotonic() >= deadline:
                return False
            await asyncio.sleep(0.05)
        return True

    @abc.abstractmethod
    async def answers(self, grace: float = 5.0) -> bool:
        """True if the engine accepts a connection; False once its process has exited (waiting up
        to ``grace`` seconds for a dying one to be gone; then its state is ``failed``)."""

    @abc.abstractmethod
    async def load_estimate(self) -> dict:
        """The load estimate of the model's weights through this server's tiers
        (:func:`loader_plugins.cache.estimate.estimate`)."""

    @abc.abstractmethod
    async def adopt(self, record: dict[str, Any]) -> bool:
        """Take over the engine a previous router left running (``record`` from :meth:`record`),
        only if it is still that engine; its state is read from it."""

    def describe(self) -> dict[str, Any]:
        """The engine for ``/admin/models`` (never its secret)."""
        return {"model": self.spec.name, "server": self.server.name, "state": self.state.value,
                "pid": self.proc.pid if self.alive() else None, "host": self.host, "port": self.port,
                "resident_bytes": self.resident_bytes,
                "resident_bytes_measured": self.measured, "inflight": self.inflight,
                "idle_seconds": round(time.monotonic() - self.last_used, 3) if self.last_used else None,
                "log": str(self.log_path), **self._described(),
                **{f"last_{k}_seconds": round(v, 3) for k, v in self.timings.items()}}

    def record(self) -> dict[str, Any] | None:
        """What a later router needs to find this engine again (None when it has no process)."""
        if not self.alive():
            return None
        return {"server": self.server.name, "model": self.spec.name, "pid": self.proc.pid, "port": self.port,
                "resident_bytes": self.resident_bytes, "measured": self.measured, **self._recorded()}

    def lost(self) -> None:
        """Its process is gone with the place it ran (a Ray node that died)."""
        self.proc = None
        self.state = EngineState.FAILED

    def _adopted(self, record: dict[str, Any], sleeping: bool) -> None:
        """What :meth:`adopt` sets once it has found the engine again."""
        self.state = EngineState.SWAPPED if sleeping else EngineState.RUNNING
        self.resident_bytes = int(record.get("resident_bytes") or self.resident_bytes)
        self.measured = bool(record.get("measured"))
        self.last_used = time.monotonic()

    # ---- what the router does ----

    async def start(self) -> float:
        """Start the engine and wait until it answers; returns the seconds taken."""
        t0 = time.monotonic()
        self.state = EngineState.STARTING
        self.timings.pop("load", None)
        try:
            load = await self._launch()
        except BaseException:
            self.state = EngineState.FAILED
            raise
        self.state = EngineState.RUNNING
        self.timings["start"] = time.monotonic() - t0
        if load is not None:
            self.timings["load"] = load
        return self.timings["start"]

    async def stop(self) -> None:
        """End the engine's process (nothing to do when it has none or it has exited)."""
        proc, self.proc = self.proc, None
        self.state = EngineState.STOPPED
        if proc is not None and proc.poll() is None:
            await self._terminate(proc)

    async def swap_out(self) -> dict:
        """Pause, offload the weights to host memory (KV cache dropped), reset the prefix cache.
        Returns ``{"bytes", "seconds", "opaque_bytes"}``."""
        t0 = time.monotonic()
        self.state = EngineState.SWAPPING_OUT
        try:
            moved = await self._offload()
        except BaseException:
            self.state = EngineState.FAILED
            raise
        if moved["bytes"] > 0:
            self.resident_bytes, self.measured = moved["bytes"], True
        self.state = EngineState.SWAPPED
        self.timings["swap_out"] = time.monotonic() - t0
        return {"bytes": moved["bytes"], "seconds": self.timings["swap_out"], "opaque_bytes": moved["opaque_bytes"]}

    async def swap_in(self) -> float:
        """Restore the weights and resume scheduling; returns the seconds taken."""
        t0 = time.monotonic()
        self.state = EngineState.SWAPPING_IN
        try:
            await self._restore()
        except BaseException:
            self.state = EngineState.FAILED
            raise
        self.state = EngineState.RUNNING
        self.timings["swap_in"] = time.monotonic() - t0
        return self.timings["swap_in"]

    # ---- what a kind implements ----

    @abc.abstractmethod
    async def _launch(self) -> float | None:
        """Start the process; return once it answers, with the seconds its load took if known.
        Sets :attr:`proc` and :attr:`port`."""

    @abc.abstractmethod
    async def _terminate(self, proc: ProcessHandle) -> None:
        """End ``proc``, a live process of this engine."""

    @abc.abstractmethod
    async def _offload(self) -> dict[str, int]:
        """The swap-out itself: ``{"bytes": moved, "opaque_bytes": ...}``."""

    @abc.abstractmethod
    async def _restore(self) -> None:
        """The swap-in itself."""

    def _described(self) -> dict[str, Any]:
        """What this kind adds to :meth:`describe`."""
        return {}

    def _recorded(self) -> dict[str, Any]:
        """What this kind adds to :meth:`record`."""
        return {}


class EngineHost(abc.ABC):
    """Where one server's engines run: it makes them, and reports what the catalogue does not say
    of that place (another host's budget, cache directories, measured bandwidths)."""

    @abc.abstractmethod
    def engine(self, model: ModelSpec, server: ServerSpec, extra_config: dict[str, Any]) -> Engine:
        """The (stopped) engine of ``model`` on ``server``."""

    async def info(self) -> dict[str, Any] | None:
        """What the place reports about itself: ``budget``, ``cache_dir``, ``dram_cache_dir``,
        ``bandwidths``, ... (None: nothing to ask, the catalogue says it all). Raises
        :class:`EngineError` when it does not answer."""
        return None
