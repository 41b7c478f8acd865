"""The C library through ctypes, loaded once, with the prototypes the core uses (Linux)."""

from __future__ import annotations

import ctypes
import ctypes.util
import errno
import mmap
import os
import threading

_libc = None
_lock = threading.Lock()

#: madvise advice (Linux 5.14+; older kernels answer EINVAL and pages fault in on first write)
MADV_POPULATE_WRITE = 23
MADV_HUGEPAGE = getattr(mmap, "MADV_HUGEPAGE", 14)
MADV_NOHUGEPAGE = getattr(mmap, "MADV_NOHUGEPAGE", 15)
HUGE_PAGE = 2 << 20


def libc():
    """The C library with madvise/mincore/mmap/munmap/syscall typed, or False where it cannot
    be loaded.

    Loaded once under a lock: the first load's workers all ask at the same moment, and
    ``ctypes.util.find_library`` runs ``ldconfig -p`` in a subprocess each time it is called.
    """
    global _libc
    if _libc is not None:
        return _libc
    with _lock:
        if _libc is None:
            _libc = _load()
    return _libc


def _load():
    for name in ("libc.so.6", None):
        try:
            lib = ctypes.CDLL(name or ctypes.util.find_library("c") or "libc.so.6", use_errno=True)
            lib.madvise.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int]
            lib.mincore.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_char_p]
            lib.mmap.restype = ctypes.c_void_p
            lib.mmap.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int, ctypes.c_int, ctypes.c_int,
                                 ctypes.c_long]
            lib.munmap.argtypes = [ctypes.c_void_p, ctypes.c_size_t]
            lib.syscall.restype = ctypes.c_long
            lib.syscall.argtypes = [ctypes.c_long, ctypes.c_int, ctypes.c_void_p, ctypes.c_void_p, ctypes.c_uint]
            return lib
        except (OSError, AttributeError):
            continue
    return False


def madvise_range(addr: int, nbytes: int, advice: int, granule: int) -> bool:
    """``madvise`` the whole ``granule``-aligned pages inside ``[addr, addr + nbytes)``;
    True when there were some and the kernel took the advice."""
    lib = libc()
    if not lib:
        return False
    start = -(-addr // granule) * granule
    end = (addr + nbytes) // granule * granule
    return end > start and lib.madvise(start, end - start, advice) == 0


def residency(start: int, length: int) -> bytes:
    """``mincore`` of the page-aligned range ``[start, start + length)``: one byte per page, whose
    low bit says the page is resident (the other bits are reserved, zero). Raises OSError when
    the C library cannot be loaded or the call fails (e.g. ENOMEM: part of the range is unmapped)."""
    lib = libc()
    if not lib:
        raise OSError(errno.ENOSYS, "mincore: the C library cannot be loaded")
    vec = ctypes.create_string_buffer(length // mmap.PAGESIZE)
    if lib.mincore(start, length, vec) != 0:
        err = ctypes.get_errno()
        raise OSError(err, f"mincore({start:#x}, {length}): {os.strerror(err)}")
    return vec.raw


#: ``cachestat(2)`` (Linux 6.5+): one number on every architecture but alpha
_SYS_CACHESTAT = 451
_cachestat_missing = os.uname().sysname != "Linux" or os.uname().machine == "alpha"


class _CachestatRange(ctypes.Structure):
    _fields_ = [("off", ctypes.c_uint64), ("len", ctypes.c_uint64)]


class _Cachestat(ctypes.Structure):
    _fields_ = [(name, ctypes.c_uint64) for name in
                ("nr_cache", "nr_dirty", "nr_writeback", "nr_evicted", "nr_recently_evicted")]


def cached_pages(fd: int, offset: int, length: int) -> int | None:
    """How many of the pages that bytes ``[offset, offset + length)`` of ``fd`` span are in the
    page cache (``cachestat``), or None where the kernel has no ``cachestat`` (before 6.5).

    One walk of the file's page cache, folio by folio: far cheaper than ``mincore`` on a
    mapping of the file, one lookup per 4 KiB page (docs/measurements.md)."""
    global _cachestat_missing
    lib = libc()
    if _cachestat_missing or not lib or length <= 0:
        return None
    rng, stat = _CachestatRange(offset, length), _Cachestat()
    if lib.syscall(_SYS_CACHESTAT, fd, ctypes.byref(rng), ctypes.byref(stat), 0) != 0:
        if ctypes.get_errno() in (errno.ENOSYS, errno.EPERM):   # no such call, or a seccomp filter refuses it
            _cachestat_missing = True
        return None
    return stat.nr_cache
