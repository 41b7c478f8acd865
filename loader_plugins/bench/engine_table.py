"""What ``bench-vllm`` and ``bench-sglang`` share: the rounds (formats interleaved, a new order
each round, cold and warm) and the table of seconds, GB/s and ratios to the streamer."""

from __future__ import annotations

import os
import statistics
import sys
import time
from typing import Callable


def safetensors_files(model: str) -> list[str]:
    return sorted(os.path.join(model, f) for f in os.listdir(model) if f.endswith(".safetensors"))


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


def print_table(title: str, results: dict[str, dict[str, list]], size: int, caches: list[str]) -> None:
    """Median seconds, GB/s and streamer ÷ format per cache (markdown)."""
    med = medians(results)
    print(title)
    print("| format | " + " | ".join(f"{c} s | {c} GB/s | streamer ÷ it" for c in caches) + " |")
    print("|" + "---|" * (1 + 3 * len(caches)))
    ours = med.get("streamer", {})
    for fmt, per in med.items():
        cells = []
        for c in caches:
            s = per.get(c)
            if s is None:
                cells += ["failed", "", ""]
                continue
            cells += [f"{s:.2f}", f"{size / s / 1e9:.2f}", f"{ours[c] / s:.2f}x" if ours.get(c) else "-"]
        print(f"| {fmt} | " + " | ".join(cells) + " |")
