"""``model-streamer cache serve|status|warm|evict`` and ``model-streamer estimate``.

:func:`register` adds the subcommands to the main parser (``loader_plugins.cli.build_parser``).
``python -m loader_plugins.cache.cli ...`` runs them on their own.

The cache commands default ``--dram-cache-dir`` to :data:`DEFAULT_DRAM_DIR`; the disk tier is
used when ``--cache-dir`` is given. Every StreamerConfig key is a flag, as for ``load``.
"""

from __future__ import annotations

import argparse
import json
import logging
import sys
import time
from typing import Any, Sequence

from .config import cache_config

log = logging.getLogger("loader_plugins.cli")

DEFAULT_DRAM_DIR = "/dev/shm/loader-plugins"


def _config(args: argparse.Namespace, *, default_dram: bool = True):
    from ..cli_options import config_from_args

    for key in ("cfg_cache_dir", "cfg_dram_cache_dir"):
        value = getattr(args, key, None)
        if isinstance(value, str) and value.lower() in ("none", "null", ""):
            setattr(args, key, None)
            continue
    cfg = config_from_args(args)
    if default_dram and cache_config(cfg).dram_cache_dir is None and getattr(args, "cfg_dram_cache_dir", None) is None:
        cfg = cfg.replace(dram_cache_dir=DEFAULT_DRAM_DIR)
    return cfg


def _size(text: str | None) -> int:
    from ..config import parse_size

    return parse_size(text) if text else 0


def _ago(t: float) -> str:
    s = max(0.0, time.time() - t)
    return f"{s:.0f} s ago" if s < 120 else f"{s / 60:.0f} min ago" if s < 7200 else f"{s / 3600:.1f} h ago"


def cmd_status(args: argparse.Namespace) -> int:
    from . import metrics
    from .disk import disk_tier
    from .dram import dram_tier

    cfg = _config(args)
    tiers = []
    for store in (dram_tier(cfg), disk_tier(cfg)):
        if store is not None:
            status = store.status()
            metrics.usage(store.tier, status["used_bytes"], len(status["entries"]))
            tiers.append(status)
    if args.json:
        print(json.dumps({"tiers": tiers}, indent=2))
        return 0
    for t in tiers:
        budget = t["max_bytes"]
        print(f"{t['tier']} tier at {t['root']}: {len(t['entries'])} entries, {t['used_bytes'] / 1e9:.3f} GB used"
              f" of {budget / 1e9:.3f} GB" if budget else
              f"{t['tier']} tier at {t['root']}: {len(t['entries'])} entries, {t['used_bytes'] / 1e9:.3f} GB used "
              f"(no budget)")
        if t["tier"] == "dram":
            server = t.get("server")
            print(f"  server: pid {server['pid']}, up {time.time() - server['started']:.0f} s" if server
                  else "  server: not running")
        for e in sorted(t["entries"], key=lambda e: -e["last_used"]):
            print(f"  {e['uri']}  {e['size'] / 1e9:.3f} GB  etag {e['etag']}  used {_ago(e['last_used'])}"
                  + ("  [in use]" if e["in_use"] else ""))
    return 0


def cmd_warm(args: argparse.Namespace) -> int:
    from .dram import DramTier
    from .warm import warm

    cfg = _config(args)
    if args.max_bytes and args.tier == "dram":
        DramTier(cache_config(cfg).dram_cache_dir).set_budget(_size(args.max_bytes))
    t0 = time.perf_counter()
    rows = warm(args.uri, cfg, tier=args.tier)
    seconds = time.perf_counter() - t0
    if args.json:
        print(json.dumps({"uri": args.uri, "tier": args.tier, "seconds": round(seconds, 4), "files": rows}))
    else:
        for row in rows:
            print(f"{row['uri']}: {row['result']} ({row['bytes'] / 1e9:.3f} GB, {row.get('seconds', 0):.2f} s)")
    failed = [r for r in rows if r["result"] == "failed" or r["result"].startswith("skipped (being")]
    return 1 if failed else 0


def cmd_evict(args: argparse.Namespace) -> int:
    from .warm import evict

    if not args.uri and not args.all:
        print("model-streamer cache evict: give an s3://, gs:// or az:// URI, or --all", file=sys.stderr)
        return 2
    cfg = _config(args)
    tiers = ("dram", "disk") if args.tier == "all" else (args.tier,)
    result = evict(None if args.all else args.uri, cfg, tiers=tiers)
    if args.json:
        print(json.dumps(result))
    else:
        for tier, r in result.items():
            print(f"{tier}: evicted {len(r['evicted'])}" + (f", kept {len(r['in_use'])} in use" if r["in_use"] else ""))
    return 0


