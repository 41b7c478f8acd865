"""``model-streamer bench s3://bucket/prefix``: this project and its peers on S3, in one run.

Every method loads the whole checkpoint from the same endpoint into CPU memory and touches
every page of the result; each cell is the median of ``--repeat`` runs, the methods taking
turns (round robin) so that drifts of the machine hit them alike. Methods:

* ``streamer``: ``load_file("s3://...")`` into fresh tensors (what a loader must do);
* ``streamer-into``: into caller-allocated tensors, allocated and touched once (the engine case);
* ``boto3-16t`` / ``boto3-into-16t`` / ``boto3-into-8t``: the ceiling, plain boto3 ranged GETs of
  16 MiB from a thread pool (a free thread takes the next range), each body read with
  ``readinto`` straight from the socket; into fresh buffers, or into buffers allocated and
  touched once and reused (no page faults: pure transfer);
* ``runai-s3-c1/4/8/16``: Run:ai Model Streamer's S3 backend at those concurrencies (16 is its
  default), pointed at the same endpoint (:func:`peers.runai_s3`).

The server's own caches are left as they are (nothing is evicted): on a loopback server the
object data sits in its page cache after the first run. Endpoint and credentials come from the
usual ``AWS_*`` variables or ``--s3-endpoint-url`` / ``--s3-region`` / ``--s3-profile``.
"""

from __future__ import annotations

import json
import logging
import os
import statistics
import subprocess
import sys
import time
from concurrent.futures import FIRST_EXCEPTION, ThreadPoolExecutor, wait
from pathlib import Path
from typing import Any, Sequence

from ..config import StreamerConfig
from . import peers
from .runner import Method, _Into, format_table, prepare_methods, round_order

log = logging.getLogger(__name__)

RANGE_BYTES = 16 << 20     # the ceiling's ranged GETs
RUNAI_CONCURRENCY = (1, 4, 8, 16)
RUNAI_DEFAULT = 16         # Run:ai's own default concurrency
_READ_STEP = 1 << 20
_COLUMN = "s3"             # the one "cache" column of the table
GOAL_VS_RUNAI_DEFAULT = 1.2
GOAL_VS_CEILING = 0.9
RSS_SLACK = 300 << 20      # interpreter, torch, boto3 and thread stacks on top of the model


def endpoint_of(config: StreamerConfig) -> str | None:
    """The endpoint every method uses: the config's, else boto3's environment variables."""
    return (config.s3_endpoint_url or os.environ.get("AWS_ENDPOINT_URL_S3")
            or os.environ.get("AWS_ENDPOINT_URL") or None)


# ------------------------------------------------------------------------------------------
# the ceiling: plain boto3 ranged GETs
# ------------------------------------------------------------------------------------------

