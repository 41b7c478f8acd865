"""``model-streamer bench``: this project and its peers side by side, in one run.

Every method loads the whole checkpoint into CPU memory and touches every page of the result.
Cold runs evict the files from the page cache first (``posix_fadvise(DONTNEED)``); warm runs
read them once beforehand. Each cell is the median of ``--repeat`` runs.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import math
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any, Callable

from ..config import StreamerConfig
from . import peers

log = logging.getLogger(__name__)


@dataclasses.dataclass
class Method:
    name: str
    group: str          # "ours", "ceiling", "peer"
    run: Callable[[], int]
    prepare: Callable[[], None] | None = None
    extra_files: Callable[[], list[str]] | None = None
    note: str = ""


def round_order(items: list, round_index: int) -> list:
    """The order of ``items`` in round ``round_index``: every item once, and each item after a
    different one from round to round (as long as there are enough orders to choose from).

    A rotation would not do: it keeps the cyclic order, so each method would always run right
    after the same one. On a VM that matters: a method that frees gigabytes (Run:ai's 3.4 GiB
    ring, a fresh 3 GB result) makes the next load pay for memory the hypervisor took back,
    measured on the 2-core reference VM as 0.56-0.79 GB/s instead of 1.0-1.2 over S3, with the
    CPU time of client and server both up by half. Round r visits ``items[(r + a*i) % n]`` for
    a stride ``a`` coprime with n, a different stride each round: the item before
    ``items[j]`` is then ``items[j - a]``.
    """
    n = len(items)
    strides = [a for a in range(1, n) if math.gcd(a, n) == 1] or [1]
    a = strides[round_index % len(strides)]
    return [items[(round_index + a * i) % n] for i in range(n)]


def _shards(path: str, config: StreamerConfig) -> list[str]:
    from ..core.checkpoint import expand

    files, _ = expand(path, config)
    return files


def _warm(paths: list[str]) -> None:
    for p in paths:
        with open(p, "rb", buffering=0) as f:
            while f.read(16 << 20):
                pass


def _ours_fresh(paths: list[str], config: StreamerConfig) -> int:
    from ..streamer import load_file

    return peers.touch_all(load_file(paths, config=config))


class _Into:
    """Caller-allocated, already-touched destinations, reused across runs (the engine case)."""

    def __init__(self, paths: list[str], config: StreamerConfig):
        self.paths, self.config = paths, config
        self.dests: dict | None = None
        self.buffers: list | None = None

    def setup_ours(self) -> None:
        import torch

        from ..core.checkpoint import open_checkpoint

        if self.dests is None:
            specs = open_checkpoint(self.paths, self.config).tensors
            self.dests = {n: torch.empty(s.shape, dtype=s.torch_dtype()) for n, s in specs.items()}
            for t in self.dests.values():   # touched: the engine's buffers exist before loading
                if t.numel():
                    t.view(-1).view(torch.uint8).fill_(0)

    def setup_pread(self) -> None:
        if self.buffers is None:
            self.buffers = peers.aligned_buffers(self.paths)
            peers.touch_all(self.buffers)

    def ours(self) -> int:
        from ..streamer import SafetensorsStreamer

        self.setup_ours()
        with SafetensorsStreamer(self.config) as s:
            s.stream_files(self.paths, destinations=self.dests)
            for _ in s.get_tensors():
                pass
        return peers.touch_all(self.dests)

    def pread(self, threads: int, direct: bool) -> int:
        self.setup_pread()
        peers.pread_ceiling(self.paths, threads=threads, direct=direct, dest=self.buffers)
        return peers.touch_all(self.buffers)


def build_methods(paths: list[str], config: StreamerConfig, workdir: Path) -> list[Method]:
    into = _Into(paths, config)
    into_ceiling = _Into(paths, config)
    tz_path = workdir / "checkpoint.tensors"
    methods = [
        Method("streamer", "ours", lambda: _ours_fresh(paths, config), note="fresh tensors"),
        Method("streamer-into", "ours-into", into.ours, prepare=into.setup_ours,
               note="into caller-allocated, touched tensors"),
        Method("pread-4t", "ceiling", lambda: peers.pread_ceiling(paths, threads=4), note="buffered, fresh buffers"),
        Method("pread-direct-8t", "ceiling", lambda: peers.pread_ceiling(paths, threads=8, direct=True),
               note="O_DIRECT, fresh buffers"),
        Method("pread-into-4t", "ceiling-into", lambda: into_ceiling.pread(4, False),
               prepare=into_ceiling.setup_pread, note="buffered, touched buffers"),
        Method("pread-direct-into-8t", "ceiling-into", lambda: into_ceiling.pread(8, True),
               prepare=into_ceiling.setup_pread, note="O_DIRECT, touched buffers"),
        Method("safetensors", "peer", lambda: peers.safetensors_clone(paths), note="load_file + clone"),
        Method("runai-c4", "peer", lambda: peers.runai(paths, 4)),
        Method("runai-c8", "peer", lambda: peers.runai(paths, 8)),
        Method("runai-c16", "peer", lambda: peers.runai(paths, 16), note="Run:ai default"),
        Method("tensorizer", "peer", lambda: peers.tensorizer(tz_path),
               prepare=lambda: tz_path.exists() or peers.tensorizer_prepare(paths, tz_path),
               extra_files=lambda: [str(tz_path)], note="own format, serialized beforehand"),
        Method("fastsafetensors", "peer", lambda: peers.fastsafetensors(paths), note="CPU, nogds"),
    ]
    return methods


#: ``--methods short`` (the default): ours and one configuration of each peer
SHORT = ("streamer", "safetensors", "runai-c16", "tensorizer", "fastsafetensors")


def select_methods(methods: list, args, short: tuple[str, ...] | None = SHORT) -> list | int:
    """Apply ``--list`` (print, return 0) and ``--methods`` (unknown name: return 2) to ``methods``;
    ``short`` is what ``--methods short`` means (None: every method)."""
    if args.list:
        for m in methods:
            print(f"{m.name:<22} {m.group:<13} {m.note}")
        return 0
    if args.methods == "all" or (args.methods == "short" and short is None):
        return methods
    wanted = set(short) if args.methods == "short" else {x.strip() for x in args.methods.split(",")}
    unknown = wanted - {m.name for m in methods} - (set(short or ()) if args.methods == "short" else set())
    if unknown:
        print(f"unknown method(s): {', '.join(sorted(unknown))}; see --list", file=sys.stderr)
        return 2
    return [m for m in methods if m.name in wanted]


def prepare_methods(methods: list[Method], results: dict[str, dict[str, Any]]) -> list[Method]:
    """Run each method's untimed ``prepare``; a method whose peer is missing is recorded as
    skipped in ``results`` (never stops the table). Returns the methods that can run."""
    live: list[Method] = []
    for method in methods:
        results[method.name] = {"group": method.group, "note": method.note}
        try:
            if method.prepare:
                method.prepare()
            live.append(method)
        except Exception as exc:  # noqa: BLE001 - a missing peer must not stop the table
            results[method.name]["error"] = f"{type(exc).__name__}: {exc}"
            print(f"  {method.name:<22} skipped: {results[method.name]['error']}", file=sys.stderr)
    return live


def _time(method: Method, files: list[str], cache: str, fresh: dict | None = None) -> tuple[float, int]:
    """Seconds and bytes of one load of ``method``, page cache ``cache`` (cold or warm); in a fresh
    process when ``fresh`` gives :func:`run_in_fresh_process`'s arguments."""
    if cache == "cold":
        peers.evict(files)
    else:
        _warm(files)
    if fresh is not None:
        return run_in_fresh_process(method.name, **fresh)
    t0 = time.perf_counter()
    nbytes = method.run()
    return time.perf_counter() - t0, nbytes


