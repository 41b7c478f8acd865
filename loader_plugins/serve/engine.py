"""One model's engine: a ``vllm serve`` process the router starts, swaps out, swaps in and stops.

The engine loads with ``--load-format streamer`` and carries the swap worker extension
(:mod:`loader_plugins.swap.vllm_ext`); swaps go through vLLM's dev-mode endpoints
(``VLLM_SERVER_DEV_MODE=1``), as docs/swap.md describes: pause scheduling, offload the weights
(and drop the KV cache), reset the prefix cache; then restore and resume. The process stays alive
while swapped out. It listens on 127.0.0.1, or on the private address a host's agent
(:mod:`.agent`) gives it; never on every interface.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import os
import re
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import httpx

from ..errors import StreamerError
from .catalog import ModelSpec, ServerSpec

log = logging.getLogger(__name__)

EXTENSION = "loader_plugins.swap.vllm_ext.StreamerSwapExtension"

#: states of an engine
STOPPED, STARTING, RUNNING, SWAPPING_OUT, SWAPPED, SWAPPING_IN, FAILED = (
    "stopped", "starting", "running", "swapping_out", "swapped", "swapping_in", "failed")


class EngineError(StreamerError, RuntimeError):
    """An engine did not start, or a swap failed (the message names the model and the log file)."""


def _free_port(host: str = "127.0.0.1") -> int:
    with socket.socket() as sock:
        sock.bind((host, 0))
        return sock.getsockname()[1]


def stop_process_group(proc: subprocess.Popen, grace: float = 60.0) -> None:
    """SIGTERM a process started with ``start_new_session=True`` and its group; SIGKILL after
    ``grace`` seconds. A process that already exited is left as it is."""
    if proc.poll() is not None:
        return
    with contextlib.suppress(ProcessLookupError):
        os.killpg(proc.pid, signal.SIGTERM)
    try:
        proc.wait(timeout=grace)
    except subprocess.TimeoutExpired:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(proc.pid, signal.SIGKILL)
        proc.wait()


def checkpoint_bytes(checkpoint: str) -> int:
    """Bytes of a local checkpoint's safetensors files (0 when they cannot be listed)."""
    path = Path(checkpoint)
    try:
        return sum(f.stat().st_size for f in path.glob("*.safetensors")) if path.is_dir() else path.stat().st_size
    except OSError:
        return 0


class Adopted:
    """A handle on an engine process another router started (found again after a restart): the
    subset of :class:`subprocess.Popen` the router uses, by pid."""

    def __init__(self, pid: int):
        self.pid = pid
        self.returncode: int | None = None

    def poll(self) -> int | None:
        if self.returncode is None:
            try:
                os.kill(self.pid, 0)
            except ProcessLookupError:
                self.returncode = -1
            except PermissionError:
                pass
        return self.returncode

    def wait(self, timeout: float | None = None) -> int:
        deadline = None if timeout is None else time.monotonic() + timeout
        while self.poll() is None:
            if deadline is not None and time.monotonic() > deadline:
                raise subprocess.TimeoutExpired(str(self.pid), timeout)
            time.sleep(0.1)
        return self.returncode


def _engine_cmdline(pid: int) -> list[str]:
    try:
        return Path(f"/proc/{pid}/cmdline").read_bytes().decode(errors="replace").split("\0")
    except OSError:
        return []


#: the vLLM adapter's log line after a load (loader_plugins/vllm_adapter/loader.py)
_LOADED = re.compile(rb"Streamer loaded ([0-9.]+) GB in ([0-9.]+) seconds")


