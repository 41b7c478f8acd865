"""No engine answers without its secret: the engines' guard, their records, their command lines,
and the agent as the only door to its host's engines. (On real engines:
integration_tests/test_serve.py, ``test_an_engine_*``.)"""

from __future__ import annotations

import asyncio
import hashlib
import json
import logging
import os
import stat

import pytest

pytest.importorskip("fastapi")
from fastapi.testclient import TestClient  # noqa: E402

from loader_plugins.errors import ConfigError  # noqa: E402
from loader_plugins.serve import local  # noqa: E402
from loader_plugins.serve.agent import create_agent_app, run_agent  # noqa: E402
from loader_plugins.serve.catalog import ModelSpec, ServerSpec  # noqa: E402
from loader_plugins.serve.engine import EngineError, EngineState  # noqa: E402
from loader_plugins.serve.guard import SECRET_ENV, EngineGuard, refusal  # noqa: E402
from loader_plugins.serve.local import GUARD, LocalEngine  # noqa: E402
from loader_plugins.serve.records import EngineRecords  # noqa: E402

SECRET = "s3cret-token"
DIGEST = hashlib.sha256(SECRET.encode()).digest()
BEARER = f"Bearer {SECRET}"


@pytest.mark.parametrize("path, authorization, client, expected", [
    ("/health", None, "10.0.0.7", None),                       # the one open path, from anywhere
    ("/sleep", None, "127.0.0.1", 401),                        # dev mode: vLLM's --api-key leaves it open
    ("/collective_rpc", "Bearer wrong", "127.0.0.1", 401),
    ("/collective_rpc", SECRET, "127.0.0.1", 401),              # not a bearer token
    ("/sleep", BEARER, "127.0.0.1", None),
    ("/sleep", BEARER, "::ffff:127.0.0.1", None),
    ("/sleep", BEARER, "10.0.0.7", 403),                       # the secret is not enough off the node
    ("/is_sleeping", BEARER, "10.0.0.7", 403),
    ("/invocations", None, "127.0.0.1", 401),                  # completions outside /v1 (SageMaker's)
    ("/metrics", BEARER, None, 403),
    ("/v1/models", None, "10.0.0.7", 401),
    ("/v1/completions", BEARER, "10.0.0.7", None),             # the OpenAI API, with the secret
])
def test_the_guard_wants_the_secret_everywhere_and_loopback_for_all_but_the_api(path, authorization, client,
                                                                                 expected):
    refused = refusal(path, authorization, client, DIGEST)
    assert (refused[0] if refused else None) == expected


def test_an_engine_without_a_secret_refuses_everything_but_health():
    assert refusal("/health", None, "127.0.0.1", None) is None
    assert refusal("/v1/models", "Bearer ", "127.0.0.1", None)[0] == 401
    assert refusal("/v1/models", BEARER, "127.0.0.1", None)[0] == 401


def _asgi(guard: EngineGuard, path: str, headers: dict[str, str], client: tuple[str, int]) -> int:
    sent: list[dict] = []

    async def receive():
        return {"type": "http.request", "body": b"", "more_body": False}

    async def send(message):
        sent.append(message)

    scope = {"type": "http", "method": "POST", "path": path, "root_path": "", "client": client,
             "headers": [(k.lower().encode(), v.encode()) for k, v in headers.items()]}
    asyncio.run(guard(scope, receive, send))
    return sent[0]["status"]


def test_the_guard_as_vllm_loads_it(monkeypatch):
    """``--middleware`` adds the class with no arguments: the secret comes from the engine's
    environment, as vLLM's own ``VLLM_API_KEY``."""
    async def app(scope, receive, send):
        await send({"type": "http.response.start", "status": 299, "headers": []})
        await send({"type": "http.response.body", "body": b""})

    monkeypatch.setenv(SECRET_ENV, SECRET)
    guard = EngineGuard(app)
    assert _asgi(guard, "/sleep", {}, ("127.0.0.1", 5)) == 401
    assert _asgi(guard, "/sleep", {"Authorization": BEARER}, ("127.0.0.1", 5)) == 299
    assert _asgi(guard, "/sleep", {"Authorization": BEARER}, ("192.0.2.9", 5)) == 403
    assert _asgi(guard, "/v1/completions", {"Authorization": BEARER}, ("192.0.2.9", 5)) == 299
    assert _asgi(guard, "/health", {}, ("192.0.2.9", 5)) == 299
    monkeypatch.delenv(SECRET_ENV)
    assert _asgi(EngineGuard(app), "/v1/models", {"Authorization": "Bearer "}, ("127.0.0.1", 5)) == 401


