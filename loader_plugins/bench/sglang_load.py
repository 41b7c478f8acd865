"""Load time inside SGLang: ``streamer`` vs SGLang's own ``safetensors`` and ``runai_streamer``.

    model-streamer bench-sglang [MODEL_DIR] [--moe DIR] [--formats streamer,safetensors,runai_streamer]
                                [--cache cold,warm] [--repeat 3] [--json FILE]

Run it with the Python that has SGLang (here ``.venv-sglang/bin/model-streamer``). Each run is a
fresh process that sets SGLang up as its scheduler does (one rank; ``inprocess.py``), then times
``get_model_loader(LoadConfig(load_format=F)).load_model(...)``: the model built and its weights
loaded, the same work for every format. Cold runs evict the checkpoint from the page cache
(``posix_fadvise(DONTNEED)``) right before; warm runs read it right before. Rounds and table as
``bench-vllm`` (``engine_table.py``); each cell is the median. Without CUDA the CPU engine is used (and, in a
source checkout, the tests' stand-in ``sgl_kernel`` when the real one is not installed).
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
from pathlib import Path

from .engine_table import (add_model_args, medians, models_to_bench, print_recipes, print_table, recipe_store, run_rounds,
                           safetensors_files, tensor_count)

FORMATS = ("streamer", "safetensors", "runai_streamer")


def add_parser(sub) -> None:
    p = sub.add_parser("bench-sglang", help="weight-load time inside SGLang: streamer vs SGLang's loaders",
                       description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_model_args(p)
    p.add_argument("--formats", default=",".join(FORMATS))
    p.add_argument("--cache", default="cold,warm")
    p.add_argument("--repeat", type=int, default=3)
    p.add_argument("--device", default=None, help="cpu or cuda (default: cuda when torch sees one)")
    p.add_argument("--settle", type=float, default=3.0, help="seconds of quiet before each run")
    p.add_argument("--extra", default="{}", help="--model-loader-extra-config for the streamer runs (JSON)")
    p.add_argument("--json", metavar="FILE", help="also write the results as JSON to FILE")
    p.set_defaults(func=run)


def _env() -> dict:
    env = dict(os.environ)
    env.setdefault("HF_HUB_OFFLINE", "1")
    import importlib.util

    if importlib.util.find_spec("sgl_kernel") is None:
        standin = Path(__file__).resolve().parents[2] / "integration_tests" / "sgl_kernel_standin"
        if standin.is_dir():
            env["PYTHONPATH"] = os.pathsep.join(p for p in (str(standin), env.get("PYTHONPATH")) if p)
    return env


def _child(fmt: str, model: str, cold: bool, device: str, extra: dict) -> dict:
    if device == "cpu":
        os.environ.setdefault("SGLANG_USE_CPU_ENGINE", "1")
    from .peers import evict
    from .runner import _warm as warm

    files = safetensors_files(model)
    from ..sglang_adapter.inprocess import init_process, load_once

    init_process(model, device)                 # set-up outside the clock
    (evict if cold else warm)(files)
    model_obj, loader, seconds = load_once(model, fmt, extra, device=device)
    stats = getattr(loader, "last_stats", None) or {}
    keep = ("in_place", "in_place_bytes", "via_model", "via_model_bytes", "unused", "unused_bytes", "probe_seconds",
            "recipe")
    return {"seconds": seconds, "bytes": sum(Path(f).stat().st_size for f in files),
            "stats": {k: stats[k] for k in keep if k in stats}}


def run(args: argparse.Namespace) -> int:
    device = args.device
    if device is None:
        import torch

        device = "cuda" if torch.cuda.is_available() else "cpu"
    out = [_run_model(args, label, model, device) for label, model in models_to_bench(args)]
    if args.json:
        Path(args.json).write_text(json.dumps(out, indent=1))
    return 0


def _run_model(args: argparse.Namespace, label: str, model: str, device: str) -> dict:
    formats = [f.strip() for f in args.formats.split(",") if f.strip()]
    caches = [c.strip() for c in args.cache.split(",") if c.strip()]
    size = sum(os.path.getsize(f) for f in safetensors_files(model))
    tensors = tensor_count(model)
    stats: dict[str, dict] = {}
    recipes: list = []

    def run_one(fmt: str, cache: str) -> float | None:
        cmd = [sys.executable, "-m", "loader_plugins.bench.sglang_load", "--one", fmt, model,
               "--cold" if cache == "cold" else "--warm", "--device", device,
               "--extra", args.extra if fmt == "streamer" else "{}"]
        proc = subprocess.run(cmd, env={**_env(), **store}, capture_output=True, text=True)
        lines = [x for x in proc.stdout.splitlines() if x.startswith("RESULT ")]
        if not lines:
            print(f"bench-sglang: {fmt} ({cache}) failed (exit {proc.returncode}):\n{proc.stderr[-3000:]}",
                  file=sys.stderr)
            return None
        row = json.loads(lines[-1][len("RESULT "):])
        if row["stats"]:
            stats[fmt] = row["stats"]
        if fmt == "streamer":
            recipes.append(row["stats"].get("recipe"))
        return row["seconds"]

    with recipe_store() as store:   # empty: the first streamer run records its placements, the next ones reuse them
        results = run_rounds(formats, caches, args.repeat, args.settle, run_one, "load_model")
    print_table(f"\nbench-sglang: {label} ({size / 1e9:.2f} GB, {tensors} tensors), device {device}, SGLang's "
                f"load_model (model built + weights loaded), median of {args.repeat}", results, size, caches, tensors)
    print_recipes(results, recipes, caches, args.repeat)
    st = stats.get("streamer")
    if st:
        print(f"streamer: {st.get('in_place')} tensors ({st.get('in_place_bytes', 0) / 1e9:.3f} GB) in place, "
              f"{st.get('via_model')} through load_weights; dry run of load_weights {st.get('probe_seconds', 0):.2f} s")
        if st.get("unused"):   # e.g. transformers 5's fused expert tensors, which SGLang's Qwen3-MoE skips
            print(f"note: SGLang's load_weights took none of {st['unused']} tensors ({st.get('unused_bytes', 0) / 1e9:.3f} "
                  f"GB) of this checkpoint: the times above are without them, for every format")
    return {"model": model, "label": label, "device": device, "bytes": size, "tensors": tensors, "runs": results,
            "median": medians(results), "stats": stats}


def _main_one(argv: list[str]) -> int:
    p = argparse.ArgumentParser()
    p.add_argument("--one", required=True)
    p.add_argument("model")
    p.add_argument("--cold", action="store_true")
    p.add_argument("--warm", action="store_true")
    p.add_argument("--device", default="cpu")
    p.add_argument("--extra", default="{}")
    a = p.parse_args(argv)
    print("RESULT " + json.dumps(_child(a.one, a.model, a.cold, a.device, json.loads(a.extra))), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(_main_one(sys.argv[1:]))
