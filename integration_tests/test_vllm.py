"""The streamer load format on a real vLLM (CPU build), against vLLM's own safetensors loader.

Each engine runs in its own subprocess (vLLM keeps global state per process) with a bounded
timeout, so a hang fails the test instead of stalling CI.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

pytestmark = [pytest.mark.vllm, pytest.mark.slow]

vllm_spec = pytest.importorskip("importlib.util").find_spec("vllm")
if vllm_spec is None:
    pytest.skip("vLLM is not installed (bash .ci/install_vllm.sh .venv/bin/python)", allow_module_level=True)

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))

from _smoke_vllm_default import CPU_ENGINE_ENV, INPROCESS_ENV, run_serve  # noqa: E402
from _tiny_models import make_tiny_llama  # noqa: E402

JOB_TIMEOUT = 300


def run_job(spec: dict, *, expect_ok: bool = True) -> dict:
    env = {**os.environ, **CPU_ENGINE_ENV, **INPROCESS_ENV}
    proc = subprocess.run([sys.executable, str(HERE / "_vllm_job.py"), json.dumps(spec)], env=env,
                          capture_output=True, text=True, timeout=JOB_TIMEOUT)
    output = proc.stdout + proc.stderr
    if not expect_ok:
        assert proc.returncode != 0, output[-3000:]
        return {"output": output}
    assert proc.returncode == 0, output[-5000:]
    line = [x for x in proc.stdout.splitlines() if x.startswith("RESULT ")][-1]
    result = json.loads(line[len("RESULT "):])
    result["output"] = output
    return result


@pytest.fixture(scope="module")
def models(tmp_path_factory):
    root = tmp_path_factory.mktemp("vllm-models")
    return {
        "one": make_tiny_llama(root / "one", dtype="float32", seed=0),
        "sharded": make_tiny_llama(root / "sharded", dtype="float32", shards=3, seed=0),
        "bf16": make_tiny_llama(root / "bf16", dtype="bfloat16", shards=2, seed=1),
        "other": make_tiny_llama(root / "other", dtype="float32", seed=7),
    }


@pytest.fixture(scope="module")
def reference(models):
    """Greedy tokens with vLLM's default safetensors loader, per model."""
    cache: dict[str, list[int]] = {}

    def get(name: str) -> list[int]:
        if name not in cache:
            cache[name] = run_job({"model": str(models[name]), "load_format": "safetensors"})["outputs"][0]
        return cache[name]

    return get


def test_offline_tokens_match_default_loader(models, reference):
    got = run_job({"model": str(models["one"]), "load_format": "streamer"})
    assert got["outputs"][0] == reference("one")
    # every tensor, q/k/v and gate/up included (into their rows of qkv_proj / gate_up_proj), was
    # streamed into the parameters; none went through a temporary and the model's weight loader
    assert "Streamer loaded" in got["output"]
    assert re.search(r"21 tensors \([0-9.]+ GB\) in place, 0 tensors \(0.000 GB\) through", got["output"])


def test_sharded_checkpoint(models, reference):
    got = run_job({"model": str(models["sharded"]), "load_format": "streamer",
                   "extra": {"concurrency": 3, "chunk_bytes": 65536}})
    assert got["outputs"][0] == reference("sharded") == reference("one")


def test_bf16_checkpoint_into_float32_model(models, reference):
    got = run_job({"model": str(models["bf16"]), "load_format": "streamer", "dtype": "float32"})
    assert got["outputs"][0] == reference("bf16")
    # cast once in the sink, fused parts too
    assert re.search(r"21 tensors \([0-9.]+ GB\) in place, 0 tensors \(0.000 GB\) through", got["output"])


def test_reload_weights_switches_and_restores(models, reference):
    got = run_job({"model": str(models["one"]), "load_format": "streamer",
                   "steps": [{"generate": True}, {"reload": str(models["other"])}, {"generate": True},
                             {"reload": str(models["one"])}, {"generate": True}]})
    first, switched, restored = got["outputs"]
    assert first == reference("one")
    assert switched == reference("other") and switched != first
    assert restored == first