def test_records_are_for_their_owner_only_and_old_files_still_load(tmp_path):
    records = EngineRecords(tmp_path / "logs" / "engines.json")
    leftover = tmp_path / "logs" / f"engines.json.{os.getpid()}.tmp"
    leftover.parent.mkdir()
    leftover.write_text("{}")
    leftover.chmod(0o644)
    records.save([{"model": "a", "pid": 1, "port": 2, "secret": SECRET}])
    assert stat.S_IMODE(records.path.stat().st_mode) == 0o600
    assert records.load() == [{"model": "a", "pid": 1, "port": 2, "secret": SECRET}]
    # written by the previous version: no secrets (its engines had none), states as strings
    records.path.write_text(json.dumps({"engines": [{"server": "local", "model": "a", "pid": 1, "port": 2,
                                                     "resident_bytes": 5, "measured": True}]}))
    assert records.load()[0]["model"] == "a"
    for garbage in ("[1, 2]", "not json", '{"engines": {"a": 1}}'):
        records.path.write_text(garbage)
        assert records.load() == []
    assert json.dumps({"state": EngineState.SWAPPING_OUT}) == '{"state": "swapping_out"}'
    assert EngineState("swapped") is EngineState.SWAPPED and f"{EngineState.RUNNING}" == "running"


def test_a_start_puts_the_secret_in_the_environment_not_the_command_line_or_the_log(tmp_path, monkeypatch,
                                                                                      caplog):
    seen = {}

    class Exited:
        pid, returncode = 99999, 1

        def poll(self):
            return 1

    def popen(cmd, **kwargs):
        seen["cmd"], seen["env"] = cmd, kwargs["env"]
        return Exited()

    monkeypatch.setattr(local.subprocess, "Popen", popen)
    engine = LocalEngine(ModelSpec(name="m", checkpoint="/m"), tmp_path, ServerSpec(name="s", budget=1))
    caplog.set_level(logging.DEBUG)
    with pytest.raises(EngineError, match="exited with 1 while starting"):
        asyncio.run(engine.start())
    secret = engine.secret
    assert secret and len(secret) >= 32 and seen["env"][SECRET_ENV] == secret
    assert seen["cmd"][seen["cmd"].index("--middleware") + 1] == GUARD
    assert seen["cmd"][seen["cmd"].index("--host") + 1] == "127.0.0.1"
    assert not any(secret in word for word in seen["cmd"]) and secret not in caplog.text
    assert engine.headers == {"Authorization": f"Bearer {secret}"}
    assert secret not in json.dumps(engine.describe())
    engine.proc = type("Alive", (), {"pid": 5, "returncode": None, "poll": lambda self: None})()
    assert engine.record()["secret"] == secret            # for engines.json (0600) only
    again = LocalEngine(ModelSpec(name="m", checkpoint="/m"), tmp_path, ServerSpec(name="s", budget=1))
    assert asyncio.run(again.adopt({"pid": os.getpid(), "port": 1, "secret": secret})) is False   # not an engine


@pytest.fixture
def agent(tmp_path):
    app = create_agent_app(ServerSpec(name="h", budget=1), tmp_path / "logs", api_key="agent-k")
    with TestClient(app) as client:
        yield client


def test_the_agent_is_the_door_to_its_engines(agent):
    key = {"Authorization": "Bearer agent-k"}
    for path in ("/agent/v1/completions", "/agent/engines/swap_out", "/agent/engines/swap_in",
                 "/agent/engines/check"):
        assert agent.post(path, json={"model": "m"}).status_code == 401, path
    for path in ("/sleep", "/collective_rpc", "/wake_up", "/v1/completions"):   # it relays none of these
        assert agent.post(path, headers=key, json={}).status_code == 404, path
    reply = agent.post("/agent/v1/completions", headers=key, json={"model": "m", "prompt": "x"})
    assert reply.status_code == 404 and "no engine of 'm'" in reply.json()["error"]["message"]
    assert agent.post("/agent/v1/completions", headers=key, content=b"[1]").status_code == 400
    for op in ("swap_out", "swap_in", "stop"):
        assert agent.post(f"/agent/engines/{op}", headers=key, json={"model": "m"}).status_code == 404
    assert agent.post("/agent/engines/check", headers=key, json={"model": "m"}).json() == \
        {"alive": False, "answers": False}
    assert agent.get("/agent/info", headers=key).json()["engine_host"] == "127.0.0.1"


def test_an_agent_refuses_to_put_engines_on_another_address(tmp_path):
    with pytest.raises(ConfigError, match="engines listen on 127.0.0.1 only"):
        create_agent_app(ServerSpec(name="h", budget=1), tmp_path, engine_host="10.0.0.6")
    with pytest.raises(ConfigError, match="Leave --engine-host out"):
        run_agent(name="h", host="10.0.0.6", port=1, engine_host="10.0.0.6", budget=1, cache_dir=None,
                  dram_cache_dir=None, log_dir=tmp_path, api_key="k")