class Boto3Ceiling:
    """Whole objects by ranged GETs from a pool of ``threads``; one client, made once (untimed)."""

    def __init__(self, uris: Sequence[str], sizes: Sequence[int], config: StreamerConfig, threads: int = 16):
        self.uris, self.sizes, self.config = list(uris), list(sizes), config
        self.threads = threads
        self._client = None
        self.buffers: list | None = None

    def client(self):
        if self._client is None:
            import boto3
            from botocore.config import Config

            cfg = self.config
            options: dict[str, Any] = {"max_pool_connections": max(16, self.threads) + 4,
                                       "connect_timeout": cfg.request_timeout, "read_timeout": cfg.request_timeout,
                                       "response_checksum_validation": "when_required",
                                       "request_checksum_calculation": "when_required"}
            if cfg.s3_addressing_style != "auto":
                options["s3"] = {"addressing_style": cfg.s3_addressing_style}
            session = boto3.session.Session(profile_name=cfg.s3_profile, region_name=cfg.s3_region)
            self._client = session.client("s3", endpoint_url=cfg.s3_endpoint_url, config=Config(**options))
        return self._client

    def prepare_into(self) -> None:
        """Allocate and touch the reused buffers once (the ``-into`` variants)."""
        self.client()
        if self.buffers is None:
            import torch

            self.buffers = [torch.empty(n, dtype=torch.uint8) for n in self.sizes]
            for b in self.buffers:
                b.fill_(1)

    def run(self, threads: int, into: bool) -> int:
        import torch

        buffers = self.buffers if into else [torch.empty(n, dtype=torch.uint8) for n in self.sizes]
        views = [memoryview(b.numpy()) for b in buffers]
        jobs = [(i, off, min(RANGE_BYTES, size - off))
                for i, size in enumerate(self.sizes) for off in range(0, size, RANGE_BYTES)]
        client = self.client()
        with ThreadPoolExecutor(max_workers=threads, thread_name_prefix="boto3-ceiling") as pool:
            futures = [pool.submit(self._get, client, i, off, n, views[i]) for i, off, n in jobs]
            done, pending = wait(futures, return_when=FIRST_EXCEPTION)
            for f in pending:
                f.cancel()
            for f in done:
                f.result()
        return peers.touch_all(buffers)

    def _get(self, client, i: int, offset: int, length: int, view: memoryview) -> None:
        from ..core.sources.s3 import parse_s3_uri

        bucket, key = parse_s3_uri(self.uris[i])
        resp = client.get_object(Bucket=bucket, Key=key, Range=f"bytes={offset}-{offset + length - 1}")
        body = resp["Body"]
        raw = getattr(body, "_raw_stream", None)
        fp = getattr(raw, "_fp", None)   # http.client response: readinto from the socket, no copy
        readinto = fp.readinto if fp is not None else body.readinto
        dest = view[offset:offset + length]
        got = 0
        while got < length:
            n = readinto(dest[got:got + _READ_STEP])
            if not n:
                raise OSError(f"{self.uris[i]}: connection closed after {got} of {length} bytes at {offset}")
            got += n
        if raw is not None and hasattr(raw, "release_conn"):
            raw.release_conn()
        else:
            body.close()


# ------------------------------------------------------------------------------------------
# methods
# ------------------------------------------------------------------------------------------

def _ours_fresh(uris: list[str], config: StreamerConfig) -> int:
    from ..streamer import load_file

    return peers.touch_all(load_file(uris, config=config))


def build_methods(uris: list[str], sizes: list[int], config: StreamerConfig) -> list[Method]:
    endpoint = endpoint_of(config)
    style = config.s3_addressing_style
    virtual = True if style == "virtual" else False if (style == "path" or endpoint) else None
    into = _Into(uris, config)
    ceiling = Boto3Ceiling(uris, sizes, config)
    methods = [
        Method("streamer", "ours", lambda: _ours_fresh(uris, config), note="load_file, fresh tensors"),
        Method("streamer-into", "ours-into", into.ours, prepare=into.setup_ours,
               note="into caller-allocated, touched tensors"),
        Method("boto3-16t", "ceiling", lambda: ceiling.run(16, False), prepare=ceiling.client,
               note="ranged GETs 16 MiB, 16 threads, fresh buffers"),
        Method("boto3-into-16t", "ceiling-into", lambda: ceiling.run(16, True), prepare=ceiling.prepare_into,
               note="ranged GETs 16 MiB, 16 threads, preallocated touched buffers"),
        Method("boto3-into-8t", "ceiling-into", lambda: ceiling.run(8, True), prepare=ceiling.prepare_into,
               note="ranged GETs 16 MiB, 8 threads, preallocated touched buffers"),
    ]
    for c in RUNAI_CONCURRENCY:
        methods.append(Method(
            f"runai-s3-c{c}", "peer",
            lambda c=c: peers.runai_s3(uris, c, endpoint, virtual_addressing=virtual, region=config.s3_region,
                                       profile=config.s3_profile),
            note="Run:ai default" if c == RUNAI_DEFAULT else ""))
    return methods


# ------------------------------------------------------------------------------------------
# peak RSS in a fresh process
# ------------------------------------------------------------------------------------------

_RSS_CODE = """\
import json, sys
from loader_plugins import StreamerConfig, load_file
from loader_plugins.bench import peers
from loader_plugins.core.checkpoint import open_checkpoint
import boto3, torch  # imported before the baseline: the load's own memory is what is measured
uris, cfg = json.loads(sys.argv[1]), StreamerConfig.from_dict(json.loads(sys.argv[2]))
model_bytes = open_checkpoint(uris, cfg).total_bytes
def hwm():
    for line in open('/proc/self/status'):
        if line.startswith('VmHWM:'):
            return int(line.split()[1]) * 1024
base = hwm()
open('/proc/self/clear_refs', 'w').write('5')  # reset the peak to the current RSS
tensors = load_file(uris, config=cfg)
peers.touch_all(tensors)
print(json.dumps({'model_bytes': model_bytes, 'peak_rss': hwm(), 'rss_before_load': base,
                  'tensors': len(tensors)}))
"""


