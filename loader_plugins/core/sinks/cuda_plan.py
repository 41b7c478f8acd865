"""Pure planning for the CUDA sink: the dtypes and kernels the device converts with, the kernel
sources in ``native/``, and which device operations one chunk needs (:func:`plan_chunk`,
:func:`column_rects`, :func:`ring_geometry`). No CUDA here: it all runs on a CPU-only machine."""

from __future__ import annotations

import dataclasses
import logging
import re
from pathlib import Path
from typing import TYPE_CHECKING, Union

from ...errors import InternalError
from ..tp import ColumnBlock

if TYPE_CHECKING:

    pass

log = logging.getLogger(__name__)

# safetensors dtype -> the name the kernels in native/convert.cu use
NATIVE_DTYPES = {
    "BF16": "bf16",
    "F16": "f16",
    "F32": "f32",
    "F8_E4M3": "e4m3fn",
    "F8_E5M2": "e5m2",
    "F8_E4M3FNUZ": "e4m3fnuz",
    "F8_E5M2FNUZ": "e5m2fnuz",
}
_CONVERT_TARGETS = ("bf16", "f16", "f32")
CONVERT_FILE = "convert.cu"
STRIDED_FILE = "strided_copy.cu"

#: narrower rows than this (bytes) are cut by the strided kernel on the device instead of a
#: cudaMemcpy2DAsync straight from host memory (the DMA engine moves narrow rows slowly)
MIN_2D_WIDTH = 512


def convert_kernel(src_dtype: str, dst_dtype: str) -> str | None:
    """Name of the kernel converting safetensors dtype ``src_dtype`` to ``dst_dtype`` (None: none)."""
    src, dst = NATIVE_DTYPES.get(src_dtype), NATIVE_DTYPES.get(dst_dtype)
    if src is None or dst not in _CONVERT_TARGETS or src == dst:
        return None
    return f"lp_convert_{src}_to_{dst}"


def convert_kernels() -> list[str]:
    """Every conversion kernel native/convert.cu defines."""
    return sorted({k for s in NATIVE_DTYPES for d in NATIVE_DTYPES if (k := convert_kernel(s, d))})


# ------------------------------------------------------------------------------------------
# kernel sources
# ------------------------------------------------------------------------------------------

def native_dir() -> Path:
    """The directory holding the CUDA C sources: ``native/`` of a source checkout, else the
    copy installed with the package (``loader_plugins/_native``)."""
    package = Path(__file__).resolve().parents[2]
    candidates = [package.parent / "native", package / "_native"]
    for path in candidates:
        if (path / CONVERT_FILE).is_file():
            return path
    raise InternalError(f"the CUDA kernel sources ({CONVERT_FILE}, {STRIDED_FILE}) are not in "
                        f"{' or '.join(map(str, candidates))}; reinstall loader-plugins")


_INCLUDE = re.compile(r'^[ \t]*#[ \t]*include[ \t]+"([^"]+)"[ \t]*$', re.MULTILINE)


def kernel_source(name: str) -> str:
    """The source of ``native/<name>`` with its local ``#include "..."`` files pasted in (NVRTC
    compiles one string and has no include path to the package)."""
    directory = native_dir()

    def paste(match: re.Match) -> str:
        included = directory / match.group(1)
        if included.parent != directory or not included.is_file():
            raise InternalError(f"{name}: #include \"{match.group(1)}\" is not a file in {directory}")
        return f"// ---- {match.group(1)} ----\n{included.read_text()}\n// ---- end {match.group(1)} ----"

    return _INCLUDE.sub(paste, (directory / name).read_text())


# ------------------------------------------------------------------------------------------
# pure planning: which device operations one chunk needs
# ------------------------------------------------------------------------------------------

HOST, STAGE, COMPACT, DEST = "host", "stage", "compact", "dest"
"""Buffers an operation names: the chunk in its pinned slot, two device staging buffers of the
slot's size, and the destination tensor."""


@dataclasses.dataclass(frozen=True)
class Copy:
    """cudaMemcpyAsync of ``nbytes`` (host to device, or device to device)."""

    src: str
    src_offset: int
    dst: str
    dst_offset: int
    nbytes: int


@dataclasses.dataclass(frozen=True)
class Copy2D:
    """cudaMemcpy2DAsync: ``height`` rows of ``width`` bytes at the given pitches."""

    src: str
    src_offset: int
    src_pitch: int
    dst: str
    dst_offset: int
    dst_pitch: int
    width: int
    height: int


@dataclasses.dataclass(frozen=True)
class StridedCopy:
    """The lp_strided_copy_<itemsize> kernel; ``cols`` and pitches in elements."""

    src: str
    src_offset: int
    dst: str
    dst_offset: int
    itemsize: int
    rows: int
    cols: int
    in_pitch: int
    out_pitch: int


@dataclasses.dataclass(frozen=True)
class Convert:
    """A conversion kernel over ``count`` elements."""

    kernel: str
    src: str
    src_offset: int
    dst: str
    dst_offset: int
    count: int


Op = Union[Copy, Copy2D, StridedCopy, Convert]


@dataclasses.dataclass(frozen=True)
class Rect:
    """Part of a chunk inside a column block: ``height`` rows of ``width`` bytes starting at
    ``src_offset`` of the chunk (rows ``pitch`` apart), landing at ``dst_offset`` of the shard."""

    src_offset: int
    dst_offset: int
    width: int
    height: int


