"""The C library through ctypes, loaded once, with the prototypes the core uses (Linux)."""

from __future__ import annotations

import ctypes
import ctypes.util
import mmap

_libc = None

#: madvise advice (Linux 5.14+; older kernels answer EINVAL and pages fault in on first write)
MADV_POPULATE_WRITE = 23
MADV_HUGEPAGE = getattr(mmap, "MADV_HUGEPAGE", 14)
HUGE_PAGE = 2 << 20


def libc():
    """The C library with madvise/mincore/mmap/munmap typed, or False where it cannot be loaded."""
    global _libc
    if _libc is None:
        try:
            lib = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6", use_errno=True)
            lib.madvise.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int]
            lib.mincore.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_char_p]
            lib.mmap.restype = ctypes.c_void_p
            lib.mmap.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int, ctypes.c_int, ctypes.c_int,
                                 ctypes.c_long]
            lib.munmap.argtypes = [ctypes.c_void_p, ctypes.c_size_t]
            _libc = lib
        except (OSError, AttributeError):
            _libc = False
    return _libc


def madvise_range(addr: int, nbytes: int, advice: int, granule: int) -> bool:
    """``madvise`` the whole ``granule``-aligned pages inside ``[addr, addr + nbytes)``;
    True when there were some and the kernel took the advice."""
    lib = libc()
    if not lib:
        return False
    start = -(-addr // granule) * granule
    end = (addr + nbytes) // granule * granule
    return end > start and lib.madvise(start, end - start, advice) == 0
