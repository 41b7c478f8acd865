"""Weight-load time inside a real vLLM engine: ``streamer`` vs vLLM's own load formats.

    model-streamer bench-vllm [MODEL_DIR] [--moe DIR] [--formats streamer,safetensors,runai_streamer]
                              [--timer load_model|load_weights] [--repeat 3]

Each run is a fresh process that builds an offline engine (engine core in-process) with
``skip_tokenizer_init`` and times the loader's ``load_model`` (the model built, its weights
loaded and processed: the same work for every format) or its ``load_weights`` call alone (vLLM
logs "Loading weights took" only for some formats, so one timer measures all). ``--moe DIR``
adds the many-tensor MoE checkpoints (``bench/moe.py``); the table then shows microseconds per
tensor as well. Cold runs evict the
checkpoint from the page cache right before ``load_weights``; warm runs read it right before.
"""

from __future__ import annotations

import json
import os
import statistics
import subprocess
import sys

from .engine_table import (add_model_args, models_to_bench, print_recipes, print_table, recipe_store, run_rounds,
                           safetensors_files, tensor_count)

_CHILD = r"""
import json, os, sys, time
spec = json.loads(sys.argv[1])
if __name__ == "__main__":
    from vllm.model_executor.model_loader.base_loader import BaseModelLoader
    from vllm.model_executor.model_loader import get_model_loader
    timings = []
    model_timings = []   # load_model: the model built, load_weights, process_weights_after_loading
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
        t0 = time.perf_counter()
        try:
            return original(self, *a, **k)
        finally:
            type(self).load_weights = inner
            model_timings.append(time.perf_counter() - t0)
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
    keep = ("in_place", "in_place_bytes", "via_model", "via_model_bytes", "unused", "unused_bytes", "probe_seconds",
            "recipe")
    last = {k: stats[-1].get(k) for k in keep} if stats and stats[-1] else None
    print("VLLM_LOAD " + json.dumps({"load_weights_s": timings[-1] if timings else None,
                                     "load_model_s": model_timings[-1] if model_timings else None, "stats": last}),
          flush=True)
"""


def run_once(model: str, fmt: str, *, cold: bool, dtype: str, extra: dict | None = None,
             timeout: float = 900, stats: list | None = None, timer: str = "load_weights",
             env: dict | None = None) -> float:
    """Seconds ``timer`` (``load_weights``, or ``load_model``: the model built, its weights
    loaded and processed) took in a fresh engine; the streamer's in-place counts are appended to
    ``stats`` when given."""
    env = {**os.environ, **(env or {}), "VLLM_ENABLE_V1_MULTIPROCESSING": "0", "VLLM_CPU_OMP_THREADS_BIND": "nobind",
           "HF_HUB_OFFLINE": "1", "VLLM_NO_USAGE_STATS": "1"}
    spec = {"model": model, "format": fmt, "cold": cold, "files": safetensors_files(model), "dtype": dtype, "extra": extra}
    proc = subprocess.run([sys.executable, "-c", _CHILD, json.dumps(spec)], env=env, capture_output=True, text=True,
                          timeout=timeout)
    lines = [x for x in proc.stdout.splitlines() if x.startswith("VLLM_LOAD ")]
    if proc.returncode != 0 or not lines:
        raise RuntimeError(f"vLLM run ({fmt}) failed with exit {proc.returncode}:\n{(proc.stdout + proc.stderr)[-3000:]}")
    record = json.loads(lines[-1][len("VLLM_LOAD "):])
    value = record[f"{timer}_s"]
    if stats is not None and record.get("stats"):
        stats.append(record["stats"])
    if value is None:
        raise RuntimeError(f"vLLM run ({fmt}) did not call load_weights")
    return float(value)


def add_parser(sub) -> None:
    p = sub.add_parser("bench-vllm", help="weight-load time in a real vLLM engine: streamer vs vLLM's loaders",
                       description=__doc__)
    add_model_args(p)
    p.add_argument("--formats", default="streamer,safetensors,runai_streamer")
    p.add_argument("--cache", default="cold,warm")
    p.add_argument("--repeat", type=int, default=3)
    p.add_argument("--dtype", default="bfloat16")
    p.add_argument("--timer", default="load_model", choices=["load_model", "load_weights"],
                   help="what is timed: load_model (model built, weights loaded and processed) or load_weights")
    p.add_argument("--extra", default="{}", help="--model-loader-extra-config for the streamer runs (JSON)")
    p.add_argument("--settle", type=float, default=3.0,
                   help="seconds of quiet before each run (the previous engine's memory is handed back)")
    p.add_argument("--json", metavar="FILE")
    p.set_defaults(func=run)


def run(args) -> int:
    out = []
    for label, model in models_to_bench(args):
        out.append(_run_model(args, label, model))
    if args.json:
        with open(args.json, "w") as f:
            json.dump(out, f, indent=2)
    return 0


def _run_model(args, label: str, model: str) -> dict:
    formats = [f.strip() for f in args.formats.split(",") if f.strip()]
    caches = [c.strip() for c in args.cache.split(",") if c.strip()]
    size = sum(os.path.getsize(f) for f in safetensors_files(model))
    tensors = tensor_count(model)
    extra = json.loads(args.extra) or None
    placed: list[dict] = []
    with recipe_store() as env:   # empty: the first streamer run records its placements, the next ones reuse them
        results = run_rounds(formats, caches, args.repeat, args.settle, lambda fmt, cache: run_once(
            model, fmt, cold=cache == "cold", dtype=args.dtype, stats=placed, timer=args.timer,
            extra=extra if fmt == "streamer" else None, env=env), args.timer)
    print_table(f"\nvLLM {args.timer}, {label} ({size / 1e9:.2f} GB, {tensors} tensors), median of {args.repeat}",
                results, size, caches, tensors)
    print_recipes(results, [p.get("recipe") for p in placed], caches, args.repeat)
    if placed:
        last = placed[-1]
        print(f"\nstreamer: {last['in_place']} tensors ({last['in_place_bytes'] / 1e9:.3f} GB) streamed in place, "
              f"{last['via_model']} ({last['via_model_bytes'] / 1e9:.3f} GB) through the model's load_weights, "
              f"{last['unused']} unused not read; dry run of load_weights median "
              f"{statistics.median(p['probe_seconds'] for p in placed):.3f} s")
    return {"model": model, "label": label, "bytes": size, "tensors": tensors, "timer": args.timer,
            "results": results, "streamer_stats": placed}
