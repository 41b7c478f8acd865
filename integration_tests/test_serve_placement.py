"""Load-time-aware placement on real engines: ``model-streamer serve`` with two servers whose
loads go through different cache directories, the weights on a real S3 server (SeaweedFS).

Server ``remote`` (listed first, so a tie would go to it) is the router's own host with an empty
disk cache: the model's weights would come from S3. Server ``cached`` is another "host": a
``model-streamer agent`` process addressed by URL, whose disk cache holds the weights (filled
beforehand by a streamer load through that cache). A request for the model must start it on
``cached``, through its agent, from the estimate that agent made; the decision lists both
estimates with their tiers, and the engine's load is then served by the disk tier (the cache's
load history gains a ``disk`` sample). Then a stream migrates between the two hosts.
"""

from __future__ import annotations

import json
import os
import shutil
import sys
import threading
import time
from pathlib import Path

import httpx

import pytest

pytestmark = [pytest.mark.vllm, pytest.mark.s3, pytest.mark.slow]
if pytest.importorskip("importlib.util").find_spec("vllm") is None:
    pytest.skip("vLLM is not installed (bash .ci/install_vllm.sh .venv/bin/python)", allow_module_level=True)
pytest.importorskip("openai")

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
from _serve_router import AGENT_KEY, API_KEY, admin, running_agent, running_router  # noqa: E402
from _smoke_vllm_default import CPU_ENGINE_KWARGS, PROMPT, _cli_flags  # noqa: E402
from _tiny_models import make_tiny_llama, tiny_llama_tensor_names  # noqa: E402

from loader_plugins import StreamerConfig, load_file  # noqa: E402
from loader_plugins.cache.disk import wait_for_commits  # noqa: E402
from loader_plugins.cache.estimate import HISTORY_NAME, LoadHistory  # noqa: E402


def test_a_cold_model_starts_where_its_checkpoint_is_cached(s3_server, s3_env, s3_bucket, tmp_path):
    # about 200 MB of float32 weights: the tiers' transfer times differ by far more than timing noise
    model = make_tiny_llama(tmp_path / "model", hidden=768, layers=8, intermediate=2048, shards=2, seed=3)
    client = s3_server.client()
    for f in model.glob("*.safetensors*"):
        client.upload_file(str(f), s3_bucket, f"mid/{f.name}")
    config_only = tmp_path / "config-only"   # config and tokenizer: the weights come from weights_uri
    shutil.copytree(model, config_only, ignore=shutil.ignore_patterns("*.safetensors", "*.safetensors.index.json"))
    prefix = f"s3://{s3_bucket}/mid/"
    s3_keys = {"s3_endpoint_url": s3_server.endpoint_url, "s3_addressing_style": "path"}

    cached_dir, remote_dir = tmp_path / "cache-cached", tmp_path / "cache-remote"
    warmed = load_file(prefix, config=StreamerConfig.from_dict({"cache_dir": str(cached_dir), **s3_keys}))
    assert wait_for_commits(60) and len(warmed) == len(tiny_llama_tensor_names(8))
    disk_loads_before = len(LoadHistory(cached_dir / HISTORY_NAME).samples("disk"))

    engine_env = {k: v for k, v in s3_env.items() if k != "AWS_ENDPOINT_URL"}
    with running_agent(tmp_path / "agent", name="host-2", cache_dir=cached_dir) as agent:
        # the agent refuses a caller without its key
        assert httpx.get(agent["url"] + "/agent/info", timeout=30).status_code == 401
        config = {
            "budget": "8GiB", "idle_timeout": 600,
            "servers": {"remote": {"cache_dir": str(remote_dir)},
                        "cached": {"url": agent["url"], "api_key": AGENT_KEY}},
            "engine": {"args": ["--dtype", "float32", "--seed", "0", *_cli_flags(CPU_ENGINE_KWARGS)],
                       "start_timeout": 300, "env": engine_env},
            "models": {"mid": {"checkpoint": str(config_only), "weights": prefix, "loader": s3_keys}},
        }
        with running_router(config, tmp_path / "router") as router:
            servers = admin(router)["servers"]
            assert servers["cached"]["url"] == agent["url"] and servers["cached"]["connected"], servers
            assert servers["cached"]["cache_dir"] == str(cached_dir)     # as the agent reported it
            reply = router["client"].completions.create(model="mid", prompt=PROMPT, max_tokens=4, temperature=0,
                                                        extra_body={"ignore_eos": True})
            assert reply.usage.completion_tokens == 4
            placements = admin(router, "/admin/placements")["placements"]
            models = {(m["model"], m["server"]): m for m in admin(router)["models"]}
            states = {key: m["state"] for key, m in models.items()}
            on_agent = httpx.get(agent["url"] + "/agent/engines", headers=agent["headers"], timeout=30).json()
            assert [(e["model"], e["pid"], e["port"]) for e in on_agent["engines"]] == \
                [("mid", models[("mid", "cached")]["pid"], models[("mid", "cached")]["port"])], on_agent
            assert models[("mid", "cached")]["agent"] == agent["url"]
            _check_live_migration(router)
            # a router killed without clean-up, restarted on the same directory, finds both engines again:
            # the one of its own host by pid, the one on the agent's host through the agent
            before = {m["server"]: (m["state"], m["pid"], m["port"]) for m in admin(router)["models"]}
            router["proc"].kill()
            router["proc"].wait()
            first_log = router["log"].read_text()
        with running_router(config, tmp_path / "router") as again:
            after = {m["server"]: (m["state"], m["pid"], m["port"]) for m in admin(again)["models"]}
            assert after == before and after["cached"][0] == "running", (before, after)
            again_reply = again["client"].completions.create(model="mid", prompt=PROMPT, max_tokens=4,
                                                             temperature=0, extra_body={"ignore_eos": True})
            assert again_reply.choices[0].text == reply.choices[0].text
            assert "found 2 engine(s) again" in again["log"].read_text()
            # an agent killed and restarted on the same directory and port takes its engine over
            agent["proc"].kill()
            agent["proc"].wait()
            with running_agent(tmp_path / "agent", name="host-2", cache_dir=cached_dir, port=agent["port"]) as agent2:
                listed = httpx.get(agent2["url"] + "/agent/engines", headers=agent2["headers"], timeout=30).json()
                assert [(e["model"], e["pid"]) for e in listed["engines"]] == [("mid", after["cached"][1])], listed
                assert "found 1 engine(s) again" in agent2["log"].read_text()
                httpx.post(again["base"] + "/admin/models/mid/stop", params={"server": "cached"}, timeout=120,
                           headers={"Authorization": f"Bearer {API_KEY}"}).raise_for_status()
                listed = httpx.get(agent2["url"] + "/agent/engines", headers=agent2["headers"], timeout=30).json()
                assert listed["engines"] == [], listed   # stopped through the agent that took it over
    with pytest.raises(ProcessLookupError):
        os.kill(after["cached"][1], 0)

    assert len(placements) == 1, placements
    decision = placements[0]
    candidates = {c["server"]: c for c in decision["candidates"]}
    assert decision["chosen"] == "cached", decision
    assert (candidates["cached"]["how"], candidates["cached"]["tier"]) == ("cold", "disk")
    assert (candidates["remote"]["how"], candidates["remote"]["tier"]) == ("cold", "s3")
    assert candidates["cached"]["seconds"] < candidates["remote"]["seconds"]
    assert decision["measured_seconds"] > 0 and decision["ratio"] is not None
    assert states == {("mid", "cached"): "running", ("mid", "remote"): "stopped"}
    # the engine's load really came from the disk tier
    assert len(LoadHistory(cached_dir / HISTORY_NAME).samples("disk")) == disk_loads_before + 1
    remote_history = LoadHistory(remote_dir / HISTORY_NAME)   # its engine, started for the migration, read S3
    assert len(remote_history.samples("s3")) == 1 and not remote_history.samples("disk")
    log = first_log
    assert "place mid on cached: remote" in log and "measured" in log


