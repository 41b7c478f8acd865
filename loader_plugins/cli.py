"""``model-streamer``: inspect, load, bench and make-demo from the command line."""

from __future__ import annotations

import argparse
import json
import logging
import os
import sys
import time
from typing import Sequence

from .config import StreamerConfig
from .cli_options import add_config_flags, config_from_args
from .errors import SourceNotFoundError, StreamerError

log = logging.getLogger("loader_plugins.cli")


def _fmt_bytes(n: float) -> str:
    for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
        if abs(n) < 1024 or unit == "TiB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.2f} {unit}"
        n /= 1024
    return str(n)


def cmd_inspect(args: argparse.Namespace) -> int:
    from .core.checkpoint import open_checkpoint

    cfg = config_from_args(args)
    ckpt = open_checkpoint(args.path, cfg)
    rows = sorted(ckpt.tensors.values(), key=lambda s: (s.file, s.offset))
    if args.json:
        print(json.dumps({
            "files": [{"file": h.file, "size": h.file_size, "header_bytes": h.data_offset, "tensors": len(h.tensors),
                       "metadata": h.metadata} for h in ckpt.headers],
            "tensors": [{"name": s.name, "dtype": s.dtype, "shape": list(s.shape), "bytes": s.nbytes, "file": s.file,
                         "offset": s.offset} for s in rows],
            "total_bytes": ckpt.total_bytes,
        }, indent=2))
        return 0
    width = max([len(s.name) for s in rows] + [6])
    print(f"{'tensor':<{width}}  {'dtype':<11} {'shape':<22} {'bytes':>14}  shard")
    for s in rows:
        shard = s.file.rsplit("/", 1)[-1]
        print(f"{s.name:<{width}}  {s.dtype:<11} {str(list(s.shape)):<22} {s.nbytes:>14,}  {shard}")
    print()
    for h in ckpt.headers:
        print(f"{h.file}: {len(h.tensors)} tensors, {_fmt_bytes(h.data_bytes)}, header {h.data_offset} bytes")
    dtypes: dict[str, int] = {}
    for s in rows:
        dtypes[s.dtype] = dtypes.get(s.dtype, 0) + s.nbytes
    print(f"total: {len(rows)} tensors, {ckpt.total_bytes:,} bytes ({_fmt_bytes(ckpt.total_bytes)}) in "
          f"{len(ckpt.files)} file(s); dtypes: " + ", ".join(f"{k} {_fmt_bytes(v)}" for k, v in sorted(dtypes.items())))
    return 0


def cmd_load(args: argparse.Namespace) -> int:
    started = time.perf_counter()
    import torch  # noqa: F401  (its first import costs ~1 s: set-up, outside the load's clock)

    from .streamer import SafetensorsStreamer

    cfg = config_from_args(args)
    t0 = time.perf_counter()
    setup = t0 - started
    count = total = 0
    with SafetensorsStreamer(cfg) as streamer:
        streamer.stream_files(args.path, device=getattr(args, "device", "cpu"))
        for _name, tensor in streamer.get_tensors():
            count += 1
            total += tensor.numel() * tensor.element_size()
        stats = dict(streamer.stats)
    seconds = time.perf_counter() - t0
    result = {"path": args.path, "tensors": count, "bytes": total, "seconds": round(seconds, 4),
              "gbps": round(total / seconds / 1e9, 3) if seconds else None,
              "header_seconds": round(stats.get("header_seconds", 0.0), 4), "files": stats.get("files"),
              "concurrency": stats.get("workers"), "direct_io": cfg.direct_io,
              "setup_seconds": round(setup, 4), "memory": stats.get("memory"), "sinks": stats.get("sinks")}
    if args.json:
        print(json.dumps(result))
    else:
        print(f"loaded {count} tensors, {total / 1e9:.3f} GB from {stats.get('files')} file(s) in {seconds:.3f} s: "
              f"{result['gbps']} GB/s (set-up before the load, importing torch: {setup:.2f} s)")
    return 0


