"""Load-time estimates: seconds = metadata time + bytes / bandwidth of the tier the checkpoint sits in.

Every whole load served by one tier (see :class:`~loader_plugins.cache.tiered.TieredStorage`),
and every engine load of local files (tier ``local``, recorded by the engine adapters), appends
``{host, tier, bytes, seconds}`` to a small JSON history file next to the cache
(``cache_dir/load-history.json``, else ``dram_cache_dir/...``, else
``$LOADER_PLUGINS_HISTORY_DIR/load-history.json``, by default
``~/.cache/loader-plugins/load-history.json``). An estimate locates each shard (DRAM, disk, the
object store: S3, GCS, Azure Blob, or a local file), and for each tier takes the median GB/s of this host's recent
loads of a similar size (within 4x), else of larger ones, else of smaller ones only where their GB/s
beats a conservative default (a small load's time is mostly per-load overhead), or that default
when the host has no history for the tier. The measured seconds of a load run from its first
object open (HEAD) to its last byte, so they include per-object overheads: loads of a similar
size predict each other best, which is why samples of a similar size are preferred. What comes
before the first open (creating the store's client, listing, reading the index) is not in any sample:
the estimate times those requests itself, since it has to make them anyway to locate the shards
(``metadata_seconds``; the client library's one-time import is kept out).

``estimate(uri, config)`` returns a dict for a scheduler::

    {"seconds": 2.93, "tier": "disk", "gbps": 1.15, "bytes": 3360000000, "basis": "history: median of ...",
     "metadata_seconds": 0.02, "transfer_seconds": 2.91, "files": 2, "host": "...", "uri": "...",
     "tiers": {"disk": {"bytes": ..., "gbps": ..., "seconds": ..., "basis": ..., "samples": 3}}}

``gbps`` is the bandwidth the prediction used (for a checkpoint spread over several tiers, their
combined transfer rate).
"""

from __future__ import annotations

import contextlib
import fcntl
import importlib
import json
import logging
import os
import socket
import statistics
import time
from pathlib import Path
from typing import TYPE_CHECKING

from ..core.sources.base import scheme_of
from .config import cache_config

if TYPE_CHECKING:
    from ..config import StreamerConfig

log = logging.getLogger(__name__)

HISTORY_NAME = "load-history.json"
#: GB/s assumed for a tier this host has never loaded from: deliberately low (a scheduler would
#: rather over-estimate), about half of what the reference 2-core VM measured
DEFAULT_GBPS = {"dram": 2.0, "disk": 0.8, "local": 0.8, "s3": 0.4, "gcs": 0.4, "azure": 0.4}
RECENT = 5          # samples in the median
KEEP = 50           # samples kept per (host, tier)
SIMILAR = 4.0       # a sample is "of a similar size" within this factor


def default_history_dir() -> Path:
    """Where loads are recorded when no cache directory is configured."""
    if os.environ.get("LOADER_PLUGINS_HISTORY_DIR"):
        return Path(os.environ["LOADER_PLUGINS_HISTORY_DIR"])
    base = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return Path(base) / "loader-plugins"


def history_path(config: "StreamerConfig") -> Path:
    section = cache_config(config)
    root = section.cache_dir or section.dram_cache_dir
    return Path(root) / HISTORY_NAME if root else default_history_dir() / HISTORY_NAME