class Engine:
    """The engine of one model on one server. ``resident_bytes`` is what it holds while running,
    counted as the bytes a swap moves (measured at its first swap-out; the checkpoint's size until
    then)."""

    def __init__(self, spec: ModelSpec, log_dir: Path, server: ServerSpec | None = None,
                 extra_config: dict[str, Any] | None = None, host: str = "127.0.0.1"):
        self.spec = spec
        self.host = host               # the address the engine listens on
        self.server = server or ServerSpec(name="local", budget=1)
        self.extra_config = dict(extra_config or {})
        self.state = STOPPED
        self.proc: subprocess.Popen | None = None
        self.port: int | None = None
        self.log_path = log_dir / self.server.name / f"{spec.name.replace('/', '_')}.log"
        self.resident_bytes = checkpoint_bytes(spec.weights_location)
        self.measured = False          # resident_bytes comes from a swap, not the checkpoint size
        self.last_used = 0.0
        self.inflight = 0
        self.lock = asyncio.Lock()     # one start / swap at a time; waiters share its outcome
        self.timings: dict[str, float] = {}

    @property
    def base_url(self) -> str:
        return f"http://{self.host}:{self.port}"

    def alive(self) -> bool:
        return self.proc is not None and self.proc.poll() is None

    def describe(self) -> dict[str, Any]:
        return {"model": self.spec.name, "server": self.server.name, "state": self.state,
                "pid": self.proc.pid if self.alive() else None, "host": self.host, "port": self.port,
                "resident_bytes": self.resident_bytes,
                "resident_bytes_measured": self.measured, "inflight": self.inflight,
                "idle_seconds": round(time.monotonic() - self.last_used, 3) if self.last_used else None,
                "log": str(self.log_path), **{f"last_{k}_seconds": round(v, 3) for k, v in self.timings.items()}}

    async def exited(self, grace: float = 5.0) -> bool:
        """True once the engine's process has exited, waiting up to ``grace`` seconds for it."""
        deadline = time.monotonic() + grace
        while self.alive():
            if time.monotonic() >= deadline:
                return False
            await asyncio.sleep(0.05)
        return True

    async def answers(self, grace: float = 5.0) -> bool:
        """True if the engine's port accepts a connection; False once its process has exited
        (waiting up to ``grace`` seconds for a dying one to be gone)."""
        try:
            _reader, writer = await asyncio.wait_for(asyncio.open_connection(self.host, self.port), grace)
            writer.close()
            return True
        except (OSError, asyncio.TimeoutError):
            pass
        deadline = time.monotonic() + grace
        while self.alive() and time.monotonic() < deadline:
            await asyncio.sleep(0.1)
        if not self.alive():
            self.state = FAILED
        return False

    def record(self) -> dict[str, Any] | None:
        """What a later router needs to find this engine again (None when it has no process)."""
        if not self.alive():
            return None
        return {"server": self.server.name, "model": self.spec.name, "pid": self.proc.pid, "port": self.port,
                "resident_bytes": self.resident_bytes, "measured": self.measured}

    async def adopt(self, record: dict[str, Any]) -> bool:
        """Take over the engine another router left running (``record`` from :meth:`record`): only
        if that pid is still an engine of ours on that port serving this model, answering /health.
        Its state is read from the engine: paused scheduling means swapped out."""
        pid, port = int(record["pid"]), int(record["port"])
        cmdline = _engine_cmdline(pid)
        if "loader_plugins.serve.vllm_cli" not in cmdline or str(port) not in cmdline \
                or self.spec.name not in cmdline:
            return False
        try:
            async with httpx.AsyncClient(base_url=f"http://{self.host}:{port}", timeout=10) as client:
                if (await client.get("/health")).status_code != 200:
                    return False
                sleeping = (await client.get("/is_sleeping")).json().get("is_sleeping")
        except (httpx.HTTPError, ValueError):
            return False
        self.proc, self.port = Adopted(pid), port   # type: ignore[assignment]
        self.state = SWAPPED if sleeping else RUNNING
        self.resident_bytes = int(record.get("resident_bytes") or self.resident_bytes)
        self.measured = bool(record.get("measured"))
        self.last_used = time.monotonic()
        return True

    async def start(self) -> float:
        """Start ``vllm serve`` and wait until it answers ``/health``; returns the seconds taken."""
        t0 = time.monotonic()
        self.state = STARTING
        self.port = _free_port(self.host)
        cmd = [sys.executable, "-m", "loader_plugins.serve.vllm_cli", "serve", self.spec.checkpoint,
               "--host", self.host, "--port", str(self.port), "--served-model-name", self.spec.name,
               "--load-format", "streamer", "--worker-extension-cls", EXTENSION, *self.spec.args]
        if self.extra_config:
            cmd += ["--model-loader-extra-config", json.dumps(self.extra_config)]
        env = {**os.environ, **self.server.env, **self.spec.env, "VLLM_SERVER_DEV_MODE": "1"}
        log.info("Starting the engine of %s on %s: %s (log %s)", self.spec.name, self.server.name, " ".join(cmd),
                 self.log_path)
        self.log_path.parent.mkdir(parents=True, exist_ok=True)
        self._log_offset = self.log_path.stat().st_size if self.log_path.exists() else 0
        self.timings.pop("load", None)
        with open(self.log_path, "ab") as out:
            self.proc = subprocess.Popen(cmd, stdout=out, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
                                         start_new_session=True, env=env)
        async with httpx.AsyncClient(timeout=5) as client:
            while True:
                if not self.alive():
                    self.state = FAILED
                    raise EngineError(f"the engine of {self.spec.name!r} exited with {self.proc.returncode} while "
                                      f"starting; see {self.log_path}:\n{self._log_tail()}")
                if time.monotonic() - t0 > self.spec.start_timeout:
                    await self.stop()
                    self.state = FAILED
                    raise EngineError(f"the engine of {self.spec.name!r} did not answer /health within "
                                      f"{self.spec.start_timeout:.0f} s; see {self.log_path}")
                try:
                    if (await client.get(self.base_url + "/health")).status_code == 200:
                        break
                except httpx.TransportError:
                    pass
                await asyncio.sleep(0.25)
        self.state = RUNNING
        self.timings["start"] = time.monotonic() - t0
        loaded = self._loaded()
        if loaded is not None:
            self.timings["load"] = loaded
        return self.timings["start"]

    def _loaded(self) -> float | None:
        """Seconds the streamer's load took in this start, from the engine's log (None if absent)."""
        try:
            with open(self.log_path, "rb") as f:
                f.seek(self._log_offset)
                found = _LOADED.findall(f.read())
        except OSError:
            return None
        return float(found[-1][1]) if found else None

    async def swap_out(self) -> dict:
        """Pause, offload the weights to host memory (KV cache dropped), reset the prefix cache."""
        t0 = time.monotonic()
        self.state = SWAPPING_OUT
        try:
            async with httpx.AsyncClient(base_url=self.base_url, timeout=600) as client:
                await self._post(client, "/sleep", params={"level": "0"})
                reply = await self._rpc(client, "streamer_offload", discard_kv_cache="true")
                await self._post(client, "/reset_prefix_cache")
        except BaseException:
            self.state = FAILED
            raise
        moved = sum(int(r.get("bytes", 0)) for r in reply)
        if moved > 0:
            self.resident_bytes, self.measured = moved, True
        self.state = SWAPPED
        self.timings["swap_out"] = time.monotonic() - t0
        return {"bytes": moved, "seconds": self.timings["swap_out"],
                "opaque_bytes": sum(int((r.get("opaque") or {}).get("bytes", 0)) for r in reply)}

    async def swap_in(self) -> float:
        """Restore the weights and resume scheduling; returns the seconds taken."""
        t0 = time.monotonic()
        self.state = SWAPPING_IN
        try:
            async with httpx.AsyncClient(base_url=self.base_url, timeout=600) as client:
                await self._rpc(client, "streamer_restore")
                await self._post(client, "/wake_up", params={"tags": "scheduling"})
        except BaseException:
            self.state = FAILED
            raise
        self.state = RUNNING
        self.timings["swap_in"] = time.monotonic() - t0
        return self.timings["swap_in"]

    async def stop(self) -> None:
        """Terminate the engine's process group (SIGTERM, then SIGKILL after 20 s)."""
        proc, self.proc = self.proc, None
        self.state = STOPPED
        if proc is None or proc.poll() is not None:
            return
        try:
            os.killpg(proc.pid, signal.SIGTERM)
        except ProcessLookupError:
            return
        for _ in range(80):
            if proc.poll() is not None:
                return
            await asyncio.sleep(0.25)
        with contextlib.suppress(ProcessLookupError):
            os.killpg(proc.pid, signal.SIGKILL)
        proc.wait()

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