def cmd_make_demo(args: argparse.Namespace) -> int:
    from .bench.demo import make_demo, parse_size

    paths = make_demo(args.directory, parse_size(args.size), shards=args.shards, dtype=args.dtype, seed=args.seed)
    total = sum(p.stat().st_size for p in paths if str(p).endswith(".safetensors"))
    print(f"wrote {len(paths)} files ({total / 1e9:.2f} GB of safetensors) to {args.directory}")
    return 0


_WEIGHT_SUFFIXES = (".safetensors", ".bin", ".pt", ".pth", ".gguf", ".ckpt", ".h5", ".msgpack", ".onnx", ".tensors")


def pull_config(uri: str, directory: str, config: StreamerConfig, *, max_bytes: int = 64 << 20) -> list[str]:
    """Copy the small non-weight files (config, tokenizer...) of a checkpoint directory."""
    import os

    from .core.sources.base import storage_for

    os.makedirs(directory, exist_ok=True)
    fetched = []
    with storage_for(uri, config) as storage:
        if not storage.is_dir(uri):
            raise SourceNotFoundError(2, f"{uri}: not a checkpoint directory (no objects under it)")
        for name in storage.list_dir(uri):
            if name.endswith(_WEIGHT_SUFFIXES) or name.startswith("."):
                continue
            data = storage.read_small(storage.join(uri, name), limit=max_bytes)
            target = os.path.join(directory, name)
            tmp = target + ".partial"
            with open(tmp, "wb") as f:
                f.write(data)
            os.replace(tmp, target)
            fetched.append(name)
    return fetched


def cmd_pull_config(args: argparse.Namespace) -> int:
    names = pull_config(args.uri, args.directory, config_from_args(args))
    print(f"fetched {len(names)} file(s) into {args.directory}: {', '.join(names)}")
    return 0


#: the bench of a checkpoint in object storage, by URI scheme ("module:function" under .bench)
_REMOTE_BENCHES = {"s3": "s3:run_s3_bench", "gs": "cloud:run_cloud_bench", "az": "cloud:run_cloud_bench",
                   "https": "cloud:run_cloud_bench"}


