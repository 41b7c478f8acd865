"""Weight-load time inside a real vLLM engine: ``streamer`` vs vLLM's own load formats.

    model-streamer bench-vllm MODEL_DIR [--formats streamer,safetensors,runai_streamer] [--repeat 3]

Each run is a fresh process that builds an offline engine (engine core in-process) with
``skip_tokenizer_init`` and times the loader's ``load_weights`` call (vLLM logs "Loading
weights took" only for some formats, so one timer measures all). Cold runs evict the
checkpoint from the page cache right before ``load_weights``; warm runs read it right before.
"""

from __future__ import annotations

import json
import os
import statistics
import subprocess
import sys

from .engine_table import print_table, run_rounds, safetensors_files

_CHILD = r"""
import json, os, sys, time
spec = json.loads(sys.argv[1])
if __name__ == "__main__":
    from vllm.model_executor.model_loader.base_loader import BaseModelLoader
    from vllm.model_executor.model_loader import get_model_loader
    timings = []
    stats = []
    import vllm.model_executor.model_loader.base_loader as bl
    original = bl.BaseModelLoader.load_model
    def load_model(self, *a, **k):
        inner = type(self).load_weights
        def timed(this, model, model_config):
            # the page cache is set up right before the timed call: the engine's start-up takes
            # long enough for this VM's reclaim (DAMON) to drop pages read earlier
            if spec["cold"]:
                evict(spec["files"])
            else:
                warm(spec["files"])
            t0 = time.perf_counter()
            try:
                return inner(this, model, model_config)
            finally:
                timings.append(time.perf_counter() - t0)
                stats.append(getattr(this, "last_stats", None))
        type(self).load_weights = timed
        try:
            return original(self, *a, **k)
        finally:
            type(self).load_weights = inner
    bl.BaseModelLoader.load_model = load_model
    from loader_plugins.bench.peers import evict
    from loader_plugins.bench.runner import _warm as warm
    from vllm import LLM
    kwargs = {}
    if spec.get("extra"):
        kwargs["model_loader_extra_config"] = spec["extra"]
    llm = LLM(spec["model"], load_format=spec["format"], dtype=spec["dtype"], skip_tokenizer_init=True,
              enforce_eager=True, max_model_len=128, max_num_seqs=1, max_num_batched_tokens=128,
              kv_cache_memory_bytes=16 << 20, disable_log_stats=True, **kwargs)
    keep = ("in_place", "in_place_bytes", "via_model", "via_model_bytes", "unused", "unused_bytes", "probe_seconds")
    last = {k: stats[-1].get(k) for k in keep} if stats and stats[-1] else None
    print("VLLM_LOAD " + json.dumps({"load_weights_s": timings[-1] if timings else None, "stats": last}), flush=True)
"""


def run_once(model: str, fmt: str, *, cold: bool, dtype: str, extra: dict | None = None,
             timeout: float = 900, stats: list | None = None) -> float:
    """Seconds ``load_weights`` took in a fresh engine; the streamer's in-place counts are
    appended to ``stats`` when given."""
    env = {**os.environ, "VLLM_ENABLE_V1_MULTIPROCESSING": "0", "VLLM_CPU_OMP_THREADS_BIND": "nobind",
           "HF_HUB_OFFLINE": "1", "VLLM_NO_USAGE_STATS": "1"}
    spec = {"model": model, "format": fmt, "cold": cold, "files": safetensors_files(model), "dtype": dtype, "extra": extra}
    proc = subprocess.run([sys.executable, "-c", _CHILD, json.dumps(spec)], env=env, capture_output=True, text=True,
                          timeout=timeout)
    lines = [x for x in proc.stdout.splitlines() if x.startswith("VLLM_LOAD ")]
    if proc.returncode != 0 or not lines:
        raise RuntimeError(f"vLLM run ({fmt}) failed with exit {proc.returncode}:\n{(proc.stdout + proc.stderr)[-3000:]}")
    record = json.loads(lines[-1][len("VLLM_LOAD "):])
    value = record["load_weights_s"]
    if stats is not None and record.get("stats"):
        stats.append(record["stats"])
    if value is None:
        raise RuntimeError(f"vLLM run ({fmt}) did not call load_weights")
    return float(value)


def run(args) -> int:
    formats = [f.strip() for f in args.formats.split(",") if f.strip()]
    caches = [c.strip() for c in args.cache.split(",") if c.strip()]
    size = sum(os.path.getsize(f) for f in safetensors_files(args.model))
    placed: list[dict] = []
    results = run_rounds(formats, caches, args.repeat, args.settle, lambda fmt, cache: run_once(
        args.model, fmt, cold=cache == "cold", dtype=args.dtype, stats=placed), "load_weights")
    print_table(f"\nvLLM load_weights, {args.model} ({size / 1e9:.2f} GB), median of {args.repeat}", results, size,
                caches)
    if placed:
        last = placed[-1]
        print(f"\nstreamer: {last['in_place']} tensors ({last['in_place_bytes'] / 1e9:.3f} GB) streamed in place, "
              f"{last['via_model']} ({last['via_model_bytes'] / 1e9:.3f} GB) through the model's load_weights, "
              f"{last['unused']} unused not read; dry run of load_weights median "
              f"{statistics.median(p['probe_seconds'] for p in placed):.3f} s")
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"model": args.model, "bytes": size, "results": results, "streamer_stats": placed}, f, indent=2)
    return 0
