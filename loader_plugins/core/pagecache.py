"""Leave a checkpoint in the page cache after a load that read it past the cache
(``page_cache``, :class:`~loader_plugins.StreamerConfig`).

``direct_io="auto"`` reads what is not cached with O_DIRECT: the first start reads at the
device's speed, but nothing of the checkpoint is left in the page cache, so a restart on the
same machine reads the disk again where a buffered loader's restart copies from memory. Once a
load is done, :func:`keep` asks the kernel to read the files it bypassed back into the cache
(``posix_fadvise(POSIX_FADV_WILLNEED)`` on every uncached range). The kernel's readahead does
the reading: no bytes are copied into this process, and I/O already submitted completes even
if the process exits.

One ``WILLNEED`` call reads at most the device's largest request or the file's readahead
window (``force_page_cache_ra``); 16 MiB calls left half of a file uncached on the reference VM,
:data:`STEP` calls all of it (docs/measurements.md, "Page cache after a load").
"""

from __future__ import annotations

import atexit
import logging
import os
import threading
from typing import Iterable

from ._libc import cached_pages

log = logging.getLogger(__name__)

#: bytes asked for per ``posix_fadvise`` call (the kernel caps each call; see the module docstring)
STEP = 4 << 20
#: ``page_cache="auto"`` keeps a load's files when the bytes missing from the cache are at most
#: this fraction of ``MemAvailable`` once the load is done
AUTO_FRACTION = 0.5
#: seconds an exiting process waits for refills still submitting their reads
EXIT_WAIT = 5.0

_threads: list[threading.Thread] = []
_threads_lock = threading.Lock()


def mem_available() -> int | None:
    """``MemAvailable`` of /proc/meminfo in bytes, None where there is none."""
    try:
        with open("/proc/meminfo") as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except (OSError, ValueError, IndexError):
        pass
    return None


def uncached_bytes(path: str) -> int | None:
    """Bytes of ``path`` not in the page cache (4 KiB pages), None where the kernel cannot say."""
    try:
        fd = os.open(path, os.O_RDONLY | getattr(os, "O_CLOEXEC", 0))
    except OSError:
        return None
    try:
        size = os.fstat(fd).st_size
        if size == 0:
            return 0
        pages = cached_pages(fd, 0, size)
        return None if pages is None else max(0, size - pages * 4096)
    finally:
        os.close(fd)


def decide(paths: Iterable[str], mode: str) -> tuple[list[str], str]:
    """Which of ``paths`` to read back into the page cache under ``mode`` (``keep``, ``bypass``,
    ``auto``), and why, for the log and the load's stats."""
    paths = list(dict.fromkeys(paths))
    if mode == "bypass" or not paths:
        return [], "page_cache is bypass" if paths else "nothing was read past the page cache"
    missing = {p: uncached_bytes(p) for p in paths}
    wanted = [p for p, n in missing.items() if n is None or n > 0]
    if not wanted:
        return [], "already cached"
    if mode == "keep":
        return wanted, "page_cache is keep"
    known = sum(n for n in missing.values() if n)
    unknown = [p for p, n in missing.items() if n is None]
    for p in unknown:          # no cachestat: count the whole file
        try:
            known += os.path.getsize(p)
        except OSError:
            pass
    available = mem_available()
    if available is None or known > AUTO_FRACTION * available:
        return [], (f"page_cache is auto and {known / 1e9:.2f} GB missing from the page cache is more than "
                    f"{AUTO_FRACTION:.0%} of the {0 if available is None else available / 1e9:.2f} GB available")
    return wanted, f"page_cache is auto and {known / 1e9:.2f} GB fits in {available / 1e9:.2f} GB available"


def _refill(paths: list[str]) -> None:
    for path in paths:
        try:
            fd = os.open(path, os.O_RDONLY | getattr(os, "O_CLOEXEC", 0))
        except OSError as exc:
            log.debug("page cache refill of %s skipped: %s", path, exc)
            continue
        try:
            size = os.fstat(fd).st_size
            for offset in range(0, size, STEP):
                os.posix_fadvise(fd, offset, min(STEP, size - offset), os.POSIX_FADV_WILLNEED)
        except OSError as exc:
            log.debug("page cache refill of %s stopped: %s", path, exc)
        finally:
            os.close(fd)


def keep(paths: Iterable[str], mode: str) -> tuple[threading.Thread | None, str]:
    """Start reading ``paths`` (files a load read past the page cache) back into the cache on a
    background thread, as ``mode`` decides (:func:`decide`). Returns the thread (None when
    nothing is refilled) and the reason."""
    wanted, why = decide(paths, mode)
    if not wanted or not hasattr(os, "posix_fadvise"):
        log.debug("page cache not refilled: %s", why)
        return None, why
    thread = threading.Thread(target=_refill, args=(wanted,), name="streamer-page-cache", daemon=True)
    with _threads_lock:
        _threads[:] = [t for t in _threads if t.is_alive()]
        _threads.append(thread)
    thread.start()
    log.debug("page cache refill of %d file(s) started: %s", len(wanted), why)
    return thread, why


@atexit.register
def _wait_at_exit() -> None:
    """A process that exits right after a load lets its refills submit their reads (bounded)."""
    with _threads_lock:
        threads = list(_threads)
    for t in threads:
        t.join(EXIT_WAIT / max(1, len(threads)))
