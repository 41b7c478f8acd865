"""One run, one table: a checkpoint loaded from S3 (cold), from the disk tier (cold page cache)
and from the DRAM tier, next to the pread ceilings of the same bytes on this host.

    model-streamer bench-cache --size 3GB --repeat 3 --workdir /tmp/lp-cache-bench
    python -m loader_plugins.bench.cache_tiers --size 3GB --repeat 3 --workdir /tmp/lp-cache-bench

Starts SeaweedFS on 127.0.0.1 (:mod:`.seaweed`;
``--endpoint`` uses a running server instead, with AWS_* credentials in the environment), writes
a Llama-like demo checkpoint (``model-streamer make-demo``), uploads it, then per repeat:

- ``pread warm`` / ``pread cold``: the ceilings (``bench.peers.pread_ceiling``) on the local copy:
  buffered 4 threads from the page cache; cold: the better of buffered 4 threads and O_DIRECT
  8 threads after ``posix_fadvise(DONTNEED)``;
- ``local cold`` / ``local warm``: this project's loader on the local copy (for reference);
- ``s3 cold``: ``load_file(s3://...)`` without a cache, SeaweedFS's own files evicted from the
  page cache first; ``s3 cold + write-through``: the same with an empty disk tier (writes it);
- ``disk tier cold``: the disk tier's files evicted from the page cache;
- ``dram tier``: the checkpoint in ``/dev/shm`` (``cache warm``); ``--extra-dram-dir`` adds a
  second DRAM-tier row, e.g. a tmpfs mounted with ``-o huge=within_size`` (``/dev/shm`` copies
  4 KiB pages: 6-8 GB/s into warm memory here, against 12-17 GB/s with huge pages or from ext4's
  page cache).

Every load is ``load_file`` into fresh tensors with every page touched. Each row is the median of
``--repeat`` runs; the ``estimate`` column is what ``model-streamer estimate`` predicted just
before the run (from the bandwidths recorded by earlier runs). Data stays under ``--workdir``
and ``/dev/shm/lp-cache-bench-*``, removed at the end unless ``--keep``.
"""

from __future__ import annotations

import argparse
import gc
import json
import logging
import os
import shutil
import statistics
import sys
import time
from pathlib import Path
from typing import Any, Callable

from ..cache.config import cache_config

log = logging.getLogger(__name__)


def _all_files(root: Path) -> list[str]:
    return [str(p) for p in root.rglob("*") if p.is_file()]


def _evict(paths: list[str]) -> None:
    from .peers import evict

    for p in paths:
        try:
            evict(p)
        except OSError:
            pass


def _read_all(paths: list[str]) -> None:
    for p in paths:
        with open(p, "rb", buffering=0) as f:
            while f.read(16 << 20):
                pass


def _start_seaweed(workdir: Path):
    from .seaweed import SeaweedS3

    server = SeaweedS3(workdir)
    server.start()
    for key, value in server.env().items():
        os.environ[key] = value
    return server


