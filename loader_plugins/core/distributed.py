"""Distributed loading: each of N ranks reads about 1/N of a checkpoint's bytes, then the ranks
exchange what they read with ``torch.distributed`` (gloo on CPU, NCCL on GPU), so that every
rank ends with every tensor it asked for while the storage serves each byte once.

The plan is pure (:func:`partition`): the wanted tensors are laid out back to back (each start
aligned to :data:`LAYOUT_ALIGN` bytes) in one flat buffer; the buffer is cut into windows and
each window into N equal parts, part ``r`` read by rank ``r``. A window is exchanged with one
``all_gather`` into the flat buffer while the next window is being read, so reading and
exchanging overlap and the per-rank staging stays at two window parts. The tensors returned are
views of the flat buffer (one allocation; freed when the last of them is dropped).

Every rank must call :func:`load_distributed` with the same checkpoint and the same ``names``
(checked: a mismatch is an error on every rank, not a hang).
"""

from __future__ import annotations

import bisect
import dataclasses
import hashlib
import logging
import time
from typing import TYPE_CHECKING, Any, Iterator, Mapping, Sequence

from ..errors import ConfigError, UsageError
from .header import TensorSpec

if TYPE_CHECKING:
    import torch

    from ..config import StreamerConfig

log = logging.getLogger(__name__)

#: byte alignment of each tensor in the flat buffer (a multiple of every itemsize; GPU friendly)
LAYOUT_ALIGN = 64


@dataclasses.dataclass(frozen=True)
class Piece:
    """Bytes ``[start, end)`` of tensor ``spec``, which sit at ``flat_offset`` of the flat buffer."""

    spec: TensorSpec
    start: int
    end: int
    flat_offset: int

    @property
    def length(self) -> int:
        return self.end - self.start


@dataclasses.dataclass(frozen=True)
class FlatPlan:
    """Where each tensor sits in the flat buffer and which rank reads which bytes of it."""

    world: int
    specs: tuple[TensorSpec, ...]          # in layout order
    offsets: tuple[int, ...]               # flat offset of each spec
    data_end: int                          # end of the last tensor
    windows: tuple[tuple[int, int], ...]   # (start, part): window bytes [start, start + world*part)

    @property
    def flat_bytes(self) -> int:
        if not self.windows:
            return 0
        start, part = self.windows[-1]
        return start + self.world * part

    @property
    def data_bytes(self) -> int:
        return sum(s.nbytes for s in self.specs)

    def rank_range(self, window: int, rank: int) -> tuple[int, int]:
        """Flat bytes rank ``rank`` reads in window ``window`` (clipped to the data)."""
        start, part = self.windows[window]
        return min(start + rank * part, self.data_end), min(start + (rank + 1) * part, self.data_end)

    def pieces(self, window: int, rank: int) -> Iterator[Piece]:
        """The tensor bytes inside :meth:`rank_range` (gaps between tensors are not read)."""
        lo, hi = self.rank_range(window, rank)
        if hi <= lo:
            return
        i = max(0, bisect.bisect_right(self.offsets, lo) - 1)
        while i < len(self.specs) and self.offsets[i] < hi:
            spec, off = self.specs[i], self.offsets[i]
            a, b = max(lo, off), min(hi, off + spec.nbytes)
            if b > a:
                yield Piece(spec, a - off, b - off, a)
            i += 1

    def rank_bytes(self, rank: int) -> int:
        return sum(p.length for w in range(len(self.windows)) for p in self.pieces(w, rank))


