"""``model-streamer agent`` in process, without engines: what it reports, what it refuses."""

from __future__ import annotations

import json

import pytest

pytest.importorskip("fastapi")
from fastapi.testclient import TestClient  # noqa: E402

from loader_plugins.cache.estimate import HISTORY_NAME, LoadHistory  # noqa: E402
from loader_plugins.errors import ConfigError  # noqa: E402
from loader_plugins.serve.agent import create_agent_app, run_agent  # noqa: E402
from loader_plugins.serve.catalog import ServerSpec  # noqa: E402

KEY = {"Authorization": "Bearer agent-k"}


@pytest.fixture
def agent(tmp_path):
    spec = ServerSpec(name="host-2", budget=3 << 30, cache_dir=str(tmp_path / "cache"))
    LoadHistory(tmp_path / "cache" / HISTORY_NAME).record("disk", 2_000_000_000, 1.0)   # 2 GB/s measured here
    app = create_agent_app(spec, tmp_path / "logs", engine_host="127.0.0.1", api_key="agent-k")
    with TestClient(app) as client:
        yield client


def test_every_endpoint_but_health_needs_the_key(agent):
    assert agent.get("/health").status_code == 200
    for method, path in (("GET", "/agent/info"), ("GET", "/agent/engines"), ("POST", "/agent/estimate"),
                         ("POST", "/agent/engines/start"), ("POST", "/agent/engines/stop")):
        reply = agent.request(method, path, headers={"Authorization": "Bearer wrong"})
        assert reply.status_code == 401 and "API key" in reply.json()["error"]["message"], (method, path)


def test_info_reports_budget_tiers_and_the_bandwidths_measured_here(agent, tmp_path):
    info = agent.get("/agent/info", headers=KEY).json()
    assert (info["server"], info["budget"], info["engine_host"]) == ("host-2", 3 << 30, "127.0.0.1")
    assert info["cache_dir"] == str(tmp_path / "cache") and info["engines"] == []
    assert info["bandwidths"]["disk"]["gbps"] == 2.0 and info["bandwidths"]["disk"]["samples"] == 1
    assert info["bandwidths"]["s3"]["samples"] == 0   # the default, said as such
    assert "default" in info["bandwidths"]["s3"]["basis"]


def test_estimate_is_made_through_this_hosts_tiers(agent, tmp_path):
    import torch
    from safetensors.torch import save_file

    model = tmp_path / "model"
    model.mkdir()
    save_file({"w": torch.zeros(1000, 250)}, str(model / "model.safetensors"))
    reply = agent.post("/agent/estimate", headers=KEY,
                       json={"weights": str(model), "loader": {"concurrency": 2, "cache_dir": "/elsewhere"}})
    assert reply.status_code == 200, reply.text
    estimate = reply.json()
    assert estimate["tier"] == "local" and estimate["bytes"] > 1_000_000 and estimate["files"] == 1
    bad = agent.post("/agent/estimate", headers=KEY, json={"weights": str(model), "loader": {"concurency": 2}})
    assert bad.status_code == 400 and "concurency" in bad.json()["error"]["message"]
    assert agent.post("/agent/estimate", headers=KEY, json={"loader": {}}).status_code == 400


@pytest.mark.parametrize("body, message", [
    ({"checkpoint": "/m"}, "'model' and 'checkpoint'"),
    ({"model": "a", "checkpoint": "/m", "args": ["--host", "0.0.0.0"]}, "the router sets itself"),
    ({"model": "a", "checkpoint": "/m", "args": ["--api-key=x"]}, "the router sets itself"),
    ({"model": "a", "checkpoint": "/m", "loader": {"concurency": 1}}, "unknown"),
    ({"model": "a", "checkpoint": "/m", "start_timeout": -1}, "positive number"),
    ({"model": "a", "checkpoint": "/m", "gpu": 1}, "unknown key(s) ['gpu']"),
])
def test_a_start_request_is_validated_as_the_catalogue_is(agent, body, message):
    reply = agent.post("/agent/engines/start", headers=KEY, json=body)
    assert reply.status_code == 400 and message in reply.json()["error"]["message"], reply.text
    assert agent.get("/agent/engines", headers=KEY).json() == {"engines": []}


def test_stopping_what_does_not_run_and_bodies_that_are_not_json(agent):
    reply = agent.post("/agent/engines/stop", headers=KEY, json={"model": "nothing"})
    assert reply.status_code == 404 and "no engine of 'nothing'" in reply.json()["error"]["message"]
    reply = agent.post("/agent/engines/start", headers=KEY, content=b"{not json")
    assert reply.status_code == 400 and "not JSON" in reply.json()["error"]["message"]


def test_a_stale_engines_file_is_not_adopted(tmp_path):
    logs = tmp_path / "logs"
    logs.mkdir()
    request = {"model": "a", "checkpoint": "/m"}
    (logs / "engines.json").write_text(json.dumps({"engines": [{"model": "a", "pid": 1, "port": 1, "host": "127.0.0.1",
                                                               "request": request}]}))
    app = create_agent_app(ServerSpec(name="h", budget=1), logs)
    with TestClient(app) as client:
        assert client.get("/agent/engines").json() == {"engines": []}   # pid 1 is no engine of ours
    assert json.loads((logs / "engines.json").read_text()) == {"engines": []}


def test_an_agent_on_a_public_address_needs_a_key(tmp_path):
    with pytest.raises(ConfigError, match="without an API key"):
        run_agent(name="h", host="0.0.0.0", port=1, engine_host=None, budget=1, cache_dir=None, dram_cache_dir=None,
                  log_dir=tmp_path, api_key=None)