def run(args: argparse.Namespace) -> dict:
    import torch  # noqa: F401  (the loads below need it; fail early)

    from ..cache.disk import DiskTier, wait_for_commits
    from ..cache.estimate import estimate
    from ..cache.warm import warm
    from ..config import StreamerConfig, parse_size
    from ..streamer import load_file
    from . import peers
    from .demo import make_demo

    work = Path(args.workdir)
    work.mkdir(parents=True, exist_ok=True)
    ckpt = work / "ckpt"
    if not (ckpt / "model.safetensors.index.json").exists():
        log.info("writing a %s demo checkpoint to %s", args.size, ckpt)
        make_demo(ckpt, parse_size(args.size), progress=False)
    shards = sorted(str(p) for p in ckpt.glob("*.safetensors"))
    nbytes = sum(os.path.getsize(p) for p in shards)
    server = None
    if args.endpoint:
        endpoint = args.endpoint
    else:
        server = _start_seaweed(work / "seaweedfs")
        endpoint = server.endpoint_url
    shm = Path(args.dram_dir or f"/dev/shm/lp-cache-bench-{os.getpid()}")
    cache = work / "disk-tier"
    results: dict[str, list[float]] = {}
    predicted: dict[str, list[float]] = {}
    try:
        import boto3
        from boto3.s3.transfer import TransferConfig
        from botocore.config import Config

        client = boto3.session.Session().client("s3", endpoint_url=endpoint,
                                                config=Config(s3={"addressing_style": "path"}))
        bucket = args.bucket
        try:
            client.create_bucket(Bucket=bucket)
        except client.exceptions.BucketAlreadyOwnedByYou:
            pass
        t0 = time.perf_counter()
        for path in sorted(ckpt.iterdir()):
            client.upload_file(str(path), bucket, f"bench/{path.name}",
                               Config=TransferConfig(multipart_chunksize=64 << 20, max_concurrency=4))
        log.info("uploaded %.2f GB in %.1f s", nbytes / 1e9, time.perf_counter() - t0)
        uri = f"s3://{bucket}/bench"
        common: dict[str, Any] = dict(s3_endpoint_url=endpoint, s3_region="us-east-1", s3_addressing_style="path",
                                      progress="off")
        if args.concurrency:
            common["concurrency"] = args.concurrency
        plain = StreamerConfig(**common)
        cached = StreamerConfig.from_dict({**common, "cache_dir": str(cache)})
        both = StreamerConfig.from_dict({**common, "cache_dir": str(cache), "dram_cache_dir": str(shm)})
        extra = StreamerConfig.from_dict({**common, "cache_dir": str(cache), "dram_cache_dir": args.extra_dram_dir}) \
            if args.extra_dram_dir else None
        extra_name = f"dram tier ({args.extra_dram_label})"
        seaweed_files = (lambda: _all_files(work / "seaweedfs")) if server is not None else (lambda: [])

        def load(cfg, path=uri) -> int:
            tensors = load_file(path, config=cfg)
            n = peers.touch_all(tensors)
            del tensors
            return n

        def disk_files() -> list[str]:
            return [e["path"] for e in DiskTier(cache).entries()]

        def measure(name: str, fn: Callable[[], Any], prepare: Callable[[], None] | None = None,
                    est_cfg=None, after: Callable[[], None] | None = None) -> None:
            if prepare is not None:
                prepare()
            gc.collect()
            if est_cfg is not None:
                predicted.setdefault(name, []).append(estimate(uri, est_cfg)["seconds"])
            t = time.perf_counter()
            fn()
            seconds = time.perf_counter() - t
            gc.collect()
            results.setdefault(name, []).append(seconds)
            log.info("%-28s %.3f s  %.2f GB/s", name, seconds, nbytes / seconds / 1e9)
            if after is not None:
                after()

        def others() -> None:
            """Drop what the other rows put in the page cache: a 2-core VM has little memory to spare."""
            _evict(seaweed_files() + disk_files())

        def published() -> None:
            t = time.perf_counter()
            wait_for_commits()
            log.info("disk-tier entries published %.2f s after the load returned (background fsync)",
                     time.perf_counter() - t)

        def clear_disk() -> None:
            DiskTier(cache).clear()
            others()

        for i in range(args.repeat):
            # cold rows: every file involved is evicted before, and what a row cached is evicted after
            measure("pread cold (4t, buffered)", lambda: peers.pread_ceiling(shards, threads=4),
                    prepare=lambda: _evict(shards))
            measure("pread cold (8t, O_DIRECT)", lambda: peers.pread_ceiling(shards, threads=8, direct=True),
                    prepare=lambda: _evict(shards))
            measure("local cold (load_file)", lambda: load(plain, ckpt), prepare=lambda: _evict(shards),
                    after=lambda: _evict(shards))
            measure("s3 cold (no cache)", lambda: load(plain), prepare=others, after=others)
            measure("s3 cold + write-through", lambda: load(cached), prepare=clear_disk, est_cfg=cached,
                    after=lambda: (published(), others()))
            measure("disk tier cold", lambda: load(cached), prepare=others, est_cfg=cached, after=others)
            # warm rows: only the local copy in the page cache, the DRAM tier in /dev/shm
            if i == 0:
                for cfg in (both, extra) if extra is not None else (both,):
                    t = time.perf_counter()
                    warm(uri, cfg, tier="dram")
                    log.info("warmed the DRAM tier %s in %.1f s", cache_config(cfg).dram_cache_dir, time.perf_counter() - t)
                others()
            measure("pread warm (4t, buffered)", lambda: peers.pread_ceiling(shards, threads=4),
                    prepare=lambda: _read_all(shards))
            measure("local warm (load_file)", lambda: load(plain, ckpt), prepare=lambda: _read_all(shards))
            measure("dram tier", lambda: load(both), est_cfg=both, prepare=lambda: _evict(shards))   # memory back
            if extra is not None:
                measure(extra_name, lambda: load(extra), est_cfg=extra)
    finally:
        if server is not None:
            server.kill()
        if not args.keep:
            shutil.rmtree(shm, ignore_errors=True)
            if args.extra_dram_dir:
                shutil.rmtree(args.extra_dram_dir, ignore_errors=True)
            shutil.rmtree(cache, ignore_errors=True)
            shutil.rmtree(work / "seaweedfs", ignore_errors=True)
    return {"bytes": nbytes, "repeat": args.repeat, "seconds": results, "predicted": predicted,
            "host": os.uname().nodename, "cpus": os.cpu_count()}


