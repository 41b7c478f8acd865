"""TGI's weight loading vs StreamerWeights on one checkpoint, same run, cold and warm page cache.

    model-streamer bench-tgi CHECKPOINT_DIR [--repeat 3] [--world 1 --rank 0]
        [--tgi-source DIR] [--concurrency N] [--json OUT.json]

(or ``python -m loader_plugins.bench.tgi ...``, the same arguments).

For each method and cache state it times

* ``routing``: the constructor (TGI: one ``safe_open`` per file, one after another, to list the
  keys; StreamerWeights: every header parsed concurrently, then streaming starts in the background
  and the constructor returns);
* ``total``: constructor plus one request per tensor, in checkpoint order, as a model does
  (``get_tensor``, or ``get_partial_sharded(dim=0)`` with ``--world > 1``) until every result is in
  memory. TGI's tensors from safetensors 0.8 are lazy mmap views, so the baseline touches every
  page of each result (``tgi+touch``, the bytes TGI's later ``.to(device)`` reads) or clones it
  (``tgi+clone``, memory it owns, which is what StreamerWeights hands out).

TGI's own ``Weights`` is used when ``--tgi-source`` / ``TGI_SOURCE_DIR`` points at a TGI checkout;
otherwise a re-creation of its constructor and ``get_tensor`` (serial ``safe_open``, mmap reads)
stands in and the report says so. ``cold`` evicts the files from the page cache before each run.
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import statistics
import sys
import time
from pathlib import Path
from typing import Any, Callable, Sequence

from ..config import StreamerConfig
from ..core.checkpoint import expand
from ..tgi_adapter.settings import TGIStreamerSettings
from ..tgi_adapter.tgi_source import FakeProcessGroup, import_tgi_weights_module


class SerialSafeOpenWeights:
    """What TGI 3.x's ``Weights`` does, for machines without TGI's sources: routing from one
    ``safe_open`` per file, serially; ``get_tensor`` through a cached mmap handle per file."""

    def __init__(self, filenames, device, dtype, process_group, weights_loader=None, aliases=None, prefix=None):
        from safetensors import safe_open

        self._safe_open = safe_open
        self.routing = {}
        for filename in filenames:
            with safe_open(filename, framework="pytorch") as f:
                for k in f.keys():
                    if k in self.routing:
                        raise RuntimeError(f"Key {k} was found in multiple files: {filename} and {self.routing[k]}")
                    self.routing[k] = filename
        self.device, self.dtype, self.process_group = device, dtype, process_group
        self._handles = {}

    def _handle(self, filename):
        if filename not in self._handles:
            self._handles[filename] = self._safe_open(filename, framework="pytorch")
        return self._handles[filename]

    def get_tensor(self, name):
        return self._handle(self.routing[name]).get_tensor(name).to(device=self.device)

    def get_partial_sharded(self, name, dim):
        slice_ = self._handle(self.routing[name]).get_slice(name)
        world, rank = self.process_group.size(), self.process_group.rank()
        block = (slice_.get_shape()[dim] + world - 1) // world
        return slice_[rank * block:(rank + 1) * block].to(device=self.device)


def _checkpoint_order(files: Sequence[str], config: StreamerConfig) -> list[tuple[str, tuple]]:
    from ..core.checkpoint import read_header

    order = []
    for f in files:
        order += [(s.name, s.shape) for s in sorted(read_header(f, config).tensors, key=lambda s: s.offset)]
    return order


def _warm(files: Sequence[str]) -> None:
    """Read the files once with buffered reads, so their pages are in the page cache."""
    buf = bytearray(16 << 20)
    for path in files:
        with open(path, "rb", buffering=0) as f:
            while f.readinto(buf):
                pass


def _touch(tensor) -> None:
    from .peers import touch_all

    touch_all([tensor])


def _run_once(make: Callable[[], Any], order, world: int, finish: Callable[[Any], None]) -> dict:
    gc.collect()
    t0 = time.perf_counter()
    weights = make()
    t_routing = time.perf_counter() - t0
    nbytes = 0
    for name, shape in order:
        if world > 1 and len(shape) >= 1:
            t = weights.get_partial_sharded(name, 0)
        else:
            t = weights.get_tensor(name)
        finish(t)
        nbytes += t.numel() * t.element_size()
        del t
    total = time.perf_counter() - t0
    extra = {}
    if hasattr(weights, "stream_stats"):
        weights.wait_streamed()
        stats = weights.stream_stats
        extra = {"header_s": weights.header_seconds, "stream_s": stats.get("seconds"),
                 "stream_gbps": stats.get("gbps")}
        weights.close()
    del weights
    return {"routing_s": t_routing, "total_s": total, "bytes": nbytes, **extra}


def run_bench(checkpoint: str, *, repeat: int = 3, world: int = 1, rank: int = 0, tgi_source: str | None = None,
              config: StreamerConfig | None = None, states: Sequence[str] = ("cold", "warm"),
              log: Callable[[str], None] = print) -> dict:
    """Time TGI's loading and StreamerWeights on ``checkpoint``; returns the medians and every run."""
    from ..core.checkpoint import read_header
    from ..tgi_adapter.weights import StandaloneStreamerWeights, streamer_weights_class
    from .peers import evict

    config = config or StreamerConfig()
    files, _ = expand(checkpoint, config)
    order = _checkpoint_order(files, config)
    pg = FakeProcessGroup(rank, world)
    # The checkpoint's own dtype: measure reading, not casting.
    dtype = read_header(files[0], config).tensors[0].torch_dtype()
    settings = TGIStreamerSettings(config=config)
    tgi_source = tgi_source or os.environ.get("TGI_SOURCE_DIR")
    if tgi_source:
        module = import_tgi_weights_module(tgi_source)
        tgi_cls, streamer_cls = module.Weights, streamer_weights_class(module)
        baseline = f"TGI Weights from {tgi_source}"
    else:
        tgi_cls, streamer_cls = SerialSafeOpenWeights, StandaloneStreamerWeights
        baseline = "re-creation of TGI's Weights (serial safe_open + mmap); pass --tgi-source for TGI's own"
    log(f"checkpoint: {len(files)} file(s), {len(order)} tensors, "
        f"{sum(os.path.getsize(f) for f in files) / 1e9:.2f} GB; rank {rank} of {world}; baseline: {baseline}; "
        f"streamer concurrency {config.workers()}")

    methods = {
        "tgi+touch": (lambda: tgi_cls(files, "cpu", dtype, pg, None), _touch),
        "tgi+clone": (lambda: tgi_cls(files, "cpu", dtype, pg, None), lambda t: t.clone()),
        "streamer": (lambda: streamer_cls(files, "cpu", dtype, pg, None, settings=settings), lambda t: None),
    }
    runs: dict[str, dict[str, list]] = {s: {m: [] for m in methods} for s in states}
    for i in range(repeat):
        for state in states:
            for method, (make, finish) in methods.items():
                if state == "cold":
                    evict(files)
                else:
                    _warm(files)   # O_DIRECT reads (the streamer's cold runs) leave the page cache empty
                result = _run_once(make, order, world, finish)
                runs[state][method].append(result)
                log(f"  run {i + 1} {state:4} {method:9}: routing {result['routing_s'] * 1e3:7.1f} ms, total "
                    f"{result['total_s']:6.2f} s, {result['bytes'] / result['total_s'] / 1e9:5.2f} GB/s"
                    + (f" (stream {result['stream_s']:.2f} s)" if result.get("stream_s") else ""))
    medians = {}
    for state, by_method in runs.items():
        for method, results in by_method.items():
            med = {k: statistics.median(r[k] for r in results) for k in results[0] if k != "bytes"}
            med["gbps"] = results[0]["bytes"] / med["total_s"] / 1e9
            medians[f"{state}/{method}"] = med
    return {"checkpoint": checkpoint, "files": len(files), "tensors": len(order),
            "bytes": runs[states[0]]["streamer"][0]["bytes"], "world": world, "rank": rank, "baseline": baseline,
            "concurrency": config.workers(), "medians": medians, "runs": runs}


