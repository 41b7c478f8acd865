"""Start ``model-streamer serve`` as a subprocess for a test, and stop it (with its engines)."""

from __future__ import annotations

import contextlib
import json
import os
import subprocess
import sys
import time
from pathlib import Path

import httpx

from _smoke_vllm_default import CPU_ENGINE_ENV, _free_port

from loader_plugins.serve.process import stop_process_group

API_KEY = "test-key-0123"


@contextlib.contextmanager
def running_router(config: dict, root: Path, *, env: dict[str, str] | None = None):
    """Yields ``{"base", "log", "client"}`` (an ``openai.OpenAI`` client with the API key)."""
    import openai

    root.mkdir(parents=True, exist_ok=True)
    (root / "serve.json").write_text(json.dumps(config))
    port = _free_port()
    log_path = root / "router.log"
    cmd = [sys.executable, "-m", "loader_plugins.cli", "serve", "--config", str(root / "serve.json"), "--port",
           str(port), "--api-key", API_KEY, "--log-dir", str(root / "engines")]
    with open(log_path, "wb") as log:
        proc = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, start_new_session=True,
                                env={**os.environ, **CPU_ENGINE_ENV, **(env or {})})
    base = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 60
        while True:
            assert proc.poll() is None, log_path.read_text()[-3000:]
            assert time.monotonic() < deadline, "the router did not answer /health"
            try:
                if httpx.get(base + "/health", timeout=2).status_code == 200:
                    break
            except httpx.TransportError:
                time.sleep(0.3)
        yield {"base": base, "log": log_path, "proc": proc, "config": config, "root": root,
               "client": openai.OpenAI(base_url=base + "/v1", api_key=API_KEY, max_retries=0, timeout=300)}
    finally:
        stop_process_group(proc, 60)   # the router stops its engines on the way out


def admin(router, path: str = "/admin/models") -> dict:
    reply = httpx.get(router["base"] + path, headers={"Authorization": f"Bearer {API_KEY}"}, timeout=30)
    reply.raise_for_status()
    return reply.json()


AGENT_KEY = "agent-key-4567"


@contextlib.contextmanager
def running_agent(root: Path, *, name: str, cache_dir: Path | None = None, env: dict[str, str] | None = None,
                  port: int | None = None, host: str = "127.0.0.1"):
    """``model-streamer agent`` as a subprocess on ``host`` (another "host" for the router):
    yields ``{"url", "port", "log", "proc", "headers"}``."""
    root.mkdir(parents=True, exist_ok=True)
    port = port or _free_port()
    log_path = root / f"agent-{port}-{time.monotonic_ns()}.log"
    cmd = [sys.executable, "-m", "loader_plugins.cli", "agent", "--name", name, "--host", host, "--port", str(port),
           "--api-key", AGENT_KEY, "--log-dir", str(root / "engines")]
    if cache_dir is not None:
        cmd += ["--cache-dir", str(cache_dir)]
    with open(log_path, "wb") as log:
        proc = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, start_new_session=True,
                                env={**os.environ, **CPU_ENGINE_ENV, **(env or {})})
    url = f"http://{host}:{port}"
    try:
        deadline = time.monotonic() + 60
        while True:
            assert proc.poll() is None, log_path.read_text()[-3000:]
            assert time.monotonic() < deadline, "the agent did not answer /health"
            try:
                if httpx.get(url + "/health", timeout=2).status_code == 200:
                    break
            except httpx.TransportError:
                time.sleep(0.3)
        yield {"url": url, "port": port, "log": log_path, "proc": proc, "headers": {"Authorization": f"Bearer {AGENT_KEY}"}}
    finally:
        stop_process_group(proc, 60)   # the agent stops its engines on the way out