def cmd_serve(args: argparse.Namespace) -> int:
    from .dram_server import serve

    cfg = _config(args)

    def ready(info: dict) -> None:
        print(json.dumps({"ready": True, **info}), flush=True)

    return serve(cfg, max_bytes=_size(args.max_bytes), warm_uris=args.warm or (), promote=args.promote,
                 interval=args.interval, metrics_port=args.metrics_port, clear_on_exit=args.clear_on_exit,
                 on_ready=ready)


def cmd_estimate(args: argparse.Namespace) -> int:
    from .estimate import estimate

    cfg = _config(args, default_dram=False)
    result = estimate(args.model, cfg)
    if args.json:
        print(json.dumps(result))
    else:
        print(f"{args.model}: {result['seconds']:.2f} s predicted for {result['bytes'] / 1e9:.3f} GB from the "
              f"{result['tier']} tier at {result['gbps']} GB/s ({result['basis']})")
    return 0


def register(subparsers: Any) -> None:
    """Add ``cache {serve,status,warm,evict}`` and ``estimate`` to ``model-streamer``'s subparsers."""
    from ..cli_options import add_config_flags

    cache = subparsers.add_parser("cache", help="the checkpoint cache tiers (shared DRAM, local disk)")
    sub = cache.add_subparsers(dest="cache_command", required=True)

    p = sub.add_parser("serve", help="keep the DRAM tier within budget, preload and promote hot checkpoints")
    p.add_argument("--max-bytes", default=None, help="DRAM budget, e.g. 64GiB (default: unlimited)")
    p.add_argument("--warm", action="append", metavar="URI", help="checkpoint to load into DRAM at start (repeat)")
    p.add_argument("--promote", action="store_true",
                   help="copy disk-tier entries used since the last scan into DRAM (needs --cache-dir)")
    p.add_argument("--interval", type=float, default=2.0, help="seconds between budget/promotion scans")
    p.add_argument("--metrics-port", type=int, default=None, help="expose Prometheus metrics on this port")
    p.add_argument("--clear-on-exit", action="store_true", help="evict every entry not in use when stopping")
    add_config_flags(p)
    p.set_defaults(func=cmd_serve)

    p = sub.add_parser("status", help="entries, sizes, budgets and the server of each tier")
    p.add_argument("--json", action="store_true")
    add_config_flags(p)
    p.set_defaults(func=cmd_status)

    p = sub.add_parser("warm", help="copy a checkpoint into a tier from the fastest tier holding it")
    p.add_argument("uri", help="s3://, gs:// or az:// checkpoint (directory, index.json or file)")
    p.add_argument("--tier", choices=("dram", "disk"), default="dram")
    p.add_argument("--max-bytes", default=None, help="also set the DRAM budget")
    p.add_argument("--json", action="store_true")
    add_config_flags(p)
    p.set_defaults(func=cmd_warm)

    p = sub.add_parser("evict", help="drop a checkpoint's entries (never ones being read)")
    p.add_argument("uri", nargs="?", help="s3://, gs:// or az:// object or prefix")
    p.add_argument("--all", action="store_true", help="every entry")
    p.add_argument("--tier", choices=("dram", "disk", "all"), default="all")
    p.add_argument("--json", action="store_true")
    add_config_flags(p)
    p.set_defaults(func=cmd_evict)

    p = subparsers.add_parser("estimate", help="predict the load time of a checkpoint on this host")
    p.add_argument("model", help="checkpoint: s3://, gs://, az:// or Azure https:// URI, directory or file")
    p.add_argument("--json", action="store_true", help="one JSON object (seconds, tier, gbps, bytes, basis...)")
    add_config_flags(p)
    p.set_defaults(func=cmd_estimate)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="model-streamer", description=__doc__)
    parser.add_argument("-v", "--verbose", action="store_true", help="debug logging")
    register(parser.add_subparsers(dest="command", required=True))
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    from ..errors import StreamerError

    args = build_parser().parse_args(argv)
    logging.basicConfig(level=logging.DEBUG if args.verbose else logging.INFO, stream=sys.stderr,
                        format="%(levelname)s %(name)s: %(message)s")
    try:
        return args.func(args) or 0
    except StreamerError as exc:
        print(f"model-streamer: error: {exc}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
