"""``model-streamer bench PATH --restarts N``: a server's starts, each a fresh process.

A server restarts: after a crash, an upgrade or a config change; a second replica or engine
starts on the same node; a router cold-starts a model it swapped out. Each round evicts the
checkpoint from the page cache once, then starts each method ``N`` times, one fresh process per
start and ``--settle`` seconds apart. So the first start reads the disk, and the later ones find
whatever the earlier starts left in the page cache. A start is timed from the loader's call to
its last byte touched. torch is imported before the clock, as in an engine; each loader's own
imports count. The table gives each start's median over ``--repeat`` rounds, the total, and how
much of the checkpoint was in the page cache when the second start began.
"""

from __future__ import annotations

import json
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

from ..config import StreamerConfig
from . import peers
from .runner import _shards, build_methods, prepare_methods, round_order, run_in_fresh_process

#: the methods ``--restarts`` runs unless ``--methods`` names others
RESTART_METHODS = ("streamer", "safetensors", "runai-c16", "tensorizer")



def cached_fraction(files: list[str]) -> float | None:
    """Share of ``files``' bytes in the page cache (None where the kernel cannot say)."""
    from ..core.pagecache import uncached_bytes

    total = missing = 0
    for f in files:
        n = uncached_bytes(f)
        if n is None:
            return None
        total += os.path.getsize(f)
        missing += n
    return 1 - missing / total if total else 1.0


def _start(method: str, paths: list[str], config: StreamerConfig, workdir: str) -> float:
    return run_in_fresh_process(method, paths=paths, config=config, workdir=workdir, prepare=False)[0]


def run_restarts(args, config: StreamerConfig) -> int:
    paths = _shards(args.path, config)
    with tempfile.TemporaryDirectory(prefix="model-streamer-bench-", dir=os.path.dirname(paths[0])) as tmp:
        return _run(args, config, paths, Path(tmp))


def _run(args, config: StreamerConfig, paths: list[str], workdir: Path) -> int:
    starts = args.restarts
    names = RESTART_METHODS if args.methods == "short" else tuple(x.strip() for x in args.methods.split(","))
    methods = [m for m in build_methods(paths, config, workdir) if m.name in names]
    unknown = set(names) - {m.name for m in methods}
    if unknown:
        print(f"unknown method(s): {', '.join(sorted(unknown))}; see --list", file=sys.stderr)
        return 2
    results: dict[str, dict[str, Any]] = {}
    live = prepare_methods(methods, results)
    total_bytes = sum(os.path.getsize(p) for p in paths)
    print(f"checkpoint: {args.path} ({len(paths)} files, {total_bytes / 1e9:.2f} GB); {starts} starts per method, "
          f"a fresh process each, {args.settle:g} s apart, after one eviction; {args.repeat} rounds", file=sys.stderr)
    runs: dict[str, list[list[float]]] = {m.name: [] for m in live}
    cached: dict[str, list[float]] = {m.name: [] for m in live}
    for rep in range(args.repeat):
        for method in round_order(list(live), rep):
            files = paths + (method.extra_files() if method.extra_files else [])
            peers.evict(files)
            times: list[float] = []
            try:
                for i in range(starts):
                    time.sleep(args.settle)
                    if i == 1:
                        frac = cached_fraction(files)
                        if frac is not None:
                            cached[method.name].append(frac)
                    times.append(_start(method.name, paths, config, str(workdir)))
            except Exception as exc:  # noqa: BLE001 - a failing peer must not stop the table
                results[method.name]["error"] = f"{type(exc).__name__}: {exc}"
                print(f"  {method.name:<16} failed: {results[method.name]['error']}", file=sys.stderr)
                live.remove(method)
                continue
            runs[method.name].append(times)
            print(f"  round {rep + 1}: {method.name:<16} " + " ".join(f"{t:.2f}" for t in times)
                  + f" s (total {sum(times):.2f})", file=sys.stderr, flush=True)
    print(format_restarts(runs, cached, starts))
    if args.json:
        text = json.dumps({"checkpoint": args.path, "bytes": total_bytes, "starts": starts, "runs": runs,
                           "cached_before_second": cached, "config": config.to_dict(redact=True)}, indent=2)
        print(text) if args.json == "-" else Path(args.json).write_text(text)
    return 0


def format_restarts(runs: dict[str, list[list[float]]], cached: dict[str, list[float]], starts: int) -> str:
    """One row per method: each start's median seconds, the median total and its ratio to the streamer's."""
    totals = {n: statistics.median(sum(r) for r in rs) for n, rs in runs.items() if rs}
    ours = totals.get("streamer")
    head = "| method | " + " | ".join(f"start {i + 1} s" for i in range(starts)) + \
        " | total s | streamer ÷ it | cached before start 2 |"
    lines = [head, "|" + "---|" * (starts + 4)]
    for name, rs in runs.items():
        if not rs:
            continue
        per = [statistics.median(r[i] for r in rs) for i in range(starts)]
        ratio = f"{ours / totals[name]:.2f}x" if ours else "-"
        frac = f"{statistics.median(cached[name]):.0%}" if cached.get(name) else "-"
        lines.append(f"| {name} | " + " | ".join(f"{t:.2f}" for t in per) + f" | {totals[name]:.2f} | {ratio} | {frac} |")
    return "\n".join(lines)
