"""What ``bench-vllm`` and ``bench-sglang`` share: the rounds (formats interleaved, a new order
each round, cold and warm) and the table of seconds, GB/s and ratios to the streamer."""

from __future__ import annotations

import contextlib
import os
import statistics
import sys
import tempfile
import time
from typing import Callable


def safetensors_files(model: str) -> list[str]:
    return sorted(os.path.join(model, f) for f in os.listdir(model) if f.endswith(".safetensors"))


def tensor_count(model: str) -> int:
    from ..core.checkpoint import open_checkpoint
    from ..config import StreamerConfig

    return len(open_checkpoint(model, StreamerConfig()).tensors)


def models_to_bench(args) -> list[tuple[str, str]]:
    """(label, directory) of each checkpoint a bench runs: ``args.model``, and with ``--moe DIR``
    the two Qwen3-MoE layouts (``bench/moe.py``; written there when missing): one tensor per
    expert as on the Hub, and transformers 5's fused experts."""
    out = [(args.model, args.model)] if args.model else []
    if getattr(args, "moe", None):
        from .moe import LAYOUTS, make_moe

        for layout in LAYOUTS:
            path = os.path.join(args.moe, layout)
            if not os.path.exists(os.path.join(path, "model.safetensors.index.json")):
                print(f"writing the {layout} Qwen3-MoE checkpoint to {path}", file=sys.stderr, flush=True)
                make_moe(path, layout=layout)
            out.append((f"Qwen3-MoE {layout}", path))
    if not out:
        raise SystemExit("name a model directory, or --moe DIR for the MoE checkpoints")
    return out


@contextlib.contextmanager
def recipe_store():
    """Environment for engine runs with an empty store of placement recipes of their own
    (``loader_plugins.inplace.recipe``): the first streamer run of a model records, later ones reuse."""
    with tempfile.TemporaryDirectory(prefix="bench-recipes-") as tmp:
        yield {"LOADER_PLUGINS_HISTORY_DIR": tmp}


def print_recipes(results: dict[str, dict[str, list]], recipes: list, caches: list[str], repeat: int) -> None:
    """The streamer's runs that recorded placements (the first of a model) and those that used them."""
    runs = [t for c in caches for t in results.get("streamer", {}).get(c, [])]
    if not any(recipes) or len(recipes) != len(runs):
        return
    cells = [f"{c} run {i % repeat + 1}: {t:.2f} s ({r or 'no recipe'})"
             for i, (c, t, r) in enumerate(zip([c for c in caches for _ in range(repeat)], runs, recipes))]
    print("streamer runs (placements recorded by the first, used by the rest): " + "; ".join(cells))


def add_model_args(p) -> None:
    p.add_argument("model", nargs="?", help="local model directory (config.json + safetensors)")
    p.add_argument("--moe", metavar="DIR", help="also (or only) the Qwen3-MoE checkpoints, per-expert and fused "
                   "(24 layers x 128 experts: 9,435 / 267 tensors, ~80 MB), written to DIR when missing")


def run_rounds(formats: list[str], caches: list[str], repeat: int, settle: float,
               run_one: Callable[[str, str], float | None], what: str) -> dict[str, dict[str, list]]:
    """``run_one(format, cache)`` -> seconds (None: it failed), for every cache, ``repeat`` rounds
    of every format, interleaved so drift hits every format alike, in a new order each round so
    that no format always follows the same one."""
    from .runner import round_order

    results: dict[str, dict[str, list]] = {f: {c: [] for c in caches} for f in formats}
    for cache in caches:
        for rep in range(repeat):
            for fmt in round_order(formats, rep):
                time.sleep(settle)
                t = run_one(fmt, cache)
                results[fmt][cache].append(t)
                shown = "failed" if t is None else f"{t:.2f} s"
                print(f"  {fmt:<16} {cache} run {rep + 1}: {what} {shown}", file=sys.stderr, flush=True)
    return results


def medians(results: dict[str, dict[str, list]]) -> dict[str, dict[str, float | None]]:
    return {f: {c: statistics.median([x for x in v if x is not None]) if any(x is not None for x in v) else None
                for c, v in per.items()} for f, per in results.items()}


def print_table(title: str, results: dict[str, dict[str, list]], size: int, caches: list[str],
                tensors: int | None = None) -> None:
    """Median seconds, GB/s and streamer ÷ format per cache (markdown); with ``tensors``, also
    microseconds per tensor (the whole time over the checkpoint's tensor count)."""
    med = medians(results)
    per = 4 if tensors else 3
    print(title)
    print("| format | " + " | ".join(f"{c} s | {c} GB/s | streamer ÷ it" + (f" | {c} µs/tensor" if tensors else "")
                                    for c in caches) + " |")
    print("|" + "---|" * (1 + per * len(caches)))
    ours = med.get("streamer", {})
    for fmt, per in med.items():
        cells = []
        for c in caches:
            s = per.get(c)
            if s is None:
                cells += ["failed"] + [""] * (per - 1)
                continue
            cells += [f"{s:.2f}", f"{size / s / 1e9:.2f}", f"{ours[c] / s:.2f}x" if ours.get(c) else "-"]
            if tensors:
                cells.append(f"{s / tensors * 1e6:.0f}")
        print(f"| {fmt} | " + " | ".join(cells) + " |")