def table(report: dict) -> str:
    nbytes = report["bytes"]
    med = {k: statistics.median(v) for k, v in report["seconds"].items()}
    gbps = {k: nbytes / s / 1e9 for k, s in med.items()}
    warm_ceiling = gbps.get("pread warm (4t, buffered)")
    cold_ceiling = max((gbps[k] for k in ("pread cold (4t, buffered)", "pread cold (8t, O_DIRECT)") if k in gbps),
                       default=None)
    s3_cold = gbps.get("s3 cold (no cache)")
    refs = {"dram tier": ("warm pread", warm_ceiling), "disk tier cold": ("cold pread", cold_ceiling),
            **{k: ("warm pread", warm_ceiling) for k in report["seconds"] if k.startswith("dram tier (")},
            "local cold (load_file)": ("cold pread", cold_ceiling),
            "local warm (load_file)": ("warm pread", warm_ceiling),
            "s3 cold + write-through": ("s3 cold", s3_cold)}
    lines = [f"checkpoint: {nbytes / 1e9:.2f} GB, median of {report['repeat']} run(s), host {report['host']} "
             f"({report['cpus']} CPUs)", "",
             "| load | GB/s | seconds (median, min-max) | ratio | estimate (s) |",
             "|---|---:|---|---|---:|"]
    for name, seconds in report["seconds"].items():
        ref = refs.get(name)
        ratio = f"{gbps[name] / ref[1]:.2f}x {ref[0]}" if ref and ref[1] else ""
        pred = report["predicted"].get(name)
        pred_text = f"{statistics.median(pred):.2f}" if pred else ""
        lines.append(f"| {name} | {gbps[name]:.2f} | {med[name]:.2f} ({min(seconds):.2f}-{max(seconds):.2f}) | "
                     f"{ratio} | {pred_text} |")
    return "\n".join(lines)


def _add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--size", default="3GB")
    parser.add_argument("--repeat", type=int, default=3)
    parser.add_argument("--workdir", default="/tmp/lp-cache-bench")
    parser.add_argument("--dram-dir", default=None, help="DRAM tier directory (default /dev/shm/lp-cache-bench-PID)")
    parser.add_argument("--extra-dram-dir", default=None,
                        help="a second DRAM tier directory measured in the same run (e.g. on a tmpfs mounted with "
                             "-o huge=within_size)")
    parser.add_argument("--extra-dram-label", default="huge-page tmpfs", help="its row's label")
    parser.add_argument("--endpoint", default=None, help="use this S3 endpoint instead of starting SeaweedFS")
    parser.add_argument("--bucket", default="lp-cache-bench")
    parser.add_argument("--concurrency", type=int, default=None)
    parser.add_argument("--json", metavar="FILE", help="also write the raw results as JSON")
    parser.add_argument("--keep", action="store_true", help="keep the tiers and the S3 data")


def add_parser(sub) -> None:
    p = sub.add_parser("bench-cache", help="S3 cold vs the disk and DRAM cache tiers vs the pread ceilings, one table",
                       description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    _add_arguments(p)
    p.set_defaults(func=_run_and_print)


def _run_and_print(args: argparse.Namespace) -> int:
    report = run(args)
    text = table(report)
    print(text)
    if args.json:
        Path(args.json).write_text(json.dumps({**report, "table": text}, indent=2))
    return 0


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m loader_plugins.bench.cache_tiers", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    _add_arguments(parser)
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, stream=sys.stderr, format="%(levelname)s %(name)s: %(message)s")
    return _run_and_print(args)


if __name__ == "__main__":
    sys.exit(main())
