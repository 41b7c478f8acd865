"""SGLang 0.5.23 on the CPU with ``--load-format streamer``: the real engine, in its own venv
(``.venv-sglang``, made by ``.ci/setup_sglang.sh``; SGLang wants another torch than vLLM).

Checkpoints are written by transformers' own classes (``_arch_models``). SGLang runs with a
stand-in ``sgl_kernel`` (``sgl_kernel_standin/``) whose every function fails the test if called.

* in one process (``_sglang_job.py unit``): ``get_model_loader(LoadConfig(load_format="streamer"))``
  after ``load_plugins()`` loads Llama, Qwen2, Qwen3, Qwen2-MoE and Qwen3-MoE; every parameter
  and buffer equals SGLang's ``safetensors`` loader's, bit for bit; a truncated shard is named; a
  bad extra-config key lists the allowed ones;
* ``sglang.Engine(load_format="streamer")``: greedy ids equal SGLang's own loader's and their
  logprobs equal them to float32 rounding (the same engine, its weights reloaded with
  ``safetensors``) on Llama, Qwen2 and Qwen3-MoE;
* ``python -m sglang.launch_server --load-format streamer`` over HTTP on 127.0.0.1, and a bad
  extra-config key failing at start;
* tensor parallelism 2 (``_sglang_job.py tp``: two ranks over gloo, as SGLang's schedulers): each
  rank's parameters equal SGLang's loader's bit for bit, and each rank reads only its own shards:
  the stream's ``read_bytes`` equal the bytes that land in the rank's parameters, and the kernel's
  count of the rank's reads (``/proc/self/io``) is far below the checkpoint; and
  ``sglang.Engine(tp_size=2, load_format="streamer")`` answers as with SGLang's loader.

SGLang's venv has torch's CUDA wheel, which brings NCCL; with it SGLang 0.5.23 sets up a NCCL
communicator at TP 2 even on the CPU engine and fails (``torch.cuda.device("cpu")``). A CPU-only
torch has no NCCL: ``SGLANG_NCCL_SO_PATH`` (SGLang's own setting) names no library here, as there.
"""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import httpx
import pytest

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent
sys.path.insert(0, str(HERE))

from _arch_models import make_arch_checkpoint  # noqa: E402

SGLANG_PY = ROOT / ".venv-sglang" / "bin" / "python"
JOB = HERE / "_sglang_job.py"
UNIT_ARCHS = ["llama", "qwen2", "qwen3", "qwen2_moe", "qwen3_moe"]
ENGINE_ARCHS = ["llama", "qwen2", "qwen3_moe"]
TP_ARCHS = ["llama", "qwen2_moe"]            # the loader at TP 2, per rank
#: the engine at TP 2: Qwen2-MoE's shared-expert gate runs a Triton kernel there, which SGLang's
#: CPU engine cannot run (in the forward pass, whatever the loader), so the MoE here is Qwen3-MoE
TP_ENGINE_ARCHS = ["llama", "qwen3_moe"]
#: wider than the unit models: the row-parallel weights' rows (o_proj: 32 heads of 32, down_proj:
#: 1024, float32) are 4 KiB, so the default ``gather_min_row_bytes`` reads them row by row; and
#: larger (25 and 46 MB), so that the kernel's count of a rank's reads is mostly checkpoint bytes
TP_SIZE = dict(hidden_size=1024, num_attention_heads=32, intermediate_size=1024, num_hidden_layers=1,
               num_experts=2, moe_intermediate_size=1024, shared_expert_intermediate_size=1024,
               max_shard_size="8MB")

pytestmark = pytest.mark.sglang

if not SGLANG_PY.exists():
    if os.environ.get("CI"):
        raise RuntimeError(f"{SGLANG_PY} is missing: SETUP_SGLANG=1 bash .ci/setup makes it (CI sets it)")
    pytest.skip(f"needs the SGLang venv {SGLANG_PY} (SETUP_SGLANG=1 bash .ci/setup)", allow_module_level=True)


@pytest.fixture(scope="module")
def models(tmp_path_factory):
    root = tmp_path_factory.mktemp("sglang-models")
    out = {a: str(make_arch_checkpoint(a, root / a)) for a in UNIT_ARCHS}
    out.update({f"{a}-other": str(make_arch_checkpoint(a, root / f"{a}-other", seed=1))
                for a in ENGINE_ARCHS})
    for arch in TP_ARCHS:
        size = {k: v for k, v in TP_SIZE.items() if arch.endswith("moe") or "moe" not in k and "expert" not in k}
        out[f"{arch}-tp"] = str(make_arch_checkpoint(arch, root / f"{arch}-tp", **size))
    return out