def test_weights_uri_points_elsewhere(models, reference, tmp_path):
    config_only = tmp_path / "config-only"
    shutil.copytree(models["one"], config_only, ignore=shutil.ignore_patterns("*.safetensors", "*.index.json"))
    got = run_job({"model": str(config_only), "load_format": "streamer",
                   "extra": {"weights_uri": str(models["other"])},
                   "steps": [{"generate": True}, {"reload": str(models["one"])}, {"generate": True}]})
    assert got["outputs"][0] == reference("other")
    assert got["outputs"][1] == reference("one"), "reload_weights(weights_path=...) must read that path"


def test_truncated_shard_fails_with_our_message(models, tmp_path):
    broken = tmp_path / "broken"
    shutil.copytree(models["sharded"], broken)
    shard = sorted(broken.glob("*.safetensors"))[1]
    data = shard.read_bytes()
    shard.write_bytes(data[: len(data) // 2])
    out = run_job({"model": str(broken), "load_format": "streamer"}, expect_ok=False)["output"]
    assert "HeaderError" in out and shard.name in out and "truncated" in out


def test_missing_tensor_is_named(models, tmp_path):
    from safetensors.torch import load_file, save_file

    partial = tmp_path / "partial"
    shutil.copytree(models["one"], partial)
    weights = load_file(partial / "model.safetensors")
    del weights["model.layers.1.post_attention_layernorm.weight"]
    save_file(weights, partial / "model.safetensors")
    out = run_job({"model": str(partial), "load_format": "streamer"}, expect_ok=False)["output"]
    assert "model.layers.1.post_attention_layernorm.weight" in out and "does not initialise" in out
    assert str(partial) in out


def test_bad_extra_config_key_lists_allowed_keys(models):
    out = run_job({"model": str(models["one"]), "load_format": "streamer", "extra": {"concurency": 4}},
                  expect_ok=False)["output"]
    assert "unknown --model-loader-extra-config key(s) 'concurency'" in out
    assert "allowed keys are: concurrency, chunk_bytes" in out and "weights_uri" in out


_BAD_VALUES = """
import json, sys
from loader_plugins.serve.vllm_cli import patch_vllm_version
patch_vllm_version()
from vllm.config import LoadConfig
from vllm.model_executor.model_loader import get_model_loader
from vllm.plugins import load_general_plugins
load_general_plugins()
for extra in json.loads(sys.argv[1]):
    try:
        get_model_loader(LoadConfig(load_format="streamer", model_loader_extra_config=extra))
        print("ACCEPTED", extra)
    except Exception as exc:
        print("REFUSED", type(exc).__name__, exc)
"""


def test_bad_extra_config_values_are_refused_by_the_loader_vllm_creates():
    """What vLLM does with --model-loader-extra-config: ``get_model_loader(LoadConfig(...))`` (an
    engine start that gets that far is test_bad_extra_config_key_lists_allowed_keys)."""
    cases = [{"direct_io": "maybe"}, {"in_place": "yes"}, {"in_place": False, "concurrency": 2}]
    proc = subprocess.run([sys.executable, "-c", _BAD_VALUES, json.dumps(cases)], capture_output=True, text=True,
                          timeout=JOB_TIMEOUT, env={**os.environ, **CPU_ENGINE_ENV})
    lines = [x for x in proc.stdout.splitlines() if x.startswith(("ACCEPTED", "REFUSED"))]
    assert len(lines) == 3, proc.stdout[-2000:] + proc.stderr[-3000:]
    assert lines[0].startswith("REFUSED ConfigError") and "'direct_io'" in lines[0] and "auto, on, off" in lines[0]
    assert lines[1].startswith("REFUSED ConfigError") and "'in_place' must be true, false or \"auto\"" in lines[1]
    assert lines[2].startswith("ACCEPTED")


def test_vllm_serve_over_http(models, reference, tmp_path):
    """`vllm serve MODEL --load-format streamer` in vLLM's production process layout (spawned engine
    core and worker: the plugin must register itself in each)."""
    served = run_serve(models["sharded"], "float32", load_format="streamer", log_path=tmp_path / "serve.log")
    assert served["token_ids"] == reference("sharded")
    log = (tmp_path / "serve.log").read_text()
    assert "Streamer loaded" in log


def test_in_place_off_loads_everything_through_load_weights(models, reference):
    got = run_job({"model": str(models["one"]), "load_format": "streamer", "extra": {"in_place": False}})
    assert got["outputs"][0] == reference("one")
    assert re.search(r"0 tensors \(0.000 GB\) in place, 21 tensors \([0-9.]+ GB\) through", got["output"])