_CHILD = r"""
import json, sys, time
import torch  # an engine's process has torch loaded before any loader runs
from pathlib import Path
from loader_plugins.config import StreamerConfig
from loader_plugins.bench.runner import build_methods
spec = json.loads(sys.argv[1])
config = StreamerConfig.from_dict(spec["config"])
method = next(m for m in build_methods(spec["paths"], config, Path(spec["workdir"])) if m.name == spec["method"])
if spec["prepare"] and method.prepare:
    method.prepare()   # untimed: caller-allocated destinations, a peer's own file
t0 = time.perf_counter()
n = method.run()
print("RESULT " + json.dumps({"seconds": time.perf_counter() - t0, "bytes": n}), flush=True)
"""


def run_in_fresh_process(method: str, *, paths: list[str], config: StreamerConfig, workdir: str,
                         prepare: bool = True) -> tuple[float, int]:
    """One timed load of ``method`` in a new Python process, as a server's start: torch imported
    before the clock, the loader's own imports and memory counted. ``(seconds, bytes)``."""
    spec = {"method": method, "paths": paths, "config": config.to_dict(), "workdir": workdir, "prepare": prepare}
    proc = subprocess.run([sys.executable, "-c", _CHILD, json.dumps(spec)], capture_output=True, text=True,
                          timeout=1800)
    lines = [x for x in proc.stdout.splitlines() if x.startswith("RESULT ")]
    if proc.returncode or not lines:
        raise RuntimeError(f"{method} failed in its process (exit {proc.returncode}): {proc.stderr[-1500:]}")
    out = json.loads(lines[-1][len("RESULT "):])
    return float(out["seconds"]), int(out["bytes"])