def column_rects(offset: int, nbytes: int, block: ColumnBlock) -> list[Rect]:
    """Cut the chunk holding tensor bytes ``[offset, offset + nbytes)`` into at most three
    rectangles inside ``block`` (a partial first row, whole rows, a partial last row).

    Together they fill one contiguous byte range of the (contiguous) shard, in order.
    """
    if nbytes <= 0 or block.width == 0 or block.rows == 0:
        return []
    end = offset + nbytes
    pitch = block.row_bytes

    def segment(row: int) -> tuple[int, int] | None:
        lo = max(row * pitch + block.start, offset)
        hi = min(row * pitch + block.start + block.width, end)
        return (lo, hi) if hi > lo else None

    def rect(lo: int, width: int, row: int, height: int) -> Rect:
        return Rect(lo - offset, row * block.width + (lo - row * pitch - block.start), width, height)

    first, last = offset // pitch, min((end - 1) // pitch, block.rows - 1)
    if first > last:
        return []
    if first == last:
        seg = segment(first)
        return [rect(seg[0], seg[1] - seg[0], first, 1)] if seg else []
    rects: list[Rect] = []
    full_lo, full_hi = first + 1, last          # rows [full_lo, full_hi) are whole inside the chunk
    head, tail = segment(first), segment(last)
    if head and head[1] - head[0] == block.width:
        full_lo, head = first, None
    if tail and tail[1] - tail[0] == block.width:
        full_hi, tail = last + 1, None
    if head:
        rects.append(rect(head[0], head[1] - head[0], first, 1))
    if full_hi > full_lo:
        rects.append(rect(full_lo * pitch + block.start, block.width, full_lo, full_hi - full_lo))
    if tail:
        rects.append(rect(tail[0], tail[1] - tail[0], last, 1))
    return rects


def plan_chunk(offset: int, nbytes: int, src_itemsize: int, dst_itemsize: int, kernel: str | None,
               block: ColumnBlock | None = None, *, min_2d_width: int = MIN_2D_WIDTH) -> list[Op]:
    """The device operations that move one chunk (tensor bytes ``[offset, offset + nbytes)`` of
    the checkpoint dtype, in the pinned slot) into the destination.

    ``kernel`` converts to the destination dtype (None: same dtype); ``block`` selects a
    tensor-parallel shard (None: the destination is the whole tensor). Destination offsets are
    in the destination's bytes.
    """
    if offset % src_itemsize or nbytes % src_itemsize:
        raise ValueError(f"chunk [{offset}, {offset + nbytes}) is not aligned to the {src_itemsize}-byte element")
    if kernel is None and dst_itemsize != src_itemsize:
        raise ValueError("a dtype change needs a conversion kernel")

    def scale(n: int) -> int:
        return n // src_itemsize * dst_itemsize

    if nbytes == 0:
        return []
    if block is None:
        if kernel is None:
            return [Copy(HOST, 0, DEST, offset, nbytes)]
        return [Copy(HOST, 0, STAGE, 0, nbytes), Convert(kernel, STAGE, 0, DEST, scale(offset), nbytes // src_itemsize)]
    if block.row_bytes % src_itemsize or block.start % src_itemsize or block.width % src_itemsize:
        raise ValueError(f"{block} is not aligned to the {src_itemsize}-byte element")
    if block.contiguous:   # a dim-0 shard: a linear copy of the part of the chunk inside it
        lo, hi = block.byte_range()
        a, b = max(offset, lo), min(offset + nbytes, hi)
        if b <= a:
            return []
        if kernel is None:
            return [Copy(HOST, a - offset, DEST, a - lo, b - a)]
        return [Copy(HOST, a - offset, STAGE, 0, b - a),
                Convert(kernel, STAGE, 0, DEST, scale(a - lo), (b - a) // src_itemsize)]
    rects = column_rects(offset, nbytes, block)
    if not rects:
        return []
    if kernel is None and block.width >= min_2d_width:
        return [Copy2D(HOST, r.src_offset, block.row_bytes, DEST, r.dst_offset, block.width, r.width, r.height)
                for r in rects]
    # one linear host-to-device copy of the span the rectangles cover, then cut on the device
    span_lo = rects[0].src_offset
    last = rects[-1]
    span_hi = last.src_offset + (last.height - 1) * block.row_bytes + last.width
    ops: list[Op] = [Copy(HOST, span_lo, STAGE, 0, span_hi - span_lo)]
    out_lo = rects[0].dst_offset
    target, base = (DEST, 0) if kernel is None else (COMPACT, out_lo)
    for r in rects:
        ops.append(StridedCopy(STAGE, r.src_offset - span_lo, target, r.dst_offset - base, src_itemsize, r.height,
                               r.width // src_itemsize, block.row_bytes // src_itemsize,
                               block.width // src_itemsize))
    if kernel is not None:
        total = sum(r.width * r.height for r in rects)
        ops.append(Convert(kernel, COMPACT, 0, DEST, scale(out_lo), total // src_itemsize))
    return ops


def ring_geometry(memory_limit: int, chunk_bytes: int, alignment: int, concurrency: int,
                  streams: int = 2) -> tuple[int, int]:
    """``(count, capacity)`` of the pinned ring: buffers of ``chunk_bytes`` (plus ``2 * alignment``
    so O_DIRECT can read in place), as many as ``memory_limit`` holds, at most two per reader
    thread (one being read while the previous one's copy is in flight) plus two per stream, and
    at least two (smaller ones when the limit is tight)."""
    per = chunk_bytes + 2 * alignment
    count = min(memory_limit // per, 2 * concurrency + 2 * streams)
    if count >= 2:
        return count, chunk_bytes
    capacity = max(alignment, (memory_limit // 2 - 2 * alignment) // alignment * alignment)
    return 2, min(capacity, chunk_bytes)