LONG = 120


def _stream(router, *, on_chunk=None) -> dict:
    """A greedy streaming completion read event by event: token ids, text, chunk ids, the
    largest gap between two tokens."""
    body = {"model": "mid", "prompt": PROMPT, "max_tokens": LONG, "temperature": 0, "stream": True,
            "ignore_eos": True, "return_token_ids": True}
    out = {"ids": [], "text": "", "chunk_ids": set(), "gaps": [], "prompt_ids": None}
    last = None
    with httpx.stream("POST", router["base"] + "/v1/completions", json=body, timeout=300,
                      headers={"Authorization": f"Bearer {API_KEY}"}) as reply:
        assert reply.status_code == 200, reply.read()
        for line in reply.iter_lines():
            if not line.startswith("data: {"):
                continue
            chunk = json.loads(line[6:])
            assert "error" not in chunk, chunk
            choice = chunk["choices"][0]
            out["prompt_ids"] = out["prompt_ids"] or choice.get("prompt_token_ids")
            out["ids"] += choice.get("token_ids") or []
            out["text"] += choice["text"]
            out["chunk_ids"].add(chunk["id"])
            now = time.monotonic()
            if last is not None:
                out["gaps"].append(now - last)
            last = now
            if on_chunk is not None:
                on_chunk(len(out["ids"]))
    return out


def _check_live_migration(router):
    """Token-based live migration: the model runs on both servers; a long greedy stream is moved
    from its server to the other mid-generation and must equal an unmigrated run token for token."""
    reply = httpx.post(router["base"] + "/admin/models/mid/start", params={"server": "remote"},
                       headers={"Authorization": f"Bearer {API_KEY}"}, timeout=400)
    assert reply.status_code == 200 and reply.json()["state"] == "running", reply.text
    reference = _stream(router)
    assert len(reference["ids"]) == LONG and len(reference["chunk_ids"]) == 1

    moved: dict = {}

    def migrate_at(n_tokens: int) -> None:
        if n_tokens != 5 or moved:
            return
        source = [m["server"] for m in admin(router)["models"] if m["inflight"]]
        moved["source"] = source

        def call():
            moved["reply"] = httpx.post(router["base"] + "/admin/models/mid/migrate", params={"server": source[0]},
                                        headers={"Authorization": f"Bearer {API_KEY}"}, timeout=300).json()
        moved["thread"] = threading.Thread(target=call)
        moved["thread"].start()

    migrated = _stream(router, on_chunk=migrate_at)
    moved["thread"].join(timeout=300)
    assert len(moved["source"]) == 1, moved
    report = moved["reply"]["moved"]
    assert len(report) == 1 and report[0]["from"] == moved["source"][0], moved["reply"]
    assert report[0]["to"] != report[0]["from"] and report[0]["tokens_moved"] >= 5
    # one stream, the same tokens and text as without the move, no token twice
    assert migrated["ids"] == reference["ids"] and migrated["text"] == reference["text"]
    assert migrated["prompt_ids"] == reference["prompt_ids"] and len(migrated["chunk_ids"]) == 1
    migrations = admin(router, "/admin/placements")["migrations"]
    assert len(migrations) == 1 and migrations[0]["tokens_moved"] == report[0]["tokens_moved"]
    states = {m["server"]: m["inflight"] for m in admin(router)["models"]}
    assert states == {"remote": 0, "cached": 0}, states