def partition(specs: Sequence[TensorSpec], world: int, window_bytes: int, *,
              align: int = LAYOUT_ALIGN) -> FlatPlan:
    """Lay ``specs`` out in a flat buffer (file order) and cut it into windows of N equal parts.

    Every window but the last holds ``window_bytes`` rounded up to a multiple of
    ``world * align``; the last is padded to a multiple of ``world``. Rank ``r`` reads part ``r``
    of every window, so the ranks' byte counts differ by less than one part per window.
    """
    if world < 1:
        raise ValueError("world must be at least 1")
    if window_bytes < 1:
        raise ValueError("window_bytes must be positive")
    ordered = tuple(sorted(specs, key=lambda s: (s.file, s.offset, s.name)))
    offsets: list[int] = []
    pos = 0
    for spec in ordered:
        pos = -(-pos // align) * align
        offsets.append(pos)
        pos += spec.nbytes
    data_end = pos
    step = world * align
    window = max(step, -(-window_bytes // step) * step)
    windows: list[tuple[int, int]] = []
    start = 0
    while start < data_end:
        size = min(window, data_end - start)
        windows.append((start, -(-size // world)))
        start += window
    return FlatPlan(world, ordered, tuple(offsets), data_end, tuple(windows))


def _fingerprint(specs: Sequence[TensorSpec]) -> str:
    h = hashlib.sha256()
    for s in sorted(specs, key=lambda s: s.name):
        h.update(f"{s.name}\0{s.dtype}\0{list(s.shape)}\0{s.nbytes}\n".encode())
    return h.hexdigest()


def load_distributed(path: Any, group: Any = None, *, config: "StreamerConfig | Mapping[str, Any] | None" = None,
                     names: Sequence[str] | None = None, device: "str | torch.device | None" = None,
                     window_bytes: int | None = None,
                     stats: dict[str, Any] | None = None) -> dict[str, "torch.Tensor"]:
    """Load a checkpoint on every rank of ``group``, each rank reading about 1/N of its bytes.

    ``path`` is anything :func:`loader_plugins.load_file` takes. ``names`` restricts the load
    to those tensors (the same list on every rank). ``device`` is where the result lives:
    ``"cpu"`` by default with gloo, the current CUDA device otherwise (NCCL exchanges device
    memory). ``window_bytes`` (default: ``config.memory_limit``) is how much of the flat buffer
    one ``all_gather`` moves. ``stats``, when given, receives ``bytes_read`` (bytes this rank
    read from storage), ``bytes_total``, ``windows``, ``read_seconds``, ``seconds``.
    """
    import torch
    import torch.distributed as dist

    from ..config import StreamerConfig
    from .checkpoint import open_checkpoint

    if not dist.is_available() or not dist.is_initialized():
        raise UsageError("load_distributed needs an initialised torch.distributed process group "
                            "(torch.distributed.init_process_group); use load_file for one process")
    if config is None:
        config = StreamerConfig()
    elif isinstance(config, Mapping):
        config = StreamerConfig.from_dict(config, where="option")
    world = dist.get_world_size(group)
    rank = dist.get_rank(group)
    backend = str(dist.get_backend(group)).lower()
    if device is None:
        device = "cpu" if backend == "gloo" else f"cuda:{torch.cuda.current_device()}"
    device = torch.device(device)
    if backend == "nccl" and device.type != "cuda":
        raise ConfigError(f"the process group uses NCCL, which exchanges CUDA memory, but device={device}; "
                            f"pass a CUDA device or use a gloo group")

    t0 = time.perf_counter()
    sources: dict = {}
    checkpoint = open_checkpoint(path, config, sources=sources)
    try:
        specs = list(checkpoint.tensors.values())
        if names is not None:
            wanted = list(dict.fromkeys(names))
            missing = sorted(set(wanted) - checkpoint.tensors.keys())
            if missing:
                raise UsageError(f"tensor(s) {missing[:5]} not found in {checkpoint.files}")
            specs = [checkpoint.tensors[n] for n in wanted]
        _check_same_everywhere(specs, group, rank)
        plan = partition(specs, world, window_bytes or config.memory_limit)
        result, read, read_s = _run(plan, rank, sources, config, group, backend, device)
    finally:
        for src in sources.values():
            src.close()
    seconds = time.perf_counter() - t0
    if stats is not None:
        stats.update({"bytes_read": read, "bytes_total": plan.data_bytes, "windows": len(plan.windows),
                      "read_seconds": read_s, "seconds": seconds, "rank": rank, "world": world})
    log.info("rank %d/%d: read %.3f GB of %.3f GB, %d tensors in %.2f s", rank, world, read / 1e9,
             plan.data_bytes / 1e9, len(result), seconds)
    return result


def _check_same_everywhere(specs: Sequence[TensorSpec], group: Any, rank: int) -> None:
    import torch.distributed as dist

    mine = _fingerprint(specs)
    every: list = [None] * dist.get_world_size(group)
    dist.all_gather_object(every, mine, group=group)
    if any(f != mine for f in every):
        others = sorted({i for i, f in enumerate(every) if f != mine})
        raise UsageError(f"rank {rank}: ranks {others} asked for different tensors or see a different "
                            f"checkpoint; every rank must pass the same path and names to load_distributed")


def _run(plan: FlatPlan, rank: int, sources: dict, config: "StreamerConfig", group: Any, backend: str,
         device: "torch.device") -> tuple[dict[str, "torch.Tensor"], int, float]:
    import torch
    import torch.distributed as dist

    from .reader import StreamReader

    on_cpu = device.type == "cpu"
    flat = torch.empty(plan.flat_bytes, dtype=torch.uint8, device=device)
    part_max = max((part for _, part in plan.windows), default=0)
    # two input parts: one is read while the other is being exchanged
    inputs = [torch.empty(part_max, dtype=torch.uint8, device=device) for _ in range(2)]
    hosts = inputs if on_cpu else [torch.empty(part_max, dtype=torch.uint8,
                                               pin_memory=torch.cuda.is_available()) for _ in range(2)]
    pending: list[Any] = [None, None]
    counted = [0]
    read_s = 0.0

    def count(n: int) -> None:
        counted[0] += n

    for w, (start, part) in enumerate(plan.windows):
        slot = w % 2
        if pending[slot] is not None:
            pending[slot].wait()
            pending[slot] = None
        lo, _ = plan.rank_range(w, rank)
        host = hosts[slot]
        pieces = list(plan.pieces(w, rank))
        if pieces:
            t = time.perf_counter()
            specs, dests = [], {}
            for p in pieces:
                spec = TensorSpec(f"{p.spec.name}@{p.start}", "U8", (p.length,), p.spec.file,
                                  p.spec.offset + p.start, p.length)
                specs.append(spec)
                dests[spec.name] = host[p.flat_offset - lo:p.flat_offset - lo + p.length]
            reader = StreamReader(specs, sources, config, destinations=dests, consumer_keeps_all=True,
                                  on_bytes=count)
            for _ in reader:
                pass
            read_s += time.perf_counter() - t
        inp = inputs[slot][:part]
        if not on_cpu:
            inp.copy_(host[:part])   # synchronous: the host part is refilled two windows later
        out = flat[start:start + plan.world * part]
        if backend == "gloo":
            pending[slot] = dist.all_gather(list(out.split(part)), inp, group=group, async_op=True)
        else:
            pending[slot] = dist.all_gather_into_tensor(out, inp, group=group, async_op=True)
    for work in pending:
        if work is not None:
            work.wait()

    result: dict[str, torch.Tensor] = {}
    for spec, off in zip(plan.specs, plan.offsets):
        result[spec.name] = flat[off:off + spec.nbytes].view(spec.torch_dtype()).reshape(spec.shape)
    return result, counted[0], read_s