def cmd_bench(args: argparse.Namespace) -> int:
    import importlib

    from .core.sources.base import scheme_of

    remote = _REMOTE_BENCHES.get(scheme_of(args.path))
    if remote is not None:
        module, _, function = remote.partition(":")
        return getattr(importlib.import_module(f".bench.{module}", __package__), function)(args, config_from_args(args))
    if args.restarts:
        from .bench.restarts import run_restarts

        return run_restarts(args, config_from_args(args))
    from .bench.runner import run_bench

    return run_bench(args, config_from_args(args))


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="model-streamer", description=__doc__)
    parser.add_argument("-v", "--verbose", action="store_true", help="debug logging")
    sub = parser.add_subparsers(dest="command", required=True)

    p = sub.add_parser("inspect", help="list tensors, dtypes, shapes, bytes and shards")
    p.add_argument("path", nargs="+", help="file(s), checkpoint directory or s3://, gs://, az:// URI")
    p.add_argument("--json", action="store_true")
    add_config_flags(p)
    p.set_defaults(func=cmd_inspect)

    p = sub.add_parser("load", help="stream every tensor and print seconds and GB/s")
    p.add_argument("path", nargs="+", help="file(s), checkpoint directory or s3://, gs://, az:// URI")
    p.add_argument("--json", action="store_true")
    p.add_argument("--device", default="cpu", help="where the tensors go: cpu, cuda, cuda:N (a CUDA load reports "
                                                   "its stages: the pinned ring, reads, waits, copies)")
    add_config_flags(p)
    p.set_defaults(func=cmd_load)

    p = sub.add_parser("make-demo", help="write a Llama-like bf16 checkpoint (2+ shards, index.json)")
    p.add_argument("directory")
    p.add_argument("--size", default="3GB")
    p.add_argument("--shards", type=int, default=None)
    p.add_argument("--dtype", default="bfloat16", choices=["bfloat16", "float16", "float32"])
    p.add_argument("--seed", type=int, default=0)
    p.set_defaults(func=cmd_make_demo)

    p = sub.add_parser("pull-config", help="fetch only the small non-weight files (config, tokenizer) of a checkpoint")
    p.add_argument("uri", help="checkpoint directory, e.g. s3://bucket/models/llama or gs://, az://")
    p.add_argument("directory", help="local directory to write them to")
    add_config_flags(p)
    p.set_defaults(func=cmd_pull_config)

    p = sub.add_parser("bench", help="this project vs the peers, cold and warm page cache, one table")
    p.add_argument("path", help="checkpoint directory (or s3://, gs://, az:// URI)")
    p.add_argument("--repeat", type=int, default=3, help="runs per method (median reported)")
    p.add_argument("--cache", default="cold,warm", help="cold, warm or both (comma separated)")
    p.add_argument("--methods", default="short",
                   help="'short' (default: streamer and one configuration of each peer: safetensors, runai-c16, "
                        "tensorizer, fastsafetensors), 'all' (adds our into-caller-tensors mode, the pread "
                        "ceilings and Run:ai at 4 and 8 threads), or a comma separated list (see --list)")
    p.add_argument("--list", action="store_true", help="list the methods and exit")
    p.add_argument("--warmup", action="store_true", help="one untimed round before the timed ones")
    p.add_argument("--process", choices=("fresh", "same"), default="fresh",
                   help="fresh (default): each timed load in a new process, as a server's start; same: every load "
                        "in this process (a long-lived process reuses memory earlier loads freed)")
    p.add_argument("--settle", type=float, default=2.0, help="seconds of quiet before each timed run (the VM hands "
                   "freed memory back in the background)")
    p.add_argument("--json", metavar="FILE", help="also write the results as JSON to FILE ('-' for stdout)")
    p.add_argument("--restarts", type=int, default=0, metavar="N",
                   help="instead of the table: a server's N starts per method, each a fresh process, after one "
                        "eviction (streamer, safetensors, runai-c16, tensorizer unless --methods names others)")
    add_config_flags(p)
    p.set_defaults(func=cmd_bench)
    from .cache.cli import register as register_cache_commands

    register_cache_commands(sub)   # cache serve|status|warm|evict, estimate

    from .bench.demo_serve import add_parser as add_demo

    add_demo(sub)   # the main job: demo model, vllm serve --load-format streamer, one completion, bench
    from .bench.vllm_load import add_parser as add_bench_vllm

    add_bench_vllm(sub)

    from .bench.serve_bench import add_parser as add_bench_serve

    add_bench_serve(sub)
    from .bench.cuda_bench import add_parser as add_bench_cuda

    add_bench_cuda(sub)
    from .bench.sglang_load import add_parser as add_bench_sglang
    from .bench.tensors import add_parser as add_bench_tensors

    add_bench_tensors(sub)
    from .bench.s3_fresh import add_parser as add_bench_s3_fresh

    add_bench_s3_fresh(sub)

    add_bench_sglang(sub)
    from .bench.cache_tiers import add_parser as add_bench_cache
    from .bench.tgi import add_parser as add_bench_tgi

    add_bench_cache(sub)
    add_bench_tgi(sub)

    p = sub.add_parser("serve", help="one OpenAI-compatible endpoint in front of vLLM engines started, swapped "
                                     "out and in on demand (see loader_plugins/serve/catalog.py for the config)")
    p.add_argument("--config", required=True, help="serve config, YAML or JSON (models, budget, idle_timeout)")
    p.add_argument("--host", default="127.0.0.1")
    p.add_argument("--port", type=int, default=8000)
    p.add_argument("--api-key", default=os.environ.get("MODEL_STREAMER_API_KEY"),
                   help="required as 'Authorization: Bearer KEY' on every endpoint but /health "
                        "(default: $MODEL_STREAMER_API_KEY, or api_key in the config)")
    p.add_argument("--log-dir", default="model-streamer-logs", help="where each engine's log goes")
    p.add_argument("--ray", nargs="?", const="auto", default=None, metavar="ADDRESS",
                   help="serve on a Ray cluster: its nodes are the servers (ADDRESS: auto, the default, HOST:PORT "
                        "or ray://HOST:10001; needs the [ray] extra); see loader_plugins/serve/ray_cluster.py")
    p.set_defaults(func=cmd_serve)

    p = sub.add_parser("agent", help="the engines of this host for a serve router on another "
                                     "(servers: NAME: {url: http://THIS-HOST:PORT}; see loader_plugins/serve/agent.py)")
    p.add_argument("--name", default=None, help="this server's name in the router's logs (default: the hostname)")
    p.add_argument("--host", default="127.0.0.1", help="address to listen on (not loopback: --api-key required)")
    p.add_argument("--port", type=int, default=8700)
    p.add_argument("--engine-host", default=None,
                   help="deprecated: engines listen on this host's 127.0.0.1 only and the agent relays to them; "
                        "any other address is refused")
    p.add_argument("--budget", default=None, help="bytes the resident models may hold here (default: 90%% of the "
                                                  "GPU, else half of RAM), e.g. 40GiB")
    p.add_argument("--cache-dir", default=None, help="this host's disk cache for its engines' loads")
    p.add_argument("--dram-cache-dir", default=None, help="this host's shared-DRAM cache (e.g. /dev/shm/streamer)")
    p.add_argument("--api-key", default=os.environ.get("MODEL_STREAMER_AGENT_KEY"),
                   help="required as 'Authorization: Bearer KEY' on every endpoint but /health "
                        "(default: $MODEL_STREAMER_AGENT_KEY)")
    p.add_argument("--log-dir", default="model-streamer-agent-logs", help="engine logs and engines.json")
    p.set_defaults(func=cmd_agent)
    return parser