def format_table(report: dict) -> str:
    lines = ["| cache | method | constructor (ms) | header parse (ms) | all tensors in memory (s) | GB/s |",
             "|---|---|---|---|---|---|"]
    for key, med in report["medians"].items():
        state, method = key.split("/")
        header = f"{med['header_s'] * 1e3:.1f}" if med.get("header_s") is not None else "(in constructor)"
        lines.append(f"| {state} | {method} | {med['routing_s'] * 1e3:.1f} | {header} | {med['total_s']:.2f} | "
                     f"{med['gbps']:.2f} |")
    return "\n".join(lines)


def _add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("checkpoint", help="checkpoint directory, index.json or file")
    p.add_argument("--repeat", type=int, default=3)
    p.add_argument("--world", type=int, default=1)
    p.add_argument("--rank", type=int, default=0)
    p.add_argument("--tgi-source", default=None, help="TGI checkout (default: $TGI_SOURCE_DIR)")
    p.add_argument("--concurrency", type=int, default=None)
    p.add_argument("--states", default="cold,warm")
    p.add_argument("--json", default=None, help="write the report here")


def add_parser(sub) -> None:
    p = sub.add_parser("bench-tgi", help="TGI's weight loading vs StreamerWeights, cold and warm page cache",
                       description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    _add_arguments(p)
    p.set_defaults(func=_run_and_print)


def _run_and_print(args: argparse.Namespace) -> int:
    config = StreamerConfig() if args.concurrency is None else StreamerConfig(concurrency=args.concurrency)
    report = run_bench(args.checkpoint, repeat=args.repeat, world=args.world, rank=args.rank,
                       tgi_source=args.tgi_source, config=config, states=tuple(args.states.split(",")))
    print(format_table(report))
    if args.json:
        Path(args.json).write_text(json.dumps(report, indent=1, default=str))
    return 0


def main(argv: Sequence[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m loader_plugins.bench.tgi", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    _add_arguments(p)
    return _run_and_print(p.parse_args(argv))


if __name__ == "__main__":
    sys.exit(main())