def measure_rss_into(paths: list[str], config: StreamerConfig) -> dict[str, Any]:
    """Peak RSS of a fresh process that loads into caller-allocated tensors (cold cache)."""
    code = (
        "import json, sys, torch\n"
        "from loader_plugins import SafetensorsStreamer, StreamerConfig\n"
        "from loader_plugins.core.checkpoint import open_checkpoint\n"
        "from loader_plugins.bench import peers\n"
        "paths, cfg = json.loads(sys.argv[1]), StreamerConfig.from_dict(json.loads(sys.argv[2]))\n"
        "specs = open_checkpoint(paths, cfg).tensors\n"
        "dests = {n: torch.empty(s.shape, dtype=s.torch_dtype()) for n, s in specs.items()}\n"
        "peers.touch_all({n: t.view(-1).view(torch.uint8).fill_(1) if t.numel() else t for n, t in dests.items()})\n"
        "def hwm():\n"
        "    for line in open('/proc/self/status'):\n"
        "        if line.startswith('VmHWM:'): return int(line.split()[1]) * 1024\n"
        "base = hwm()\n"
        "open('/proc/self/clear_refs', 'w').write('5')  # reset the peak to the current RSS\n"
        "peers.evict(paths)\n"
        "with SafetensorsStreamer(cfg) as s:\n"
        "    s.stream_files(paths, destinations=dests)\n"
        "    for _ in s.get_tensors(): pass\n"
        "peak = hwm()\n"
        "print(json.dumps({'model_bytes': sum(s.nbytes for s in specs.values()), 'peak_rss': peak,\n"
        "                  'rss_before_load': base}))\n"
    )
    proc = subprocess.run([sys.executable, "-c", code, json.dumps(paths), json.dumps(config.to_dict())],
                          capture_output=True, text=True, check=True)
    return json.loads(proc.stdout.strip().splitlines()[-1])


#: loggers whose per-load INFO lines would land between the bench's own lines and the table
QUIET_LOGGERS = ("loader_plugins", "runai_model_streamer", "tensorizer", "fastsafetensors")


class quiet_loaders:
    """Raise the loaders' loggers to WARNING while a bench times them (``-v`` keeps them)."""

    def __init__(self, verbose: bool = False):
        self.verbose = verbose
        self.saved: dict[str, int] = {}

    def __enter__(self):
        if not self.verbose:
            # Run:ai sets its logger's level (and adds a handler) when imported: import it first
            import importlib

            for module in ("runai_model_streamer",):
                try:
                    importlib.import_module(module)
                except Exception:  # noqa: BLE001 - not installed or broken: its method reports that
                    pass
            for name in QUIET_LOGGERS:
                lg = logging.getLogger(name)
                self.saved[name] = lg.level
                lg.setLevel(logging.WARNING)
        return self

    def __exit__(self, *exc):
        for name, level in self.saved.items():
            logging.getLogger(name).setLevel(level)


def run_bench(args, config: StreamerConfig) -> int:
    """The local-files bench (``model-streamer bench PATH``; an ``s3://`` PATH runs :mod:`.s3`)."""
    with quiet_loaders(getattr(args, "verbose", False)):
        return _run_bench(args, config)