class LoadHistory:
    """Recorded loads in one JSON file (written atomically under an flock)."""

    def __init__(self, path: str | os.PathLike):
        self.path = Path(path)

    def _read(self) -> list[dict]:
        try:
            data = json.loads(self.path.read_text())
        except (OSError, ValueError):
            return []
        loads = data.get("loads") if isinstance(data, dict) else None
        return [r for r in loads if isinstance(r, dict)] if isinstance(loads, list) else []

    @contextlib.contextmanager
    def _locked(self):
        self.path.parent.mkdir(parents=True, exist_ok=True)
        fd = os.open(str(self.path) + ".lock", os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o644)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX)
            yield
        finally:
            os.close(fd)

    def record(self, tier: str, nbytes: int, seconds: float, *, host: str | None = None) -> dict:
        if seconds <= 0 or nbytes <= 0:
            raise ValueError(f"a load sample needs positive bytes and seconds, got {nbytes}, {seconds}")
        sample = {"host": host or socket.gethostname(), "tier": tier, "bytes": int(nbytes),
                  "seconds": round(float(seconds), 6), "gbps": round(nbytes / seconds / 1e9, 4), "at": time.time()}
        with self._locked():
            loads = self._read() + [sample]
            same = [r for r in loads if (r.get("host"), r.get("tier")) == (sample["host"], tier)]
            if len(same) > KEEP:
                drop = {id(r) for r in same[:len(same) - KEEP]}
                loads = [r for r in loads if id(r) not in drop]
            tmp = self.path.with_name(f"{self.path.name}.{os.getpid()}.tmp")
            tmp.write_text(json.dumps({"version": 1, "loads": loads}))
            os.replace(tmp, self.path)
        return sample

    def samples(self, tier: str, *, host: str | None = None) -> list[dict]:
        host = host or socket.gethostname()
        return [r for r in self._read() if r.get("host") == host and r.get("tier") == tier
                and isinstance(r.get("bytes"), (int, float)) and isinstance(r.get("seconds"), (int, float))
                and r["bytes"] > 0 and r["seconds"] > 0]


def bandwidth(tier: str, nbytes: int, history: LoadHistory | None, *, host: str | None = None
              ) -> tuple[float, str, int]:
    """(GB/s, basis, samples used) for loading ``nbytes`` from ``tier`` on ``host``.

    Loads of a similar size predict best. Without them, larger loads are next (their GB/s is, if
    anything, a little high for a smaller load). Loads only much smaller than this one say little
    about bandwidth: their time is mostly per-load overhead (a 2 MB load in 50 ms is "0.04 GB/s"),
    so their GB/s is taken only where it beats the tier's conservative default."""
    samples = history.samples(tier, host=host) if history is not None else []
    default = DEFAULT_GBPS.get(tier, min(DEFAULT_GBPS.values()))
    if not samples:
        return default, f"default: no recorded {tier} loads on this host", 0
    similar = [r for r in samples if nbytes / SIMILAR <= r["bytes"] <= nbytes * SIMILAR] if nbytes else samples
    larger = [r for r in samples if r["bytes"] > nbytes]
    chosen, kind = (similar, "similar-size") if similar else (larger, "larger") if larger else (samples, "smaller")
    chosen = chosen[-RECENT:]
    gbps = statistics.median(r["bytes"] / r["seconds"] / 1e9 for r in chosen)
    basis = f"history: median of the last {len(chosen)} {kind} {tier} load(s) on this host"
    if kind == "smaller" and gbps < default:
        largest = max(r["bytes"] for r in chosen)
        return default, (f"default: this host's {tier} loads are all under 1/{SIMILAR:g} of this one (the largest "
                         f"{largest / 1e6:.1f} MB, {gbps:.3f} GB/s, mostly per-load overhead)"), 0
    return gbps, basis, len(chosen)


def predict(tiers: dict[str, int], history: LoadHistory | None, *, host: str | None = None,
            metadata_seconds: float = 0.0) -> dict:
    """Seconds to load ``tiers`` ({tier: bytes}) one after the other, with the basis per tier,
    plus ``metadata_seconds`` (listing, index, client set-up) that no bandwidth sample covers."""
    total = sum(tiers.values())
    transfer = 0.0
    detail: dict[str, dict] = {}
    for tier, nbytes in tiers.items():
        gbps, basis, n = bandwidth(tier, nbytes, history, host=host)
        t = nbytes / (gbps * 1e9) if nbytes else 0.0
        transfer += t
        detail[tier] = {"bytes": nbytes, "gbps": round(gbps, 4), "seconds": round(t, 6), "basis": basis,
                        "samples": n}
    if len(detail) == 1:
        tier = next(iter(detail))
        basis = detail[tier]["basis"]
        gbps_used = detail[tier]["gbps"]
    else:
        tier = "mixed" if detail else "none"
        basis = "; ".join(f"{t}: {d['basis']}" for t, d in detail.items())
        gbps_used = round(total / transfer / 1e9, 4) if transfer > 0 else None
    return {"seconds": round(metadata_seconds + transfer, 6), "tier": tier, "gbps": gbps_used, "bytes": total,
            "basis": basis, "metadata_seconds": round(metadata_seconds, 6), "transfer_seconds": round(transfer, 6),
            "tiers": detail}