@pytest.fixture(scope="module")
def standin_log(tmp_path_factory):
    path = tmp_path_factory.mktemp("standin") / "calls.log"
    yield path
    assert not path.exists() or not path.read_text().strip(), f"sgl_kernel stand-in called:\n{path.read_text()}"


def _env(standin_log: Path) -> dict:
    env = dict(os.environ)
    env.update(SGLANG_USE_CPU_ENGINE="1", HF_HUB_OFFLINE="1", TRANSFORMERS_OFFLINE="1",
               LP_SGL_KERNEL_STANDIN_LOG=str(standin_log), SGLANG_NCCL_SO_PATH=str(HERE / "no-nccl-here.so"),
               SGLANG_CPU_OMP_THREADS_BIND="0|1",    # TP 2: a core per rank (SGLang's CPU engine asks)
               PYTHONPATH=os.pathsep.join([str(HERE / "sgl_kernel_standin"), str(HERE)]))
    env.pop("VIRTUAL_ENV", None)
    return env


def _job(standin_log: Path, *args: str, timeout: float = 900) -> dict:
    proc = subprocess.run([str(SGLANG_PY), str(JOB), *args], env=_env(standin_log), capture_output=True, text=True,
                          timeout=timeout)
    lines = [line for line in proc.stdout.splitlines() if line.startswith("RESULT ")]
    assert lines, f"the SGLang job printed no result (exit {proc.returncode}):\n{proc.stderr[-6000:]}"
    result = json.loads(lines[-1][len("RESULT "):])
    assert "error" not in result, result["error"] + "\n" + proc.stderr[-3000:]
    return result


def _assert_standin_unused(standin_log: Path) -> None:
    assert not standin_log.exists() or not standin_log.read_text().strip(), standin_log.read_text()


@pytest.fixture(scope="module")
def unit_result(models, standin_log, tmp_path_factory):
    truncated = tmp_path_factory.mktemp("truncated") / "llama"
    src = Path(models["llama"])
    truncated.mkdir()
    for f in src.iterdir():
        (truncated / f.name).write_bytes(f.read_bytes())
    shard = sorted(truncated.glob("*.safetensors"))[-1]
    shard.write_bytes(shard.read_bytes()[:-1000])
    result = _job(standin_log, "unit", *(models[a] for a in UNIT_ARCHS), "--truncated", str(truncated))
    result["truncated_shard"] = shard.name
    return result


def test_the_loader_fills_every_parameter_as_sglangs_own(unit_result, standin_log):
    for arch in UNIT_ARCHS:
        got = unit_result["models"][arch]
        assert got["loader"] == "StreamerSGLangLoader", got
        assert got["differ"] == [] and got["extra"] == [], (arch, got)
        assert got["tensors"] > 0 and got["in_place"] > 0 and got["in_place_bytes"] > 0, (arch, got)
    _assert_standin_unused(standin_log)


def test_a_truncated_shard_and_a_bad_key_are_named(unit_result):
    errors = unit_result["errors"]
    assert unit_result["truncated_shard"] in errors["truncated"], errors["truncated"]
    assert "concurency" in errors["bad_key"] and "allowed keys are" in errors["bad_key"], errors["bad_key"]
    assert "weights_uri" in errors["bad_key"] and "in_place" in errors["bad_key"]


def test_engine_greedy_ids_and_logprobs_equal_sglangs_loader(models, standin_log):
    result = _job(standin_log, "engine", *(f"{models[a]},{models[a + '-other']}" for a in ENGINE_ARCHS))
    for arch in ENGINE_ARCHS:
        got = result["models"][arch]
        assert all(ok for ok, _ in got["reloads"]), got["reloads"]
        assert got["other_weights"] != got["streamer"], f"{arch}: a reload to other weights changed nothing"
        for ours, theirs in zip(got["streamer"], got["safetensors"]):
            assert ours["ids"] == theirs["ids"], arch
            # The weights are the same bits (the in-process test); the CPU engine's float32 sums
            # differ by a unit in the last place from one run to the next (seen: 4.8e-7 at -4.68).
            assert ours["logprobs"] == pytest.approx(theirs["logprobs"], rel=1e-5, abs=1e-6), arch
            assert len(ours["ids"]) > 0
    _assert_standin_unused(standin_log)