def measure_rss(uris: list[str], config: StreamerConfig, timeout: float = 600) -> dict[str, Any]:
    """Peak RSS of a fresh process running ``load_file`` on the S3 checkpoint (VmHWM)."""
    proc = subprocess.run([sys.executable, "-c", _RSS_CODE, json.dumps(uris), json.dumps(config.to_dict())],
                          capture_output=True, text=True, timeout=timeout)
    if proc.returncode != 0:
        raise RuntimeError(f"RSS probe failed (exit {proc.returncode}): {proc.stderr.strip()[-800:]}")
    return json.loads(proc.stdout.strip().splitlines()[-1])


# ------------------------------------------------------------------------------------------
# the run
# ------------------------------------------------------------------------------------------

def _checkpoint(uri: str, config: StreamerConfig) -> tuple[list[str], list[int], int]:
    from ..core.checkpoint import open_checkpoint

    ckpt = open_checkpoint(uri, config)
    return list(ckpt.files), [h.file_size for h in ckpt.headers], ckpt.total_bytes


def run_s3_bench(args, config: StreamerConfig) -> int:
    uris, sizes, tensor_bytes = _checkpoint(args.path, config)
    total = sum(sizes)
    methods = build_methods(uris, sizes, config)
    from .runner import select_methods

    methods = select_methods(methods, args, short=None)   # its list is short already
    if not isinstance(methods, list):
        return methods
    print(f"checkpoint: {args.path} ({len(uris)} objects, {total / 1e9:.2f} GB) at {endpoint_of(config) or 'AWS'}; "
          f"concurrency={config.workers(remote=True)} range={config.s3_range_bytes >> 20}MiB; median of {args.repeat}; "
          f"server caches as they are", file=sys.stderr)
    results: dict[str, dict[str, Any]] = {}
    live = prepare_methods(methods, results)
    time_rounds(live, args, results, _COLUMN)
    rss = None
    if "streamer" in {m.name for m in methods}:
        try:
            rss = measure_rss(uris, config)
        except Exception as exc:  # noqa: BLE001
            rss = {"error": f"{type(exc).__name__}: {exc}"}
    print(format_table(results, [_COLUMN]))
    summary = summarize(results, config, rss)
    for line in summary["lines"]:
        print(line)
    if args.json:
        payload = {"checkpoint": args.path, "files": uris, "bytes": total, "tensor_bytes": tensor_bytes,
                   "endpoint": endpoint_of(config), "config": config.to_dict(redact=True), "repeat": args.repeat,
                   "results": results, "rss": rss, "summary": summary["values"]}
        text = json.dumps(payload, indent=2, default=str)
        if args.json == "-":
            print(text)
        else:
            Path(args.json).write_text(text)
    return 0


def time_rounds(live: list[Method], args, results: dict[str, dict[str, Any]], column: str) -> None:
    """Time each method ``args.repeat`` times (one untimed round first with ``--warmup``), the
    methods taking turns (a new order each round); a failed run is reported and the others go
    on. Fills ``results[name][column]`` (runs, median, GB/s) or ``results[name]["error"]``.
    Shared by the object-store benches (S3 here, GCS and Azure in :mod:`.cloud`)."""
    runs: dict[str, list[float]] = {m.name: [] for m in live}
    failures: dict[str, list[str]] = {m.name: [] for m in live}
    nbytes: dict[str, int] = {}
    rounds = args.repeat + (1 if args.warmup else 0)
    for rep in range(rounds):
        for method in round_order(live, rep):   # each method after another one every round
            t0 = time.perf_counter()
            try:
                n = method.run()
            except Exception as exc:  # noqa: BLE001 - a failed run is reported, the others go on
                failures[method.name].append(f"{type(exc).__name__}: {exc}")
                print(f"  run {rep + 1}: {method.name:<22} failed after {time.perf_counter() - t0:.1f} s: "
                      f"{failures[method.name][-1]}", file=sys.stderr, flush=True)
                continue
            seconds = time.perf_counter() - t0
            if args.warmup and rep == 0:
                continue
            runs[method.name].append(seconds)
            nbytes[method.name] = n
            print(f"  run {rep + 1 - bool(args.warmup)}: {method.name:<22} {n / seconds / 1e9:6.2f} GB/s",
                  file=sys.stderr, flush=True)
    for method in live:
        row = results[method.name]
        if failures[method.name]:
            row["failures"] = failures[method.name]
        if runs[method.name]:
            med = statistics.median(runs[method.name])
            n = nbytes[method.name]
            row[column] = {"seconds": runs[method.name], "median_s": med, "bytes": n, "gbps": n / med / 1e9}
            if failures[method.name]:
                row["note"] = (f"{row['note']}; " if row["note"] else "") + \
                    f"{len(failures[method.name])} run(s) failed: {failures[method.name][0][:120]}"
        else:
            row["error"] = f"every run failed: {failures[method.name][0][:200]}"