def record_load(config: "StreamerConfig", tier: str, nbytes: int, seconds: float) -> dict | None:
    """Record one whole load in this host's history (see :func:`history_path`); a history that
    cannot be written is logged and skipped: it never fails a load."""
    if nbytes <= 0 or seconds <= 0:
        return None
    path = history_path(config)
    try:
        return LoadHistory(path).record(tier, nbytes, seconds)
    except OSError as exc:
        log.warning("could not record a %s load in %s (%s); estimates will not learn from it", tier, path, exc)
        return None


def locate(uri: str, config: "StreamerConfig") -> list[dict]:
    """Every shard of the checkpoint with its size and the fastest tier holding it: ``local`` for
    a local file, a cache tier that holds the object's current version, else the store itself
    (``s3``, ``gcs``, ``azure``: :mod:`.remotes`; another scheme's name for a storage the tiers do
    not serve)."""
    from ..core.checkpoint import expand
    from ..core.sources.base import storage_for
    from .disk import disk_tier
    from .dram import dram_tier
    from .remotes import remote_for

    files, _ = expand(uri, config)
    dram, disk = dram_tier(config), disk_tier(config)
    rows: list[dict] = []
    storages: dict[str, object] = {}
    try:
        for f in files:
            scheme = scheme_of(f)
            if scheme == "file":
                path = f[len("file://"):] if f.startswith("file://") else f
                rows.append({"uri": f, "bytes": os.path.getsize(path), "tier": "local"})
                continue
            storage = storages.get(scheme)
            if storage is None:
                storage = storages[scheme] = storage_for(f, config)
            src = getattr(storage, "remote", storage).open(f)   # HEAD only (a TieredStorage's remote: no locks)
            try:
                size = src.size()
                remote = remote_for(f)
                version = remote.version(src) if remote is not None else None
            finally:
                src.close()
            tier = remote.tier if remote is not None else scheme
            if version:
                bucket, key = remote.identity(f, config)
                if dram is not None and dram.contains(bucket, key, version, size):
                    tier = "dram"
                elif disk is not None and disk.contains(bucket, key, version, size):
                    tier = "disk"
            rows.append({"uri": f, "bytes": size, "tier": tier, "etag": version})
    finally:
        for storage in storages.values():
            storage.close()
    return rows


def estimate(uri: str, config: "StreamerConfig", *, history: LoadHistory | str | os.PathLike | None = None) -> dict:
    """Predict the load time of ``uri`` on this host: ``{seconds, tier, gbps, bytes, basis, ...}``."""
    if history is None:
        history = LoadHistory(history_path(config))
    elif not isinstance(history, LoadHistory):
        history = LoadHistory(history)
    from .remotes import remote_for

    remote = remote_for(str(uri))
    if remote is not None:
        with contextlib.suppress(ImportError):   # an engine has it imported already: keep it out of the timing
            importlib.import_module(remote.client_module)
    t0 = time.perf_counter()
    rows = locate(uri, config)
    metadata_seconds = time.perf_counter() - t0
    tiers: dict[str, int] = {}
    for row in rows:
        tiers[row["tier"]] = tiers.get(row["tier"], 0) + row["bytes"]
    out = predict(tiers, history, metadata_seconds=metadata_seconds)
    out.update({"uri": str(uri), "host": socket.gethostname(), "files": len(rows)})
    return out