def cmd_agent(args: argparse.Namespace) -> int:
    import socket
    from pathlib import Path

    from .config import parse_size
    from .serve.agent import run_agent

    run_agent(name=args.name or socket.gethostname(), host=args.host, port=args.port, engine_host=args.engine_host,
              budget=parse_size(args.budget) if args.budget else None, cache_dir=args.cache_dir,
              dram_cache_dir=args.dram_cache_dir, log_dir=Path(args.log_dir), api_key=args.api_key)
    return 0


def cmd_serve(args: argparse.Namespace) -> int:
    from pathlib import Path

    from .serve.catalog import load_catalog
    from .serve.router import serve

    catalog = load_catalog(args.config)
    if args.ray is not None:
        from .serve.catalog import with_ray

        catalog = with_ray(catalog, args.ray)
    serve(catalog, host=args.host, port=args.port, log_dir=Path(args.log_dir), api_key=args.api_key)
    return 0


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    logging.basicConfig(level=logging.DEBUG if args.verbose else logging.INFO, stream=sys.stderr,
                        format="%(levelname)s %(name)s: %(message)s")
    if not args.verbose:   # azure-core logs every request and its headers at INFO
        logging.getLogger("azure").setLevel(logging.WARNING)
    if args.command in ("inspect", "load") and len(args.path) == 1:
        args.path = args.path[0]
    try:
        return args.func(args) or 0
    except StreamerError as exc:
        print(f"model-streamer: error: {exc}", file=sys.stderr)
        return 2
    except BrokenPipeError:
        # the reader of our stdout left early (``model-streamer inspect X | head``): not an error;
        # point stdout at /dev/null so the interpreter's final flush does not fail again
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return 0


if __name__ == "__main__":
    sys.exit(main())
