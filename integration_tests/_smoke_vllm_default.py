"""Smoke check: a tiny Llama through vLLM's own safetensors loader on CPU, offline and served.

    python integration_tests/_smoke_vllm_default.py [--mode llm|serve|both] [--shards N] [--dtype D]

Builds the tiny model (``_tiny_models.make_tiny_llama``) in a temporary directory, then

- ``llm``:   ``vllm.LLM(model, load_format="safetensors", dtype=..., max_model_len=256, enforce_eager=True)``
  and one greedy ``generate``;
- ``serve``: ``python _vllm_launcher.py serve MODEL ...`` in its own process group, waits for ``/health``,
  sends one ``/v1/completions`` request (temperature 0, ``return_token_ids``), then kills the group.

Prints one JSON line per mode (generated token ids, text, engine start seconds) and checks that both
modes generate the same ids. Not collected by pytest (no ``test_`` prefix); the integration tests reuse
its settings.

Fast, small CPU engine (measured on 2 cores; see ``CPU_ENGINE_ENV`` / ``CPU_ENGINE_KWARGS``):

- ``kv_cache_memory_bytes=16 MiB`` (16k tokens). vLLM zero-fills the CPU KV cache at start, so its size is
  resident memory: 1 GiB (``VLLM_CPU_KVCACHE_SPACE=1``) costs ~1 GB RSS and ~1 s. With neither setting vLLM
  reserves ``gpu_memory_utilization`` (0.92) of the NUMA node and refuses to start when that much is not
  free. Do not also set ``VLLM_CPU_KVCACHE_SPACE``: it overrides ``kv_cache_memory_bytes``.
- ``enforce_eager=True`` (no torch.compile), ``max_num_seqs=4``, ``max_num_batched_tokens=256``,
  ``max_model_len=256``, ``disable_log_stats=True``.
- ``--inprocess`` (default for ``llm``): ``VLLM_ENABLE_V1_MULTIPROCESSING=0`` runs the engine core and the
  worker inside the calling process (uniproc executor). That skips two ``spawn`` children, each of which
  re-imports vLLM (~10 s each here): engine start drops from ~30 s to ~3 s. The loader then runs in the
  caller's process. ``--no-inprocess`` keeps vLLM's production layout (API/LLM process -> EngineCore ->
  worker, all spawned), which is what a plugin test must use to prove registration in child processes.
- ``VLLM_CPU_OMP_THREADS_BIND=nobind``: vLLM leaves the CPU affinity of the process alone (with ``auto`` on
  2 cores it reserves one core and pins the worker to the other).
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import socket
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.request
from pathlib import Path

_HERE = Path(__file__).resolve().parent
if str(_HERE) not in sys.path:
    sys.path.insert(0, str(_HERE))

from _tiny_models import make_tiny_llama  # noqa: E402
from _vllm_launcher import patch_vllm_version  # noqa: E402

PROMPT = "Hello world, my name is"
MAX_TOKENS = 16

# Read by vLLM at engine start; set by the caller (this script, a test fixture), never by library code.
CPU_ENGINE_ENV = {
    "HF_HUB_OFFLINE": "1",
    "VLLM_CPU_OMP_THREADS_BIND": "nobind",
    "VLLM_NO_USAGE_STATS": "1",
    "DO_NOT_TRACK": "1",
}
# Engine core and worker in the calling process (see the module docstring).
INPROCESS_ENV = {"VLLM_ENABLE_V1_MULTIPROCESSING": "0"}
CPU_ENGINE_KWARGS = {
    "kv_cache_memory_bytes": 16 * 1024 * 1024,
    "max_model_len": 256,
    "max_num_seqs": 4,
    "max_num_batched_tokens": 256,
    "enforce_eager": True,
    "disable_log_stats": True,
}


def _cli_flags(kwargs: dict) -> list[str]:
    flags = []
    for key, value in kwargs.items():
        flag = "--" + key.replace("_", "-")
        if value is True:
            flags.append(flag)
        else:
            flags += [flag, str(value)]
    return flags


def run_llm(model_dir: Path, dtype: str) -> dict:
    patch_vllm_version()
    from vllm import LLM, SamplingParams

    t0 = time.monotonic()
    llm = LLM(str(model_dir), load_format="safetensors", dtype=dtype, seed=0, **CPU_ENGINE_KWARGS)
    start_s = time.monotonic() - t0
    t1 = time.monotonic()
    out = llm.generate([PROMPT], SamplingParams(temperature=0.0, max_tokens=MAX_TOKENS), use_tqdm=False)
    gen_s = time.monotonic() - t1
    completion = out[0].outputs[0]
    result = {
        "mode": "llm",
        "engine_start_s": round(start_s, 2),
        "generate_s": round(gen_s, 3),
        "prompt_token_ids": list(out[0].prompt_token_ids),
        "token_ids": list(completion.token_ids),
        "text": completion.text,
    }
    llm.llm_engine.engine_core.shutdown()
    del llm
    return result


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _http(url: str, body: dict | None = None, timeout: float = 60) -> dict | str:
    data = None if body is None else json.dumps(body).encode()
    req = urllib.request.Request(url, data=data, headers={"Content-Type": "application/json"})
    with urllib.request.urlopen(req, timeout=timeout) as resp:
        raw = resp.read().decode()
    try:
        return json.loads(raw)
    except json.JSONDecodeError:
        return raw


def run_serve(model_dir: Path, dtype: str, timeout_s: float = 240, log_path: Path | None = None,
              load_format: str = "safetensors", extra_flags: tuple[str, ...] = ()) -> dict:
    port = _free_port()
    cmd = [
        sys.executable,
        str(_HERE / "_vllm_launcher.py"),
        "serve",
        str(model_dir),
        "--host",
        "127.0.0.1",
        "--port",
        str(port),
        "--load-format",
        load_format,
        *extra_flags,
        "--dtype",
        dtype,
        "--seed",
        "0",
        *_cli_flags(CPU_ENGINE_KWARGS),
    ]
    log_path = log_path or Path(tempfile.mkstemp(prefix="vllm-serve-", suffix=".log")[1])
    base = f"http://127.0.0.1:{port}"
    t0 = time.monotonic()
    with open(log_path, "wb") as log:
        proc = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
    try:
        while True:
            if proc.poll() is not None:
                raise RuntimeError(f"vllm serve exited with {proc.returncode}; log: {log_path}")
            if time.monotonic() - t0 > timeout_s:
                raise TimeoutError(f"vllm serve not healthy after {timeout_s}s; log: {log_path}")
            try:
                _http(base + "/health", timeout=2)
                break
            except (urllib.error.URLError, ConnectionError, TimeoutError):
                time.sleep(0.5)
        start_s = time.monotonic() - t0
        t1 = time.monotonic()
        resp = _http(
            base + "/v1/completions",
            {
                "model": str(model_dir),
                "prompt": PROMPT,
                "max_tokens": MAX_TOKENS,
                "temperature": 0,
                "return_token_ids": True,
            },
        )
        gen_s = time.monotonic() - t1
        choice = resp["choices"][0]
        return {
            "mode": "serve",
            "healthy_s": round(start_s, 2),
            "request_s": round(gen_s, 3),
            "prompt_token_ids": choice.get("prompt_token_ids"),
            "token_ids": choice.get("token_ids"),
            "text": choice["text"],
            "log": str(log_path),
        }
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGTERM)
            try:
                proc.wait(timeout=20)
            except subprocess.TimeoutExpired:
                os.killpg(proc.pid, signal.SIGKILL)
                proc.wait()


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--mode", choices=["llm", "serve", "both"], default="both")
    parser.add_argument("--shards", type=int, default=1)
    parser.add_argument("--dtype", default="float32", choices=["float32", "bfloat16"])
    parser.add_argument(
        "--inprocess",
        action=argparse.BooleanOptionalAction,
        default=None,
        help="VLLM_ENABLE_V1_MULTIPROCESSING=0 (default: on for --mode llm, off otherwise)",
    )
    args = parser.parse_args(argv)
    env = dict(CPU_ENGINE_ENV)
    if args.inprocess or (args.inprocess is None and args.mode == "llm"):
        env.update(INPROCESS_ENV)
    for key, value in env.items():
        os.environ.setdefault(key, value)

    results = []
    with tempfile.TemporaryDirectory(prefix="tiny-llama-") as tmp:
        model_dir = make_tiny_llama(Path(tmp) / "model", dtype=args.dtype, shards=args.shards, seed=0)
        if args.mode in ("llm", "both"):
            results.append(run_llm(model_dir, args.dtype))
            print(json.dumps(results[-1]), flush=True)
        if args.mode in ("serve", "both"):
            results.append(run_serve(model_dir, args.dtype))
            print(json.dumps(results[-1]), flush=True)
    ids = [r["token_ids"] for r in results]
    if not all(ids) or any(len(set(i)) < 2 for i in ids):
        print("FAIL: empty or degenerate generation", file=sys.stderr)
        return 1
    if len(ids) == 2 and ids[0] != ids[1]:
        print(f"FAIL: LLM and serve disagree: {ids[0]} != {ids[1]}", file=sys.stderr)
        return 1
    print("OK", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
