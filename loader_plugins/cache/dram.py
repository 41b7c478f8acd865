"""The shared-memory tier: complete objects as files in ``/dev/shm`` (tmpfs), read at memory speed.

The layout and the locking are the disk tier's (:mod:`loader_plugins.cache.disk`): manifest
written last, readers hold a shared ``flock`` on the data file, eviction takes an exclusive one
without waiting and skips what is being read. An evicted file someone still reads stays
readable until they close it (tmpfs frees the pages then), so memory is never pulled from
under a reader. Readers use ``preadv`` on the tmpfs file, a kernel memcpy that releases the GIL
and needs no page-table setup for the source (far faster than filling fresh tensor memory
costs: docs/measurements.md).

``model-streamer cache serve`` (:func:`loader_plugins.cache.dram_server.serve`) keeps the tier within its budget, preloads
checkpoints (``--warm``), promotes recently used disk-tier entries (``--promote``), reclaims
leftovers of crashed writers and exposes Prometheus metrics. It is a janitor, not a data path:
clients never talk to it, so a dead server never blocks a load. ``cache warm`` fills the tier
from the fastest tier holding each shard, with or without a server.
"""

from __future__ import annotations

import json
import logging
import os
import socket
from typing import TYPE_CHECKING

from .disk import EntryStore
from .config import cache_config

if TYPE_CHECKING:
    from ..config import StreamerConfig

log = logging.getLogger(__name__)

SERVER_FILE = "server.json"
BUDGET_FILE = "budget.json"
_MEMORY_FS = ("tmpfs", "ramfs", "hugetlbfs")
_warned: set[str] = set()


class DramTier(EntryStore):
    """Entries in shared memory. The budget is ``max_bytes`` when given, else the one recorded
    in ``ROOT/budget.json`` by ``cache serve --max-bytes`` (0 = unlimited)."""

    durable = False
    tier = "dram"

    def __init__(self, root: str | os.PathLike, max_bytes: int = 0):
        super().__init__(root, max_bytes)
        fs, options = mount_of(self.root)
        if str(self.root) not in _warned:
            _warned.add(str(self.root))
            if fs is not None and fs not in _MEMORY_FS:
                log.warning("the DRAM cache directory %s is on %s, not tmpfs: it will run at disk speed; use a "
                            "directory under /dev/shm", self.root, fs)
            elif fs == "tmpfs" and not _huge_tmpfs(options):
                log.info("the DRAM cache directory %s is on a tmpfs without huge pages: reads copy 4 KiB pages "
                         "(measured 6-8 GB/s vs 12-17 GB/s on a tmpfs mounted with -o huge=within_size)", self.root)

    def budget(self) -> int:
        if self.max_bytes:
            return self.max_bytes
        try:
            with open(self.root / BUDGET_FILE) as f:
                return max(0, int(json.load(f).get("max_bytes", 0)))
        except (OSError, ValueError, TypeError, AttributeError):
            return 0

    def set_budget(self, max_bytes: int) -> None:
        tmp = self.root / f"{BUDGET_FILE}.{os.getpid()}.tmp"
        tmp.write_text(json.dumps({"max_bytes": int(max_bytes)}))
        os.replace(tmp, self.root / BUDGET_FILE)

    def server_info(self) -> dict | None:
        """The running server's ``server.json`` (pid, host, budget...), or None when none runs."""
        try:
            info = json.loads((self.root / SERVER_FILE).read_text())
        except (OSError, ValueError):
            return None
        if info.get("host") == socket.gethostname():
            try:
                os.kill(int(info["pid"]), 0)
            except (ProcessLookupError, ValueError, KeyError, TypeError):
                return None
            except PermissionError:
                pass
        return info

    def status(self) -> dict:
        out = super().status()
        out["server"] = self.server_info()
        return out


def mount_of(path: str | os.PathLike) -> tuple[str | None, str]:
    """(file system type, mount options) of ``path`` from /proc/self/mounts (longest mount prefix)."""
    try:
        real = os.path.realpath(path)
        best, fstype, options = "", None, ""
        with open("/proc/self/mounts") as f:
            for line in f:
                parts = line.split()
                if len(parts) < 4:
                    continue
                mnt = parts[1].replace("\\040", " ")
                if (real == mnt or real.startswith(mnt.rstrip("/") + "/")) and len(mnt) >= len(best):
                    best, fstype, options = mnt, parts[2], parts[3]
        return fstype, options
    except OSError:
        return None, ""


def filesystem_type(path: str | os.PathLike) -> str | None:
    return mount_of(path)[0]


def _huge_tmpfs(options: str) -> bool:
    """Whether a tmpfs with these mount options allocates huge pages (or the host forces them)."""
    huge = next((o.split("=", 1)[1] for o in options.split(",") if o.startswith("huge=")), "never")
    if huge in ("always", "within_size"):   # "advise" needs madvise on a mapping; the tier writes with pwrite
        return True
    try:
        with open("/sys/kernel/mm/transparent_hugepage/shmem_enabled") as f:
            return "[force]" in f.read()
    except OSError:
        return False


def dram_tier(config: "StreamerConfig") -> DramTier | None:
    """The DRAM tier ``config`` names (None without ``dram_cache_dir``)."""
    section = cache_config(config)
    return DramTier(section.dram_cache_dir) if section.dram_cache_dir else None
