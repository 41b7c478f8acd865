"""Giving a swapped-out model's memory back (drop pages, resize storages) and taking it again."""

from __future__ import annotations

import logging
from typing import TYPE_CHECKING, Any, Sequence

from ..core._libc import madvise_range as _madvise
from ..core._libc import residency
from .common import MADV_DONTNEED as _MADV_DONTNEED
from .common import PAGE as _PAGE
from .common import (
    RELEASE_MODES,
    SwapError,
)
from .entries import StorageEntry

if TYPE_CHECKING:

    pass

log = logging.getLogger(__name__)


# ----------------------------------------------------------------------------------------------
# Releasing and re-materialising device memory
# ----------------------------------------------------------------------------------------------

def _drop_pages(address: int, nbytes: int) -> int:
    """MADV_DONTNEED on the whole pages inside [address, address+nbytes); bytes given back."""
    start = -(-address // _PAGE) * _PAGE
    end = (address + nbytes) // _PAGE * _PAGE
    if end <= start:
        return 0
    return end - start if _madvise(start, end - start, _MADV_DONTNEED, _PAGE) else 0


def resident_pages(address: int, nbytes: int) -> tuple[int, int]:
    """(bytes of the whole pages inside a CPU memory range, bytes of those resident in RAM), by ``mincore``."""
    start = -(-address // _PAGE) * _PAGE
    end = (address + nbytes) // _PAGE * _PAGE
    if end <= start:
        return 0, 0
    return end - start, sum(b & 1 for b in residency(start, end - start)) * _PAGE


def _resolve_release(release: str, entry: StorageEntry, storage) -> str:
    if release not in RELEASE_MODES:
        raise SwapError(f"release must be one of {', '.join(RELEASE_MODES)}, got {release!r}")
    if release == "auto":
        release = "pages" if entry.device == "cpu" else "resize"
    if release == "pages" and entry.device != "cpu":
        raise SwapError(f"release='pages' is for CPU memory; {entry.name!r} is on {entry.device} "
                        f"(use 'resize' or 'none')")
    if release == "resize" and not storage.resizable():
        # numpy / mmap'd / from_blob storages cannot be freed by torch; CPU ones can still drop pages
        return "pages" if entry.device == "cpu" else "none"
    return release


def _release(entries: Sequence[StorageEntry], storages: Sequence[Any], release: str, empty_cache: bool) -> int:
    freed = 0
    cuda_freed = False
    for entry, storage in zip(entries, storages):
        mode = _resolve_release(release, entry, storage)
        if mode == "pages":
            entry.released_bytes = _drop_pages(storage.data_ptr(), entry.nbytes)
            entry.release = "pages" if entry.released_bytes else "none"
        elif mode == "resize":
            storage.resize_(0)
            entry.release, entry.released_bytes = "resize", entry.nbytes
            cuda_freed |= entry.is_cuda
        else:
            entry.release, entry.released_bytes = "none", 0
        freed += entry.released_bytes
    if cuda_freed and empty_cache:
        import torch

        torch.cuda.empty_cache()  # hand the blocks back to the driver: another process can use them
    return freed


def _rematerialise(entry: StorageEntry, storage) -> None:
    current = storage.nbytes()
    if current == entry.nbytes:
        return
    if current == 0 and entry.release == "resize":
        storage.resize_(entry.nbytes)
        return
    raise SwapError(f"storage of {entry.name!r} on {entry.device} is now {current} bytes but the snapshot holds "
                    f"{entry.nbytes}: the model was changed after offload; restore into the model the snapshot "
                    f"was taken from")