def test_tensor_parallel_2_ranks_load_their_own_shards(models, standin_log):
    result = _job(standin_log, "tp", *(models[f"{a}-tp"] for a in TP_ARCHS))
    assert len(result["ranks"]) == 2
    for rank, per_model in enumerate(result["ranks"]):
        for arch in TP_ARCHS:
            got = per_model[f"{arch}-tp"]
            assert got["differ"] == [] and got["extra"] == [], (rank, arch, got["differ"])
            assert got["through"] == {} and got["in_place_shards"] > 0, (rank, arch, got["through"])
            # the rank read exactly the bytes that landed in its parameters: its dim-0 shards, the
            # rows of its dim-1 shards, the replicated tensors; no whole tensor it only cuts
            assert got["read_bytes"] == got["in_place_bytes"] + got["via_model_bytes"], (rank, arch, got)
            assert 0 < got["in_place_bytes"] <= got["param_bytes"], (rank, arch, got)   # (+ rotary caches)
            # and the kernel agrees: every read call of the process during the load (seen: 0.52 of
            # the checkpoint, headers and config files included; 0.68 when row-parallel weights
            # were read whole) is about half of it
            assert got["read_bytes"] <= got["rchar"] < 0.6 * got["checkpoint_bytes"], (rank, arch, got)
    _assert_standin_unused(standin_log)


def test_engine_at_tensor_parallel_2_answers_as_with_sglangs_loader(models, standin_log):
    result = _job(standin_log, "engine", *(f"{models[a]},{models[a + '-other']}" for a in TP_ENGINE_ARCHS),
                  "--tp", "2")
    for arch in TP_ENGINE_ARCHS:
        got = result["models"][arch]
        assert all(ok for ok, _ in got["reloads"]), got["reloads"]
        assert got["other_weights"] != got["streamer"], f"{arch}: a reload to other weights changed nothing"
        for ours, theirs in zip(got["streamer"], got["safetensors"]):
            assert ours["ids"] == theirs["ids"] and len(ours["ids"]) > 0, arch
            assert ours["logprobs"] == pytest.approx(theirs["logprobs"], rel=1e-5, abs=1e-6), arch
    _assert_standin_unused(standin_log)


def _port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _launch(model: str, port: int, extra: dict, standin_log: Path, log: Path) -> subprocess.Popen:
    cmd = [str(SGLANG_PY), "-m", "sglang.launch_server", "--model-path", model, "--load-format", "streamer",
           "--device", "cpu", "--attention-backend", "torch_native", "--sampling-backend", "pytorch",
           "--max-total-tokens", "2048", "--dtype", "float32", "--host", "127.0.0.1", "--port", str(port),
           "--model-loader-extra-config", json.dumps(extra), "--log-level", "warning"]
    return subprocess.Popen(cmd, env=_env(standin_log), stdout=log.open("w"), stderr=subprocess.STDOUT,
                            start_new_session=True)


def _stop(proc: subprocess.Popen) -> None:
    if proc.poll() is None:
        os.killpg(proc.pid, signal.SIGTERM)
        try:
            proc.wait(30)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait(10)


def test_launch_server_streams_and_answers_over_http(models, standin_log, tmp_path):
    port = _port()
    log = tmp_path / "server.log"
    proc = _launch(models["llama"], port, {"concurrency": 4}, standin_log, log)
    base = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 300
        while True:
            assert proc.poll() is None, f"launch_server exited {proc.returncode}:\n{log.read_text()[-4000:]}"
            try:
                if httpx.get(base + "/health", timeout=5).status_code == 200:
                    break
            except httpx.HTTPError:
                pass
            assert time.monotonic() < deadline, log.read_text()[-4000:]
            time.sleep(1)
        body = {"text": "The quick brown fox", "sampling_params": {"temperature": 0, "max_new_tokens": 12}}
        first = httpx.post(base + "/generate", json=body, timeout=120).json()
        again = httpx.post(base + "/generate", json=body, timeout=120).json()
        assert first["output_ids"] and first["output_ids"] == again["output_ids"]
        completion = httpx.post(base + "/v1/completions", timeout=120, json={
            "model": "default", "prompt": "The quick brown fox", "max_tokens": 12, "temperature": 0}).json()
        assert completion["choices"][0]["text"] == first["text"]
        info = httpx.get(base + "/get_server_info", timeout=30).json()
        assert info.get("load_format", "streamer") == "streamer"
    finally:
        _stop(proc)
    _assert_standin_unused(standin_log)


def test_a_bad_extra_config_key_fails_at_start_with_the_allowed_keys(models, standin_log, tmp_path):
    log = tmp_path / "server.log"
    proc = _launch(models["llama"], _port(), {"concurency": 4}, standin_log, log)
    try:
        assert proc.wait(180) != 0
    finally:
        _stop(proc)
    text = log.read_text()
    assert "'concurency'" in text and "allowed keys are" in text and "weights_uri" in text, text[-3000:]
    assert "Load weight" not in text          # refused before any engine process loaded anything