def _run_bench(args, config: StreamerConfig) -> int:
    paths = _shards(args.path, config)
    total = sum(os.path.getsize(p) for p in paths)
    caches = [c.strip() for c in args.cache.split(",") if c.strip()]
    with tempfile.TemporaryDirectory(prefix="model-streamer-bench-", dir=os.path.dirname(paths[0])) as tmp:
        methods = build_methods(paths, config, Path(tmp))
        methods = select_methods(methods, args)
        if not isinstance(methods, list):
            return methods
        results: dict[str, dict[str, Any]] = {}
        print(f"checkpoint: {args.path} ({len(paths)} files, {total / 1e9:.2f} GB); concurrency={config.workers()} "
              f"chunk={config.chunk_bytes >> 20}MiB direct_io={config.direct_io}; median of {args.repeat}; each load "
              f"{'in a fresh process' if getattr(args, 'process', 'fresh') == 'fresh' else 'in this process'}",
              file=sys.stderr)
        # Methods take turns (round robin) so that slow drifts of the machine (page cache,
        # memory the hypervisor has to back again) hit every method alike.
        fresh = None
        if getattr(args, "process", "fresh") == "fresh":
            # each load a new process, as a server starts: no method finds memory an earlier one
            # freed (a long-lived process reuses its allocator's faulted-in heap; see TABLE_NOTE)
            fresh = {"paths": paths, "config": config, "workdir": tmp}
            for m in methods:
                results[m.name] = {"group": m.group, "note": m.note}
            prepare_methods([m for m in methods if m.extra_files], results)   # files a peer needs, made once
            live = [m for m in methods if "error" not in results[m.name]]
        else:
            live = prepare_methods(methods, results)
        for cache in caches:
            runs: dict[str, list[float]] = {m.name: [] for m in live}
            nbytes: dict[str, int] = {}
            for rep in range(args.repeat + (1 if args.warmup else 0)):
                # a new order each round: no method always runs right after the same one (on
                # a VM a load's speed depends on how much memory the one before it freed)
                for method in round_order(list(live), rep):
                    files = paths + (method.extra_files() if method.extra_files else [])
                    if args.settle:
                        # memory freed by the previous run is handed back to the hypervisor in the
                        # background (free page reporting); let that finish before the next run
                        time.sleep(args.settle)
                    try:
                        seconds, n = _time(method, files, cache, fresh)
                    except Exception as exc:  # noqa: BLE001
                        results[method.name]["error"] = f"{type(exc).__name__}: {exc}"
                        print(f"  {method.name:<22} failed: {results[method.name]['error']}", file=sys.stderr)
                        live.remove(method)
                        continue
                    if args.warmup and rep == 0:
                        continue
                    runs[method.name].append(seconds)
                    nbytes[method.name] = n
                    print(f"  {cache} run {rep + 1 - bool(args.warmup)}: {method.name:<22} {n / seconds / 1e9:6.2f} GB/s",
                          file=sys.stderr, flush=True)
            for method in live:
                med = statistics.median(runs[method.name])
                n = nbytes[method.name]
                results[method.name][cache] = {"seconds": runs[method.name], "median_s": med, "bytes": n,
                                               "gbps": n / med / 1e9}
        rss = None
        if "streamer-into" in results and "error" not in results["streamer-into"]:
            try:
                rss = measure_rss_into(paths, config)
            except Exception as exc:  # noqa: BLE001
                rss = {"error": str(exc)}
    table = format_table(results, caches)
    print(table)
    print(TABLE_NOTE)
    summary = summarize(results, caches, config, rss)
    for line in summary["lines"]:
        print(line)
    if args.json:
        payload = {"checkpoint": args.path, "files": paths, "bytes": total, "config": config.to_dict(redact=True),
                   "repeat": args.repeat, "results": results, "rss": rss, "summary": summary["values"]}
        text = json.dumps(payload, indent=2, default=str)
        if args.json == "-":
            print(text)
        else:
            Path(args.json).write_text(text)
    return 0


def _gbps(results, name, cache):
    cell = results.get(name, {}).get(cache)
    return cell["gbps"] if cell else None