def _gbps(results: dict, name: str) -> float | None:
    cell = results.get(name, {}).get(_COLUMN)
    return cell["gbps"] if cell else None


def summarize(results: dict, config: StreamerConfig, rss: dict | None) -> dict:
    values: dict[str, Any] = {}
    lines: list[str] = []

    def best(group: str | None = None, prefix: str | None = None) -> tuple[float | None, str | None]:
        vals = [(_gbps(results, n), n) for n, row in results.items()
                if (group is None or row["group"] == group) and (prefix is None or n.startswith(prefix))
                and _gbps(results, n)]
        return max(vals) if vals else (None, None)

    def compare(key: str, ours_name: str, label: str, other: float | None, other_name: str | None,
                goal: float | None = None) -> None:
        ours = _gbps(results, ours_name)
        if not ours or not other:
            reason = results.get(other_name or "", {}).get("error") or "not measured"
            lines.append(f"{ours_name} vs {label}: - ({reason})")
            return
        ratio = ours / other
        values[key] = ratio
        verdict = "" if goal is None else f" (goal >= {goal:.1f}x: {'met' if ratio >= goal else 'NOT met'})"
        lines.append(f"{ours_name} {ours:.2f} GB/s = {ratio:.2f}x {label} ({other_name}, {other:.2f} GB/s){verdict}")

    default = f"runai-s3-c{RUNAI_DEFAULT}"
    compare("vs_runai_default", "streamer", "Run:ai at its default concurrency", _gbps(results, default), default,
            GOAL_VS_RUNAI_DEFAULT)
    compare("vs_runai_best", "streamer", "Run:ai at its best", *best(prefix="runai-s3"))
    # the ceiling goal is judged like for like: fresh memory against fresh memory, touched
    # buffers against touched buffers (fresh memory pays page faults the ceiling's reused
    # buffers do not); the cross comparison is printed too, without a goal
    g, n = best(group="ceiling-into")
    compare("vs_boto3_fresh", "streamer", "the boto3 ceiling (both into fresh buffers)", *best(group="ceiling"),
            GOAL_VS_CEILING)
    compare("into_vs_boto3_ceiling", "streamer-into", "the boto3 ceiling (both into touched buffers)", g, n,
            GOAL_VS_CEILING)
    compare("vs_boto3_ceiling", "streamer", "the boto3 ceiling into preallocated buffers (fresh vs touched)", g, n)
    if rss and "peak_rss" in rss:
        bound = rss["model_bytes"] + config.memory_limit + RSS_SLACK
        values["peak_rss"] = rss
        lines.append(f"peak RSS of load_file from S3 in a fresh process: {rss['peak_rss'] / 2**20:.0f} MiB "
                     f"(before the load {rss['rss_before_load'] / 2**20:.0f} MiB; model "
                     f"{rss['model_bytes'] / 2**20:.0f} MiB + memory_limit {config.memory_limit / 2**20:.0f} MiB + "
                     f"{RSS_SLACK >> 20} MiB = {bound / 2**20:.0f} MiB bound: "
                     f"{'within' if rss['peak_rss'] <= bound else 'OVER'})")
    elif rss:
        lines.append(f"peak RSS: not measured ({rss.get('error')})")
    return {"values": values, "lines": lines}
