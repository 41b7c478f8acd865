"""Loads from S3 in fresh processes: this project next to Run:ai Model Streamer, requests counted
at the server.

    model-streamer bench-s3-fresh MODEL_DIR [--repeat 3] [--moe DIR]

Starts SeaweedFS on 127.0.0.1 (``bench/seaweed.py``), uploads the checkpoint's safetensors (and
its index) under ``s3://bench/model/``, then runs each method in a new process per load, in
turns (a new order each round): ``streamer`` is ``load_file("s3://bench/model")``; ``runai`` is
Run:ai Model Streamer's ``SafetensorsStreamer`` over the shards (``runai-model-streamer-s3``,
its default concurrency). Each load's seconds count from the call to the last tensor (torch is
imported before, as in an engine; each loader's own imports and clients count); the
requests are the server's own counters (Prometheus metrics) before and after the process, so
every GET, HEAD and LIST either client sent is counted. With ``--moe DIR`` the per-expert and
fused Qwen3-MoE checkpoints (``bench/moe.py``) are measured too.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

_CHILD = r"""
import json, sys, time
import torch  # an engine's process has torch loaded before any loader runs; neither load pays for it
spec = json.loads(sys.argv[1])
if spec["method"] == "streamer":
    from loader_plugins import load_file
    t0 = time.perf_counter()
    out = load_file(spec["uri"], s3_endpoint_url=spec["endpoint"])
    n = len(out)
else:
    from loader_plugins.bench.peers import runai_s3
    t0 = time.perf_counter()
    runai_s3(spec["shards"], endpoint=spec["endpoint"], virtual_addressing=False, region="us-east-1")
    n = None
print("S3FRESH " + json.dumps({"seconds": time.perf_counter() - t0, "tensors": n}), flush=True)
"""

METHODS = ("streamer", "runai")


def add_parser(sub) -> None:
    from .engine_table import add_model_args

    p = sub.add_parser("bench-s3-fresh", help="S3 loads in fresh processes, streamer vs Run:ai, requests counted at "
                       "the server", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_model_args(p)
    p.add_argument("--repeat", type=int, default=3)
    p.add_argument("--json", metavar="FILE")
    p.set_defaults(func=run)


def _upload(client, model: str, prefix: str) -> list[str]:
    names = sorted(n for n in os.listdir(model) if n.endswith(".safetensors") or n.endswith(".index.json"))
    for name in names:
        client.upload_file(os.path.join(model, name), "bench", f"{prefix}/{name}")
    return [f"s3://bench/{prefix}/{n}" for n in names if n.endswith(".safetensors")]


def run(args: argparse.Namespace) -> int:
    from .engine_table import models_to_bench
    from .runner import round_order
    from .seaweed import SeaweedS3

    models = models_to_bench(args)
    out = []
    with tempfile.TemporaryDirectory(prefix="bench-s3-") as tmp, SeaweedS3(tmp) as s3:
        client = s3.client()
        client.create_bucket(Bucket="bench")
        env = {**os.environ, **s3.env()}
        for i, (label, model) in enumerate(models):
            shards = _upload(client, model, f"m{i}")
            uri = f"s3://bench/m{i}"
            runs: dict[str, list[dict]] = {m: [] for m in METHODS}
            for rep in range(args.repeat):
                for method in round_order(list(METHODS), rep):
                    before = s3.request_counts()
                    spec = {"method": method, "uri": uri, "shards": shards, "endpoint": s3.endpoint_url}
                    proc = subprocess.run([sys.executable, "-c", _CHILD, json.dumps(spec)], env=env,
                                          capture_output=True, text=True, timeout=900)
                    after = s3.request_counts()
                    lines = [x for x in proc.stdout.splitlines() if x.startswith("S3FRESH ")]
                    if proc.returncode or not lines:
                        print(f"bench-s3-fresh: {method} failed (exit {proc.returncode}):\n{proc.stderr[-2000:]}",
                              file=sys.stderr)
                        continue
                    row = json.loads(lines[-1][len("S3FRESH "):])
                    row["requests"] = {k: after.get(k, 0) - before.get(k, 0) for k in after
                                       if after.get(k, 0) != before.get(k, 0)}
                    runs[method].append(row)
                    print(f"  {method:<9} run {rep + 1}: {row['seconds']:.2f} s, requests {row['requests']}",
                          file=sys.stderr, flush=True)
            size = sum(os.path.getsize(os.path.join(model, n)) for n in os.listdir(model) if n.endswith(".safetensors"))
            print(f"\nS3 (SeaweedFS on 127.0.0.1), {label} ({size / 1e9:.2f} GB, {len(shards)} shards), a fresh process "
                  f"per load, median of {args.repeat}")
            print("| method | s | GB/s | streamer ÷ it | GET per load | other requests per load |")
            print("|---|---|---|---|---|---|")
            ours = statistics.median(r["seconds"] for r in runs["streamer"]) if runs["streamer"] else None
            for method, rows in runs.items():
                if not rows:
                    print(f"| {method} | failed | | | | |")
                    continue
                s = statistics.median(r["seconds"] for r in rows)
                gets = statistics.median(r["requests"].get("GET", 0) for r in rows)
                other = {k: v for k, v in rows[-1]["requests"].items() if k != "GET"}
                print(f"| {method} | {s:.2f} | {size / s / 1e9:.2f} | {ours / s:.2f}x | {gets:.0f} | "
                      f"{', '.join(f'{k} {v}' for k, v in sorted(other.items())) or '-'} |")
            out.append({"label": label, "model": model, "bytes": size, "shards": len(shards), "runs": runs})
    if args.json:
        Path(args.json).write_text(json.dumps(out, indent=1))
    return 0