def format_table(results: dict, caches: list[str]) -> str:
    """A markdown table: one row per method, GB/s and our ratio to it per cache state, a note."""
    header = f"| {'method':<22} |" + "".join(f" {c + ' GB/s':>10} | {'ours ÷ it':>9} |" for c in caches) + " note |"
    sep = "|" + "-" * 24 + "|" + "".join("-" * 12 + "|" + "-" * 11 + "|" for _ in caches) + "------|"
    lines = [header, sep]
    for name, row in results.items():
        ref = "streamer-into" if row["group"].endswith("into") else "streamer"
        cells = ""
        for c in caches:
            g = _gbps(results, name, c)
            ours = _gbps(results, ref, c)
            ratio = f"{ours / g:.2f}x" if g and ours else "-"
            cells += f" {g:10.2f} | {ratio:>9} |" if g else f" {'-':>10} | {'-':>9} |"
        note = (row.get("error") or row.get("note", "")).replace("|", "/")
        lines.append(f"| {name:<22} |{cells} {note} |")
    return "\n".join(lines)


#: printed under the table: what its figures time
TABLE_NOTE = ("GB/s = checkpoint bytes / wall time of one load, each in a fresh process as a server's start "
              "(torch imported before the clock; --process same: all in this process), from the call until one "
              "byte of every page of the result has been read and the result freed (headers, allocation, page "
              "faults included; cold: page cache dropped first; median of the runs). The streamer's own "
              "'Streamed ... GB/s' log line (shown with -v) times its stream alone, from opening the files to "
              "the last tensor, so it reads higher.")


def summarize(results: dict, caches: list[str], config: StreamerConfig, rss: dict | None) -> dict:
    values: dict[str, Any] = {}
    lines: list[str] = []

    def best(names, cache):
        vals = [(_gbps(results, n, cache), n) for n in names if _gbps(results, n, cache)]
        return max(vals) if vals else (None, None)

    runai = [n for n in results if n.startswith("runai")]
    others = [n for n in results if results[n]["group"] == "peer" and not n.startswith("runai")]
    ceilings = [n for n in results if results[n]["group"] == "ceiling"]
    ceilings_into = [n for n in results if results[n]["group"] == "ceiling-into"]
    for cache in caches:
        ours = _gbps(results, "streamer", cache)
        if not ours:
            continue
        for label, names in (("best pread ceiling", ceilings), ("best Run:ai", runai), ("best other peer", others)):
            g, n = best(names, cache)
            if g:
                values[f"{cache}_vs_{label.replace(' ', '_')}"] = ours / g
                lines.append(f"{cache}: streamer {ours:.2f} GB/s = {ours / g:.2f}x {label} ({n}, {g:.2f} GB/s)")
        into = _gbps(results, "streamer-into", cache)
        g, n = best(ceilings_into, cache)
        if into and g:
            values[f"{cache}_into_vs_ceiling"] = into / g
            lines.append(f"{cache}: streamer-into {into:.2f} GB/s = {into / g:.2f}x pread into the same buffers "
                         f"({n}, {g:.2f} GB/s)")
        # the strictest reading of "the pread ceiling": our faster way against the fastest pread of any kind
        mine, mine_name = best(["streamer", "streamer-into"], cache)
        g, n = best(ceilings + ceilings_into, cache)
        if mine and g:
            values[f"{cache}_best_vs_any_ceiling"] = mine / g
            lines.append(f"{cache}: best of ours ({mine_name}, {mine:.2f} GB/s) = {mine / g:.2f}x the fastest pread "
                         f"of any kind ({n}, {g:.2f} GB/s)")
    if rss and "peak_rss" in rss:
        bound = rss["model_bytes"] + config.memory_limit + 200 * 2**20
        values["peak_rss"] = rss
        lines.append(f"peak RSS loading into caller-allocated tensors: {rss['peak_rss'] / 2**20:.0f} MiB "
                     f"(model {rss['model_bytes'] / 2**20:.0f} MiB + memory_limit {config.memory_limit / 2**20:.0f} "
                     f"MiB + 200 MiB = {bound / 2**20:.0f} MiB bound: {'within' if rss['peak_rss'] <= bound else 'OVER'})")
    return {"values": values, "lines": lines}
