"""``model-streamer cache serve``: the DRAM tier's janitor (see :mod:`.dram`).

It keeps the tier within its budget, preloads checkpoints (``--warm``), promotes recently used
disk-tier entries (``--promote``), reclaims leftovers of crashed writers and exposes Prometheus
metrics. It is not a data path: clients never talk to it, so a dead server never blocks a load.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import signal
import socket
import threading
import time
from pathlib import Path
from typing import TYPE_CHECKING, Callable, Sequence

from ..errors import ConfigError
from .config import cache_config
from . import metrics
from .disk import DiskTier
from .dram import SERVER_FILE, DramTier
from .warm import copy_entry, warm

if TYPE_CHECKING:
    from ..config import StreamerConfig

log = logging.getLogger(__name__)


def serve(config: "StreamerConfig", *, max_bytes: int = 0, warm_uris: Sequence[str] = (), promote: bool = False,
          interval: float = 2.0, metrics_port: int | None = None, clear_on_exit: bool = False,
          stop: threading.Event | None = None, on_ready: Callable[[dict], None] | None = None) -> int:
    """Run the DRAM tier's janitor until ``stop`` is set (or SIGTERM/SIGINT in the main thread)."""
    section = cache_config(config)
    if not section.dram_cache_dir:
        raise ConfigError("cache serve needs dram_cache_dir (--dram-cache-dir /dev/shm/loader-plugins)")
    dram = DramTier(section.dram_cache_dir)
    if max_bytes:
        dram.set_budget(max_bytes)
    disk = DiskTier(section.cache_dir, section.cache_max_bytes) if section.cache_dir else None
    stop = stop or threading.Event()
    if threading.current_thread() is threading.main_thread():
        for sig in (signal.SIGTERM, signal.SIGINT):
            signal.signal(sig, lambda *_: stop.set())
    if metrics_port:
        metrics.start_http_server(metrics_port)
    info = {"pid": os.getpid(), "host": socket.gethostname(), "started": time.time(), "max_bytes": dram.budget(),
            "promote": promote, "metrics_port": metrics_port, "cache_dir": section.cache_dir}
    server_file = Path(dram.root) / SERVER_FILE
    tmp = server_file.with_name(f"{SERVER_FILE}.{os.getpid()}.tmp")
    tmp.write_text(json.dumps(info))
    os.replace(tmp, server_file)
    log.info("cache server for %s (budget %s bytes, promote=%s) running as pid %d", dram.root,
             dram.budget() or "unlimited", promote, os.getpid())
    try:
        dram.sweep()
        for uri in warm_uris:
            if stop.is_set():
                break
            for row in warm(uri, config, tier="dram"):
                log.info("warm %s: %s", row["uri"], row["result"])
        last_scan = time.time()
        if on_ready is not None:
            on_ready(info)
        while not stop.is_set():
            if promote and disk is not None:
                scan_started = time.time()
                for entry in disk.entries():
                    if stop.is_set():
                        break
                    if entry["last_used"] < last_scan - interval:
                        continue
                    if dram.contains(entry["bucket"], entry["key"], entry["etag"], int(entry["size"])):
                        continue
                    try:
                        result = copy_entry(disk, dram, entry, config)
                    except OSError as exc:
                        log.warning("promoting %s to the DRAM tier failed: %s", entry.get("uri"), exc)
                        continue
                    log.info("promote %s: %s", entry.get("uri"), result)
                last_scan = scan_started
            dram.enforce_budget()
            dram.sweep()
            entries = dram.entries()
            metrics.usage("dram", dram.usage(), len(entries))
            if disk is not None:
                metrics.usage("disk", disk.usage(), len(disk.entries()))
            stop.wait(interval)
    finally:
        with contextlib.suppress(OSError):
            if json.loads(server_file.read_text()).get("pid") == os.getpid():
                server_file.unlink()
        if clear_on_exit:
            evicted, skipped = dram.clear()
            log.info("cleared the DRAM tier on exit: %d evicted, %d in use kept", evicted, skipped)
    return 0
